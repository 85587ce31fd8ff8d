"""The seeded random draws of the PoC search on the host, bit-identical to the network's reference.

Every generator is numpy's PCG64 seeded from SHA-256 digests of a seed string (docs/algorithm.md §1).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import ml_dtypes
import numpy as np

from .params import Params

NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def seed_entropy(seed: str, n_digests: int) -> np.ndarray:
    """The uint32 words of SHA-256(f"{seed}_{i}") for i < n_digests, little-endian, concatenated."""
    digests = b"".join(hashlib.sha256(f"{seed}_{i}".encode()).digest() for i in range(n_digests))
    return np.frombuffer(digests, dtype="<u4")


def rng(seed: str, n_digests: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed_entropy(seed, n_digests))))


def input_seed(block_hash: str, public_key: str, nonce: int) -> str:
    return f"{block_hash}_{public_key}_nonce{nonce}"


def permutation_seed(block_hash: str, public_key: str, nonce: int) -> str:
    return f"{block_hash}_{public_key}_nonce_{nonce}_permutations"


def input_generator(block_hash: str, public_key: str, nonce: int) -> np.random.Generator:
    return rng(input_seed(block_hash, public_key, nonce), 4)


def cast_input(x: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """A float64 draw in the model dtype as the reference casts it (docs/algorithm.md §5): `torch.tensor(x,
    dtype=...)` rounds to float32 first, then to float16 or bfloat16 (two roundings, both to nearest
    even). A direct float64 cast differs for about one element in 16k."""
    if out is None:
        out = np.empty(x.shape, dtype=NUMPY_DTYPES[dtype])
    out[...] = x if dtype == "float32" else x.astype(np.float32)
    return out


# Values of the (seq_len, dim) input drawn per call: bounds the float64 scratch per thread.
_DRAW_CHUNK = 1 << 16


def draw_input(
    block_hash: str, public_key: str, nonce: int, params: Params, dtype: str, out: np.ndarray | None = None
) -> np.ndarray:
    """One nonce's (seq_len, dim) input in the model dtype.

    numpy fills standard normals strictly in order, so drawing the stream in chunks gives the same
    values as one (1, seq_len, dim) call while the float64 scratch stays small.
    """
    n = params.seq_len * params.dim
    if out is None:
        out = np.empty((params.seq_len, params.dim), dtype=NUMPY_DTYPES[dtype])
    flat = out.reshape(-1)
    g = input_generator(block_hash, public_key, nonce)
    scratch = np.empty(min(n, _DRAW_CHUNK), dtype=np.float64)
    for start in range(0, n, _DRAW_CHUNK):
        chunk = scratch[: min(_DRAW_CHUNK, n - start)]
        g.standard_normal(out=chunk)
        cast_input(chunk, dtype, out=flat[start : start + chunk.size])
    return out


def draw_input_f64(block_hash: str, public_key: str, nonce: int, params: Params) -> np.ndarray:
    """The reference's own float64 draw, shape (1, seq_len, dim); for tests and validation only."""
    return input_generator(block_hash, public_key, nonce).standard_normal((1, params.seq_len, params.dim))


def draw_permutation(block_hash: str, public_key: str, nonce: int, vocab_size: int) -> np.ndarray:
    return rng(permutation_seed(block_hash, public_key, nonce), 1).permutation(vocab_size)


def draw_target(block_hash: str, vocab_size: int) -> np.ndarray:
    """The unit target vector of a block hash (float64)."""
    y = rng(f"{block_hash}_target", 1).standard_normal((1, vocab_size))
    # The row norm (a sum of squares), not the 1-D norm (a dot product): the last bits differ.
    return (y / np.linalg.norm(y, axis=1, keepdims=True))[0]


def draw_pool(block_hash: str, pool_size: int) -> np.ndarray:
    """The weight pool as float32: normal(0, 0.02) in float64, cast to float32 (docs/algorithm.md §3)."""
    g = rng(block_hash, 4)
    pool = np.empty(pool_size, dtype=np.float32)
    scratch = np.empty(min(pool_size, 1 << 22), dtype=np.float64)
    for start in range(0, pool_size, scratch.size):
        chunk = scratch[: min(scratch.size, pool_size - start)]
        g.standard_normal(out=chunk)
        # Generator.normal(loc, scale) is loc + scale * standard_normal, in float64.
        np.multiply(chunk, 0.02, out=chunk)
        np.add(chunk, 0.0, out=chunk)
        pool[start : start + chunk.size] = chunk
    return pool


def parameter_offset(block_hash: str, name: str) -> int:
    """k of docs/algorithm.md §3: the first 8 hex digits of SHA-256(f"{block_hash}_{name}")."""
    return int(hashlib.sha256(f"{block_hash}_{name}".encode()).hexdigest()[:8], 16)


class HostDrawer:
    """Draws batches of inputs and permutations with a thread pool (numpy releases the GIL)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or max(1, min(32, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="draw")
        self._closed = threading.Event()

    def inputs(
        self, block_hash: str, public_key: str, nonces: Sequence[int], params: Params, dtype: str
    ) -> np.ndarray:
        out = np.empty((len(nonces), params.seq_len, params.dim), dtype=NUMPY_DTYPES[dtype])
        list(self._pool.map(lambda i: draw_input(block_hash, public_key, nonces[i], params, dtype, out[i]),
                            range(len(nonces))))
        return out

    def permutations(self, block_hash: str, public_key: str, nonces: Sequence[int], vocab_size: int) -> np.ndarray:
        out = np.empty((len(nonces), vocab_size), dtype=np.int32)

        def one(i):
            out[i] = draw_permutation(block_hash, public_key, nonces[i], vocab_size)

        list(self._pool.map(one, range(len(nonces))))
        return out

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

"""Model pieces that the reference vectors do not reach on a CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import weights
from jaxbench.model import Attention, flash_attention, forward_fn
from jaxbench.params import Params
from jaxbench.weights import WeightLayout


@pytest.mark.parametrize("head_dim, n_heads, n_kv_heads", [(28, 4, 4), (16, 4, 2), (12, 6, 2)])
def test_padded_fused_attention_equals_the_step_by_step_path(head_dim, n_heads, n_kv_heads):
    """The padding to a multiple of 8 and the GQA head mapping of the fused path, checked through
    XLA's implementation of the same call (cuDNN itself needs a GPU)."""
    p = Params(dim=head_dim * n_heads, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=32, seq_len=9)
    gen = np.random.default_rng(0)
    d, kv = p.dim, n_kv_heads * head_dim
    w = [jnp.asarray(gen.standard_normal(s, np.float32) * 0.2) for s in [(d, d), (d, kv), (d, kv), (d, d)]]
    x = jnp.asarray(gen.standard_normal((2, p.seq_len, d), np.float32))
    cos, sin = jnp.ones((p.seq_len, head_dim // 2)), jnp.zeros((p.seq_len, head_dim // 2))

    @jax.jit
    def step_by_step(w, x):
        return Attention(dict(zip(("wq", "wk", "wv", "wo"), w)), p, "xla")(x, cos, sin, last_only=False)

    @jax.jit
    def fused(w, x):
        q = (x @ w[0]).reshape(2, p.seq_len, n_heads, head_dim)
        k = (x @ w[1]).reshape(2, p.seq_len, n_kv_heads, head_dim)
        v = (x @ w[2]).reshape(2, p.seq_len, n_kv_heads, head_dim)
        return flash_attention(q, k, v, implementation="xla").reshape(2, p.seq_len, d) @ w[3]

    np.testing.assert_allclose(np.asarray(fused(w, x)), np.asarray(step_by_step(w, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_the_interleaved_ffn_layout_computes_the_reference_layouts_logits(block, n_kv_heads):
    p = Params(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=96, multiple_of=128, seq_len=6)
    layout = WeightLayout(gate_up_block=block)
    pool = weights.pool_on_device("layouts", p, "float32")
    reference = weights.build_weights(pool, p, "layouts")
    fused = weights.build_weights(pool, p, "layouts", layout)
    x = jax.random.normal(jax.random.key(1), (3, p.seq_len, p.dim), jnp.float32)
    expected = jax.jit(forward_fn(p, "float32"))(reference, x)
    got = jax.jit(forward_fn(p, "float32", layout=layout))(fused, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    h = p.hidden_dim

    def every_layer(tree, key):  # the stacked full-sequence blocks, then the last block
        return np.concatenate([np.asarray(tree["blocks"][key]), np.asarray(tree["last"][key])[None]])

    pairs = every_layer(fused, "w13").reshape(p.n_layers, p.dim, h // block, 2, block)
    np.testing.assert_array_equal(pairs[:, :, :, 0].reshape(p.n_layers, p.dim, h), every_layer(reference, "w1"))
    np.testing.assert_array_equal(pairs[:, :, :, 1].reshape(p.n_layers, p.dim, h), every_layer(reference, "w3"))
    assert not {"w1", "w3"} & (set(fused["blocks"]) | set(fused["last"]))


@pytest.mark.parametrize("block", [64, 128])
def test_the_kernel_tiles_on_the_weights_interleaving_block(block, monkeypatch):
    """The kernel reads w13 in tiles of 2·block columns, so it must be given the layout's block."""
    from jaxbench import gated_ffn
    from jaxbench.model import FeedForward

    seen = []

    def kernel(x, w13, config):
        seen.append(config.block)
        return jnp.zeros((x.shape[0], w13.shape[1] // 2), x.dtype)

    monkeypatch.setattr(gated_ffn, "gated_ffn", kernel)
    w = {"w13": jnp.zeros((64, 2 * 256), jnp.float16), "w2": jnp.zeros((256, 64), jnp.float16)}
    FeedForward(w, gate_up_block=block, implementation="pallas").gated(jnp.zeros((2, 128, 64), jnp.float16))
    assert seen == [block]


def test_the_pallas_kernel_is_refused_off_hopper():
    from jaxbench.engine import Engine
    from jaxbench.gated_ffn import on_hopper

    if on_hopper(jax.devices()[0]):
        pytest.skip("this device is a Hopper GPU, which runs the kernel")

    with pytest.raises(ValueError, match="Hopper"):
        Engine(devices=1, draws_mode="host", compile_cache_dir=None, ffn="pallas")


def test_gated_kernel_configurations_take_whole_tiles_only():
    from jaxbench.gated_ffn import DEFAULT_CONFIG, GatedConfig, applies

    clustered = GatedConfig(cluster=2)
    assert (DEFAULT_CONFIG.row_multiple, clustered.row_multiple) == (128, 256)
    assert applies(384, 1792, 49152, jnp.float16) and applies(384, 1792, 49152, jnp.bfloat16)
    assert not applies(384, 1792, 49152, jnp.float16, clustered)
    assert not applies(192, 1792, 49152, jnp.float16)
    assert not applies(512, 1792, 49152, jnp.float32)
    assert not applies(512, 1800, 49152, jnp.float16)
    assert not applies(512, 1792, 49152 + 64, jnp.float16)
    with pytest.raises(ValueError, match="cluster"):
        GatedConfig(cluster=4)


@pytest.mark.parametrize("cluster", [1, 2])
def test_gated_kernel_lowers_for_cuda_with_the_installed_jax(cluster):
    """Lowering (no GPU needed) catches Pallas API changes; the kernel runs only on a GPU machine
    (scripts/gated_ffn_check.py compares it with XLA there)."""
    from jaxbench.gated_ffn import GatedConfig, gated_ffn

    config = GatedConfig(cluster=cluster)
    x = jax.ShapeDtypeStruct((512, 256), jnp.float16)
    w13 = jax.ShapeDtypeStruct((256, 2 * 512), jnp.float16)
    lowered = jax.jit(lambda x, w: gated_ffn(x, w, config, multiprocessors=132)).trace(x, w13).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()

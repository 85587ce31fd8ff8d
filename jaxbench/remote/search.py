"""What a remote search asks for, checked before anything is sent: the /generate fields its requests
share, and the nonce sequences it covers (plan.py)."""

from __future__ import annotations

import dataclasses

from .. import fields
from ..params import Params, params_from_text
from .plan import Sequence

# Nonces, heights and counts are int64 on the network (the model server refuses more): every nonce
# of a search is at most this. (To become jaxbench/nonces.py's, which makes the nonce space explicit.)
MAX_NONCE = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Search:
    params: Params
    block_hash: str
    block_height: int
    public_key: str
    r_target: float
    dtype: str
    start_nonce: int
    max_nonces: int | None
    duration_s: float | None
    workers: int
    screen: str | None = None  # the workers' FP8 screen (jaxbench/screen.py), and its margin
    screen_margin: float | None = None

    @classmethod
    def from_args(cls, args) -> "Search":
        values = vars(args)
        search = fields.search_fields({**values, "params": params_from_text(args.params)})
        workers = fields.integer(values, "workers", minimum=1)
        limit = search["max_nonces"]
        if limit is not None and limit < workers:
            raise fields.FieldError("workers", f"must be at most --max-nonces ({limit}), got {workers}")
        for name in ("block_height", "start_nonce"):
            if search[name] > MAX_NONCE:
                raise fields.FieldError(name, f"must be at most 2**63-1, got {search[name]}")
        if limit is not None and search["start_nonce"] + limit - 1 > MAX_NONCE:
            raise fields.FieldError("max_nonces", f"must be at most {MAX_NONCE - search['start_nonce'] + 1} from "
                                                  f"--start-nonce {search['start_nonce']}: nonces end at 2**63-1")
        duration_s = None if args.duration is None else fields.number(values, "duration")
        screen, margin = fields.screen(values)
        return cls(**search, workers=workers, duration_s=duration_s, screen=screen,
                   screen_margin=margin if screen else None)

    def sequences(self) -> list[Sequence]:
        """--max-nonces M: the nonces start … start + M − 1 as one sequence; --duration: one endless
        sequence per worker (node i of N)."""
        if self.max_nonces is not None:
            return [Sequence(self.start_nonce, 0, 1, self.max_nonces)]
        return [Sequence(self.start_nonce, i, self.workers, None) for i in range(self.workers)]

    def body(self) -> dict:
        """The /generate fields every request of the search shares."""
        return {"block_hash": self.block_hash, "block_height": self.block_height, "public_key": self.public_key,
                "r_target": self.r_target, "params": self.params.to_dict(), "dtype": self.dtype,
                "batch_size": 1,  # a required field of /generate; the worker picks its device batch itself
                **({"screen": self.screen, "screen_margin": self.screen_margin} if self.screen else {})}

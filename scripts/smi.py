"""nvidia-smi read on a thread: the measurement scripts' independent view of the cards.

    with SmiSampler({"sm_mhz": "clocks.sm", "power_w": "power.draw"}, interval=0.2) as smi:
        ...
    smi.samples  # [{"t": unix time, "index": GPU index, "sm_mhz": 1320.0, "power_w": 694.1}, …]

Each reading is one `nvidia-smi --query-gpu=index,<fields>` of every GPU (or of `gpu` only), stamped
with the middle of the call; numbers become floats, anything else stays text. Failed calls and
unreadable lines go to `errors`.
"""

from __future__ import annotations

import subprocess
import threading
import time


class SmiSampler:
    def __init__(self, fields: dict[str, str], interval: float = 0.25, gpu: int | None = None):
        self.fields = fields  # our name -> nvidia-smi's query field
        self.interval = interval
        self.gpu = gpu
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()

    def _read(self) -> None:
        command = ["nvidia-smi", "--query-gpu=" + ",".join(["index", *self.fields.values()]),
                   "--format=csv,noheader,nounits"] + ([] if self.gpu is None else ["-i", str(self.gpu)])
        t0 = time.time()
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as e:
            self.errors.append(f"{type(e).__name__}: {e}")
            return
        t = (t0 + time.time()) / 2
        for line in out.stdout.strip().splitlines():
            values = [v.strip() for v in line.split(",")]
            if len(values) != len(self.fields) + 1 or not values[0].isdigit():
                self.errors.append(f"unreadable line {line!r}")
                continue
            sample = {"t": t, "index": int(values[0])}
            for name, text in zip(self.fields, values[1:]):
                try:
                    sample[name] = float(text)
                except ValueError:
                    sample[name] = text
            self.samples.append(sample)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.interval)

    def __enter__(self) -> "SmiSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

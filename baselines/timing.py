"""Wall-clock timing of GPU or CPU work, shared by the edit stages and ``fewstep bench``."""

from __future__ import annotations

import time

import torch


class Timer:
    """Wall-clock seconds of a block: ``with Timer(device) as t: ...; t.seconds``; on a CUDA ``device`` it waits
    for queued work at both ends (kernels run asynchronously, so the last decode would fall outside the block)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

"""Intra-op thread counts for a span of work.

Small CPU tensor work (an image through its processor: a resize, a normalise, a stack of some 150,000 values) is
split over an OpenMP team when torch has more than one thread, and on a busy machine that team waits for cores at
every op. Measured on 2 cores with a training run holding both: 8 ms per such op, and checking the lengths of 4,000
training samples (each image through the processor once) took 159 s on 2 threads against 9.6 s on one. So that work
runs on one thread (``one_thread``), whatever the process's setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (None: leave it), restoring the previous setting afterwards."""
    import torch

    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread() -> AbstractContextManager[None]:
    """Small tensor work (image preprocessing): inline ops, no team to wait for."""
    return torch_threads(1)

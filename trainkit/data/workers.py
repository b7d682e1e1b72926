"""What every DataLoader with worker processes gets: workers that die with their parent, and
batches that need no shared memory where decoding, not the transfer, sets the pace.

A worker busy decoding a slow image does not notice its parent is gone until it next waits on
its queue (DataLoader checks every 5 s), so after a `kill` or a crash of trainkit it went on
decoding its prefetched batches for up to ~45 s, holding the caller's stdout/stderr open.
A tensor crosses from a worker through /dev/shm: where that is small (a container's default is
64 MB), a batch that does not fit made the worker drop it and the caller wait forever. Arrays
(numpy) are pickled through the worker's pipe instead: slower per byte, but nothing next to
decoding the images in them.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any

import numpy as np
import torch

from trainkit.errors import TrainkitError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_options(num_workers: int) -> dict[str, Any]:
    """DataLoader keyword arguments for `num_workers` workers (none for 0)."""
    if num_workers <= 0:
        return {}
    return {"worker_init_fn": functools.partial(_die_with_parent, os.getpid())}


def _die_with_parent(parent: int, worker_id: int) -> None:
    """Ask the kernel (Linux) to SIGKILL this worker when the process that started it ends;
    elsewhere DataLoader's own 5 s check remains. `parent`: the pid of the process that built
    the DataLoader (the forkserver, not it, may be this worker's parent: that one exits with it)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    try:
        os.kill(parent, 0)  # gone before prctl took effect: nobody is waiting for this worker
    except ProcessLookupError:
        os._exit(0)
    except PermissionError:
        pass


def to_arrays(images: torch.Tensor | None) -> np.ndarray | None:
    """In a worker: a batch as a numpy array, pickled through the pipe (no /dev/shm)."""
    return None if images is None else images.numpy()


def from_arrays(images: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    """In the caller: back to a tensor, without a copy (also for batches made in-process)."""
    return torch.from_numpy(images) if isinstance(images, np.ndarray) else images


def check_shared_memory(needed: int, setting: str) -> None:
    """Refuse, in one line and before any worker starts, a DataLoader whose batches in flight
    (`needed` bytes) do not fit in /dev/shm: it would hang, not fail, once they are made."""
    try:
        info = os.statvfs("/dev/shm")
    except (OSError, AttributeError):  # no /dev/shm (macOS, Windows): other transports
        return
    free = info.f_bavail * info.f_frsize
    if needed > free:
        from trainkit.text import size_text

        raise TrainkitError(
            f"{setting}: the batches in flight need ~{size_text(needed)} of shared memory and "
            f"/dev/shm has {size_text(free)} free; lower data.num_workers or data.batch_size, "
            "use data.cache=memory, or give the container more (docker run --shm-size=1g)"
        )

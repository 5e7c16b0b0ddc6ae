"""Running a function on several local processes (ranks) that report through a file."""
from __future__ import annotations

import os
import time

import torch.multiprocessing as mp


def run_ranks(fn, args, nprocs: int, result: str, timeout_s: float = 480) -> None:
    """mp.spawn, but a rank that hangs or aborts in teardown after the result is written (both
    seen under load, in the process group's destructors: "terminate called without an active
    exception") is not a failure: the ranks meet in a barrier after the result is written, so
    by then every rank's work is done. A rank that raises still raises here, and no result is
    an error."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.time() + timeout_s
    while True:
        try:
            if context.join(timeout=5):
                break
        except mp.ProcessExitedException:  # killed by a signal, not a Python exception
            if not os.path.exists(result):
                raise
            break
        stuck_after_result = os.path.exists(result) and time.time() - os.path.getmtime(result) > 60
        if stuck_after_result or time.time() > deadline:
            break
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    assert os.path.exists(result), f"no rank wrote {result} within {timeout_s} s"

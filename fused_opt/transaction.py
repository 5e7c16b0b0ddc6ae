"""A step's launches as one transaction (see Transaction.run)."""
from __future__ import annotations

import signal
import threading

import torch

try:  # the C module: signal.signal's enum conversions cost more than the launches at small sizes
    import _signal as _raw_signal
except ImportError:  # not CPython
    _raw_signal = signal


class Transaction:
    """An interrupt (Ctrl-C) arriving between a step's launches is held until they are all
    enqueued, and an exception before the first write restores the loss scale, its counters,
    the applied-step count and the count of skipped steps, so a step either happens or leaves no trace, and a retry
    never double-counts. A backend whose step is one call into compiled code (native_backend.one_call)
    has nothing to roll back, and holds interrupts itself where Python writes after that call.
    """

    def __init__(self):
        self._rollback = None  # (scaler, copies of its scale and counter and of the applied steps)

    def run(self, backend, batch) -> None:
        one_call = getattr(backend, "one_call", None)
        if one_call is not None and one_call(batch):  # nothing is written before its one call
            backend.step(batch)  # which holds interrupts itself over any write after that call
            return
        live = [*batch.scaler.counters, batch.applied_steps, batch.consecutive_skips]
        saved = self._buffers(batch)
        torch._foreach_copy_(saved, live)
        with _interrupts_held():
            try:
                backend.step(batch)
            except BaseException:
                torch._foreach_copy_(live, saved)
                raise

    def _buffers(self, batch) -> list:
        scaler = batch.scaler
        if self._rollback is None or self._rollback[0] is not scaler:
            self._rollback = (scaler, [torch.empty_like(t) for t in
                                       (*scaler.counters, batch.applied_steps, batch.consecutive_skips)])
        return self._rollback[1]


class _interrupts_held:
    """Holds SIGINT (KeyboardInterrupt) for the duration of the block and re-raises it after,
    in the main thread (the only one Python delivers it to); elsewhere a no-op."""

    def __enter__(self):
        self._held = None
        self._previous = None
        if (threading.current_thread() is threading.main_thread()
                and _raw_signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = _raw_signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self._held = (signum, frame)

    def __exit__(self, exc_type, exc, tb):
        if self._previous is not None:
            _raw_signal.signal(signal.SIGINT, self._previous)
            if self._held is not None and exc_type is None:
                self._previous(*self._held)  # raises KeyboardInterrupt, after the whole step
        return False

"""No silent wrong training: scaled grads edited outside the optimizer raise at step().

With the loss scale on, `.grad` holds S times the true gradient between backward and
step(). Anything nonlinear computed there, a framework's gradient clipping above all, acts
on the scaled values: `clip_grad_norm_(params, 1.0)` sees a norm S times too large, shrinks
every grad by ~1/S, and the run trains nothing, silently. Such an edit is in place, so it
bumps the grad's version counter: the guard records each grad's (id, version) at the very
end of every backward through `scale_loss` (an autograd engine callback queued behind those
that DDP and FSDP2 queue, so their own in-place reductions are not counted), and step()
compares. A changed version raises, naming what to do instead.
"""
from __future__ import annotations

import weakref

import torch


class ScaledGradGuard:
    def __init__(self, snapshot_of):
        self.recorded = None            # the grads' versions after backward (a snapshot)
        self.snapshot_of = snapshot_of  # () -> a snapshot of the optimizer's grads (None once it is gone)

    def on_backward(self, grad):
        """A hook on the scaled loss: it runs first in backward; the callback it queues runs
        after all others queued by then, at the end of the backward pass."""
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(lambda: engine.queue_callback(self.record))
        return grad

    def record(self) -> None:
        snapshot = self.snapshot_of()
        if snapshot is not None:
            self.recorded = snapshot

    def check(self, params: list | None, name_of) -> None:
        """Raises if a grad recorded after backward was modified in place since. `params`: the
        flat params, for naming the grad (None on the flat-storage step)."""
        recorded, self.recorded = self.recorded, None
        if recorded is None:
            return
        now = self.snapshot_of()
        if now is None or now == recorded or now[0] != recorded[0]:
            return  # unchanged, or the storage changed kind in between: nothing to compare
        if now[0] == "flat":  # one version per flat buffer: which grad it was is not known
            raise _edited("a param")
        if params is None or len(recorded[1]) != len(params):
            return
        for p, id_before, before, id_after, after in zip(params, *recorded[1:], *now[1:]):
            if id_before != -1 and id_before == id_after and before != after:
                raise _edited(name_of(p))


def _edited(name: str) -> RuntimeError:
    return RuntimeError(
        f"fused_opt: the grad of {name} was modified in place between backward and "
        "step() while it holds the loss-scaled gradient. A clipping or norm computed there (a "
        "framework's gradient clipping, torch.nn.utils.clip_grad_norm_) acts on the scaled values and "
        "silently trains nothing. Clip inside the step instead: FusedMixedPrecisionSGD/AdamW(..., "
        "max_grad_norm=...), or route the framework's clipping to opt.clip_grad_norm_ (the "
        "integrations in fused_opt.integrations do); read the unscaled norm from opt.last_grad_norm. "
        "For BF16 use loss_scale=None. If the edit does not depend on the scale (a constant factor), "
        "build the optimizer with check_scaled_grads=False.")


def _versions(params: list) -> tuple:
    """("grads", ids, versions) of the grads, -1 for none: two lists of ints, which Python's
    cyclic GC does not track (a tuple per grad, kept from backward to step, made it run full
    collections at thousands of params)."""
    grads = [p.grad for p in params]
    return "grads", [-1 if g is None else id(g) for g in grads], [-1 if g is None else g._version for g in grads]


def grad_snapshot_of(optimizer):
    """A weak getter of a snapshot of the optimizer's grads: ("flat", the flat buffers'
    versions) while its grads are flat views (flat_storage.py), else one version per grad.
    Weak: the hooks it goes into live in autograd graphs, which must not keep the optimizer
    alive."""
    ref = weakref.ref(optimizer)

    def snapshot():
        opt = ref()
        if opt is None:
            return None
        flat = opt._flat_grads.storage if opt._flat_grads is not None else None
        if flat is not None and flat.buffers_intact():
            return "flat", flat.versions()
        return _versions(opt._flat_params())
    return snapshot

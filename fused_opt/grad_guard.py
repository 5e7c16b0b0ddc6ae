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
    def __init__(self, params_of):
        self.recorded = None        # (ids, versions) of the flat params' grads, after backward
        self.params_of = params_of  # () -> the optimizer's flat params (None once it is gone)

    def on_backward(self, grad):
        """A hook on the scaled loss: it runs first in backward; the callback it queues runs
        after all others queued by then, at the end of the backward pass."""
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(lambda: engine.queue_callback(self.record))
        return grad

    def record(self) -> None:
        params = self.params_of()
        if params is not None:
            self.recorded = _versions(params)

    def check(self, params: list, name_of) -> None:
        """Raises if a grad recorded after backward was modified in place since."""
        recorded, self.recorded = self.recorded, None
        if recorded is None or len(recorded[0]) != len(params):
            return
        now = _versions(params)
        if now == recorded:
            return
        for p, id_before, before, id_after, after in zip(params, *recorded, *now):
            if id_before != -1 and id_before == id_after and before != after:
                raise RuntimeError(
                    f"FusedMixedPrecisionSGD: the grad of {name_of(p)} was modified in place between backward and "
                    "step() while it holds the loss-scaled gradient. A clipping or norm computed there (a "
                    "framework's gradient clipping, torch.nn.utils.clip_grad_norm_) acts on the scaled values and "
                    "silently trains nothing. Clip inside the step instead: FusedMixedPrecisionSGD(..., "
                    "max_grad_norm=...), or route the framework's clipping to opt.clip_grad_norm_ (the "
                    "integrations in fused_opt.integrations do); read the unscaled norm from opt.last_grad_norm. "
                    "For BF16 use loss_scale=None. If the edit does not depend on the scale (a constant factor), "
                    "build the optimizer with check_scaled_grads=False.")


def _versions(params: list) -> tuple:
    """(ids, versions) of the grads, -1 for none: two lists of ints, which Python's cyclic GC
    does not track (a tuple per grad, kept from backward to step, made it run full
    collections at thousands of params)."""
    grads = [p.grad for p in params]
    return [-1 if g is None else id(g) for g in grads], [-1 if g is None else g._version for g in grads]


def flat_params_of(optimizer):
    """A weak getter of the optimizer's flat params: the hooks it goes into live in autograd
    graphs, which must not keep the optimizer alive."""
    ref = weakref.ref(optimizer)

    def params():
        opt = ref()
        return None if opt is None else opt._flat_params()
    return params

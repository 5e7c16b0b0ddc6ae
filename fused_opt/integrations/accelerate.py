"""accelerate: `fused_opt.integrations.accelerate.patch(accelerator)` once, after creating it.

Then `accelerator.backward(loss)` multiplies the loss by our loss scale first,
`accelerator.clip_grad_norm_(params, max_norm)` is routed to the clipping fused into the
next step (on the unscaled norm; it returns `opt.last_grad_norm`, filled in by the step), or,
for params that are not the optimizer's own (a sub-module), clips those at once by their
own unscaled norm, as torch would (fused_opt.clipping), value
clipping on scaled grads raises, `accelerator.optimizer_step_was_skipped` reports our
skipped steps (it reads one flag from the device when asked, as it does for GradScaler),
and the prepared `AcceleratedOptimizer` forwards `scale_loss`, `loss_scale`,
`last_grad_norm` and `last_step_skipped` to ours.
"""
from __future__ import annotations

import math

import torch

from . import fused_optimizers, scaled_loss, the_fused_optimizer, unwrap


def _accelerated_class(cls):
    """AcceleratedOptimizer, reporting our skipped steps and forwarding our attributes."""
    if getattr(cls, "_fused_opt_patched", False):
        return cls

    def step_was_skipped(self):
        fused = unwrap(self.optimizer)
        return bool(fused.last_step_skipped) if fused is not None else cls.step_was_skipped.fget(self)

    def __getattr__(self, name):
        if name.startswith("__") or name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)
    return type("Fused" + cls.__name__, (cls,), {"step_was_skipped": property(step_was_skipped),
                                                  "__getattr__": __getattr__, "_fused_opt_patched": True})


def _patch_optimizers(accelerator) -> None:
    for wrapped in getattr(accelerator, "_optimizers", []):
        if unwrap(wrapped) is not None:
            wrapped.__class__ = _accelerated_class(type(wrapped))


def _owner(optimizers: list, parameters: list):
    """The fused optimizer that holds every given param that has a grad (a GAN's generator
    clipped apart from its discriminator); None when there is no fused optimizer. Among
    several, params that no single one holds raise."""
    if not optimizers:
        return None
    with_grads = {id(p) for p in parameters if p.grad is not None}
    owners = [o for o in optimizers if with_grads <= {id(p) for p in o._flat_params()}]
    if len(owners) == 1 or len(optimizers) == 1:
        return owners[0] if owners else optimizers[0]
    if not owners:
        raise RuntimeError("fused_opt: clip_grad_norm_ over params of several fused optimizers "
                           "at once: their grads come from differently scaled losses. Clip each optimizer's "
                           "params apart.")
    return next((o for o in owners if o._scaler.enabled), owners[0])


def patch(accelerator):
    """Routes the accelerator's backward and clipping to the optimizer's loss scale and fused
    clipping (see the module docstring). Returns the accelerator."""
    if getattr(accelerator, "_fused_opt_patched", False):
        return accelerator
    backward, clip_norm, clip_value = accelerator.backward, accelerator.clip_grad_norm_, accelerator.clip_grad_value_
    prepare = accelerator.prepare

    def fused():
        return the_fused_optimizer(getattr(accelerator, "_optimizers", []))

    def patched_backward(loss, **kwargs):
        optimizers = getattr(accelerator, "_optimizers", [])
        return backward(scaled_loss(optimizers, loss, "accelerator.backward(opt.scale_loss(loss)), with opt the "
                                                      "prepared optimizer the loss is for"), **kwargs)

    def patched_clip_grad_norm_(parameters, max_norm, norm_type=2):
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        opt = _owner(fused_optimizers(getattr(accelerator, "_optimizers", [])), parameters)
        if opt is None:
            return clip_norm(parameters, max_norm, norm_type)
        if math.isinf(max_norm):
            return opt.last_grad_norm  # only the norm is asked for, clipping stays as configured
        # the optimizer's params: fused into the step; a sub-module's: clipped now (clipping.py)
        return opt.clip_grad_norm_(max_norm, norm_type, parameters=parameters)

    def patched_clip_grad_value_(parameters, clip_value_):
        if fused() is not None and fused()._scaler.enabled:
            raise RuntimeError("fused_opt: clip_grad_value_ on loss-scaled grads would clip at the scale times the "
                               "threshold; clip by norm (fused into the step) or use loss_scale=None")
        return clip_value(parameters, clip_value_)

    def patched_prepare(*args, **kwargs):
        result = prepare(*args, **kwargs)
        _patch_optimizers(accelerator)
        return result

    accelerator.backward = patched_backward
    accelerator.clip_grad_norm_ = patched_clip_grad_norm_
    accelerator.clip_grad_value_ = patched_clip_grad_value_
    accelerator.prepare = patched_prepare
    accelerator._fused_opt_patched = True
    _patch_optimizers(accelerator)
    return accelerator

"""Glue for the frameworks people train with: one documented line each, in the framework's
own idiom. Every module here imports its framework lazily (inside the module, which is only
imported when asked for), so none of them is a dependency of fused_opt.

- `fused_opt.integrations.lightning.FusedPrecision`: a Lightning precision plugin.
- `fused_opt.integrations.accelerate.patch(accelerator)`: routes `accelerator.backward` and
  `accelerator.clip_grad_norm_` to the loss scale and the fused clipping.
- `fused_opt.integrations.transformers.FusedTrainer`: a `transformers.Trainer` that does
  the same for its accelerator.
"""
from __future__ import annotations

from ..drop_in import SCALED_MARK


def unwrap(optimizer):
    """The fused optimizer (FusedMixedPrecisionSGD/AdamW) behind framework wrappers (LightningOptimizer's `_optimizer`,
    AcceleratedOptimizer's `optimizer`), or None if there is none."""
    from ..optimizer import FusedMixedPrecisionOptimizer
    seen = 0
    while optimizer is not None and not isinstance(optimizer, FusedMixedPrecisionOptimizer) and seen < 8:
        optimizer = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, FusedMixedPrecisionOptimizer) else None


def already_scaled(loss) -> bool:
    """Whether `loss` came out of an optimizer's scale_loss (the integrations pass it on)."""
    return getattr(loss, SCALED_MARK, False)


def scaled_loss(optimizers, loss, how_to_scale: str):
    """The loss a framework's backward should run: as given when a scale_loss already made it
    (or none of `optimizers` keeps a loss scale), else scaled by the one optimizer that keeps
    one. Several keeping one cannot share a backward (their scales differ), so that raises,
    saying how to scale each loss with its own optimizer (`how_to_scale`)."""
    if already_scaled(loss):
        return loss
    scaling = [o for o in map(unwrap, optimizers) if o is not None and o._scaler.enabled]
    if not scaling:
        return loss
    if len(scaling) > 1:
        raise RuntimeError(f"fused_opt integrations: {len(scaling)} fused optimizers keep a loss "
                           "scale, and this backward does not say which one its loss is for (their scales differ). "
                           f"Scale each loss with its own optimizer first: {how_to_scale}; a loss that "
                           "scale_loss returned is passed on as it is. Or use one optimizer over all params "
                           "(param groups), or loss_scale=None for BF16/FP32 params.")
    return scaling[0].scale_loss(loss)


def fused_optimizers(optimizers) -> list:
    return [o for o in map(unwrap, optimizers) if o is not None]


def the_fused_optimizer(optimizers):
    """The one fused optimizer among a framework's optimizers that keeps a loss scale
    (else the one without, else None): what clipping and step reporting refer to."""
    found = [o for o in map(unwrap, optimizers) if o is not None]
    scaling = [o for o in found if o._scaler.enabled]
    return scaling[0] if len(scaling) == 1 else (found[0] if len(found) == 1 else None)

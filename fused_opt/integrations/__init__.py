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


def unwrap(optimizer):
    """The FusedMixedPrecisionSGD behind framework wrappers (LightningOptimizer's `_optimizer`,
    AcceleratedOptimizer's `optimizer`), or None if there is none."""
    from ..optimizer import FusedMixedPrecisionSGD
    seen = 0
    while optimizer is not None and not isinstance(optimizer, FusedMixedPrecisionSGD) and seen < 8:
        optimizer = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, FusedMixedPrecisionSGD) else None


def the_fused_optimizer(optimizers):
    """The one FusedMixedPrecisionSGD among a framework's optimizers (None if there is none);
    more than one cannot share a backward's loss scale, so that raises."""
    found = [o for o in map(unwrap, optimizers) if o is not None]
    if len(found) > 1:
        raise RuntimeError("fused_opt integrations: several FusedMixedPrecisionSGD optimizers share one backward; "
                           "their loss scales would differ. Use one optimizer over all params (param groups), "
                           "or loss_scale=None and torch.amp.GradScaler.")
    return found[0] if found else None

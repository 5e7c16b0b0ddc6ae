"""Which loss scale a step unscales by, and the drop-in checks that guard it (SPEC §2):
our own scaler, or the scale torch.amp.GradScaler hands us, or 1 for the state-initialising
step torch.distributed.checkpoint runs; a step without scale_loss(), or with GradScaler
driving while our own scale is on, raises before anything is written."""
from __future__ import annotations

import torch

from .loss_scaler import LossScaler


def step_scaler(opt) -> LossScaler:
    """The loss scaler this step unscales by (and updates), after the drop-in checks."""
    if _is_state_init_step(opt):
        return fixed_scaler(opt, 1.0)
    _check_drop_in(opt)
    return _grad_scaler_scale(opt)


def _is_state_init_step(opt) -> bool:
    """torch.distributed.checkpoint's get/set_optimizer_state_dict initialise an empty
    optimizer state with a step on zero grads with every lr set to 0, and no scale_loss.
    That step is let through, unscaled and leaving the loss scale alone, so the state (and
    with it a checkpoint template) gets its buffers, as torch.optim.SGD's does. A forgotten
    scale_loss in a real step is still caught: with any lr != 0 (or on the GPU) it raises."""
    if not opt._scaler.enabled or opt._scaler.loss_scaled or opt.state:
        return False
    for group in opt.param_groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and (lr.device.type != "cpu" or lr.item() != 0):
            return False
        if not isinstance(lr, torch.Tensor) and lr != 0:
            return False
    return True


def _check_drop_in(opt) -> None:
    if not opt._scaler.enabled:
        return
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        raise RuntimeError("FusedMixedPrecisionSGD: torch.amp.GradScaler is driving this optimizer "
                           "while its own loss scaling is on; the grads would be unscaled twice. "
                           "Build it with loss_scale=None to use GradScaler.")
    if not opt._scaler.loss_scaled:
        raise RuntimeError("FusedMixedPrecisionSGD: step() without scale_loss() since the last step "
                           "while loss scaling is on; the grads of an unscaled loss would be divided "
                           "by the loss scale. Call opt.scale_loss(loss).backward(), or build the "
                           "optimizer with loss_scale=None.")


def _grad_scaler_scale(opt) -> LossScaler:
    """The scale of this step: ours, or the one torch.amp.GradScaler set on us (None when
    its unscale_ already ran). GradScaler's found_inf becomes a NaN scale, which the
    kernels' own inf/NaN check turns into a skipped step: no new path through them."""
    if opt._scaler.enabled or (getattr(opt, "grad_scale", None) is None
                                and getattr(opt, "found_inf", None) is None):
        return opt._scaler
    scale = opt.grad_scale if getattr(opt, "grad_scale", None) is not None else 1.0
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(())  # GradScaler's are (1,)-shaped
    found_inf = opt.found_inf if isinstance(getattr(opt, "found_inf", None), torch.Tensor) else None
    if found_inf is not None:
        scale = torch.where(found_inf.reshape(()).to(opt.last_grad_norm.device) > 0, float("nan"), scale)
    return fixed_scaler(opt, scale)


def fixed_scaler(opt, scale) -> LossScaler:
    """A static scaler holding `scale` for this step (never updated by the step)."""
    if opt._amp_scaler is None:
        opt._amp_scaler = LossScaler(1.0, 1.0, 1.0, 1.0, 1, opt.last_grad_norm.device)
    opt._amp_scaler.scale.copy_(scale)
    return opt._amp_scaler

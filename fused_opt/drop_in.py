"""Which loss scale a step unscales by, and the drop-in checks that guard it:
our own scaler, or the scale torch.amp.GradScaler hands us, or 1 for the state-initialising
step torch.distributed.checkpoint runs; a step without scale_loss(), or with GradScaler
driving while our own scale is on, raises before anything is written."""
from __future__ import annotations

import torch

from .loss_scaler import LossScaler

# Set on the tensor scale_loss returns: the framework integrations pass such a loss on as it is.
SCALED_MARK = "_fused_opt_scaled"


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
        raise RuntimeError(f"{type(opt).__name__}: torch.amp.GradScaler is driving this optimizer "
                           "while its own loss scaling is on; the grads would be unscaled twice. "
                           "Build it with loss_scale=None to use GradScaler.")
    if not opt._scaler.loss_scaled:
        raise RuntimeError(_missing_scale_message(opt))


# Where a framework's own loop calls backward, the integration that scales its loss.
_INTEGRATIONS = (
    ("lightning", "Lightning: Trainer(plugins=[fused_opt.integrations.lightning.FusedPrecision('16-true')]) "
                  "in place of precision='16-true' (or '16-mixed')"),
    ("pytorch_lightning", "Lightning: Trainer(plugins=[fused_opt.integrations.lightning.FusedPrecision('16-true')])"),
    ("transformers", "transformers: fused_opt.integrations.transformers.FusedTrainer in place of Trainer"),
    ("accelerate", "accelerate: fused_opt.integrations.accelerate.patch(accelerator) once, after creating it"),
)


def _framework_on_stack() -> str | None:
    """The integration for the framework whose code called this step, if any: a frame of
    lightning, transformers or accelerate on the stack (read only to word an error)."""
    import sys
    frame = sys._getframe(1)
    found = set()
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        found.add(module.split(".", 1)[0])
        frame = frame.f_back
    return next((advice for name, advice in _INTEGRATIONS if name in found), None)


def _missing_scale_message(opt) -> str:
    name = type(opt).__name__
    if getattr(opt._scaler, "scale_used", False):
        return (f"{name}: step() again without a new backward through scale_loss(): the last scaled loss's "
                "grads were stepped already (a second step() after one backward, or a retried step). Run "
                "opt.scale_loss(loss).backward() before every step(), and opt.zero_grad() between steps.")
    framework = _framework_on_stack()
    fp16 = any(p.dtype == torch.float16 for p in opt._flat_params())
    message = (f"{name}: step() without scale_loss() since the last step while loss scaling is on: the grads "
               "of an unscaled loss would be divided by the loss scale. ")
    if framework is not None:
        message += f"The loss is computed by a framework: use its integration, {framework}. "
    else:
        message += "Call opt.scale_loss(loss).backward() in place of loss.backward(). "
    if fp16:
        message += ("(loss_scale=None is no equal fix for FP16 params: their small grads flush to zero "
                    "without a scale; use it with torch.amp.GradScaler driving the optimizer, or for BF16.)")
    else:
        message += "For BF16/FP32 params, loss_scale=None turns scaling off."
    return message


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

"""Every bad input raises here, before the step modifies anything.

Messages name the offending group or parameter and the rule it breaks.
"""
from __future__ import annotations

import math

import torch

NORM_TYPES = (2.0, math.inf)


def _number(value) -> float | None:
    if isinstance(value, torch.Tensor):
        return None  # a tensor hyperparameter is read on the device, never here
    return float(value)


def check_group(group: dict, index: int) -> None:
    """Hyperparameters of one param group (run at construction and at every step:
    schedulers and users edit param_groups in between)."""
    where = f"param_groups[{index}]"
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{where}: a tensor lr must be a 1-element floating-point tensor")
    elif not lr >= 0.0:
        raise ValueError(f"{where}: invalid learning rate {lr!r} (must be >= 0)")
    momentum = group["momentum"]
    if isinstance(momentum, torch.Tensor):  # CyclicLR/OneCycleLR write tensor momenta: read on the device
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(f"{where}: a tensor momentum must be a 1-element floating-point tensor")
    for name in ("momentum", "weight_decay", "dampening") if not isinstance(momentum, torch.Tensor) else ("weight_decay", "dampening"):
        value = _number(group[name])
        if value is None:
            raise ValueError(f"{where}: {name} must be a number, not a tensor")
        if not value >= 0.0:
            raise ValueError(f"{where}: invalid {name} {value!r} (must be >= 0)")
    no_momentum = not isinstance(momentum, torch.Tensor) and momentum <= 0
    if group["nesterov"] and (no_momentum or group["dampening"] != 0):
        raise ValueError(f"{where}: nesterov momentum requires momentum > 0 and dampening = 0")


def check_params(params: list[torch.Tensor], index: int) -> None:
    """Params of one group as they are added: floating point, real, no duplicates."""
    seen = set()
    for j, p in enumerate(params):
        where = f"param_groups[{index}]['params'][{j}]"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: optimizer params must be tensors, got {type(p).__name__}")
        if not p.is_floating_point() or p.is_complex():
            raise TypeError(f"{where}: dtype {p.dtype} is not supported (integer and complex params "
                            "cannot be trained by SGD on FP32 masters)")
        if p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{where}: dtype {p.dtype} is not supported (FP16, BF16 or FP32)")
        if id(p) in seen:
            raise ValueError(f"{where}: this param appears twice in the group")
        seen.add(id(p))


def check_global(max_grad_norm, norm_type) -> None:
    if max_grad_norm is not None and (isinstance(max_grad_norm, (bool, str)) or not (float(max_grad_norm) >= 0.0)):
        raise ValueError(f"max_grad_norm must be >= 0 or None, got {max_grad_norm!r}")
    if float(norm_type) not in NORM_TYPES:
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")


def check_tensor_lr(group: dict, index: int) -> None:
    """A tensor lr's (or momentum's) value, read once when the optimizer first sees that tensor
    (a sync on the GPU, off the hot path): schedulers then change it in place, on the device."""
    for name, what in (("lr", "learning rate"), ("momentum", "momentum")):
        value = group.get(name)
        if isinstance(value, torch.Tensor):
            value = float(value.detach().reshape(()).float().cpu())
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"param_groups[{index}]: invalid {what} {value!r} (must be finite and >= 0)")
            if name == "momentum" and group.get("nesterov") and value <= 0:
                raise ValueError(f"param_groups[{index}]: nesterov momentum requires momentum > 0 and dampening = 0")


def grad_dtypes(param_dtype: torch.dtype) -> tuple:
    """The grad dtypes a param of this dtype can be stepped with: its own, and FP32 sums
    (fp32_grad_accumulation) for FP16/BF16 params."""
    return (param_dtype,) if param_dtype == torch.float32 else (param_dtype, torch.float32)


def check_grads(grads: list[torch.Tensor], params: list[torch.Tensor], name_of) -> None:
    """Grads about to be used in a step, against their params: torch refuses a .grad of
    another shape, dtype or device when it is assigned, but `p.grad.data = ...` is not
    checked, and a kernel would read past the grad's end. `name_of(k)` names the k-th
    grad's param, for the message."""
    for k, (g, p) in enumerate(zip(grads, params)):
        if g.layout is not torch.strided:
            raise RuntimeError(f"{name_of(k)}: sparse gradients are not supported")
        if g.shape != p.shape:
            raise RuntimeError(f"{name_of(k)}: the grad has shape {tuple(g.shape)}, the param {tuple(p.shape)}")
        if g.device != p.device:
            raise RuntimeError(f"{name_of(k)}: the grad is on {g.device}, the param on {p.device}")
        if g.dtype not in grad_dtypes(p.dtype):
            raise RuntimeError(f"{name_of(k)}: a {g.dtype} grad for a {p.dtype} param (expected "
                               f"{' or '.join(map(str, grad_dtypes(p.dtype)))})")

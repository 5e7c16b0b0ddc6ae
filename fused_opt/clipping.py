"""Gradient clipping asked for between backward and step(), as frameworks ask for it.

`opt.clip_grad_norm_(max_norm)` clips the coming step, and only that step, inside the fused
step (on the unscaled global norm). Asked for a subset of the params (accelerate's
`clip_grad_norm_(model.head.parameters(), ...)`), the fused step cannot help: its norm is
the global one. Such a subset is clipped here, at once, as torch.nn.utils.clip_grad_norm_
would clip the unscaled grads: the norm of the scaled grads divided by the scale S, in FP32,
and the grads multiplied in place. Tensor ops only, so nothing waits on the device.
"""
from __future__ import annotations

import torch

from .distributed import is_dtensor


def split_request(opt, parameters) -> list | None:
    """None when `parameters` are, as far as their grads go, the optimizer's own params (the
    fused step can clip them), else the list of those given that have a grad."""
    given = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    ours = opt._flat_params()
    ours_ids, ids = set(map(id, ours)), set(map(id, given))
    with_grads = [p for p in given if p.grad is not None]
    if all(id(p) in ours_ids for p in with_grads) and not any(p.grad is not None for p in ours if id(p) not in ids):
        return None
    return with_grads


def clip_scaled_(opt, params: list, max_norm: float, norm_type: float) -> torch.Tensor:
    """Clips `params`' grads, which hold S times the true gradient, as torch's
    clip_grad_norm_ would clip the true ones; returns their unscaled total norm."""
    device = opt.last_grad_norm.device
    if not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    if any(is_dtensor(p) for p in params):
        raise ValueError("clip_grad_norm_ over a subset of DTensor (FSDP2) params is not supported: the fused "
                         "step clips by the global norm over all of them; clip all params, or build one "
                         "optimizer per subset")
    grads = [p.grad for p in params]
    # FP32 norms: S times a grad overflows FP16 where the grad does not
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in grads])
    total = torch.linalg.vector_norm(norms, norm_type)
    scale = opt._scaler.scale if opt._scaler.enabled else None
    if scale is not None:
        total = total / scale.to(total.device)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for device_grads in _by_device(grads):
        torch._foreach_mul_(device_grads, coef.to(device_grads[0].device))
    if opt._guard is not None:
        opt._guard.record()  # our edit knows the scale: the guard takes the grads as they are now
    return total


def _by_device(grads):
    groups = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    return groups.values()


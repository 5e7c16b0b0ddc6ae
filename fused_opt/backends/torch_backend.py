"""The pure-PyTorch backend: SPEC §3 line by line. It is the oracle the fused backends are
tested against, so it favours readability; it uses torch._foreach_* ops where they exist so
that it is also a usable fallback on any device.

No host sync: the skip is decided on the device and applied with torch.where, so every
tensor is rewritten with its old value on a skipped step rather than branched around.
"""
from __future__ import annotations

import math

import torch

from . import StepBatch


def availability(device: torch.device) -> str | None:
    return None  # runs wherever torch runs


def _per_tensor_norms(unscaled: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    # What clip_grad_norm_(foreach=True) does. Empty tensors add nothing and have no
    # max-norm, so they are left out.
    nonempty = [u for u in unscaled if u.numel() > 0]
    if not nonempty:
        return torch.zeros(1, dtype=torch.float32, device=unscaled[0].device)
    return torch.stack(torch._foreach_norm(nonempty, norm_type))


def _global_norm(unscaled: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    # Per-tensor norms, then the norm of those.
    return torch.linalg.vector_norm(_per_tensor_norms(unscaled, norm_type), norm_type)


def _global_stats(unscaled: list[torch.Tensor], found_inf: torch.Tensor, batch: StepBatch):
    """DTensor params: this rank's [sum of squares (or max), inf count], made global."""
    norm_inf = batch.norm_type == math.inf
    per_tensor = _per_tensor_norms(unscaled, batch.norm_type)
    stat = per_tensor.amax() if norm_inf else per_tensor.square().sum()
    stats = torch.stack([stat, found_inf.float()])
    batch.reduce_stats(stats, norm_inf)
    return (stats[0] if norm_inf else stats[0].sqrt()), stats[1] > 0


def step(batch: StepBatch) -> bool:
    inv_scale = torch.reciprocal(batch.scaler.scale)                        # 1/S in FP32

    # 1. u_i = float32(g_i) * (1/S)
    unscaled = torch._foreach_mul([g.float() for g in batch.grads], inv_scale)

    # 2. found_inf: any element of any u_i is inf or NaN
    found_inf = torch.stack([(~torch.isfinite(u)).any() for u in unscaled]).any()

    # 3. N, accumulated in FP32
    if batch.reduce_stats is None:
        norm = _global_norm(unscaled, batch.norm_type)
    else:  # sharded params: over all ranks' shards (distributed.py)
        norm, found_inf = _global_stats(unscaled, found_inf, batch)

    # 4. c = min(1, max_norm / (N + 1e-6))
    if batch.max_grad_norm is not None:
        clip = torch.clamp(batch.max_grad_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(unscaled, clip)

    # 5. the SGD update, per param with its group's hyperparameters, kept only if finite
    applied_steps = batch.applied_steps + (~found_inf).to(torch.int32)
    for i, d in enumerate(unscaled):
        h = batch.groups[batch.group_index[i]]
        w = batch.masters[i]
        if h.maximize:
            d = -d
        if h.weight_decay != 0:
            d = d + h.weight_decay * w
        if h.momentum != 0:
            b, first_step = batch.momentum_buffers[i], batch.momentum_first_step[i]
            first = (first_step == 0) | (first_step == applied_steps)
            new_b = torch.where(first, d, b * h.momentum + (1 - h.dampening) * d)
            d = d + h.momentum * new_b if h.nesterov else new_b
            b.copy_(torch.where(found_inf, b, new_b))
            first_step.copy_(torch.where((first_step == 0) & ~found_inf, applied_steps, first_step))
        new_w = w - h.lr * d
        w.copy_(torch.where(found_inf, w, new_w))
        p = batch.params[i]
        if p is not w:
            p.copy_(w)  # round to nearest even in the param's dtype (unchanged master -> unchanged p)

    batch.applied_steps.copy_(applied_steps)
    batch.found_inf.copy_(found_inf)
    batch.grad_norm.copy_(norm)
    # 6. dynamic scale update
    batch.scaler.update_(found_inf)
    return True


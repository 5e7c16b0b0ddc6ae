"""Backend registry: each backend is a module with `availability(device)` and `step(batch)`.
`step` bumps the version counter of every param it may have written, as torch ops do.

Adding a backend is adding a module and a line in BACKENDS; nothing else dispatches on names.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

# Fastest first: "auto" takes the first one available for the params' device.
BACKENDS = {
    "native": "fused_opt.backends.native_backend",
    "triton": "fused_opt.backends.triton_backend",
    "torch": "fused_opt.backends.torch_backend",
}


@dataclass
class Hyper:
    """One param group's hyperparameters for this step (lr may be a 0-dim tensor)."""
    lr: float | torch.Tensor
    momentum: float | torch.Tensor  # a tensor (CyclicLR/OneCycleLR's tensor momenta) is read on the device
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool

    @property
    def uses_momentum(self) -> bool:
        """Whether the group keeps a momentum buffer: a tensor momentum always does (its value
        is not read on the host), and steps as torch's SGD would at that value."""
        return isinstance(self.momentum, torch.Tensor) or self.momentum != 0


@dataclass
class StepBatch:
    """Everything one step touches, for the params that have a grad.

    `momentum_buffers[i]`/`momentum_first_step[i]` are None when the param's group has no
    momentum. `momentum_first_step[i]` is an int32 0-dim tensor: 0 while the buffer was never
    applied, else the applied-step count at which it was first applied (see optimizer.py).
    `grad_norm` and `found_inf` are outputs written in place. `cache` is a dict the
    optimizer keeps for the backend across steps; `layout_id` changes whenever anything but
    the grads changed (params that step, their storage, state tensors, use of momentum), so a
    backend can cache tables of their addresses under it (and of the grads' too, when
    `flat_grads` is set). With DTensor params the lists hold
    local shards, and `reduce_stats(stats, norm_inf)` makes a rank's fp32 [norm statistic
    (sum of squares, or max for the inf-norm), inf count] global in place, between the norm
    and the clip.
    """
    params: list
    grads: list
    masters: list
    momentum_buffers: list
    momentum_first_step: list
    group_index: list
    groups: list
    max_grad_norm: float | None
    norm_type: float
    scaler: object
    applied_steps: torch.Tensor
    grad_norm: torch.Tensor
    found_inf: torch.Tensor
    cache: dict
    layout_id: int
    reduce_stats: object = None  # DTensor params: distributed.ShardReduction, else None
    # flat_grads=True (flat_storage.py): {grad dtype: flat buffer} that every grad is a view of,
    # fixed while the layout is; the norm pass then streams each buffer as one run.
    flat_grads: dict | None = None
    consecutive_skips: torch.Tensor | None = None  # int32: skipped steps in a row, written by finalize


def _module(name: str):
    return importlib.import_module(BACKENDS[name])


def availability(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on tensors of `device`, else a one-line reason."""
    try:
        module = _module(name)
    except ImportError as exc:  # e.g. triton not installed
        return f"{name} backend cannot be imported: {exc}"
    return module.availability(torch.device(device))


def resolve(name: str, device: torch.device):
    """The (name, module) that will run steps on `device`; raises with the reason if unavailable."""
    if name == "auto":
        for candidate in BACKENDS:
            if availability(candidate, device) is None:
                return candidate, _module(candidate)
        raise RuntimeError(f"no fused_opt backend can run on {device}")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    reason = availability(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available on {device}: {reason}")
    return name, _module(name)

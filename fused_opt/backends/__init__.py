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
class StepBatch:
    """Everything one step touches, for the params that have a grad.

    `rule` is the per-element update rule (update_rules.py: SGD or AdamW), `groups` each
    group's hyperparameters as that rule reads them. `buffers[i]` holds the FP32 state
    tensors the rule keeps for param i (SGD: the momentum buffer, or none without momentum;
    AdamW: exp_avg, exp_avg_sq and with amsgrad max_exp_avg_sq), `counts[i]` its 0-dim
    count (SGD: the buffer's first-step flag, AdamW: the param's step), None without buffers.
    `grad_norm` and `found_inf` are outputs written in place. `cache` is a dict the
    optimizer keeps for the backend across steps; `layout_id` changes whenever anything but
    the grads changed (params that step, their storage, state tensors, use of momentum), so a
    backend can cache tables of their addresses under it (and of the grads' too, when
    `flat_grads` is set). With DTensor params the lists hold
    local shards, and `reduce_stats(stats, norm_inf)` makes a rank's [norm statistic (sum of
    squares, or max for the inf-norm), inf count] global between the norm and the clip:
    `stats` has a row per sharding layout (`reduce_stats.members`: each one's positions in the
    lists, None for all), and the call returns the global pair over all of them.
    """
    params: list
    grads: list
    masters: list
    buffers: list
    counts: list
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
    rule: type | None = None
    # With ema_decay (ema.py): `emas[i]` is param i's EMA (FP32 or BF16), updated after its
    # master on applied steps, and `ema` the policy (decay, warm-up, dtype); else None.
    emas: list | None = None
    ema: object = None
    # state_precision (state_precision.py): how `buffers` are stored (FP32, BF16, or int8 codes
    # with `scales[i]`, one FP32 scale tensor per buffer of param i; None for other precisions).
    scales: list | None = None
    state_precision: object = None
    # The grads' data_ptr()s (int64, read with their layout: tensor_watch.py) and a version that
    # changes whenever their layout (shapes, strides, dtypes) did: a backend may keep facts
    # about the grads' layout (which need staging) while it stays. None: read the grads.
    grad_ptrs: torch.Tensor | None = None
    grad_version: int | None = None


def _module(name: str):
    return importlib.import_module(BACKENDS[name])


def availability(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on tensors of `device`, else a one-line reason."""
    try:
        module = _module(name)
    except ImportError as exc:  # e.g. triton not installed
        return f"{name} backend cannot be imported: {exc}"
    return module.availability(torch.device(device))


def resolve(name: str, device: torch.device, rule=None):
    """The (name, module) that will run steps on `device`; raises with the reason if unavailable.
    A rule with a matrix stage (matrix_rules.py) steps through the torch backend, with its
    elementwise stages as the chosen backend's kernels (stack_kernels.py)."""
    if name == "auto":
        name = next((c for c in BACKENDS if availability(c, device) is None), None)
        if name is None:
            raise RuntimeError(f"no fused_opt backend can run on {device}")
    elif name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    reason = availability(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available on {device}: {reason}")
    if getattr(rule, "matrix", False):
        from .stack_kernels import StagedStep
        return name, StagedStep(name, device)
    return name, _module(name)

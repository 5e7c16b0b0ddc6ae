"""Copies of an optimizer: copy.deepcopy, pickle, torch.save(opt).

torch's Optimizer.__getstate__ keeps only defaults, state and groups; a copy must step
exactly like the original, so everything travels but what refers to processes, modules or
raw memory (backends, cached layouts and tables, hooks, flat storage), which the copy
rebuilds from what did travel. An FP32 accumulation in progress travels as its sums.
"""
from __future__ import annotations

import torch

from . import backends
from .grad_accumulation import FP32GradAccumulator, low_precision_grad_is_fp32, set_grad
from .grad_guard import ScaledGradGuard, grad_snapshot_of
from .hyperparams import GroupHypers
from .master_format import master_format
from .state_precision import state_precision
from .flat_storage import FlatGrads
from .step_layout import PerTensorStorage
from .tracked_state import ParamList
from .transaction import Transaction

REBUILT = ("_backend", "_backend_cache", "_layouts", "_flat_grads", "_transaction", "_accumulator", "_flat_ids",
           "_flat", "_group_of", "_sharded", "_hypers", "_epoch", "_state", "_amp_scaler", "_guard")
# What a copy needs to know to rebuild the rest (popped before torch's __setstate__ sees it).
EXTRAS = ("_guarded", "_flat_mode", "_accumulated")


def getstate(opt) -> dict:
    if opt.__dict__.get("_ema_swapped"):
        raise RuntimeError("copying an optimizer inside swap_ema(): its params hold the EMA; copy it after the "
                           "`with` block")
    state = {k: v for k, v in opt.__dict__.items() if k not in REBUILT}
    state["state"] = opt.state
    state["_guarded"] = opt._guard is not None
    state["_flat_mode"] = opt._flat_grads is not None
    if opt._accumulator is not None:  # the FP32 sums of an accumulation in progress (in .grad)
        params = opt._flat_params()
        state["_accumulated"] = {i: p.grad for i, p in enumerate(params) if low_precision_grad_is_fp32(p, p.grad)}
    return state


def rebuild(opt, guarded: bool = False, flat_mode: bool = False, accumulated: dict | None = None) -> None:
    """Everything REBUILT names, for a copy whose travelling state is set."""
    opt._epoch = opt._state._epoch
    for name, default in (("_clip_request", None), ("_auto_scale", False), ("_check_scaled_grads", True),
                          ("_ema", None), ("_ema_swapped", False), ("_ema_buffers", None)):
        opt.__dict__.setdefault(name, default)  # copies made before these existed
    if "_state_precision" not in opt.__dict__:
        opt._state_precision = state_precision("fp32")
    if "_masters" not in opt.__dict__:
        opt._masters = master_format("remainder" if opt.__dict__.pop("_remainders", False) else "fp32")
    opt._flat_ids, opt._backend_cache, opt._amp_scaler = None, {}, None
    opt._layouts, opt._transaction = PerTensorStorage(), Transaction()
    opt._hypers = GroupHypers(opt.RULE)
    opt._guard = ScaledGradGuard(grad_snapshot_of(opt)) if guarded else None
    opt._flat_grads = FlatGrads() if flat_mode else None  # the copy adopts grads of its own
    for group in opt.param_groups:
        group["params"] = ParamList(opt._epoch, group["params"])
    params = opt._flat_params()
    device = params[0].device if params else torch.device("cpu")
    opt.backend, opt._backend = backends.resolve(opt.backend, device, opt.RULE)
    opt._accumulator = None
    if accumulated is not None:
        opt._accumulator = FP32GradAccumulator(params, adopt=True)
        for i, total in accumulated.items():
            if params[i].grad is None:  # torch's Parameter.__deepcopy__ leaves grads behind
                set_grad(params[i], total)

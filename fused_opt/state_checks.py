"""Checks of the memory a step is about to touch, and of a state dict before it is loaded.

The fused backends hand raw addresses to kernels that trust them: a master of the wrong
size, a param that overlaps itself or another param, a buffer laid out unlike its master
would be read or written outside its tensor. Everything here runs when the step's cached
layout is rebuilt (step_layout.PerTensorStorage._new_layout) or at load time, never per element, and raises
before anything is modified.
"""
from __future__ import annotations

import math

import torch

from .distributed import is_dtensor, local
from .loss_scaler import MIN_SCALE
from .memory import byte_span, has_internal_overlap, is_dense
from .validation import check_group, check_tensor_lr


def check_param_memory(tensors: list[torch.Tensor], name_of) -> None:
    """Each param has memory of its own: no self-overlap, no two params sharing memory (each
    would keep its own master, and the memory would get one update instead of two)."""
    spans = []
    for k, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        if has_internal_overlap(t):
            raise ValueError(f"{name_of(k)}: the param overlaps itself (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}, e.g. an expand()ed view): SGD needs memory of its own per element")
        spans.append((*byte_span(t), k))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{name_of(a)} and {name_of(b)} share memory (views of one storage); each would "
                             "keep its own FP32 master. Make them separate tensors, or one param.")


def _dense(t: torch.Tensor) -> bool:
    return is_dense(local(t))


def usable_master(master, p: torch.Tensor) -> bool:
    """Whether a cached master still fits its FP16/BF16 param: after `p.data = ...` of another
    shape, dtype or device (or `model.half()` of an FP32 param, whose master was the param
    itself) it does not, and is re-taken from the param."""
    return (isinstance(master, torch.Tensor) and master is not p and master.dtype == torch.float32
            and master.shape == p.shape and master.device == p.device and is_dtensor(master) == is_dtensor(p)
            and _dense(master))


def usable_remainder(remainder, p: torch.Tensor) -> bool:
    """Whether a cached int16 remainder (master_weights="remainder") still fits its param."""
    return (isinstance(remainder, torch.Tensor) and remainder.dtype == torch.int16 and remainder.shape == p.shape
            and remainder.device == p.device and _dense(remainder) and (remainder.stride() == p.stride()
                                                                        or p.numel() <= 1))


def conform_buffer(buf, p: torch.Tensor, master, name: str):
    """A momentum buffer as the kernels need it: FP32, p's shape and device, laid out like the
    master (elementwise by memory order). A buffer of another shape cannot be meant for this
    param (e.g. `p.data` replaced by a smaller tensor after steps): that raises."""
    if buf is None:
        return None
    if not isinstance(buf, torch.Tensor) or not buf.is_floating_point() or buf.is_complex():
        raise ValueError(f"{name}: state['momentum_buffer'] must be a floating-point tensor, got "
                         f"{type(buf).__name__ if not isinstance(buf, torch.Tensor) else buf.dtype}")
    if buf.shape != p.shape or buf.device != p.device or is_dtensor(buf) != is_dtensor(p):
        raise ValueError(f"{name}: state['momentum_buffer'] has shape {tuple(buf.shape)} on {buf.device}, but the "
                         f"param has shape {tuple(p.shape)} on {p.device} (was the param replaced after the "
                         "optimizer stepped? clear its state: del opt.state[p])")
    if is_dtensor(p):
        return buf if buf.dtype == torch.float32 else buf.to(torch.float32)
    like = master if master is not None else p
    strides = torch.empty_like(like, dtype=torch.float32, device="meta").stride()
    if buf.dtype == torch.float32 and _dense(buf) and (buf.stride() == strides or buf.numel() <= 1):
        return buf
    return torch.empty_like(like, dtype=torch.float32).copy_(buf)


def _check_state_tensor(value, p: torch.Tensor, where: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
    if not value.is_floating_point() or value.is_complex():
        raise ValueError(f"{where} must be a real floating-point tensor, got {value.dtype}")
    if value.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, the param has {tuple(p.shape)} "
                         "(a state dict of another model, or params in another order?)")
    if not bool(torch.isfinite(local(value)).all()):
        raise ValueError(f"{where} holds inf or NaN")


def _check_scaler_state(opt, extra, key: str) -> None:
    where = f"state dict {key!r}"
    if not isinstance(extra, dict) or not isinstance(extra.get("loss_scaler"), dict) or "applied_steps" not in extra:
        raise ValueError(f"{where}: expected {{'loss_scaler': {{...}}, 'applied_steps': ...}}")
    scaler = extra["loss_scaler"]
    if any(k not in scaler for k in ("scale", "growth_tracker", "enabled", "dynamic")):
        raise ValueError(f"{where}: the loss scaler state lacks one of scale, growth_tracker, enabled, dynamic")
    if bool(scaler["enabled"]) != opt._scaler.enabled or bool(scaler["dynamic"]) != opt._scaler.dynamic:
        raise ValueError("loss scaler state dict: saved with a different loss_scale mode "
                         f"(enabled={scaler['enabled']}, dynamic={scaler['dynamic']})")
    scale = float(torch.as_tensor(scaler["scale"]).reshape(()))
    if not (MIN_SCALE <= scale and math.isfinite(scale)):
        raise ValueError(f"{where}: the loss scale must be a finite number >= 2**-126 (its reciprocal must be "
                         f"finite in FP32), got {scale}")
    counts = [("growth_tracker", scaler["growth_tracker"]), ("applied_steps", extra["applied_steps"])]
    # Saved before hysteresis and consecutive_skips existed: absent, and loaded as 0.
    counts += [(name, where_[name]) for name, where_ in (("hysteresis_tracker", scaler),
                                                       ("consecutive_skips", extra)) if name in where_]
    for name, value in counts:
        value = torch.as_tensor(value)
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or int(value) < 0 or int(value) >= 2**31:
            raise ValueError(f"{where}: {name} must be a non-negative int32 count, got {value}")


def validated_state_dict(opt, state_dict, params: list, key: str):
    """Everything a load needs, checked before anything is modified. Returns (entries by flat
    param index, the saved groups without our key, state under keys that name no param, the
    scaler extra or None)."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("optimizer state dict must be a dict with 'state' and 'param_groups' keys")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups) if isinstance(saved_groups, (list, tuple)) else '?'} "
                         f"parameter groups, this optimizer has {len(opt.param_groups)}")
    groups, extras, saved_ids = [], [], []
    for gi, (saved, ours) in enumerate(zip(saved_groups, opt.param_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"loaded param_groups[{gi}] must be a dict with a 'params' list")
        if len(saved["params"]) != len(ours["params"]):
            raise ValueError(f"loaded param_groups[{gi}] has {len(saved['params'])} params, this optimizer's has "
                             f"{len(ours['params'])}")
        group = dict(saved)
        extras.append(group.pop(key, None))
        merged = {**opt.defaults, **group}
        check_group(merged, gi)
        if isinstance(merged["lr"], torch.Tensor):
            check_tensor_lr(merged, gi)
        groups.append(group)
        saved_ids.extend(saved["params"])
    if len(set(saved_ids)) != len(saved_ids):
        raise ValueError("loaded state dict names a param id twice in its param_groups")
    index_of = {saved_id: k for k, saved_id in enumerate(saved_ids)}
    state = state_dict["state"]
    if not isinstance(state, dict):
        raise ValueError(f"loaded state dict's 'state' must be a dict, got {type(state).__name__}")
    entries, others = {}, {}
    for saved_id, entry in state.items():
        if saved_id not in index_of:
            others[saved_id] = entry  # kept as they are, as torch keeps them
            continue
        k = index_of[saved_id]
        if not isinstance(entry, dict):
            raise ValueError(f"loaded state for param id {saved_id!r} must be a dict, got {type(entry).__name__}")
        p = params[k]
        for name in ("master_param", "momentum_buffer"):
            if entry.get(name) is not None or (name == "master_param" and name in entry):
                _check_state_tensor(entry[name], p, f"loaded state[{saved_id!r}][{name!r}]")
        entries[k] = entry
    extra = state_dict.get(key, next((e for e in extras if e is not None), None))  # 0.1 kept it at the top
    if extra is not None:
        _check_scaler_state(opt, extra, key)
    return entries, groups, others, extra

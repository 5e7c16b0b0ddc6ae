"""`state_dict()` and `load_state_dict()` of the fused optimizers, torch's protocol kept.

What it holds: per param, as torch.optim.SGD/AdamW number them, "master_param" (FP32; left
out for FP32 params, which are their own) and the update rule's state under torch's names
(SGD: "momentum_buffer", left out while never applied, as torch's SGD would have none;
AdamW: "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", as state_precision stores them: FP32,
BF16, or with state_precision="int8" codes under "<name>_codes" and their block scales under
"<name>_scale", never under torch's name, so that torch's optimizers cannot read codes as
values (`decoded_state_dict` converts; a sharded param's int8 state is saved decoded to FP32),
and with ema_decay the EMA
("ema_param", in ema_dtype); in every param group, under STATE_KEY, the loss scaler's
state and the applied-step count (torch.distributed.checkpoint keeps only "state" and
"param_groups", and may regroup the groups by param). Tensors are never views into a larger
storage (flat_grads keeps state in flat buffers): torch.save writes a view's whole storage.
"""
from __future__ import annotations

import copy
import functools

import torch

from . import ema, remainder
from .distributed import is_dtensor, placed_like
from .state_precision import LEGACY_CODE_DTYPES, codes_key, decode, decode_legacy, is_codes, scale_key
from .validation import validated_state_dict

# The key, in each saved param group, of the loss scaler's state and the applied-step count.
STATE_KEY = "fused_opt"
# What the live groups hold under STATE_KEY. Loaders that rebuild groups only from the keys
# the live groups have (torch.distributed.checkpoint's flattened optimizer state dicts, which
# torchtitan saves) then restore the saved entry too, instead of dropping it.
STATE_MARK = "loss scale, applied-step count (and EMA buffers): saved by state_dict()"


def pack(opt) -> dict:
    """As torch's (its pre- and post-hooks see and may replace exactly what torch's would),
    off the hot path, so it may sync: buffers never applied are left out, as
    torch.optim.SGD would have none; an FP32 param's master is the param itself; a master
    whose param was edited since our last write is taken from the param, as the next step
    would take it; state of a param no longer in any group is left out."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    opt.sync_from_params()
    params = opt._flat_params()
    index_of = {id(p): i for i, p in enumerate(params)}
    # torch.optim's own group keys (capturable, differentiable, ...) at torch's defaults where
    # ours lack them: a loader that asks for every key the torch.optim optimizer it fills has
    # (DCP's, torchtitan's) finds them.
    torch_keys = _torch_group_defaults_of(opt.RULE)
    groups = [{**torch_keys, **{k: v for k, v in g.items() if k != "params"},
               "params": [index_of[id(p)] for p in g["params"]]} for g in opt.param_groups]
    packed = {}
    for key, entry in opt.state.items():
        if not isinstance(key, torch.Tensor):
            packed[key] = entry  # other keys ride along, as in torch
            continue
        if id(key) not in index_of:
            continue
        index = index_of[id(key)]
        entry = opt.RULE.saved(dict(entry))
        # int8 buffers are saved decoded, FP32 values under torch's names, in every layout: a
        # sharded param's blocks are per shard, and a checkpoint may be loaded on another number
        # of ranks, by torch.optim, or by a loader that asks for the live names only. Loading
        # encodes them again, to the same codes and scales (decode then encode is the identity).
        for k in opt.RULE.all_buffers:
            if not is_codes(entry.get(k), entry.get(scale_key(k))):
                continue
            if is_dtensor(entry[k]):
                entry[k] = opt._state_precision.decoded_dtensor(entry[k], entry.pop(scale_key(k)))
            else:
                entry[k] = decode(entry[k], entry.pop(scale_key(k)))
        if entry.get("master_param") is key:
            del entry["master_param"]
        if opt._masters.key in entry:
            # Every state dict holds an FP32 master (rebuilt from a remainder). A remainder stays
            # too, under its live name, for loaders that ask for the live names only (DCP's
            # flattened state dicts, torchtitan's): it gives the master back with the param.
            entry["master_param"] = opt._masters.master_of(key, entry[opt._masters.key])
        # A view into flat storage (flat_grads) is copied out: torch.save writes a view's
        # whole storage, which would put every param's state in every entry.
        entry = {k: v.clone() if _is_view_into_more(v) else v for k, v in entry.items()}
        if entry:
            packed[index] = entry
    # In every group, as torch.distributed.checkpoint keeps only "state" and "param_groups"
    # (and may regroup the groups by param); load_state_dict takes it back out.
    extra = {"loss_scaler": opt._scaler.state_dict(), "applied_steps": opt._applied_steps.clone(),
             "consecutive_skips": opt.consecutive_skips.clone()}
    if opt._ema_buffers is not None:  # ema_model's buffers' average, by buffer name
        extra["ema_buffers"] = opt._ema_buffers.state()
    for group in groups:
        group[STATE_KEY] = extra
    sd = {"state": packed, "param_groups": groups}
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, sd)
        if result is not None:
            sd = result
    return sd


def load(opt, state_dict: dict) -> None:
    """Loads ours or torch's (torch.optim.SGD's, AdamW's) state dict, all or nothing: after the pre-hooks
    (which see and may replace the dict, as in torch), everything is checked
    (validation.validated_state_dict: groups, shapes, dtypes, finite values, the scaler)
    and only then put in place; the post-hooks run once it is. torch's loader casts
    floating state to the param's dtype, which would round FP32 masters and buffers to
    FP16, so the state is placed here, in FP32. A loaded master is written to its param
    (rounded), as an FP32 param's own master is. Keys torch's groups have and ours lack
    (foreach, fused, differentiable, capturable) ride along untouched."""
    state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    with torch.no_grad():
        _load(opt, state_dict)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def _load(opt, state_dict: dict) -> None:
    if opt._ema_swapped:
        raise RuntimeError("load_state_dict() inside swap_ema(): load after the `with` block")
    params = opt._flat_params()
    entries, saved_groups, others, extra = validated_state_dict(opt, state_dict, params, STATE_KEY)
    groups = []
    for group, saved in zip(opt.param_groups, copy.deepcopy(saved_groups)):
        saved["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            saved["param_names"] = group["param_names"]
        for key in opt.RULE.keys:
            saved.setdefault(key, opt.defaults[key])
        for key in _torch_group_defaults_of(opt.RULE):
            if key not in group:  # torch's implementation switches, saved for torch's loaders: not ours
                saved.pop(key, None)
        groups.append(saved)
    opt._layouts.invalidate()
    for group in groups:
        group[STATE_KEY] = STATE_MARK
    opt.param_groups = groups
    opt.state = others  # as torch: a new state; keys that name no param are kept as they are
    opt._hypers.reset()
    params = opt._flat_params()
    rule = opt.RULE
    for index, entry in entries.items():
        p = params[index]
        state = opt.state[p]
        for key, value in entry.items():
            if key not in ("master_param", "master_remainder", rule.count_key, ema.KEY, *rule.all_buffers,
                           *map(scale_key, rule.all_buffers), *map(codes_key, rule.all_buffers)):
                state[key] = value  # keys of other optimizers' wrappers ride along
        if "master_param" not in entry and entry.get("master_remainder") is not None and p.dtype == torch.bfloat16:
            # the remainder alone (a flattened DCP load): the master is the loaded param and it
            entry = dict(entry, master_param=remainder.rebuild_any(p.detach(), entry["master_remainder"]))
        if "master_param" in entry:
            master = placed_like(entry["master_param"], p)
            if p.dtype == torch.float32:
                p.copy_(master)
            else:
                opt._masters.load(state, p, master)
        if p.dtype == torch.float32:
            state["master_param"] = p
        for key in rule.all_buffers:
            # In this optimizer's state_precision, whichever it was saved in: values under the
            # key, codes under codes_key, or codes of the first int8 format under the key.
            saved = entry.get(codes_key(key), entry.get(key))
            if saved is not None:
                legacy = (codes_key(key) not in entry and isinstance(entry.get(scale_key(key)), torch.Tensor)
                          and saved.dtype in LEGACY_CODE_DTYPES.values())
                codes = legacy or codes_key(key) in entry  # else values: a scale beside them means nothing
                buf, scale = opt._state_precision.loaded(saved, entry.get(scale_key(key)) if codes else None, p,
                                                         key not in rule.unsigned_buffers, legacy)
                state[key] = buf
                if scale is not None:
                    state[scale_key(key)] = scale
        count = rule.loaded_count(entry, p)
        if count is not None:
            state[rule.count_key] = count
        # A saved EMA; without one (torch's state dict) the param's EMA restarts from its loaded
        # weights when it next steps (ema.py).
        if opt._ema is not None and entry.get(ema.KEY) is not None:
            state[ema.KEY] = torch.empty_like(p, dtype=opt._ema.dtype).copy_(placed_like(entry[ema.KEY], p))
    if extra is not None:
        opt._scaler.load_state_dict(extra["loss_scaler"])
        opt._applied_steps.copy_(extra["applied_steps"])
        opt.consecutive_skips.copy_(extra.get("consecutive_skips", 0))  # absent before it existed
        if opt._ema_buffers is not None and extra.get("ema_buffers") is not None:
            opt._ema_buffers.load(extra["ema_buffers"])


def decoded_state_dict(state_dict: dict) -> dict:
    """A copy of a state dict with every int8 buffer decoded to FP32 under torch's name
    ("exp_avg" from "exp_avg_codes" and "exp_avg_scale"): what torch.optim.AdamW or SGD, or a
    tool reading torch's names, can load. state_dict() holds values already; this converts
    checkpoints saved with codes by earlier versions. Other entries are shared, not copied."""
    out = dict(state_dict)
    out["state"] = {}
    for index, entry in state_dict["state"].items():
        entry = dict(entry) if isinstance(entry, dict) else entry
        if isinstance(entry, dict):
            for key in [k for k in entry if isinstance(k, str) and k.endswith("_scale")]:
                name = key[:-len("_scale")]
                if codes_key(name) in entry:
                    entry[name] = decode(entry.pop(codes_key(name)), entry.pop(key).float())
                elif isinstance(entry.get(name), torch.Tensor) and entry[name].dtype in (torch.int8, torch.uint8):
                    entry[name] = decode_legacy(entry[name], entry.pop(key).float())
        out["state"][index] = entry
    return out


def _is_view_into_more(t) -> bool:
    return (isinstance(t, torch.Tensor) and not is_dtensor(t)
            and t.untyped_storage().nbytes() > t.numel() * t.element_size())


def _torch_group_defaults_of(rule) -> dict:
    """torch.optim's implementation switches for `rule`'s torch counterpart (none for Muon:
    torch.optim.Muon has no such keys; none for MuSGD, which torch lacks)."""
    if getattr(rule, "matrix", False):
        return {}
    return _torch_group_defaults(getattr(torch.optim, rule.name))


@functools.cache
def _torch_group_defaults(torch_class) -> dict:
    """The group keys torch_class (torch.optim.SGD, AdamW) adds beyond the hyperparameters ours
    has too, at their defaults, as this torch writes them."""
    group = torch_class([torch.zeros(1)]).param_groups[0]
    return {k: v for k, v in group.items() if k in ("foreach", "fused", "capturable", "differentiable",
                                                     "decoupled_weight_decay")}

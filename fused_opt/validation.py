"""Every bad input raises here, before the step modifies anything: the optimizer's
arguments, params as they are added, grads, and a state dict before it is loaded. (A group's
hyperparameters are its update rule's to check, update_rules.py; the memory a step touches,
memory.py.) Messages name the offending group or parameter and the rule it breaks.
"""
from __future__ import annotations

import math

import torch

from .distributed import local
from .loss_scaler import MIN_SCALE

NORM_TYPES = (2.0, math.inf)


def check_params(params: list[torch.Tensor], index: int) -> None:
    """Params of one group as they are added: floating point, real, no duplicates."""
    seen = set()
    for j, p in enumerate(params):
        where = f"param_groups[{index}]['params'][{j}]"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: optimizer params must be tensors, got {type(p).__name__}")
        if not p.is_floating_point() or p.is_complex():
            raise TypeError(f"{where}: dtype {p.dtype} is not supported (integer and complex params "
                            "cannot be trained on FP32 masters)")
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


def _check_state_tensor(value, p: torch.Tensor, where: str, dtype: torch.dtype = torch.float32,
                        finite: bool = False) -> None:
    """A saved state value: real floating point, p's shape, and representable in `dtype`, the
    precision it is kept in (a finite float64 1e300 would load as inf). An optimizer buffer's
    non-finite values load as they are: a run reaches them (torch.optim.AdamW's exp_avg_sq is
    inf after a grad of ~6e20) and keeps saving them, and its own checkpoint must load back.
    A master or an EMA (`finite`) must be finite: loading it writes it into the model."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
    if not value.is_floating_point() or value.is_complex():
        raise ValueError(f"{where} must be a real floating-point tensor, got {value.dtype}")
    if value.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, the param has {tuple(p.shape)} "
                         "(a state dict of another model, or params in another order?)")
    v = local(value)
    if finite and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{where} holds inf or NaN (a master or an EMA is written into the model)")
    if torch.finfo(v.dtype).max > torch.finfo(dtype).max:
        overflows = torch.isfinite(v) & ~torch.isfinite(v.to(dtype))
        if bool(overflows.any()):
            raise ValueError(f"{where} holds finite {v.dtype} values beyond {dtype}'s range (largest "
                             f"{float(v[overflows].abs().max()):.3g}; {dtype} holds up to {torch.finfo(dtype).max:.3g})")


def _check_saved_codes(entry: dict, name: str, p: torch.Tensor, where: str, signed: bool, legacy: bool) -> None:
    """A buffer saved compressed (state_precision="int8"): int8 codes for signed state, FP16 for
    unsigned (uint8 in the first format), laid out as the param, and beside them one
    non-negative FP32 scale per block of state_precision.BLOCK elements (inf or NaN: a
    poisoned block, as a run can save it)."""
    from .distributed import is_dtensor
    from .state_precision import BLOCK, CODE_DTYPES, LEGACY_CODE_DTYPES, codes_key, num_blocks, scale_key
    key = name if legacy else codes_key(name)
    codes, scale = entry[key], entry.get(scale_key(name))
    expected = (LEGACY_CODE_DTYPES if legacy else CODE_DTYPES)[signed]
    if not isinstance(codes, torch.Tensor) or codes.dtype != expected:
        what = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"{where}[{key!r}] holds {what}; {name} is saved as {expected} codes")
    if is_dtensor(codes):
        raise ValueError(f"{where}[{key!r}]: codes of a sharded param (state dicts of DTensor params hold "
                         "the state decoded to FP32)")
    if codes.shape != p.shape:
        raise ValueError(f"{where}[{key!r}] has shape {tuple(codes.shape)}, the param has {tuple(p.shape)}")
    if (not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() != 1
            or scale.numel() != num_blocks(codes.numel())):
        raise ValueError(f"{where}[{scale_key(name)!r}] must be a 1-D FP32 tensor of {num_blocks(codes.numel())} "
                         f"block scales (one per {BLOCK} elements of {key!r})")
    if bool((scale < 0).any()):
        raise ValueError(f"{where}[{scale_key(name)!r}] holds a negative scale")
    if not legacy and codes.dtype == torch.float16 and bool((codes.view(torch.int16) < 0).any()
                                                            | ~torch.isfinite(codes).all()):
        raise ValueError(f"{where}[{key!r}] holds negative or non-finite codes ({name} is never negative)")
    if codes.dtype == torch.int8 and not legacy and bool((codes.abs() > 121).any() | (codes == -128).any()):
        raise ValueError(f"{where}[{key!r}] holds codes beyond +-121, which no encoding writes")


def _check_rule(opt, groups: list, state: dict) -> None:
    """A state dict of another update rule (SGD's into AdamW, torch.optim.AdamW's into SGD) is
    refused by what only the other rule's groups and state hold."""
    from .matrix_rules import RULES
    ours = opt.RULE
    for other in RULES:
        if other is ours:
            continue
        group_keys = set(other.group_keys) - set(ours.group_keys)
        state_keys = set(other.all_buffers) - set(ours.all_buffers)
        found = next((f"param_groups[{gi}] has {k!r}" for gi, g in enumerate(groups) if isinstance(g, dict)
                      for k in sorted(group_keys) if k in g), None)
        if found is None:
            found = next((f"state[{i!r}] has {k!r}" for i, e in state.items() if isinstance(e, dict)
                          for k in e if isinstance(k, str) and k.removesuffix("_codes") in state_keys), None)
        if found is not None:
            raise ValueError(f"loaded state dict is of another update rule ({other.name}: its {found}); "
                             f"{type(opt).__name__} steps {ours.name} and cannot continue it")


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
        # (the kernels saturate the counts at 2**31 - 1 and clamp the scaler's into range)
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
    if isinstance(state_dict["state"], dict):
        _check_rule(opt, saved_groups, state_dict["state"])
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
        opt.RULE.check_group(merged, gi)
        opt.RULE.check_tensor_values(merged, gi)
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
        where = f"loaded state[{saved_id!r}]"
        # torch.distributed.checkpoint's flattened loads (torchtitan's) ask for every key the
        # live state has and hand an empty dict for one the checkpoint lacks: nothing saved.
        entry = {name: v for name, v in entry.items() if not (isinstance(v, dict) and not v)}
        from .state_precision import LEGACY_CODE_DTYPES, codes_key, scale_key
        if entry.get("master_remainder") is not None:  # a remainder master's low bits, beside its FP32 value
            r = entry["master_remainder"]
            if not isinstance(r, torch.Tensor) or r.dtype not in (torch.int16, torch.int8) or r.shape != p.shape:
                raise ValueError(f"{where}['master_remainder'] must be an int16 or int8 tensor of shape "
                                 f"{tuple(p.shape)}")
        for name in ("master_param", "ema_param"):  # values only: codes are never a master or an EMA
            if entry.get(name) is not None or (name == "master_param" and name in entry):
                dtype = opt._ema.dtype if name == "ema_param" and opt._ema is not None else torch.float32
                _check_state_tensor(entry[name], p, f"{where}[{name!r}]", dtype, finite=True)
        for name in opt.RULE.all_buffers:
            signed = name not in opt.RULE.unsigned_buffers
            if codes_key(name) in entry:
                if name in entry:
                    raise ValueError(f"{where} has both {name!r} and {codes_key(name)!r}")
                _check_saved_codes(entry, name, p, where, signed, legacy=False)
            elif (isinstance(entry.get(name), torch.Tensor) and entry.get(scale_key(name)) is not None
                  and entry[name].dtype in LEGACY_CODE_DTYPES.values()):
                _check_saved_codes(entry, name, p, where, signed, legacy=True)  # the first int8 format
            elif entry.get(name) is not None:
                _check_state_tensor(entry[name], p, f"{where}[{name!r}]")
        opt.RULE.check_loaded(entry, f"loaded state[{saved_id!r}]")
        entries[k] = entry
    extra = state_dict.get(key, next((e for e in extras if e is not None), None))  # 0.1 kept it at the top
    if extra is not None:
        _check_scaler_state(opt, extra, key)
        if opt._ema_buffers is not None and extra.get("ema_buffers") is not None:
            opt._ema_buffers.check_state(extra["ema_buffers"])
    return entries, groups, others, extra

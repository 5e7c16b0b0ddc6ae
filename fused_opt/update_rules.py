"""The per-element update rule: what FusedMixedPrecisionSGD and FusedMixedPrecisionAdamW do
differently. Everything around it is one pipeline shared by both (unscale, inf check, norm
and clip, update, write-back; storage, master format, loss scale). A rule says

- which hyperparameters a param group has, how they are checked, and how they reach the
  kernels: one row of GROUP_COLUMNS float32 per group (`Hyper.row`), with tensor values (a scheduler's
  tensor lr) copied into their column on the device (`Hyper.device_values`);
- which state a param keeps beside its master, under torch's names: `Hyper.buffers`, FP32
  tensors laid out like the master (the kernels' BUF, BUF2, BUF3 columns), and one 0-dim
  count (the COUNT column): SGD's first-applied-step flag, AdamW's step;
- the math, in torch ops (`update`): the pure-PyTorch backend runs it, and the kernels'
  per-element functions (csrc/sgd_math.h, csrc/adamw_math.h, triton_kernels.py) follow it.

The rule of an optimizer is its class's `RULE`, chosen nowhere else.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

# Codes shared with the kernels (csrc/dispatch.h kSGD/kAdamW, triton_kernels.py).
SGD_CODE, ADAMW_CODE = 0, 1


def _number(group: dict, name: str, where: str) -> float:
    """A hyperparameter that must be a plain number (read on the host)."""
    value = group[name]
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: {name} must be a number, not a tensor")
    return float(value)


def _check_scalar_tensor(value, where: str, name: str) -> None:
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"{where}: Tensor {name} must be 1-element (a 1-element floating-point tensor)")


def _check_lr(group: dict, where: str) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        _check_scalar_tensor(lr, where, "lr")
    elif isinstance(lr, (bool, str)) or not lr >= 0.0:
        raise ValueError(f"{where}: invalid learning rate {lr!r} (must be >= 0)")


def _fp32(x: float) -> float:
    """x rounded to FP32 (to nearest even), as a Python float, without a tensor."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # rounds past FP32's largest
        return math.copysign(math.inf, x)


def _low(x: float) -> float:
    """What a double loses in FP32: x - float32(x), itself rounded to FP32."""
    hi = _fp32(x)
    return _fp32(x - hi) if math.isfinite(hi) else 0.0


def commit(dst: torch.Tensor, new: torch.Tensor, found_inf: torch.Tensor) -> None:
    """dst <- new where the step is applied; a skipped step keeps dst. Decided on the device,
    in one pass (a select written in place)."""
    if new.dtype == dst.dtype:
        torch.where(found_inf, dst, new, out=dst)
    else:
        dst.copy_(torch.where(found_inf, dst, new))


# int8 state clamps exp_avg to MOMENT_MARGIN * moment_bound * sqrt(exp_avg_sq): rounding noise (a
# code up to 1/8 off, v's half precision) never reaches it, only codes that disagree (an m of one
# block's scale beside a v flushed in another's). No step exceeds twice FP32's largest.
MOMENT_MARGIN = 2.0


def moment_bound(beta1: float, beta2: float, t) -> torch.Tensor | float:
    """C_t with |m_t| <= C_t * sqrt(v_t) for Adam's moments after t steps from zero, whatever the
    grads (Cauchy-Schwarz on m's and v's sums over the same grads):
    C_t^2 = (1 - beta1)^2 / (1 - beta2) * sum_{j<t} (beta1^2 / beta2)^j. It is inductive (a state
    within it stays within it), so clamping a decoded int8 state to it changes no state FP32
    would hold; the step it allows is bounded by the largest step FP32 state can take. In float64 with
    a margin of 2^-20 (no rounding of an FP32-exact state may bite), rounded once; inf where
    beta2 is 0 (no bound: v is the last u^2 alone). `t` may be a float64 tensor."""
    if beta2 == 0.0:
        return math.inf if not isinstance(t, torch.Tensor) else torch.full_like(t, math.inf)
    r = beta1 * beta1 / beta2
    if isinstance(t, torch.Tensor):
        total = t.clone() if r == 1.0 else (1.0 - torch.pow(torch.tensor(r, dtype=torch.float64, device=t.device), t)) / (1.0 - r)
        return ((1.0 - beta1) * torch.sqrt(total / (1.0 - beta2)) * (1.0 + 2.0 ** -20)).float()
    total = t if r == 1.0 else (1.0 - r ** t) / (1.0 - r)
    return (1.0 - beta1) * math.sqrt(total / (1.0 - beta2)) * (1.0 + 2.0 ** -20)


def _device_value(value: torch.Tensor, device) -> torch.Tensor:
    return value.reshape(()).to(device, torch.float32, non_blocking=True)


def _host_value(value: torch.Tensor) -> float:
    """A tensor hyperparameter's value, read once when the optimizer first sees that tensor
    (a sync on the GPU, off the hot path)."""
    return float(value.detach().reshape(()).float().cpu())


# -- SGD -------------------------------------------------------------------------------------
@dataclass
class SGDHyper:
    """One SGD param group's hyperparameters for this step (lr may be a 0-dim tensor)."""
    lr: float | torch.Tensor
    momentum: float | torch.Tensor  # a tensor (CyclicLR/OneCycleLR's tensor momenta) is read on the device
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool

    @property
    def buffers(self) -> tuple:
        """The group keeps a momentum buffer when momentum is not 0; a tensor momentum always
        does (its value is not read on the host), and steps as torch's SGD would at that value."""
        return ("momentum_buffer",) if isinstance(self.momentum, torch.Tensor) or self.momentum != 0 else ()

    def row(self) -> tuple:
        # lr, momentum, 1 - dampening, weight decay, nesterov, maximize (csrc/sgd_math.h SGDHyper)
        return (0.0 if isinstance(self.lr, torch.Tensor) else float(self.lr),
                0.0 if isinstance(self.momentum, torch.Tensor) else self.momentum, 1.0 - self.dampening,
                self.weight_decay, float(self.nesterov), float(self.maximize)) + (0.0,) * 6

    def device_values(self, device) -> list:
        """(column, value) of the tensors read on the device. At a momentum of 0 torch's SGD
        ignores dampening: so does the table then."""
        out = []
        if isinstance(self.lr, torch.Tensor):
            out.append((0, _device_value(self.lr, device)))
        if isinstance(self.momentum, torch.Tensor):
            m = _device_value(self.momentum, device)
            out += [(1, m), (2, torch.where(m != 0, 1.0 - self.dampening, 1.0))]
        return out


class SGD:
    code = SGD_CODE
    name = "SGD"
    group_keys = ("momentum", "dampening", "nesterov")  # what only this rule's groups hold
    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    keys = tuple(defaults)
    tensor_keys = ("lr", "momentum")  # may be 0-dim tensors, read on the device
    all_buffers = ("momentum_buffer",)
    unsigned_buffers = ()  # never negative: state_precision="int8" stores them unsigned
    count_key = "momentum_first_step"

    @staticmethod
    def check_group(group: dict, index: int) -> None:
        where = f"param_groups[{index}]"
        _check_lr(group, where)
        momentum = group["momentum"]
        if isinstance(momentum, torch.Tensor):  # CyclicLR/OneCycleLR write tensor momenta: read on the device
            _check_scalar_tensor(momentum, where, "momentum")
        names = ("weight_decay", "dampening") if isinstance(momentum, torch.Tensor) else ("momentum", "weight_decay", "dampening")
        for name in names:
            value = _number(group, name, where)
            if not value >= 0.0:
                raise ValueError(f"{where}: invalid {name} {value!r} (must be >= 0)")
        no_momentum = not isinstance(momentum, torch.Tensor) and momentum <= 0
        if group["nesterov"] and (no_momentum or group["dampening"] != 0):
            raise ValueError(f"{where}: nesterov momentum requires momentum > 0 and dampening = 0")

    @staticmethod
    def check_tensor_values(group: dict, index: int) -> None:
        for name, what in (("lr", "learning rate"), ("momentum", "momentum")):
            value = group.get(name)
            if isinstance(value, torch.Tensor):
                value = _host_value(value)
                if not (value >= 0.0 and math.isfinite(value)):
                    raise ValueError(f"param_groups[{index}]: invalid {what} {value!r} (must be finite and >= 0)")
                if name == "momentum" and group.get("nesterov") and value <= 0:
                    raise ValueError(f"param_groups[{index}]: nesterov momentum requires momentum > 0 and dampening = 0")

    @staticmethod
    def hyper(g: dict) -> SGDHyper:
        momentum = g["momentum"] if isinstance(g["momentum"], torch.Tensor) else float(g["momentum"])
        return SGDHyper(g["lr"], momentum, float(g["dampening"]), float(g["weight_decay"]), bool(g["nesterov"]),
                        bool(g["maximize"]))

    @staticmethod
    def count(state: dict, device, new_buffers: bool) -> torch.Tensor:
        """The buffer's first-step flag: 0 while the buffer was never applied, else the
        applied-step count of its first applied step (every chunk of a tensor writes the same
        value, so the kernels' chunks never race on it); -1 for a buffer applied before (put
        in the state by hand or by a loader), never equal to an applied-step count."""
        flag = state.get("momentum_first_step")
        if new_buffers:
            return torch.zeros((), dtype=torch.int32, device=device)
        if (isinstance(flag, torch.Tensor) and flag.dtype == torch.int32 and flag.dim() == 0
                and flag.device == device):
            return flag
        return torch.full((), -1, dtype=torch.int32, device=device)

    @staticmethod
    def update(w, d, bufs, count, h: SGDHyper, applied_steps, found_inf, bounded: bool = False):
        """d = c*u (negated if maximize), weight decay, momentum; returns the new master.
        The buffers and the count are written only where the step is applied. (`bounded` is
        AdamW's; SGD's step is lr times its buffer, bounded by the buffer's own precision.)"""
        if h.maximize:
            d = -d
        if h.weight_decay != 0:
            d = d + h.weight_decay * w
        if bufs:
            b = bufs[0]
            first = (count == 0) | (count == applied_steps)
            keep_d = 1 - h.dampening
            if isinstance(h.momentum, torch.Tensor):  # at a momentum of 0 torch's SGD ignores dampening
                keep_d = torch.where(h.momentum != 0, keep_d, 1.0)
            new_b = torch.where(first, d, b * h.momentum + keep_d * d)
            d = d + h.momentum * new_b if h.nesterov else new_b
            commit(b, new_b, found_inf)
            count.copy_(torch.where((count == 0) & ~found_inf, applied_steps, count))
        return w - h.lr * d

    @staticmethod
    def saved(entry: dict) -> dict:
        """A param's state as a state dict holds it: a buffer never applied is left out, as
        torch.optim.SGD would have none."""
        first_step = entry.pop("momentum_first_step", None)
        if first_step is not None and int(first_step) == 0:
            entry.pop("momentum_buffer", None)
        return entry

    @staticmethod
    def check_loaded(entry: dict, where: str) -> None:
        """A loaded entry's rule-specific parts (the buffer is checked as every state tensor)."""

    @staticmethod
    def loaded_count(entry: dict, p: torch.Tensor):
        """The count for a loaded buffer: applied before (-1)."""
        if entry.get("momentum_buffer") is None:
            return None
        return torch.full((), -1, dtype=torch.int32, device=p.device)


# -- AdamW -----------------------------------------------------------------------------------
@dataclass
class AdamWHyper:
    """One AdamW param group's hyperparameters for this step (lr may be a 0-dim tensor)."""
    lr: float | torch.Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool

    @property
    def buffers(self) -> tuple:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if self.amsgrad else ("exp_avg", "exp_avg_sq")

    def row(self) -> tuple:
        # lr, beta1, 1 - beta1, beta2, 1 - beta2, weight decay, eps, maximize, then what beta1,
        # beta2, lr and weight decay lose in FP32 (csrc/adamw_math.h AdamWHyper): 1 - beta is rounded
        # once from the double, as torch's scalar arguments are, and the bias corrections and the
        # decay are computed from hi + lo, within 2^-48 of the user's doubles, as torch computes
        # them in double on the host.
        lr = 0.0 if isinstance(self.lr, torch.Tensor) else float(self.lr)
        return (lr, self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, self.weight_decay, self.eps,
                float(self.maximize), _low(self.beta1), _low(self.beta2), _low(lr), _low(self.weight_decay))

    def device_values(self, device) -> list:
        return [(0, _device_value(self.lr, device))] if isinstance(self.lr, torch.Tensor) else []


class AdamW:
    code = ADAMW_CODE
    name = "AdamW"
    group_keys = ("betas", "eps", "amsgrad")
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False)
    keys = tuple(defaults)
    tensor_keys = ("lr",)
    all_buffers = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    unsigned_buffers = ("exp_avg_sq", "max_exp_avg_sq")
    count_key = "step"

    @staticmethod
    def check_group(group: dict, index: int) -> None:
        where = f"param_groups[{index}]"
        _check_lr(group, where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        for k, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor):
                raise ValueError(f"{where}: betas[{k}] must be a number, not a tensor (tensor betas are not "
                                 "supported; a scheduler's tensor lr is)")
            if isinstance(beta, (bool, str)) or not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"{where}: Invalid beta parameter at index {k}: {beta!r} (must be in [0, 1))")
        for name in ("eps", "weight_decay"):
            value = _number(group, name, where)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{where}: Invalid {name} value: {group[name]!r} (must be finite and >= 0)")
        # torch.optim.Adam's groups say decoupled_weight_decay=False (L2 added to the grad): loaded
        # here they would be stepped as AdamW, a different optimizer, without a word.
        if group.get("decoupled_weight_decay", True) is False and group["weight_decay"] != 0:
            raise ValueError(f"{where}: decoupled_weight_decay=False with weight_decay={group['weight_decay']} is "
                             "torch.optim.Adam's update (L2 weight decay); FusedMixedPrecisionAdamW steps AdamW "
                             "(decoupled weight decay). Set the group's weight_decay to 0 or drop the key.")

    @staticmethod
    def check_tensor_values(group: dict, index: int) -> None:
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            value = _host_value(lr)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"param_groups[{index}]: invalid learning rate {value!r} (must be finite and >= 0)")

    @staticmethod
    def hyper(g: dict) -> AdamWHyper:
        beta1, beta2 = g["betas"]
        return AdamWHyper(g["lr"], float(beta1), float(beta2), float(g["eps"]), float(g["weight_decay"]),
                          bool(g["amsgrad"]), bool(g["maximize"]))

    @staticmethod
    def count(state: dict, device, new_buffers: bool) -> torch.Tensor:
        """The param's step, torch.optim.AdamW's state["step"]: a float32 count of the steps
        applied to it, kept on its device (read and advanced by the kernels)."""
        step = state.get("step")
        if new_buffers or step is None:
            return torch.zeros((), dtype=torch.float32, device=device)
        if isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0 and step.device == device:
            return step
        return torch.tensor(float(step), dtype=torch.float32, device=device)

    @staticmethod
    def update(w, u, bufs, count, h: AdamWHyper, applied_steps, found_inf, bounded: bool = False):
        """Decoupled weight decay, the moments, bias correction by the param's own count of
        applied steps t; returns the new master. The scalars are computed in float64 and
        rounded once, as torch.optim.AdamW computes them on the host; ((1 - beta2) * u) * u in
        torch's order (addcmul_), finite for |u| up to ~5.8e20 at beta2 = 0.999 where u * u
        overflows at 1.8e19. `bounded` (int8 state): exp_avg clamped to +-moment_bound * sqrt(v)."""
        if h.maximize:
            u = -u
        t = (count + 1).double()
        lr = h.lr.double() if isinstance(h.lr, torch.Tensor) else h.lr
        bias1 = 1 - torch.pow(torch.tensor(h.beta1, dtype=torch.float64, device=t.device), t)
        bias2 = 1 - torch.pow(torch.tensor(h.beta2, dtype=torch.float64, device=t.device), t)
        step_size = (lr / bias1).float()
        bias2_sqrt = bias2.sqrt().float()
        decay = torch.as_tensor(1 - lr * h.weight_decay, dtype=torch.float64).float()
        m, v = bufs[0], bufs[1]
        # torch.optim.AdamW's exp_avg.lerp_(grad, 1 - beta1), by its kernel's formula written
        # out (torch's CPU vector lerp may fuse it into an FMA; the kernels round each operation)
        weight = _fp32(1 - h.beta1)
        new_m = m + weight * (u - m) if weight < 0.5 else u - (u - m) * (1 - weight)
        new_v = h.beta2 * v + ((1 - h.beta2) * u) * u
        if bounded:
            limit = (MOMENT_MARGIN * moment_bound(h.beta1, h.beta2, t)) * new_v.sqrt()
            new_m = torch.where(new_m > limit, limit, new_m)  # selects, as the kernels: NaN passes
            new_m = torch.where(new_m < -limit, -limit, new_m)
        denominator_v = new_v
        if h.amsgrad:
            new_max = torch.maximum(bufs[2], new_v)
            commit(bufs[2], new_max, found_inf)
            denominator_v = new_max
        denom = denominator_v.sqrt() / bias2_sqrt + h.eps
        commit(m, new_m, found_inf)
        commit(v, new_v, found_inf)
        commit(count, count + 1, found_inf)
        return w * decay + (-step_size * new_m) / denom  # addcdiv_(m, denom, value=-step_size)

    @staticmethod
    def saved(entry: dict) -> dict:
        """As torch.optim.AdamW saves it; "step" is a float32 tensor, as torch's."""
        return entry

    @staticmethod
    def check_loaded(entry: dict, where: str) -> None:
        """A loaded "step": a non-negative whole number, as torch counts, beside its moments."""
        if "step" not in entry:
            return
        step = torch.as_tensor(entry["step"])
        if step.numel() != 1 or step.is_complex():
            raise ValueError(f"{where}['step'] must be a number, got {entry['step']!r}")
        value = float(step.reshape(()))
        if not (value >= 0 and value == math.floor(value) and value < 2**24):
            raise ValueError(f"{where}['step'] must be a whole number of steps in [0, 2**24), got {value}")
        def held(name):  # as values, or as int8 codes (state_precision.codes_key)
            return entry.get(name) is not None or entry.get(f"{name}_codes") is not None
        if not held("exp_avg") or not held("exp_avg_sq"):
            raise ValueError(f"{where} has a 'step' but lacks 'exp_avg' or 'exp_avg_sq'")

    @staticmethod
    def loaded_count(entry: dict, p: torch.Tensor):
        step = entry.get("step")
        if step is None:
            return None
        value = float(torch.as_tensor(step).reshape(()))
        return torch.tensor(value, dtype=torch.float32, device=p.device)

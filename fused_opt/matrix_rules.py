"""Update rules with a matrix stage: Muon (torch.optim.Muon's update) and MuSGD (Ultralytics'
Muon + SGD hybrid). The pipeline around them is the one SGD and AdamW run (unscale, inf
check, norm and clip before; masters, state precision, write-back and EMA after); what a rule
now is grew by one thing: instead of a per-element `update(w, u, ...)` these rules have a
list-level `update_all`, elementwise stages around one matrix stage (newton_schulz.py) that
orthogonalizes every param's momentum at once, batched by shape. `update_all` is a generator:
it yields its matrix stage (newton_schulz.Request) and takes the results, so that a step of
many stacks can run their matrix stages together (newton_schulz.run_together); its value is
the new masters.

A Muon param group has `algorithm="muon"` (the default) or `"adamw"`: params that are not
matrices (biases, norms) and those the user keeps off Muon (embeddings, the head) are
stepped by AdamW inside the same optimizer, with AdamW's hyperparameters in their group, as
the Muon reference implementation and torchtitan do. Every param keeps a float32 count
under "step" (AdamW's step; a Muon param's applied steps, left out of state dicts as
torch.optim.Muon has none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import newton_schulz
from .backends import buckets
from .update_rules import SGD, AdamW, AdamWHyper, _check_lr, _number, commit

MUON_CODE, MUSGD_CODE = 2, 3


def refuse_sharded_matrices(name: str, params: list, index: int) -> None:
    """A DTensor shard is not its matrix: orthogonalizing it alone would be a different update."""
    from .distributed import is_dtensor
    for j, p in enumerate(params):
        if is_dtensor(p):
            raise ValueError(f"{name}: param_groups[{index}]['params'][{j}] is a DTensor (FSDP2 / tensor parallel): "
                             "its local shard is not the matrix Newton-Schulz must orthogonalize, and gathering "
                             "each matrix is not supported; use DDP, or an AdamW/SGD optimizer for sharded params")


def _check_matrices(group: dict, where: str, what: str, elsewhere: str) -> None:
    for j, p in enumerate(group.get("params", ())):
        if isinstance(p, torch.Tensor) and p.dim() < 2:
            raise ValueError(f"{where}['params'][{j}]: {what} orthogonalizes matrices, and this param has shape "
                             f"{tuple(p.shape)}; put params that are not matrices (biases, norms) in a group "
                             f"with {elsewhere}")


def _check_momentum(group: dict, where: str) -> None:
    for name in ("momentum", "weight_decay"):
        value = _number(group, name, where)
        if not (value >= 0.0 and math.isfinite(value)):
            raise ValueError(f"{where}: invalid {name} {group[name]!r} (must be finite and >= 0)")


# -- Muon ------------------------------------------------------------------------------------
@dataclass
class MuonHyper:
    lr: float | torch.Tensor
    momentum: float
    nesterov: bool
    weight_decay: float
    ns_coefficients: tuple
    eps: float
    ns_steps: int
    adjust_lr_fn: str | None

    buffers = ("momentum_buffer",)


class Muon:
    """torch.optim.Muon's update on FP32 masters: momentum by lerp, nesterov, Newton–Schulz
    in BF16, decoupled weight decay, the adjusted lr; AdamW in groups with algorithm="adamw"."""
    code = MUON_CODE
    name = "Muon"
    matrix = True
    momentum_reads_grads = True  # u is read once, by the momentum (update_all: buckets.ScaledGrads)
    group_keys = ("momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn", "algorithm", "betas", "eps",
                  "amsgrad")
    defaults = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                    ns_coefficients=newton_schulz.NS_COEFFICIENTS, eps=newton_schulz.NS_EPS,
                    ns_steps=newton_schulz.NS_STEPS, adjust_lr_fn=None, algorithm="muon",
                    betas=(0.9, 0.999), amsgrad=False, maximize=False)
    # Where an algorithm="adamw" group names no value of its own for a key both rules have,
    # it takes torch.optim.AdamW's default, not Muon's.
    adamw_defaults = dict(weight_decay=1e-2, eps=1e-8)
    keys = tuple(defaults)
    tensor_keys = ("lr",)
    all_buffers = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    unsigned_buffers = ("exp_avg_sq", "max_exp_avg_sq")
    count_key = "step"

    @staticmethod
    def fill_group(group: dict) -> dict:
        """An algorithm="adamw" group's keys it does not name take AdamW's defaults, not Muon's
        (eps 1e-8, not the Newton–Schulz 1e-7; weight decay 1e-2)."""
        if group.get("algorithm") == "adamw":
            return {**Muon.adamw_defaults, **group}
        return group

    @staticmethod
    def check_group(group: dict, index: int) -> None:
        where = f"param_groups[{index}]"
        algorithm = group.get("algorithm", "muon")
        if algorithm == "adamw":
            AdamW.check_group(group, index)
            return
        if algorithm != "muon":
            raise ValueError(f"{where}: algorithm must be 'muon' or 'adamw', got {algorithm!r}")
        _check_lr(group, where)
        _check_momentum(group, where)
        if not 0.0 <= float(group["momentum"]) < 1.0:
            raise ValueError(f"{where}: momentum must be in [0, 1) (the buffer is a lerp toward the grad), "
                             f"got {group['momentum']!r}")
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"{where}: ns_coefficients must be a tuple of exactly 3 values, got {coefficients!r}")
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
            raise ValueError(f"{where}: ns_steps must be an int in [0, 100), got {steps!r}")
        eps = _number(group, "eps", where)
        if not (eps >= 0.0 and math.isfinite(eps)):
            raise ValueError(f"{where}: invalid eps {group['eps']!r} (must be finite and >= 0)")
        if group["adjust_lr_fn"] not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"{where}: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', "
                             f"got {group['adjust_lr_fn']!r}")
        if group.get("maximize"):
            raise ValueError(f"{where}: maximize=True is not supported by Muon (torch.optim.Muon has no maximize)")
        _check_matrices(group, where, "Muon", 'algorithm="adamw"')

    @staticmethod
    def check_tensor_values(group: dict, index: int) -> None:
        AdamW.check_tensor_values(group, index)

    @staticmethod
    def hyper(g: dict):
        if g.get("algorithm", "muon") == "adamw":
            return AdamW.hyper(g)
        return MuonHyper(g["lr"], float(g["momentum"]), bool(g["nesterov"]), float(g["weight_decay"]),
                         tuple(map(float, g["ns_coefficients"])), float(g["eps"]), int(g["ns_steps"]),
                         g["adjust_lr_fn"])

    count = staticmethod(AdamW.count)

    @staticmethod
    def update_all(ws, us, bufs, counts, hypers, applied_steps, found_inf, bounded=False, stacked=False, stages=None,
                   params=None) -> list:
        """The new master of every param: AdamW's for algorithm="adamw" params, else
        torch.optim.Muon's, its momentum and orthogonalization batched over the params.
        `stacked`: each tensor is a stack of params of one shape (its first dim), counts
        shaped to broadcast over them. `stages` (stack_kernels.py): the momentum as its
        kernel; with `params` (the members of the one stack) the apply too, which writes the
        master and the params itself (its new master is then None: nothing left to store).
        A generator: it yields its matrix stage (newton_schulz.Request per Newton-Schulz
        setting) and returns the new masters; newton_schulz.start / complete run it."""
        new_ws = [None] * len(ws)
        muon = []
        for i, h in enumerate(hypers):
            if isinstance(h, AdamWHyper):  # (the fused backends' stages step these themselves: elementwise_step)
                new_ws[i] = _adamw(ws[i], us[i], bufs[i], counts[i], h, applied_steps, found_inf, bounded, stacked)
            else:
                muon.append(i)
        if not muon:
            return new_ws
        # 1. momentum (elementwise): B <- B.lerp(u, 1 - mu); the update U = u.lerp(B, mu) with nesterov
        updates = []
        for i in muon:
            h, (b,) = hypers[i], bufs[i]
            if stages is not None and stages.can_step(us[i], b):
                updates.append(stages.momentum(us[i], b, found_inf, h.momentum, h.nesterov))
            else:
                u = buckets.rows(us[i])
                new_b = torch.lerp(b, u, 1 - h.momentum)
                updates.append(torch.lerp(u, new_b, h.momentum) if h.nesterov else new_b)
                commit(b, new_b, found_inf)
            commit(counts[i], counts[i] + 1, found_inf)
        # 2. the matrix stage: one batched Newton-Schulz per (group settings, shape), run by the caller
        settings = _by_settings([hypers[i] for i in muon])
        requests = []
        for members in settings:
            h = hypers[muon[members[0]]]
            requests.append(newton_schulz.Request([updates[k] for k in members], "torch", h.ns_coefficients,
                                                  h.ns_steps, h.eps, stacked))
        results = yield requests
        for members, rows in zip(settings, results):
            for k, o in zip(members, rows):
                updates[k] = o
        # 3. decoupled weight decay, then the step at the adjusted lr (torch's mul_ and add_)
        for k, i in enumerate(muon):
            h, w = hypers[i], ws[i]
            ratio = newton_schulz.adjusted_lr_ratio(h.adjust_lr_fn, w.shape[1:] if stacked else w.shape)
            if params is not None:
                stages.apply(w, updates[k], params, found_inf, 1 - h.lr * h.weight_decay, -(h.lr * ratio))
            elif isinstance(h.lr, torch.Tensor):
                lr = h.lr.to(w.device, torch.float32)
                new_ws[i] = w * (1 - lr * h.weight_decay) + updates[k] * (-(lr * ratio))
            else:
                new_ws[i] = (w * (1 - h.lr * h.weight_decay)).add_(updates[k], alpha=-(h.lr * ratio))
        return new_ws

    @staticmethod
    def applies_in_kernel(h, master: torch.Tensor) -> bool:
        """Whether a stack of this group's params can take the apply kernel (stack_kernels.py)."""
        return isinstance(h, MuonHyper) and not isinstance(h.lr, torch.Tensor)

    @staticmethod
    def saved(entry: dict) -> dict:
        """A Muon param's state as torch.optim.Muon's: its count is left out."""
        if "exp_avg" not in entry and "exp_avg_codes" not in entry:
            entry.pop("step", None)
        return entry

    @staticmethod
    def check_loaded(entry: dict, where: str) -> None:
        if "exp_avg" in entry or "exp_avg_codes" in entry:
            AdamW.check_loaded(entry, where)

    @staticmethod
    def loaded_count(entry: dict, p: torch.Tensor):
        count = AdamW.loaded_count(entry, p)
        if count is None and ("momentum_buffer" in entry or "momentum_buffer_codes" in entry):
            return torch.zeros((), dtype=torch.float32, device=p.device)
        return count


def _adamw(w, u, bufs, count, h: AdamWHyper, applied_steps, found_inf, bounded: bool, stacked: bool):
    """An algorithm="adamw" param's new master: torch.optim.AdamW(fused=True)'s kernel, which
    skips on the device's found_inf, on the FP32 values (one pass instead of the oracle's
    many); with int8 state (which bounds exp_avg) or a tensor lr (which the CPU kernel reads on
    the host) the oracle's."""
    if bounded or isinstance(h.lr, torch.Tensor):
        return AdamW.update(w, u, bufs, count, h, applied_steps, found_inf, bounded)
    split = (lambda t: list(t.unbind(0))) if stacked else (lambda t: [t])  # noqa: E731
    steps = split(count.view(-1)) if stacked else [count]
    torch._foreach_add_(steps, (~found_inf).float())  # torch's AdamW counts the step first, then skips
    torch._fused_adamw_(split(w), split(u), split(bufs[0]), split(bufs[1]), split(bufs[2]) if h.amsgrad else [],
                        steps, lr=h.lr, beta1=h.beta1, beta2=h.beta2, weight_decay=h.weight_decay, eps=h.eps,
                        amsgrad=h.amsgrad, maximize=h.maximize, found_inf=found_inf.float())
    return w


def _by_settings(hypers: list) -> list[list[int]]:
    """Positions of the params that share Newton-Schulz settings (batched together by shape)."""
    groups: dict[tuple, list[int]] = {}
    for k, h in enumerate(hypers):
        groups.setdefault((h.ns_coefficients, h.ns_steps, h.eps), []).append(k)
    return list(groups.values())


# -- MuSGD -----------------------------------------------------------------------------------
@dataclass
class MuSGDHyper:
    lr: float | torch.Tensor
    momentum: float
    weight_decay: float
    nesterov: bool
    use_muon: bool
    muon: float
    sgd: float

    @property
    def buffers(self) -> tuple:
        return ("momentum_buffer", "momentum_buffer_SGD") if self.use_muon else ("momentum_buffer",)


class MuSGD:
    """Ultralytics' MuSGD: in use_muon groups a Muon step (lerp momentum, their Newton-Schulz,
    scaled by sqrt(max(1, size(-2) / size(-1)))) at lr * muon, then an SGD-with-momentum
    step (L2 weight decay on the updated weight, buffer zero-initialized) at lr * sgd; in the
    other groups that SGD step alone at lr. State names as theirs."""
    code = MUSGD_CODE
    name = "MuSGD"
    matrix = True
    group_keys = ("momentum", "nesterov", "use_muon", "muon", "sgd")
    defaults = dict(lr=1e-3, momentum=0.0, weight_decay=0.0, nesterov=False, use_muon=False, muon=0.5, sgd=0.5)
    keys = tuple(defaults)
    tensor_keys = ("lr",)
    all_buffers = ("momentum_buffer", "momentum_buffer_SGD")
    unsigned_buffers = ()
    count_key = "step"

    @staticmethod
    def fill_group(group: dict) -> dict:
        return group

    @staticmethod
    def check_group(group: dict, index: int) -> None:
        where = f"param_groups[{index}]"
        _check_lr(group, where)
        _check_momentum(group, where)
        for name in ("muon", "sgd"):
            value = _number(group, name, where)
            if not math.isfinite(value):
                raise ValueError(f"{where}: {name} must be a finite weight, got {group[name]!r}")
        if group["use_muon"]:
            if not 0.0 <= float(group["momentum"]) <= 1.0:
                raise ValueError(f"{where}: momentum must be in [0, 1] in a use_muon group (its Muon buffer is a "
                                 f"lerp toward the grad), got {group['momentum']!r}")
            _check_matrices(group, where, "MuSGD's Muon part", "use_muon=False")

    check_tensor_values = staticmethod(AdamW.check_tensor_values)  # a tensor lr, read once

    @staticmethod
    def hyper(g: dict) -> MuSGDHyper:
        return MuSGDHyper(g["lr"], float(g["momentum"]), float(g["weight_decay"]), bool(g["nesterov"]),
                          bool(g["use_muon"]), float(g["muon"]), float(g["sgd"]))

    count = staticmethod(AdamW.count)

    @staticmethod
    def update_all(ws, us, bufs, counts, hypers, applied_steps, found_inf, bounded=False, stacked=False, stages=None,
                   params=None) -> list:
        """As Muon.update_all (`stacked`, `stages` and `params` the same)."""
        muon = [i for i, h in enumerate(hypers) if h.use_muon]
        orthogonal = {}
        if muon:
            updates = []
            for i in muon:
                h, b = hypers[i], bufs[i][0]
                if stages is not None and stages.can_step(us[i], b):
                    updates.append(stages.momentum(us[i], b, found_inf, h.momentum, h.nesterov))
                    continue
                new_b = torch.lerp(b, us[i], 1 - h.momentum)
                updates.append(torch.lerp(us[i], new_b, h.momentum) if h.nesterov else new_b)
                commit(b, new_b, found_inf)
            (rows,) = yield [newton_schulz.Request(updates, "ultralytics", stacked=stacked)]
            for i, o in zip(muon, rows):
                orthogonal[i] = o
        new_ws = []
        for i, h in enumerate(hypers):
            w, u = ws[i], us[i]
            shape = w.shape  # their scale: the param's last two sizes (a conv's kernel height / width)
            scale = max(1, shape[-2] / shape[-1]) ** 0.5 if h.use_muon else 1.0
            if params is not None and stages.can_step(u, bufs[i][-1]):
                stages.musgd_apply(w, orthogonal.get(i), scale, u, bufs[i][-1], params, found_inf, h)
                commit(counts[i], counts[i] + 1, found_inf)
                new_ws.append(None)
                continue
            lr = h.lr.to(w.device, torch.float32) if isinstance(h.lr, torch.Tensor) else h.lr
            if h.use_muon:
                orthogonal[i] = orthogonal[i] * scale
            if h.use_muon:
                w = _add(w, orthogonal[i], -(lr * h.muon))
                b, sgd_lr = bufs[i][1], lr * h.sgd
            else:
                b, sgd_lr = bufs[i][0], lr
            d = u.add(w, alpha=h.weight_decay) if h.weight_decay != 0 else u
            new_b = (b * h.momentum).add_(d)
            step = d.add(new_b, alpha=h.momentum) if h.nesterov else new_b
            commit(b, new_b, found_inf)
            commit(counts[i], counts[i] + 1, found_inf)
            new_ws.append(_add(w, step, -sgd_lr))
        return new_ws

    @staticmethod
    def applies_in_kernel(h, master: torch.Tensor) -> bool:
        """Whether a stack of this group's params can take the MuSGD apply kernel."""
        return not isinstance(h.lr, torch.Tensor)

    @staticmethod
    def saved(entry: dict) -> dict:
        entry.pop("step", None)
        return entry

    @staticmethod
    def check_loaded(entry: dict, where: str) -> None:
        pass

    @staticmethod
    def loaded_count(entry: dict, p: torch.Tensor):
        if any(k in entry for k in ("momentum_buffer", "momentum_buffer_codes")):
            return torch.zeros((), dtype=torch.float32, device=p.device)
        return None


def _add(w: torch.Tensor, x: torch.Tensor, alpha) -> torch.Tensor:
    """w + alpha * x as torch's add_(x, alpha=...) computes it (alpha a tensor: its product)."""
    if isinstance(alpha, torch.Tensor):
        return w + x * alpha
    return w.add(x, alpha=alpha)


RULES = (SGD, AdamW, Muon, MuSGD)  # every rule: a state dict of one is refused by the others

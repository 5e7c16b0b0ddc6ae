"""FusedMixedPrecisionSGD: the torch.optim.Optimizer that users see (SPEC §1-2).

It owns the param groups, the per-param state and the loss scaler, validates input before
anything is written, and hands one StepBatch per step to the chosen backend. It never reads
a device value on the host, so a step can be captured in a CUDA graph.
"""
from __future__ import annotations

import itertools

import torch

from . import backends
from .backends import Hyper, StepBatch
from .loss_scaler import LossScaler, check_scaler_args
from .validation import check_global, check_grads, check_group, check_params


class FusedMixedPrecisionSGD(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, max_grad_norm=None, norm_type=2.0,
                 loss_scale="dynamic", init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, backend="auto"):
        check_global(max_grad_norm, norm_type)
        check_scaler_args(loss_scale, init_scale, growth_factor, backoff_factor, growth_interval)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)
        device = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else torch.device("cpu")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.norm_type = float(norm_type)
        self.backend, self._backend = backends.resolve(backend, device)
        self._scaler = LossScaler(loss_scale, init_scale, growth_factor, backoff_factor,
                                  growth_interval, device)
        # Persistent outputs, updated in place every step (valid across CUDA-graph replays).
        self.last_grad_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.last_step_skipped = torch.zeros((), dtype=torch.bool, device=device)
        # Count of applied (not skipped) steps, on the device: it tells each momentum buffer
        # whether this is its first applied step (see momentum_first_step in StepBatch).
        self._applied_steps = torch.zeros((), dtype=torch.int32, device=device)
        self._loss_scaled = False
        # (param._version, data_ptr) right after our last write: anything else means the
        # param was changed outside the optimizer and its master must be re-taken.
        self._written = {}
        self._backend_cache = {}
        self._state_epoch = 0  # bumped whenever state tensors are (re)allocated

    # -- public API ---------------------------------------------------------------------
    @property
    def loss_scale(self) -> torch.Tensor:
        return self._scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        self._loss_scaled = True
        if not self._scaler.enabled:
            return loss
        return loss * self._scaler.scale.to(loss.device, non_blocking=True)

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        index = len(self.param_groups)
        check_params(params, index)
        check_group({**self.defaults, **group}, index)
        super().add_param_group({**group, "params": params})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            check_group(group, index)
        active = [(gi, j, p) for gi, g in enumerate(self.param_groups)
                  for j, p in enumerate(g["params"]) if p.grad is not None]
        if not active:  # SPEC §2: nothing changes, the scale and its counter included
            self.last_grad_norm.zero_()
            self.last_step_skipped.fill_(False)
            return loss
        self._check_drop_in()
        check_grads([p for _, _, p in active], [f"param_groups[{gi}]['params'][{j}]" for gi, j, _ in active])
        batch = self._prepare(active)
        self._backend.step(batch)
        for p in batch.params:
            self._written[p] = (p._version, p.data_ptr())
        self._loss_scaled = False
        return loss

    # -- step preparation ---------------------------------------------------------------
    def _check_drop_in(self) -> None:
        if not self._scaler.enabled:
            return
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError("FusedMixedPrecisionSGD: torch.amp.GradScaler is driving this optimizer "
                               "while its own loss scaling is on; the grads would be unscaled twice. "
                               "Build it with loss_scale=None to use GradScaler.")
        if not self._loss_scaled:
            raise RuntimeError("FusedMixedPrecisionSGD: step() without scale_loss() since the last step "
                               "while loss scaling is on; the grads of an unscaled loss would be divided "
                               "by the loss scale. Call opt.scale_loss(loss).backward(), or build the "
                               "optimizer with loss_scale=None.")

    def _master(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        if p.dtype == torch.float32:
            state["master_param"] = p  # an FP32 param is its own master
        elif "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
            self._state_epoch += 1
        elif self._written.get(p) != (p._version, p.data_ptr()):
            state["master_param"].copy_(p)  # changed outside: don't silently revert it
        return state["master_param"]

    def _prepare(self, active) -> StepBatch:
        hypers = [Hyper(g["lr"], float(g["momentum"]), float(g["dampening"]), float(g["weight_decay"]),
                        bool(g["nesterov"]), bool(g["maximize"])) for g in self.param_groups]
        params, grads, masters, bufs, firsts, group_index = [], [], [], [], [], []
        for gi, _, p in active:
            state = self.state[p]
            master = self._master(p, state)
            if hypers[gi].momentum != 0 and "momentum_buffer" not in state:
                # Allocated now, applied on the device: the first applied step sets b = d.
                state["momentum_buffer"] = torch.zeros_like(master)
                state["momentum_first_step"] = torch.zeros((), dtype=torch.int32, device=p.device)
                self._state_epoch += 1
            uses_momentum = hypers[gi].momentum != 0
            params.append(p)
            grads.append(p.grad)
            masters.append(master)
            bufs.append(state["momentum_buffer"] if uses_momentum else None)
            firsts.append(state["momentum_first_step"] if uses_momentum else None)
            group_index.append(gi)
        return StepBatch(params, grads, masters, bufs, firsts, group_index, hypers,
                         self.max_grad_norm, self.norm_type, self._scaler, self._applied_steps,
                         self.last_grad_norm, self.last_step_skipped, self._backend_cache,
                         self._state_epoch)

    # -- state dict ---------------------------------------------------------------------
    def _flat_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """Off the hot path, so it may sync: buffers never applied are left out, as
        torch.optim.SGD would have none; an FP32 param's master is the param itself."""
        sd = super().state_dict()
        params = self._flat_params()
        packed = {}
        for index, entry in sd["state"].items():
            entry = dict(entry)
            first_step = entry.pop("momentum_first_step", None)
            if first_step is not None and int(first_step) == 0:
                del entry["momentum_buffer"]
            if entry.get("master_param") is params[index]:
                del entry["master_param"]
            if entry:
                packed[index] = entry
        sd["state"] = packed
        sd["fused_opt"] = {"loss_scaler": self._scaler.state_dict(),
                           "applied_steps": self._applied_steps.clone()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads ours or a torch.optim.SGD state dict. torch's loader casts floating state to
        the param's dtype, which would round FP32 masters and buffers to FP16, so the state
        is put in place here, in FP32, and only the groups go through torch's loader."""
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        params = dict(zip(saved_ids, self._flat_params()))
        for saved_id, entry in state_dict["state"].items():
            p = params[saved_id]
            state = self.state[p]
            if "master_param" in entry:
                master = entry["master_param"].to(device=p.device, dtype=torch.float32)
                if p.dtype == torch.float32:
                    p.copy_(master)
                else:
                    state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(master)
            if p.dtype == torch.float32:
                state["master_param"] = p
            if entry.get("momentum_buffer") is not None:
                state["momentum_buffer"] = torch.empty_like(p, dtype=torch.float32).copy_(entry["momentum_buffer"])
                # -1: applied before, never equal to an applied-step count, so never "first" again.
                state["momentum_first_step"] = torch.full((), -1, dtype=torch.int32, device=p.device)
            self._written[p] = (p._version, p.data_ptr())
        self._state_epoch += 1
        extra = state_dict.get("fused_opt")
        if extra is not None:
            self._scaler.load_state_dict(extra["loss_scaler"])
            self._applied_steps.copy_(extra["applied_steps"])


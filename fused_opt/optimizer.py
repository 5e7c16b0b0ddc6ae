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
from .distributed import local, local_grads, placed_like, shard_reduction
from .grad_accumulation import FP32GradAccumulator
from .loss_scaler import LossScaler, check_scaler_args
from .validation import check_global, check_grads, check_group, check_params


# The key, in each saved param group, of the loss scaler's state and the applied-step count.
STATE_KEY = "fused_opt"


class FusedMixedPrecisionSGD(torch.optim.Optimizer):
    # torch.amp.GradScaler then hands us its scale and found_inf (as attributes) instead of
    # unscaling the grads itself: the unscale and the skip stay inside the fused step.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, max_grad_norm=None, norm_type=2.0,
                 loss_scale="dynamic", init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, fp32_grad_accumulation=False, backend="auto"):
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
        self._amp_scaler = None  # the scale torch.amp.GradScaler hands us, when it drives
        # (param._version, data_ptr) right after our last write: anything else means the
        # param was changed outside the optimizer and its master must be re-taken.
        self._written = {}
        self._layout = None
        self._layout_ids = itertools.count(1)
        self._backend_cache = {}
        self._flat_shape = None
        self._accumulator = FP32GradAccumulator(self._flat_params()) if fp32_grad_accumulation else None

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
        if getattr(self, "_accumulator", None) is not None:
            self._accumulator.add(params)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            check_group(group, index)
        hypers = [Hyper(g["lr"], float(g["momentum"]), float(g["dampening"]), float(g["weight_decay"]),
                        bool(g["nesterov"]), bool(g["maximize"])) for g in self.param_groups]
        params = self._flat_params()
        if self._accumulator is not None:
            self._accumulator.check()
            grads = self._accumulator.grads(params)
        else:
            grads = [p.grad for p in params]
        active = [i for i, g in enumerate(grads) if g is not None]
        if not active:  # SPEC §2: nothing changes, the scale and its counter included
            self.last_grad_norm.zero_()
            self.last_step_skipped.fill_(False)
            return loss
        scaler = self._step_scaler()
        grads = [grads[i] for i in active]
        check_grads(grads, lambda k: self._param_name(params[active[k]]))
        if self._sharded:  # DTensor params: the kernels run on the local shards
            grads = local_grads(grads, [params[i] for i in active], lambda k: self._param_name(params[active[k]]))
        batch = self._batch(params, active, grads, hypers, scaler)
        if self._backend.step(batch):
            # Our own writes bumped _version (torch ops do; raw kernels don't): record them.
            self._layout.written = [(p._version, p.data_ptr()) for p in batch.params]
        self._loss_scaled = False
        if self._accumulator is not None:
            self._accumulator.consume()  # the FP32 sums were this step's grads
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._accumulator is not None:
            self._accumulator.consume()

    # -- step preparation ---------------------------------------------------------------
    def _step_scaler(self) -> LossScaler:
        """The loss scaler this step unscales by (and updates), after the drop-in checks."""
        if self._is_state_init_step():
            return self._fixed_scaler(1.0)
        self._check_drop_in()
        return self._grad_scaler_scale()

    def _is_state_init_step(self) -> bool:
        """torch.distributed.checkpoint's get/set_optimizer_state_dict initialise an empty
        optimizer state with a step on zero grads with every lr set to 0, and no scale_loss.
        That step is let through, unscaled and leaving the loss scale alone, so the state (and
        with it a checkpoint template) gets its buffers, as torch.optim.SGD's does. A forgotten
        scale_loss in a real step is still caught: with any lr != 0 (or on the GPU) it raises."""
        if not self._scaler.enabled or self._loss_scaled or self.state:
            return False
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and (lr.device.type != "cpu" or lr.item() != 0):
                return False
            if not isinstance(lr, torch.Tensor) and lr != 0:
                return False
        return True

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

    def _grad_scaler_scale(self) -> LossScaler:
        """The scale of this step: ours, or the one torch.amp.GradScaler set on us (None when
        its unscale_ already ran). GradScaler's found_inf becomes a NaN scale, which the
        kernels' own inf/NaN check turns into a skipped step: no new path through them."""
        if self._scaler.enabled or (getattr(self, "grad_scale", None) is None
                                    and getattr(self, "found_inf", None) is None):
            return self._scaler
        scale = self.grad_scale if getattr(self, "grad_scale", None) is not None else 1.0
        found_inf = self.found_inf if isinstance(getattr(self, "found_inf", None), torch.Tensor) else None
        if found_inf is not None:
            scale = torch.where(found_inf.to(self.last_grad_norm.device) > 0, float("nan"), scale)
        return self._fixed_scaler(scale)

    def _fixed_scaler(self, scale) -> LossScaler:
        """A static scaler holding `scale` for this step (never updated by the step)."""
        if self._amp_scaler is None:
            self._amp_scaler = LossScaler(1.0, 1.0, 1.0, 1.0, 1, self.last_grad_norm.device)
        self._amp_scaler.scale.copy_(scale)
        return self._amp_scaler

    def _param_name(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{j}]"
        return "a param"

    def _batch(self, params, active, grads, hypers, scaler: LossScaler) -> StepBatch:
        """The step's tensors. At thousands of tensors the host's per-tensor work decides the
        speed, so the lists are cached in a _StepLayout and only rebuilt when the params that
        step, their storage, their state or the use of momentum changed."""
        signature = (id(self._flat), active, [h.momentum != 0 for h in hypers])
        if self._sharded:
            written = [(local(params[i])._version, local(params[i]).data_ptr()) for i in active]
        else:  # at thousands of tensors this line is a visible part of the host's work
            written = [(params[i]._version, params[i].data_ptr()) for i in active]
        layout = self._layout
        if layout is None or layout.signature != signature or layout.written != written:
            layout = self._new_layout(params, active, hypers, signature)
        return StepBatch(layout.params, grads, layout.masters, layout.bufs, layout.firsts, layout.group_index,
                         hypers, self.max_grad_norm, self.norm_type, scaler, self._applied_steps,
                         self.last_grad_norm, self.last_step_skipped, self._backend_cache, layout.layout_id,
                         layout.reduce_stats)

    def _flush_layout(self) -> None:
        """Moves the fast path's record of our last writes into the per-param record."""
        if self._layout is not None:
            self._written.update(zip(self._layout.owners, self._layout.written))
            self._layout = None

    def _new_layout(self, params, active, hypers, signature) -> "_StepLayout":
        self._flush_layout()
        devices = {params[i].device for i in active}
        if len(devices) > 1:
            raise RuntimeError(f"params with grads are on {sorted(map(str, devices))}; one step runs on one "
                               "device (use one optimizer per device)")
        layout = _StepLayout(signature, next(self._layout_ids))
        layout.reduce_stats = shard_reduction([params[i] for i in active])
        for i in active:
            p = params[i]
            state = self.state[p]
            master = state.get("master_param")
            if p.dtype == torch.float32:
                state["master_param"] = p  # an FP32 param is its own master
            elif master is None or master.device != p.device:  # e.g. the model moved after construction
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            elif self._written.get(p) != (local(p)._version, local(p).data_ptr()):
                # Changed outside: don't silently revert it. Elements that still equal the master
                # rounded keep the master (a model.load_state_dict of the same checkpoint after
                # the optimizer's must not round the FP32 masters to the param's dtype).
                master.copy_(torch.where(p == master.to(p.dtype), master, p.to(torch.float32)))
            gi = self._group_of[i]
            uses_momentum = hypers[gi].momentum != 0
            if uses_momentum and "momentum_buffer" not in state:
                # Allocated now, applied on the device: the first applied step sets b = d.
                state["momentum_buffer"] = torch.zeros_like(state["master_param"])
                state["momentum_first_step"] = torch.zeros((), dtype=torch.int32, device=p.device)
            layout.owners.append(p)
            layout.params.append(local(p))  # a DTensor's state is a DTensor too; kernels get the shards
            layout.masters.append(local(state["master_param"]))
            layout.bufs.append(local(state["momentum_buffer"]) if uses_momentum else None)
            layout.firsts.append(state["momentum_first_step"] if uses_momentum else None)
            layout.group_index.append(gi)
        layout.written = [(p._version, p.data_ptr()) for p in layout.params]
        self._layout = layout
        return layout

    # -- state dict ---------------------------------------------------------------------
    def _flat_params(self) -> list[torch.Tensor]:
        """All params in group order (the order state_dict numbers them), and each one's
        group in self._group_of."""
        shape = [(id(g["params"]), len(g["params"])) for g in self.param_groups]
        if shape != self._flat_shape:
            self._flat = [p for g in self.param_groups for p in g["params"]]
            self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
            self._sharded = shard_reduction(self._flat) is not None
            self._flat_shape = shape
        return self._flat

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
        # In every group, as torch.distributed.checkpoint keeps only "state" and "param_groups"
        # (and may regroup the groups by param); load_state_dict takes it back out.
        extra = {"loss_scaler": self._scaler.state_dict(), "applied_steps": self._applied_steps.clone()}
        for group in sd["param_groups"]:
            group[STATE_KEY] = extra
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads ours or a torch.optim.SGD state dict. torch's loader casts floating state to
        the param's dtype, which would round FP32 masters and buffers to FP16, so the state
        is put in place here, in FP32, and only the groups go through torch's loader."""
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        groups = [dict(g) for g in state_dict["param_groups"]]
        extras = [g.pop(STATE_KEY, None) for g in groups]
        extra = extras[0] if extras else None
        extra = state_dict.get(STATE_KEY, extra)  # where fused_opt 0.1 kept it
        self._flush_layout()  # the loaded state replaces what the cached layout points to
        super().load_state_dict({"state": {}, "param_groups": groups})
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        params = dict(zip(saved_ids, self._flat_params()))
        for saved_id, entry in state_dict["state"].items():
            p = params[saved_id]
            state = self.state[p]
            if "master_param" in entry:
                master = placed_like(entry["master_param"], p)
                if p.dtype == torch.float32:
                    p.copy_(master)
                else:
                    state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(master)
            if p.dtype == torch.float32:
                state["master_param"] = p
            if entry.get("momentum_buffer") is not None:
                buf = placed_like(entry["momentum_buffer"], p)
                state["momentum_buffer"] = torch.empty_like(p, dtype=torch.float32).copy_(buf)
                # -1: applied before, never equal to an applied-step count, so never "first" again.
                state["momentum_first_step"] = torch.full((), -1, dtype=torch.int32, device=p.device)
            self._written[p] = (local(p)._version, local(p).data_ptr())
        if extra is not None:
            self._scaler.load_state_dict(extra["loss_scaler"])
            self._applied_steps.copy_(extra["applied_steps"])


class _StepLayout:
    """The cached per-tensor lists of a step (see FusedMixedPrecisionSGD._batch)."""

    def __init__(self, signature, layout_id: int):
        self.signature = signature
        self.layout_id = layout_id
        self.owners = []  # the params as the user sees them (DTensors stay DTensors)
        self.params, self.masters, self.bufs, self.firsts, self.group_index = [], [], [], [], []
        self.reduce_stats = None
        self.written = []

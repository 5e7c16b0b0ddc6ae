"""FusedMixedPrecisionSGD and FusedMixedPrecisionAdamW: the torch.optim.Optimizers users see.

Both are one class, FusedMixedPrecisionOptimizer, with an update rule (update_rules.py) as
their only difference. It owns the param groups, the per-param state and the loss scaler,
validates input before anything is written, and hands one StepBatch per step to the chosen
backend. It never reads a device value on the host, so a step can be captured in a CUDA graph.
"""
from __future__ import annotations

import inspect
import itertools
import operator
import warnings
from contextlib import AbstractContextManager

import torch
import torch.optim.optimizer as torch_optimizer
from typing_extensions import Unpack

from . import backends, clipping, copies, drop_in, ema
from . import state_dict as packing
from .backends import StepBatch
from .distributed import shard_reduction
from .flat_storage import FlatGrads, ineligible
from .grad_accumulation import FP32GradAccumulator
from .drop_in import SCALED_MARK
from .grad_guard import ScaledGradGuard, grad_snapshot_of
from .hyperparams import GroupHypers
from .options import PipelineOptions, check_keywords, with_pipeline_signature
from .loss_scaler import LossScaler, check_scale_bounds, check_scaler_args
from .master_format import master_format
from .step_layout import PerTensorStorage
from .tracked_state import Epoch, ParamList, TrackedState
from .transaction import Transaction
from .state_precision import scale_key
from .state_precision import state_precision as make_state_precision
from .matrix_rules import Muon, MuSGD, refuse_sharded_matrices
from .update_rules import SGD, AdamW
from .validation import check_global, check_params

_PARAMS = operator.itemgetter("params")

# torch's global step hooks (torch.optim.optimizer.register_optimizer_step_pre_hook and _post_hook);
# where a torch lacks the names, a non-empty stand-in sends every step through torch's wrapper.
_GLOBAL_STEP_HOOKS = (getattr(torch_optimizer, "_global_optimizer_pre_hooks", (None,)),
                      getattr(torch_optimizer, "_global_optimizer_post_hooks", (None,)))
_profiler_enabled = torch._C._autograd._profiler_enabled
_STEP_OUTSIDE_GRAPH = None  # FusedMixedPrecisionOptimizer._step under torch.compiler.disable


class FusedMixedPrecisionOptimizer(torch.optim.Optimizer):
    """The pipeline shared by every fused optimizer; a subclass sets RULE and its signature."""
    RULE = None  # the per-element update rule (update_rules.py)
    # torch.amp.GradScaler then hands us its scale and found_inf (as attributes) instead of
    # unscaling the grads itself: the unscale and the skip stay inside the fused step.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, *, max_grad_norm=None, norm_type=2.0,
                 loss_scale="auto", init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, hysteresis=1, hysteresis_mode="megatron", min_scale=None, max_scale=None,
                 master_weights="fp32", state_precision="fp32", ema_decay=None, ema_dtype=torch.float32, ema_warmup=None,
                 ema_model=None, fp32_grad_accumulation=False, flat_grads=False, backend="auto", check_scaled_grads=True):
        check_global(max_grad_norm, norm_type)
        # A model EMA of the masters, updated inside the step (ema.py); None without ema_decay.
        self._ema = None if ema_decay is None else ema.ModelEMA(ema_decay, ema_dtype, ema_warmup)
        if ema_model is not None and ema_decay is None:
            raise ValueError("ema_model=... names the model whose buffers the EMA averages: it needs ema_decay=...")
        # The average of ema_model's floating buffers (BatchNorm statistics), beside the params' EMA.
        self._ema_buffers = None if ema_model is None else ema.BufferEMA(ema_model)
        self._ema_swapped = False
        # How masters are kept: FP32 copies, or BF16 params' int16 remainders (master_format.py).
        self._masters = master_format(master_weights)
        # How the rule's state buffers are stored: FP32, BF16 or blockwise int8 (state_precision.py).
        self._state_precision = make_state_precision(state_precision)
        check_scaler_args("dynamic" if loss_scale == "auto" else loss_scale, init_scale, growth_factor,
                          backoff_factor, growth_interval)
        check_scale_bounds(init_scale, hysteresis, min_scale, max_scale, hysteresis_mode)
        self._epoch = Epoch()  # counts every write to self.state and the groups' lists (tracked_state.py)
        self._flat_grads = FlatGrads() if flat_grads else None
        self._flat_ids = None
        self._layouts = PerTensorStorage()
        self._hypers = GroupHypers(self.RULE)
        super().__init__(params, defaults)
        device = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else torch.device("cpu")
        self.max_grad_norm = max_grad_norm
        self.norm_type = norm_type
        self._clip_request = None  # (max_norm, norm_type) of a clip_grad_norm_ call, for the next step only
        self.backend, self._backend = backends.resolve(backend, device, self.RULE)
        # "auto": FP16 needs a scale to keep small grads from flushing; BF16/FP32 do not. Decided
        # again when the params turn FP16 later (model.half()): see _check_auto_scale.
        self._auto_scale = loss_scale == "auto"
        if self._auto_scale:
            loss_scale = "dynamic" if any(p.dtype == torch.float16 for p in self._flat_params()) else None
        self._scaler = LossScaler(loss_scale, init_scale, growth_factor, backoff_factor,
                                  growth_interval, device, hysteresis, min_scale, max_scale, hysteresis_mode)
        self._check_scaled_grads = check_scaled_grads
        self._guard = ScaledGradGuard(grad_snapshot_of(self)) if check_scaled_grads and self._scaler.enabled else None
        # Persistent outputs, updated in place every step (valid across CUDA-graph replays).
        self.last_grad_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.last_step_skipped = torch.zeros((), dtype=torch.bool, device=device)
        # Count of applied (not skipped) steps, on the device: it tells each SGD momentum buffer
        # whether this is its first applied step (update_rules.SGD.count).
        self._applied_steps = torch.zeros((), dtype=torch.int32, device=device)
        # Skipped steps in a row (0 after an applied one): one .item() at the user's logging
        # interval tells a run whose every step overflows (README "Loss scale").
        self.consecutive_skips = torch.zeros((), dtype=torch.int32, device=device)
        self._amp_scaler = None  # the scale torch.amp.GradScaler hands us, when it drives
        self._backend_cache = {}
        self._transaction = Transaction()
        self._accumulator = FP32GradAccumulator(self._flat_params()) if fp32_grad_accumulation else None
        if flat_grads:
            self._warn_if_flat_grads_stays_off(self._flat_params())

    # -- copies: deepcopy, pickle, torch.save(opt) (copies.py) ------------------------------
    def __getstate__(self) -> dict:
        return copies.getstate(self)

    # -- public API ---------------------------------------------------------------------
    @property
    def loss_scale(self) -> torch.Tensor:
        return self._scaler.scale

    # Validated on every assignment, so a later `opt.norm_type = 1.0` or `opt.max_grad_norm = -1`
    # raises instead of running a step the backends would each read differently.
    @property
    def max_grad_norm(self) -> float | None:
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        check_global(value, getattr(self, "_norm_type", 2.0))
        self._max_grad_norm = None if value is None else float(value)

    @property
    def norm_type(self) -> float:
        return self._norm_type

    @norm_type.setter
    def norm_type(self, value) -> None:
        check_global(None, value)
        self._norm_type = float(value)

    # torch.optim.Optimizer assigns self.state (in __init__ and load_state_dict); whatever it
    # assigns becomes a TrackedState, so the step sees every later change to it.
    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value) -> None:
        if "_epoch" not in self.__dict__:  # unpickling: __init__ did not run
            self._epoch = Epoch()
        self._state = TrackedState(self._epoch, value)

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        value = state.pop("state", state.pop("_state", None))
        extras = {k.lstrip("_"): state.pop(k) for k in copies.EXTRAS if k in state}
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:
            self.defaults.pop("differentiable", None)  # torch's __setstate__ adds it; not ours
        if value is not None:
            self.state = value
        if "_scaler" in self.__dict__:  # a copy, not torch.optim.Optimizer.load_state_dict's __setstate__
            copies.rebuild(self, **extras)

    def ema_params(self) -> list[torch.Tensor]:
        """The EMA of every param (ema_decay=...), in the optimizer's param order: group by
        group, each group's params as given (state_dict's numbering), which is
        `model.parameters()`'s order only when the groups were built in that order. The tensors
        the step updates, FP32 or ema_dtype. `ema_state_dict()` gives them by name."""
        if self._ema is None:
            raise RuntimeError(f"{type(self).__name__}.ema_params(): the optimizer keeps no EMA "
                               "(build it with ema_decay=...)")
        with torch.no_grad():
            return [ema.ema_of(self, p) for p in self._flat_params()]

    def ema_state_dict(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The EMA model as a state dict under the model's own names (copies):
        `ema_model.load_state_dict(opt.ema_state_dict())` loads it into a model of the same
        architecture. Optimized params hold their EMA (FP32 or ema_dtype); with
        `ema_model=model` at construction the floating buffers hold their average; every other
        entry is the model's own. `model` defaults to ema_model."""
        return ema.ema_state_dict(self, model)

    def swap_ema(self) -> AbstractContextManager:
        """`with opt.swap_ema(): evaluate(model)`: inside, every param holds its EMA (rounded to
        its dtype), and with `ema_model=model` every floating buffer (BatchNorm statistics)
        its average; on exit each gets its own value back, bit for bit. Without ema_model the
        buffers are left as they are. step() inside raises."""
        return ema.swap(self)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * the current loss scale (a tensor op, no sync). The flag it sets lives on the
        scaler object, which wrappers (LightningOptimizer, AcceleratedOptimizer) share."""
        self._scaler.loss_scaled = True
        self._scaler.scale_used = False
        if not self._scaler.enabled:
            setattr(loss, SCALED_MARK, True)  # the integrations pass it on unscaled
            return loss
        scale = self._scaler.scale
        scaled = loss * (scale if scale.device == loss.device else scale.to(loss.device, non_blocking=True))
        if self._guard is not None and scaled.requires_grad:
            scaled.register_hook(self._guard.on_backward)
        if self._flat_grads is not None and scaled.requires_grad:
            self._flat_grads.expect_backward(scaled)
        setattr(scaled, SCALED_MARK, True)
        return scaled

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach=None, *, parameters=None) -> torch.Tensor:
        """Where a framework would call torch.nn.utils.clip_grad_norm_ on our (scaled) grads:
        clip the coming step(), and only that one, inside it, at max_norm on the unscaled
        norm (with max_grad_norm set too, at the smaller of the two). Returns
        `last_grad_norm`, which holds that norm once step() has run (no sync here).
        `parameters`, when given and not the optimizer's own params (a sub-module's), are
        clipped at once instead, by their own unscaled norm, which is returned (clipping.py)."""
        check_global(max_norm, norm_type)
        if parameters is not None:
            subset = clipping.split_request(self, parameters)
            if subset is not None:
                return clipping.clip_scaled_(self, subset, float(max_norm), float(norm_type))
        if self.max_grad_norm is not None and float(norm_type) != self.norm_type:
            raise ValueError(f"clip_grad_norm_(norm_type={norm_type}) on an optimizer that clips by the "
                             f"{self.norm_type}-norm (max_grad_norm={self.max_grad_norm}): one step clips by one norm")
        self._clip_request = (float(max_norm), float(norm_type))
        return self.last_grad_norm

    def _clip_of_step(self) -> tuple:
        """(max_norm or None, norm_type) of the coming step: max_grad_norm, or a
        clip_grad_norm_ call's for this step only (the smaller of the two when both)."""
        request = self._clip_request
        if request is None:
            return self.max_grad_norm, self.norm_type
        max_norm, norm_type = request
        if self.max_grad_norm is not None:
            max_norm = min(max_norm, self.max_grad_norm)
        return max_norm, norm_type

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        index = len(self.param_groups)
        # model.named_parameters(): (name, param) pairs, whose names go to "param_groups", as in torch >= 2.6
        names = [p[0] for p in params if isinstance(p, tuple) and len(p) == 2]
        if names:
            if len(names) != len(params):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            params = [p[1] for p in params]
            group["param_names"] = names
        if self.param_groups and ("param_names" in self.param_groups[0]) != bool(names):
            raise ValueError("all optimizer param groups should be with/without names. cannot add param group "
                             f"{'with' if names else 'without'} names to the optimizer")
        check_params(params, index)
        self._masters.check_params(params, index)
        if getattr(self.RULE, "matrix", False):
            refuse_sharded_matrices(type(self).__name__, params, index)
            group = self.RULE.fill_group(group)
        if getattr(self, "_ema_swapped", False):
            raise RuntimeError("add_param_group inside swap_ema(): leave the swap first")
        self.RULE.check_group({**self.defaults, **group}, index)
        self.RULE.check_tensor_values({**self.defaults, **group}, index)
        if getattr(self, "_accumulator", None) is not None:
            self._accumulator.check_add(params)  # refused before the group is appended
        super().add_param_group({**group, "params": params, packing.STATE_KEY: packing.STATE_MARK})
        self.param_groups[-1]["params"] = ParamList(self._epoch, self.param_groups[-1]["params"])
        self._hypers.checked(self.param_groups[index], index)
        if getattr(self, "_accumulator", None) is not None:
            self._accumulator.add(params)

    def step(self, *args, **kwargs):  # step(closure=None), as its __signature__ says
        # torch.optim.Optimizer would wrap this in profile_hook_step: a record_function (two
        # dispatcher ops) and the hook loops on every call, most of a small step's host time
        # once a step's bytes have left the caches. Here they run only when there is something
        # for them to do: a step hook (the optimizer's or a global one), a profiler, or dynamo
        # tracing (which knows torch's wrapper); then torch's own wrapper runs, unchanged, and
        # hooks see the call's args and kwargs as given (Lightning passes closure=...).
        if type(self).step is not _STEP:  # a subclass's step, which torch wraps, calling super().step()
            return self._unhooked_step(*args, **kwargs)
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _GLOBAL_STEP_HOOKS[0]
                or _GLOBAL_STEP_HOOKS[1] or _profiler_enabled() or torch.compiler.is_compiling()):
            return self._hooked_step(*args, **kwargs)
        return self._step(_closure_argument(*args, **kwargs))

    step.hooked = True  # tells torch.optim.Optimizer._patch_step_function not to wrap it again

    def _unhooked_step(self, closure=None):
        # Under torch.compile the step runs as eager code (a graph break in a compiled train
        # step): its caches, flags and raw-pointer kernels are host state that dynamo would
        # specialise on or drop; eager, the bits equal an uncompiled step's. Called eagerly, it
        # skips torch.compiler.disable's wrapper, whose cost is most of a small step's host time.
        if torch.compiler.is_compiling():
            return self._step_outside_graph(closure)
        return self._step(closure)

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_unhooked_step)

    def _step_outside_graph(self, closure):
        # torch.compiler.disable imports dynamo (seconds): decorated here, when dynamo already runs.
        global _STEP_OUTSIDE_GRAPH
        if _STEP_OUTSIDE_GRAPH is None:
            _STEP_OUTSIDE_GRAPH = torch.compiler.disable(FusedMixedPrecisionOptimizer._step)
        return _STEP_OUTSIDE_GRAPH(self, closure)

    def _step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.no_grad() by hand: the decorator builds a context manager object per call
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step_without_grad()
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        return loss

    def _step_without_grad(self) -> None:
        """One path for every mode: the storage says what this step touches, the optimizer
        checks the drop-in rules, the backend runs unscale, inf check, norm and clip, update
        and write-back, and the storage takes note of what was written."""
        if self._ema_swapped:
            raise RuntimeError("step() inside swap_ema(): the params hold the EMA, not the weights being trained; "
                               "step after the `with` block")
        hypers = self._hypers.of(self.param_groups)
        storage = self._storage(hypers)
        plan = storage.prepare(self, hypers)
        if plan is None:  # no param has a grad: nothing changes, the scale and its counter included
            self.last_grad_norm.zero_()
            self.last_step_skipped.fill_(False)
            self._clip_request = None
            return
        if self._auto_scale and not self._scaler.enabled and plan.params is not None:
            self._check_auto_scale(plan.params)
        scaler = self._step_scaler()
        if self._guard is not None and scaler is self._scaler:
            self._guard.check(plan.params, self._param_name)
        if self._accumulator is not None:
            self._accumulator.check()
        batch = storage.batch_of(self, plan, hypers, scaler, self._clip_of_step())
        self._launch(batch)
        if self._ema_buffers is not None:
            self._ema_buffers.update(self._ema.weight(self._applied_steps), self.last_step_skipped)
        self._stepped()
        storage.after_step(self, plan, batch, hypers)

    def _storage(self, hypers):
        """Where this step's tensors live, chosen here and nowhere else: flat storage
        (flat_storage.py) while it holds everything the step touches, an O(1) check; else the
        params' own (step_layout.py), checked per tensor."""
        flat = self._flat_grads
        if flat is not None and flat.holds(self._epoch.value, self.param_groups, hypers):
            return flat
        return self._layouts

    def _check_auto_scale(self, params: list) -> None:
        """loss_scale="auto" chose no scale for FP32/BF16 params; if some are FP16 now
        (model.half() after construction), FP16 grads need one: it is turned on (dynamic,
        from init_scale), and this step, whose grads come from an unscaled loss, raises."""
        if not any(p.dtype == torch.float16 for p in params):
            return
        self._scaler.turn_on_dynamic()
        if self._check_scaled_grads:
            self._guard = ScaledGradGuard(grad_snapshot_of(self))
        raise RuntimeError(
            f"{type(self).__name__}: the params are FP16 now, but were FP32/BF16 when the optimizer was built "
            "with loss_scale='auto', which then chose no loss scale. FP16 grads need one (small grads flush to "
            f"zero): dynamic loss scaling is now on, from init_scale={float(self._scaler.init_scale)}. This "
            "step's grads come from a loss that was not scaled, so nothing was stepped: compute them again "
            "with opt.scale_loss(loss).backward() (the integrations in fused_opt.integrations do) and call "
            "step(). Build the optimizer after model.half() to have this decided at once.")

    def _stepped(self) -> None:
        """After a step's launch: what was asked for this step only is used up."""
        self._scaler.loss_scaled = False
        self._scaler.scale_used = True  # a second step on the same backward is told apart
        self._clip_request = None

    @property
    def flat_grads_status(self) -> str | None:
        """With flat_grads=True: "active" while the fast step runs on flat storage, else why
        not (see README "flat grads"); None without flat_grads."""
        return None if self._flat_grads is None else self._flat_grads.status

    def zero_grad(self, set_to_none: bool = True) -> None:
        flat = self._flat_grads
        if flat is None or not flat.zero_(self._epoch.value, self.param_groups, set_to_none):
            super().zero_grad(set_to_none)  # else flat storage: the grads stay views, zeroed

    # -- step preparation ---------------------------------------------------------------
    def _step_scaler(self) -> LossScaler:
        """The loss scaler this step unscales by (and updates), after the drop-in checks."""
        return drop_in.step_scaler(self)

    def _param_name(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{j}]"
        return "a param"

    def _launch(self, batch: StepBatch) -> None:
        self._transaction.run(self._backend, batch)

    # -- state dict ---------------------------------------------------------------------
    def _flat_params(self) -> list[torch.Tensor]:
        """All params in group order (the order state_dict numbers them), and each one's
        group in self._group_of. Rebuilt every call (a group's list may be edited in place,
        `opt.param_groups[0]["params"][0] = q`); its ids are compared with the last ones."""
        flat = list(itertools.chain.from_iterable(map(_PARAMS, self.param_groups)))  # C-level: ~10 ns a param
        ids = list(map(id, flat))
        if ids != self._flat_ids:
            self._params_changed(flat)
            self._flat_ids = ids
        self._flat = flat
        return flat

    def _warn_if_flat_grads_stays_off(self, params: list) -> None:
        """flat_grads=True over params it cannot hold (DTensors, several devices): said now,
        not discovered later in flat_grads_status; every step then runs per tensor, correctly."""
        reason = ineligible(params)
        if reason is not None and reason != "no params":
            warnings.warn(f"{type(self).__name__}(flat_grads=True): flat storage stays off for these params "
                          f"({reason}); every step runs per tensor, with the same results", UserWarning,
                          stacklevel=4)

    def _params_changed(self, flat: list) -> None:
        for gi, group in enumerate(self.param_groups):
            check_params(group["params"], gi)
        if len(set(map(id, flat))) != len(flat):
            raise ValueError("some parameters appear in more than one parameter group")
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        self._sharded = shard_reduction(flat) is not None
        self._layouts.invalidate()
        # A param no longer in any group lets go of its master (torch.optim.SGD would hold no
        # copy of it): else every replaced param and its FP32 copy stay alive for good.
        present = set(map(id, flat))
        for p in [k for k in self.state if isinstance(k, torch.Tensor) and id(k) not in present]:
            entry = self.state[p]
            entry.pop("master_param", None)
            entry.pop("master_remainder", None)
            entry.pop(ema.KEY, None)
            if not any(key in entry for key in self.RULE.all_buffers):
                for key in self.RULE.all_buffers:
                    entry.pop(scale_key(key), None)
            if not any(key in entry for key in self.RULE.all_buffers):  # a count without its buffers
                entry.pop(self.RULE.count_key, None)
            if not entry:
                del self.state[p]

    def sync_from_params(self) -> None:
        """Re-takes every FP16/BF16 param's FP32 master where the param no longer equals it
        rounded (as every step does per element; see README "changes outside the optimizer"),
        so that a state dict holds the masters the next step would use. (Remainder masters
        need nothing: they are rebuilt from the param wherever they are read.)"""
        if self._ema_swapped:
            raise RuntimeError("state_dict()/sync_from_params() inside swap_ema(): the params hold the EMA, "
                               "not the weights being trained; call it after the `with` block")
        with torch.no_grad():
            self._masters.sync_from_params(self, self._flat_params())

    def state_dict(self) -> dict:
        """As torch's (its pre- and post-hooks see and may replace exactly what torch's would),
        off the hot path, so it may sync; see state_dict.py for what it holds."""
        return packing.pack(self)

    def load_state_dict(self, state_dict: dict) -> None:  # the name is torch's keyword (DCP passes it)
        """Loads ours or torch's (torch.optim.SGD's or AdamW's) state dict, all or nothing (state_dict.py)."""
        packing.load(self, state_dict)


def _refuse_differentiable(name: str, differentiable: bool) -> None:
    # torch.optim's implementation switches (foreach, fused, capturable) are accepted and
    # ignored: every step here is fused, and capturable already (no host sync).
    if differentiable:
        raise ValueError(f"FusedMixedPrecision{name}: differentiable=True is not supported (the fused step is "
                         f"not differentiable; use torch.optim.{name}(differentiable=True))")


@with_pipeline_signature
class FusedMixedPrecisionSGD(FusedMixedPrecisionOptimizer):
    """torch.optim.SGD's update (momentum, dampening, nesterov, weight decay, maximize) inside
    the fused mixed-precision step. See README.md and docs/semantics.md."""
    RULE = SGD

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, fused=None, differentiable=False,
                 **pipeline: Unpack[PipelineOptions]):
        check_keywords(type(self), pipeline)
        _refuse_differentiable("SGD", differentiable)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize), **pipeline)


@with_pipeline_signature
class FusedMixedPrecisionAdamW(FusedMixedPrecisionOptimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction by each param's
    own step, amsgrad, maximize) inside the fused mixed-precision step. See docs/semantics.md."""
    RULE = AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, fused=None, capturable=None, differentiable=False,
                 **pipeline: Unpack[PipelineOptions]):
        check_keywords(type(self), pipeline)
        _refuse_differentiable("AdamW", differentiable)
        super().__init__(params, dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize), **pipeline)


@with_pipeline_signature
class FusedMixedPrecisionMuon(FusedMixedPrecisionOptimizer):
    """torch.optim.Muon's update (momentum by lerp, nesterov, Newton-Schulz in BF16,
    decoupled weight decay, adjust_lr_fn) inside the fused mixed-precision step, on matrices
    and conv weights (as their 2-D view); groups with algorithm="adamw" are stepped by AdamW
    (their betas, eps, weight_decay; AdamW's defaults where they name none). See
    docs/semantics.md "Muon and MuSGD"."""
    RULE = Muon

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=Muon.defaults["ns_coefficients"], eps=Muon.defaults["eps"],
                 ns_steps=Muon.defaults["ns_steps"], adjust_lr_fn=None, *, algorithm="muon",
                 **pipeline: Unpack[PipelineOptions]):
        check_keywords(type(self), pipeline)
        super().__init__(params, dict(Muon.defaults, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), eps=eps,
                                      ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, algorithm=algorithm),
                         **pipeline)


@with_pipeline_signature
class FusedMixedPrecisionMuSGD(FusedMixedPrecisionOptimizer):
    """Ultralytics' MuSGD (Muon + SGD with momentum on the same weights in use_muon groups,
    weighted lr * muon and lr * sgd; SGD alone in the others) inside the fused
    mixed-precision step. State names as theirs. See docs/semantics.md "Muon and MuSGD"."""
    RULE = MuSGD

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, nesterov=False, use_muon=False,
                 muon=0.5, sgd=0.5, **pipeline: Unpack[PipelineOptions]):
        check_keywords(type(self), pipeline)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      use_muon=use_muon, muon=muon, sgd=sgd), **pipeline)


def _closure_argument(closure=None):
    return closure


# step's signature for inspect (it takes *args, **kwargs to hand them to hooks unchanged)
FusedMixedPrecisionOptimizer.step.__signature__ = inspect.signature(lambda self, closure=None: None)
_STEP = FusedMixedPrecisionOptimizer.step

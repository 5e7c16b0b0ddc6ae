"""The per-tensor side of a step: which params step with which masters, buffers and grads,
checked against each other before anything is written, and cached across steps.

At thousands of tensors the host's per-tensor work decides the speed, so the lists are kept
in a StepLayout and rebuilt only when the params that step, their storage or layout, the
state (any write to it: tracked_state.py) or the state buffers kept changed. (flat_grads=True
skips even the per-step comparisons: flat_storage.py.)
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch

from . import ema, tensor_watch
from .backends import StepBatch, buckets
from .distributed import local, local_grads, local_tensors, shard_reduction, specs_of
from .memory import check_param_memory
from .state_precision import INT8_CODE, scale_key
from .validation import check_grads

_GRAD = operator.attrgetter("grad")


class StepLayout:
    """The cached per-tensor lists of a step (see PerTensorStorage.batch)."""

    def __init__(self, signature, layout_id: int):
        self.signature = signature
        self.layout_id = layout_id
        self.owners = []  # the params as the user sees them (DTensors stay DTensors)
        self.params, self.masters, self.buffers, self.counts, self.group_index = [], [], [], [], []
        self.scales = []       # per param, the int8 buffers' block scales (None for other precisions)
        self.emas = None       # with ema_decay: each param's EMA (ema.py)
        self.reduce_stats = None
        self.specs = None      # DTensor params: their sharding specs (distributed.local_grads)
        self.memory = None     # tensor_watch.Rows of the params (their local shards) when built
        # The masters (not the params themselves), buffers and counts the kernels' tables
        # point at, and their data pointers when built: `buf.data = t`, `.set_()` and
        # `.share_memory_()` move a state tensor's storage without a write to opt.state.
        self.state_tensors, self.state_memory = [], None
        # The grads as last checked (check_grads): their rows, dtypes and element sizes, and a
        # version that changes with them (the backends cache per-grad layout facts under it).
        self.grad_rows, self.grad_dtypes, self.grad_itemsizes, self.grad_version = None, None, None, None
        self.epoch = None      # the state's write count when built


@dataclass
class StepPlan:
    """What one step touches, as a storage prepared it. `params`: every param, to name one in
    an error (None on flat storage, which reads nothing per param); `owners`: those stepped."""
    params: list | None
    owners: list
    active: list = None
    grads: list = None
    grads_all: list = None


class PerTensorStorage:
    """Storage as the user has it: each param's own grad, master and buffer. A step reads
    every `.grad`, compares every tensor's memory with the cached StepLayout's (O(n)), and
    rebuilds the layout when anything changed. Also hands the step's tensors to flat storage
    (flat_storage.py) when flat_grads asks for it."""

    def __init__(self):
        self.layout = None
        self._ids = itertools.count(1)
        self._every = []  # list(range(n)) for the last n: the positions when every param has a grad

    def prepare(self, opt, hypers) -> StepPlan | None:
        """The params that have a grad, or None when none has one."""
        params = opt._flat_params()
        # (A DTensor's .grad goes through its __torch_function__ otherwise: twice the time.)
        with torch._C.DisableTorchFunctionSubclass():
            grads = list(map(_GRAD, params))
        # Every param has a grad (the usual step): the lists as they are, and the same list of
        # positions each step, so the layout's signature compares by identity. Per param, a
        # Python-level pass costs ~40-60 ns (1,542 params: ~0.1 ms a pass); these are C-level.
        if grads and not any(map(operator.is_, grads, itertools.repeat(None))):
            if len(self._every) != len(params):
                self._every = list(range(len(params)))
            return StepPlan(params, params, self._every, grads, grads)
        active = [i for i, g in enumerate(grads) if g is not None]
        if not active:
            return None
        return StepPlan(params, [params[i] for i in active], active, [grads[i] for i in active], grads)

    def batch_of(self, opt, plan: StepPlan, hypers, scaler, clip: tuple) -> StepBatch:
        return self.batch(opt, plan.params, plan.active, plan.grads, hypers, scaler, clip)

    def after_step(self, opt, plan: StepPlan, batch: StepBatch, hypers) -> None:
        flat = opt._flat_grads
        if flat is not None:
            left_out = [p for p, g in zip(plan.params, plan.grads_all) if g is None]
            if flat.adopt(self.layout, batch.grads, left_out, opt.state, opt.param_groups, hypers, opt._epoch,
                          self.next_id(), opt.RULE, opt._accumulator):
                self.invalidate()  # its masters and buffers were copied; the state holds flat views
    def next_id(self) -> int:
        return next(self._ids)

    def invalidate(self) -> None:
        self.layout = None

    def batch(self, opt, params, active, grads, hypers, scaler, clip: tuple) -> StepBatch:
        """The step's tensors, checked against each other before anything is written. At
        thousands of tensors the host's per-tensor work decides the speed, so the lists are
        cached in a StepLayout and only rebuilt when the params that step, their storage or
        layout, the state (any write to it: tracked_state.py) or the state buffers kept changed;
        the per-step checks compare each list's rows (tensor_watch.py) with the cached ones."""
        owners = params if len(active) == len(params) else [params[i] for i in active]
        tensors = local_tensors(owners) if opt._sharded else owners
        signature = (opt._flat_ids, active, [h.buffers for h in hypers])
        layout = self.layout
        # Storage, dtype, shape and strides of every param and state tensor (`p.data =
        # p.data[:1]` keeps data_ptr and _version), read in one native call per list
        # (tensor_watch.py) and compared with the rows read when the layout was built.
        if (layout is None or layout.signature != signature or layout.epoch != opt._epoch.value
                or not tensor_watch.unchanged(tensors, layout.memory)
                or not tensor_watch.unchanged(layout.state_tensors, layout.state_memory)):
            layout = self._new_layout(opt, params, active, hypers, signature)
            layout.memory = tensor_watch.read(tensors)
        # DTensor params: the kernels run on the local shards, and the grads' shards are what
        # the per-step comparison reads (a DTensor's attributes cost more than a tensor's).
        shards = local_grads(grads, owners, lambda k: opt._param_name(owners[k]), layout.specs) if opt._sharded else grads
        grad_ptrs = tensor_watch.relaid(shards, layout.grad_rows, layout.grad_itemsizes)
        if grad_ptrs is None:  # checked in full when a grad's layout changed
            check_grads(grads, owners, lambda k: opt._param_name(owners[k]))
            dtypes = [g.dtype for g in shards]
            if dtypes != layout.grad_dtypes:
                layout.layout_id = next(self._ids)  # the backends' tables pair by grad dtype
            layout.grad_rows, layout.grad_dtypes = tensor_watch.read(shards), dtypes
            layout.grad_itemsizes = torch.tensor([g.element_size() for g in shards], dtype=torch.int64)
            layout.grad_version = next(self._ids)
            grad_ptrs = tensor_watch.pointers(layout.grad_rows, layout.grad_itemsizes)
        grads = shards
        max_norm, norm_type = clip
        return StepBatch(params=layout.params, grads=grads, masters=layout.masters, buffers=layout.buffers,
                         counts=layout.counts, group_index=layout.group_index, groups=hypers,
                         max_grad_norm=max_norm, norm_type=norm_type, scaler=scaler,
                         applied_steps=opt._applied_steps, grad_norm=opt.last_grad_norm,
                         found_inf=opt.last_step_skipped, cache=opt._backend_cache, layout_id=layout.layout_id,
                         reduce_stats=layout.reduce_stats, consecutive_skips=opt.consecutive_skips, rule=opt.RULE,
                         emas=layout.emas, ema=opt._ema, scales=layout.scales,
                         state_precision=opt._state_precision,
                         grad_ptrs=grad_ptrs, grad_version=layout.grad_version)

    def _new_layout(self, opt, params, active, hypers, signature) -> StepLayout:
        """Checks every param, master and buffer about to be touched, and re-takes or re-lays
        out what no longer fits its param; raises (before any write) what cannot be fixed."""
        self.layout = None
        owners = [params[i] for i in active]
        devices = {p.device for p in owners}
        if len(devices) > 1:
            raise RuntimeError(f"params with grads are on {sorted(map(str, devices))}; one step runs on one "
                               "device (use one optimizer per device)")
        check_param_memory([local(p) for p in owners], lambda k: opt._param_name(owners[k]))
        layout = StepLayout(signature, next(self._ids))
        layout.reduce_stats = shard_reduction(owners)
        layout.specs = specs_of(owners) if opt._sharded else None
        rule = opt.RULE
        fixes = []
        for i in active:  # first check all, then write: a raise leaves the state as it was
            p = params[i]
            state = opt.state[p] if p in opt.state else {}
            gi = opt._group_of[i]
            keys = hypers[gi].buffers
            master = opt._masters.cached(state, p)  # None: none yet, or no longer fits p
            name = opt._param_name(p)
            stored = [opt._state_precision.conform(state.get(key), state.get(scale_key(key)), p, master, name, key,
                                                   key not in rule.unsigned_buffers) for key in keys]
            average = None if opt._ema is None else opt._ema.conform(state.get(ema.KEY), p, master, name)
            fixes.append((p, master, keys, stored, gi, average))
        if opt._ema is not None:
            layout.emas = []
        precision = opt._state_precision
        for p, master, keys, stored, gi, average in fixes:
            state = opt.state[p]
            if master is None:
                master = opt._masters.make(p)
            key = opt._masters.key
            if state.get(key) is not master:
                state[key] = master
            count = None
            bufs, scales = [], []
            if keys:
                # Buffers allocated now are zeros, applied on the device (SGD: the first applied
                # step sets b = d; AdamW: the moments start at 0 with step 0). Stored in the
                # state_precision's form (state_precision.py); an int8 buffer's scales beside it.
                new = all(b is None for b, _ in stored)
                stored = [precision.zeros(master, k not in rule.unsigned_buffers) if b is None else (b, sc)
                          for k, (b, sc) in zip(keys, stored)]
                count = rule.count(state, p.device, new)
                for k, (b, sc) in zip(keys, stored):
                    if state.get(k) is not b:
                        state[k] = b
                    if sc is not None and state.get(scale_key(k)) is not sc:
                        state[scale_key(k)] = sc
                    bufs.append(b)
                    scales.append(sc)
                if state.get(rule.count_key) is not count:
                    state[rule.count_key] = count
            if opt._ema is not None:  # none yet (its state was cleared): it restarts from the master
                if average is None:
                    average = opt._ema.make(opt._masters.current_master(state, p), master)
                if state.get(ema.KEY) is not average:
                    state[ema.KEY] = average
                layout.emas.append(local(average))
            layout.owners.append(p)
            layout.params.append(local(p))  # a DTensor's state is a DTensor too; kernels get the shards
            layout.masters.append(local(master))
            layout.buffers.append(tuple(map(local, bufs)))
            layout.scales.append(tuple(scales) if precision.scaled else None)
            layout.counts.append(count)
            layout.group_index.append(gi)
        if getattr(rule, "matrix", False) and layout.reduce_stats is None:
            _pack_stacks(opt, layout, hypers)
        layout.epoch = opt._epoch.value
        emas = layout.emas or [None] * len(layout.params)
        layout.state_tensors = [t for p, m, bufs, scales, count, e in zip(layout.params, layout.masters,
                                                                          layout.buffers, layout.scales,
                                                                          layout.counts, emas)
                                for t in (m, *bufs, *(scales or ()), count, e) if t is not None and t is not p]
        layout.state_memory = tensor_watch.read(layout.state_tensors, full=False)
        self.layout = layout
        return layout


def _pack_stacks(opt, layout: StepLayout, hypers) -> None:
    """A rule that steps params as stacks (buckets.py) finds each stack's state as the rows
    of one tensor: the members' masters, buffers, scales, counts and EMAs are moved there
    (values kept), so its step reads and writes them in place instead of gathering and
    scattering copies. Params stay the user's; non-contiguous state is left as it is."""
    stacks, _ = buckets.plan(layout, opt._state_precision.code == INT8_CODE)
    for members in stacks:
        if len(members) < 2:
            continue
        first = members[0]
        keys = list(hypers[layout.group_index[first]].buffers)
        fields = [("buffers", k) for k in range(len(keys))]
        names = list(keys)
        if layout.masters[first] is not layout.params[first]:
            fields.append(("masters", None))
            names.append(opt._masters.key)
        if layout.scales[first] is not None:
            fields += [("scales", k) for k in range(len(keys))]
            names += [scale_key(key) for key in keys]
        if layout.counts[first] is not None:
            fields.append(("counts", None))
            names.append(opt.RULE.count_key)
        if layout.emas is not None:
            fields.append(("emas", None))
            names.append(ema.KEY)
        field = lambda i, f, k: getattr(layout, f)[i] if k is None else getattr(layout, f)[i][k]  # noqa: E731
        if not all(field(i, f, k).is_contiguous() for i in members for f, k in fields):
            continue
        owners = [layout.owners[i] for i in members]
        packed = buckets.pack(opt.state, owners, names)
        for i, row in zip(members, packed):
            by_field = dict(zip(fields, row))
            layout.buffers[i] = tuple(by_field[("buffers", k)] for k in range(len(keys)))
            if ("masters", None) in by_field:
                layout.masters[i] = by_field[("masters", None)]
            if layout.scales[i] is not None:
                layout.scales[i] = tuple(by_field[("scales", k)] for k in range(len(keys)))
            if ("counts", None) in by_field:
                layout.counts[i] = by_field[("counts", None)]
            if ("emas", None) in by_field:
                layout.emas[i] = by_field[("emas", None)]

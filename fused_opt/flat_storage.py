"""`flat_grads=True`: the grads, FP32 masters and state buffers in flat buffers the
optimizer owns, so a step's host work does not grow with the number of tensors.

Each param's `.grad` becomes a view into one flat buffer per grad dtype, kept across steps:
autograd accumulates into it in place and `opt.zero_grad()` zeroes each buffer in one op, so
no grad address ever changes and the step needs no pass over the grads (DDP's
`gradient_as_bucket_view` and Megatron's grad buffer work this way). `state[p]` entries are
views into flat FP32 master and state buffers (one per buffer the update rule keeps: the
momentum buffer, or Adam's moments; one of the per-param counts; one of the EMAs), so the kernels
stream them in order.

What the fast step must still notice costs O(number of flat buffers), but for one read per
param: a grad that is freed or replaced (`p.grad = None`, `model.zero_grad()`, DDP's bucket
views) drops the last reference to our view, whose weakref callback marks the storage dead;
`p.grad.data = ...` or `state[p]["momentum_buffer"].data = ...` drops a reference to a flat
buffer's storage (their use counts are compared); `share_memory_()` or a storage
`resize_()` on a grad or a state entry moves a flat buffer's memory (their data pointers are
compared); `p.data = ...` frees the param's old storage (a weakref callback again); any
write to `opt.state` bumps its epoch (tracked_state.py); group lists are compared by
identity. A param's own storage can also move in place (`p.share_memory_()`,
`model.share_memory()`, `p.untyped_storage().resize_()` as FSDP1 and ZeRO-3 do), which no
signal but its data pointer tells: that is the one read per param, a word compared in C++
(storage_watch.py), the price of never writing to freed memory. A dead storage sends the step down the per-tensor
path, which re-adopts the grads as they are. What those signals cannot see is a grad
replaced while other code still holds the old one (README: flat grads).

Params are left where they are (a flat copy would be an alias the user never asked for).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import ema
from .backends import StepBatch
from .distributed import is_dtensor
from .grad_accumulation import set_grad
from .memory import is_dense
from .state_precision import scale_key
from .storage_watch import _STORAGE_PTR, PointerWatch
from .step_layout import StepPlan
from .tracked_state import Epoch, ParamList

# Each tensor's slice starts on a multiple of this many elements: 16-byte-aligned rows for
# FP16/BF16 grads and FP32 state, so the CUDA kernels keep their vector loads.
ALIGN = 8


def ineligible(params: list) -> str | None:
    """Why these params cannot live in flat storage, or None."""
    if not params:
        return "no params"
    if any(is_dtensor(p) for p in params):
        return "DTensor (FSDP2) params: their grads are DTensors FSDP2 creates every step"
    if len({p.device for p in params}) > 1:
        return "params on more than one device"
    if any(not is_dense(p) for p in params):
        return "a param that is a view with gaps (not dense)"
    return None




def _storage_use_count(storage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


_CALL = weakref.ref.__call__


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class FlatStorage:
    """Flat buffers for one optimizer's params, adopted after a per-tensor step whose layout
    (a step_layout.StepLayout: masters, state buffers, counts) covers the params that stepped."""

    def __init__(self, layout, grads: list):
        self.alive = True
        params = layout.params
        device = params[0].device
        self.offsets, self.total = [], 0
        for p in params:
            self.offsets.append(self.total)
            self.total += _padded(p.numel())
        # One buffer per grad dtype (FP16/BF16 grads, or FP32 ones), padding kept at zero.
        self.grad_buffers = {g.dtype: None for g in grads}
        for dtype in self.grad_buffers:
            self.grad_buffers[dtype] = torch.zeros(self.total, dtype=dtype, device=device)
        # The views the kernels' tables point at, held here; p.grad gets views of its own
        # (attach), held only by the param, so that dropping one is seen (see intact).
        self.grad_views = [self._view(self.grad_buffers[g.dtype], p, off).copy_(g)
                           for p, g, off in zip(params, grads, self.offsets)]
        self.masters, self.master_views = self._flat_copies(params, [m if m is not p else None for p, m in
                                                                     zip(params, layout.masters)])
        # The k-th state buffer of every param (SGD: momentum; AdamW: exp_avg, exp_avg_sq,
        # max_exp_avg_sq) in one flat buffer per k; params that keep fewer have None there.
        width = max(map(len, layout.buffers), default=0)
        self.state_buffers, columns = [], []
        for k in range(width):
            flat, views = self._flat_copies(params, [b[k] if k < len(b) else None for b in layout.buffers])
            self.state_buffers.append(flat)
            columns.append(views)
        self.buffer_views = [tuple(column[i] for column in columns if column[i] is not None)
                             for i in range(len(params))]
        # state_precision="int8": the k-th buffer's block scales of every param in one flat FP32
        # buffer per k (a param's scales start on a block boundary of its own, as its codes).
        self.scale_buffers, self.scale_views = [], [None] * len(params)
        if any(s is not None for s in layout.scales):
            scale_columns = []
            for k in range(width):
                column = [s[k] if s is not None and k < len(s) else None for s in layout.scales]
                flat = torch.zeros(sum(c.numel() for c in column if c is not None), dtype=torch.float32, device=device)
                views, at = [], 0
                for c in column:
                    views.append(None if c is None else flat[at:at + c.numel()].copy_(c))
                    at += 0 if c is None else c.numel()
                self.scale_buffers.append(flat)
                scale_columns.append(views)
            self.scale_views = [tuple(column[i] for column in scale_columns if column[i] is not None)
                                for i in range(len(params))]
        # With ema_decay: the EMAs in one flat buffer of their own (FP32 or BF16).
        self.emas, self.ema_views = self._flat_copies(params, layout.emas) if layout.emas else (None, None)
        counts = [c for c in layout.counts if c is not None]
        self.counts = torch.zeros(max(len(params), 1), dtype=counts[0].dtype if counts else torch.int32, device=device)
        self.count_views = [None if c is None else self.counts[k].copy_(c) for k, c in enumerate(layout.counts)]
        self.use_counts = None
        self._refs, self._param_storages, self._param_pointers = [], [], None

    @staticmethod
    def _view(buffer, like, offset):
        """`like`'s shape and strides (dense: a permutation of one run) from `offset` on."""
        return buffer.as_strided(like.shape, like.stride(), offset)

    def _flat_copies(self, params, tensors):
        """(flat buffer, views) holding a copy of each tensor that is not None: FP32 masters and
        buffers, or master_weights="remainder"'s int16 remainders."""
        present = [t for t in tensors if t is not None]
        if not present:
            return None, list(tensors)
        flat = torch.zeros(self.total, dtype=present[0].dtype, device=params[0].device)
        return flat, [None if t is None else self._view(flat, p, off).copy_(t)
                      for p, t, off in zip(params, tensors, self.offsets)]

    def attach(self, owners: list, state, accumulator=None) -> None:
        """Points each param's .grad and state entries at the flat storage. An FP32 grad of
        an FP16/BF16 param (fp32_grad_accumulation's sums, or Megatron-style main grads)
        stays FP32: a view into the FP32 buffer."""
        me = weakref.ref(self)

        def died(_ref):
            storage = me()
            if storage is not None:
                storage.alive = False

        for p, kernel_view, off in zip(owners, self.grad_views, self.offsets):
            buffer = self.grad_buffers[kernel_view.dtype]
            set_grad(p, self._view(buffer, p, off))
            self._refs.append(weakref.ref(p.grad, died))  # held by the param only, so that dropping it is seen
            if accumulator is not None:
                accumulator.adopt_buffer(p, self._view(buffer, p, off))
        # `p.data = ...` frees the param's old storage (its PyObject is preserved while it lives).
        self._param_storages = [weakref.ref(p.untyped_storage(), died) for p in owners]
        self._refs += self._param_storages
        self._param_pointers = PointerWatch(list(map(_CALL, self._param_storages)))
        for p, master, bufs, scales, count, keys in zip(owners, self.master_views, self.buffer_views,
                                                        self.scale_views, self.count_views, self.keys):
            entry = state[p]
            if master is not None:
                entry["master_param" if master.dtype == torch.float32 else "master_remainder"] = master
            entry.update(zip(keys, bufs))
            if scales is not None:
                entry.update(zip(map(scale_key, keys), scales))
            if count is not None:
                entry[self.count_key] = count
        if self.ema_views is not None:
            for p, view in zip(owners, self.ema_views):
                state[p][ema.KEY] = view
        buffers = [*self.grad_buffers.values(), self.masters, *self.state_buffers, *self.scale_buffers, self.counts,
                   self.emas]
        self.storages = [b.untyped_storage() for b in buffers if b is not None]
        self.use_counts = [_storage_use_count(s) for s in self.storages]
        self.data_ptrs = list(map(_STORAGE_PTR, self.storages))

    def buffers_intact(self) -> bool:
        """O(flat buffers): no attached view was dropped, no view's storage swapped (`.data =
        ...` drops a reference to a flat buffer's storage), no flat buffer's memory moved, no
        param's storage freed. Enough for what touches only our buffers (zeroing grads)."""
        if (self.alive and all(_storage_use_count(s) == n for s, n in zip(self.storages, self.use_counts))
                and list(map(_STORAGE_PTR, self.storages)) == self.data_ptrs):
            return True
        self.alive = False
        return False

    def intact(self) -> bool:
        """buffers_intact(), and no param's storage moved (`share_memory_()`, a storage
        `resize_()`): one data pointer per param, what a step needs before it writes params."""
        if self.buffers_intact() and self._param_pointers.unmoved(lambda: map(_CALL, self._param_storages)):
            return True
        self.alive = False
        return False

    def zero_(self) -> None:
        for buffer in self.grad_buffers.values():
            buffer.zero_()

    def versions(self) -> list:
        """The grad buffers' version counters (a view shares its base's): what the scaled-grad
        guard compares instead of one version per grad."""
        return [b._version for b in self.grad_buffers.values()]


@dataclass
class FlatLayout:
    """The lists the fast step hands the backend, every one fixed while the storage is."""
    layout_id: int
    params: list
    grads: list
    masters: list
    buffers: list
    counts: list
    group_index: list
    emas: list | None = None
    scales: list | None = None


class FlatGrads:
    """The optimizer's side of flat_grads=True: when to adopt flat storage, whether the fast
    step may run on it, and when to give up (grads that someone else replaces every step)."""

    # Storages dropped before a single fast step, in a row, before adopting stops: DDP's
    # gradient_as_bucket_view and model.zero_grad() every step replace .grad each backward.
    MAX_DEATHS = 2

    def __init__(self):
        self.storage = None
        self.layout = None      # the FlatLayout the fast step launches over
        self.off = None         # why flat storage is not used, once it never will be
        self.deaths = 0
        self.ran = 0
        self.epoch = self.lists = self.buffer_keys = None
        self.left_out = []
        self.backward_due = False  # scale_loss was called and its backward has not started

    @property
    def status(self) -> str:
        if self.off is not None:
            return f"off: {self.off}"
        return "active" if self.storage is not None and self.storage.alive else "per-tensor until the next step"

    def holds(self, epoch: int, groups: list, hypers: list) -> bool:
        """Whether the fast step may run: O(groups + grad dtypes), nothing per tensor."""
        storage = self.storage
        if storage is None:
            return False
        if (storage.intact() and epoch == self.epoch and len(groups) == len(self.lists)
                and all(g["params"] is lst for g, lst in zip(groups, self.lists))
                and [h.buffers for h in hypers] == self.buffer_keys
                and all(p.grad is None for p in self.left_out)):
            return True
        if not storage.alive:  # grads taken away from us, not a change of ours or the user's state
            self.deaths = self.deaths + 1 if self.ran == 0 else 1
        self.storage = self.layout = None
        return False

    def adopt(self, layout, grads: list, left_out: list, state, groups: list, hypers: list, epoch: Epoch,
              layout_id: int, rule, accumulator=None) -> bool:
        """After a per-tensor step: copy its grads and state into flat buffers and point .grad
        and state[p] at them (a full copy, so only when something changed). Params that had no
        grad in that step (frozen, unused) stay out, as torch would leave them: each step
        checks that they still have none (the one per-tensor check left, on those only).
        FP32 grads of FP16/BF16 params (fp32_grad_accumulation) become views into the FP32
        buffer, beside the FP32 params' grads. With master_weights="remainder" the int16
        remainders are flat too."""
        if self.off is not None:
            return False
        reason = ineligible(layout.owners)
        if reason is None and self.deaths >= self.MAX_DEATHS:
            reason = (".grad was replaced before every step (DDP's gradient_as_bucket_view, or "
                      "model.zero_grad()/zero_grad(set_to_none=True) by other code): the grads are not ours to keep")
        if reason is not None:
            self.off = reason
            return False
        storage = FlatStorage(layout, grads)
        storage.keys = [hypers[gi].buffers for gi in layout.group_index]
        storage.count_key = rule.count_key
        storage.attach(layout.owners, state, accumulator)
        for g in groups:  # in-place edits of a group's list must bump the epoch
            if not (isinstance(g["params"], ParamList) and g["params"]._epoch is epoch):
                g["params"] = ParamList(epoch, g["params"])
        masters = [p if m is None else m for p, m in zip(layout.params, storage.master_views)]
        self.layout = FlatLayout(layout_id, layout.params, storage.grad_views, masters, storage.buffer_views,
                                 storage.count_views, layout.group_index, storage.ema_views,
                                 storage.scale_views if storage.scale_buffers else None)
        self.storage, self.ran = storage, 0
        self.lists = [g["params"] for g in groups]
        self.left_out = left_out
        self.buffer_keys = [h.buffers for h in hypers]
        self.epoch = epoch.value
        return True

    def prepare(self, opt, hypers) -> StepPlan:
        return StepPlan(None, self.layout.params)

    def batch_of(self, opt, plan, hypers, scaler, clip: tuple) -> StepBatch:
        """The step over flat storage: every list is cached, nothing is read per tensor; what
        could have changed was checked in holds()."""
        self.check_backward_ran()
        layout = self.layout
        max_norm, norm_type = clip
        return StepBatch(params=layout.params, grads=layout.grads, masters=layout.masters, buffers=layout.buffers,
                         counts=layout.counts, group_index=layout.group_index, groups=hypers,
                         max_grad_norm=max_norm, norm_type=norm_type, scaler=scaler,
                         applied_steps=opt._applied_steps, grad_norm=opt.last_grad_norm,
                         found_inf=opt.last_step_skipped, cache=opt._backend_cache, layout_id=layout.layout_id,
                         flat_grads=self.storage.grad_buffers, consecutive_skips=opt.consecutive_skips,
                         rule=opt.RULE, emas=layout.emas, ema=opt._ema, scales=layout.scales,
                         state_precision=opt._state_precision)

    def after_step(self, opt, plan, batch, hypers) -> None:
        self.stepped()

    def expect_backward(self, scaled_loss: torch.Tensor) -> None:
        """The fast step does not bump the params' version counters (README "flat grads"), so
        autograd would not catch a backward through a graph built before the step (the
        classic forward, step, backward mistake); a step between scale_loss and its backward
        raises here instead."""
        self.backward_due = True
        me = weakref.ref(self)

        def started(grad):
            flat = me()
            if flat is not None:
                flat.backward_due = False
            return grad
        scaled_loss.register_hook(started)

    def check_backward_ran(self) -> None:
        if self.backward_due:
            self.backward_due = False
            raise RuntimeError("fused_opt: step() between scale_loss() and the backward of its loss. "
                               "The step would change the weights that graph saved, and its backward would use "
                               "them silently (flat_grads=True does not bump the params' version counters). "
                               "Call backward() before step().")

    def stepped(self) -> None:
        self.ran += 1
        self.deaths = 0

    def zero_(self, epoch: int, groups: list, set_to_none: bool) -> bool:
        """opt.zero_grad(): the flat buffers zeroed in one op each, the views kept, when the
        storage still covers the optimizer's params as adopted (else False: torch's
        zero_grad then clears every .grad its way). The params left out get torch's
        treatment (a grad set on a frozen param is cleared, as torch would)."""
        storage = self.storage
        if (storage is None or not storage.buffers_intact() or epoch != self.epoch or len(groups) != len(self.lists)
                or not all(g["params"] is lst for g, lst in zip(groups, self.lists))):
            return False
        storage.zero_()
        for p in self.left_out:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()
        return True

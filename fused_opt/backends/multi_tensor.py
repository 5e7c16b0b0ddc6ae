"""Host side of a multi-tensor step, shared by the Triton and native backends.

A step over T tensors becomes a constant number of launches: every tensor is cut into
fixed-size chunks, and a chunk table (tensor index, start offset) lets one program per
chunk find its work. Tensor addresses travel in a small device table instead of kernel
arguments (which cap out at a few hundred tensors). Tensors are grouped by (param dtype,
grad dtype), since a kernel is compiled per dtype pair.

Only the grad addresses change from step to step (zero_grad(set_to_none=True) frees them),
so everything else is built once per set of params and cached; a step costs one pass over
the grads to collect addresses and, when they moved, one async host-to-device copy. With
flat grads (flat_storage.py) not even that: the grads are views of buffers that stay put,
and the norm pass reads each buffer as one run instead of tensor by tensor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..memory import is_dense
from ..state_precision import BLOCK as STATE_BLOCK
from . import StepBatch

# Elements per chunk: large enough that a program streams a long run of memory, small enough
# to spread one big tensor over all SMs. Tests shrink it to cross chunk boundaries cheaply.
CHUNK_SIZE = int(os.environ.get("FUSED_OPT_CHUNK_SIZE", 65536))
# A chunk holds whole int8 state blocks (state_precision.py): each block's scale is written by
# the one program that owns it.
if CHUNK_SIZE <= 0 or CHUNK_SIZE % STATE_BLOCK:
    raise ValueError(f"FUSED_OPT_CHUNK_SIZE must be a positive multiple of {STATE_BLOCK}, got {CHUNK_SIZE}")

# Columns of the per-tensor table (int64): addresses are raw device pointers, 0 when absent.
# BUF, BUF2, BUF3 are the update rule's state buffers in its order (SGD: the momentum buffer;
# AdamW: exp_avg, exp_avg_sq, max_exp_avg_sq), COUNT its per-param count (update_rules.py),
# EMA the param's model EMA (ema.py), SCALE, SCALE2, SCALE3 the block scales of BUF, BUF2, BUF3
# with state_precision="int8" (state_precision.py).
GRAD, MASTER, BUF, PARAM, NUMEL, GROUP, COUNT, BUF2, BUF3, EMA, SCALE, SCALE2, SCALE3 = range(13)
TABLE_COLUMNS = 13
BUFFER_COLUMNS = (BUF, BUF2, BUF3)
SCALE_COLUMNS = (SCALE, SCALE2, SCALE3)
# How a pair's master column is kept (master_format.py): FP32 masters, or BF16 params with
# int16 ("remainder") or int8 ("remainder8") remainders; each is a kernel of its own.
FP32_MASTERS, REMAINDER16, REMAINDER8 = 0, 1, 2
MASTER_KINDS = {torch.float32: FP32_MASTERS, torch.int16: REMAINDER16, torch.int8: REMAINDER8}
# The per-group hyperparameter table (float32): each rule's row of GROUP_COLUMNS (Hyper.row).
GROUP_COLUMNS = 12
# Per-step scalars (float32): written by the finalize stage and read by the update, then the
# EMA's settings finalize reads to write EMA_WEIGHT (ema.ModelEMA.scalars: 1 - d, d, 1/tau).
INV_SCALE, CLIP_COEF, FOUND_INF, EMA_WEIGHT, EMA_ONE_MINUS_DECAY, EMA_DECAY, EMA_INV_TAU, SCALARS = range(8)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Async host-to-device copy through pinned memory (torch's caching host allocator keeps
    the pinned block alive until the copy has run), so no step waits on the device."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class PairPlan:
    """The tensors of one (param dtype, grad dtype) pair: what one kernel launch covers."""
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    members: list                  # positions in the StepBatch
    host_table: torch.Tensor       # [T, TABLE_COLUMNS] int64, grad column refreshed per step
    chunks: torch.Tensor           # [C, 2] int64 on the device: (tensor index, start)
    num_chunks: int
    chunk_base: int                # this pair's first slot in the per-chunk partials
    table: torch.Tensor = None     # device copy of host_table
    index: torch.Tensor = None     # members as an int64 tensor (to pick their grads' addresses)
    grad_ptrs: torch.Tensor = None  # the grad column as last uploaded
    grad_version: object = None    # the grads' layout the two lists below were found for
    strided_grads: list = field(default_factory=list)  # rows whose grad is not contiguous
    odd_rows: list = field(default_factory=list)  # rows laid out unlike a dense tensor
    static_aligned: bool = False   # masters, buffers and params all 16-byte aligned
    aligned: bool = False          # ... and this step's grads too: vector loads are safe
    staged: list = field(default_factory=list)    # (param or None, dense staging copy)
    master_kind: int = FP32_MASTERS  # what the master column holds (MASTER_KINDS)
    chunk_members: torch.Tensor = None  # [C] int64 on the host: each chunk's position in the StepBatch


@dataclass
class NormRun:
    """A flat grad buffer as one table row, for the norm pass (which reads grads only)."""
    grad_dtype: torch.dtype
    table: torch.Tensor
    chunks: torch.Tensor
    num_chunks: int
    chunk_base: int
    aligned: bool = True  # a buffer's start is aligned; every slice in it starts on ALIGN elements


class Plan:
    """Everything about a step that outlives the step: tables and scratch buffers."""

    def __init__(self, batch: StepBatch, chunk_size: int):
        device = batch.masters[0].device if batch.masters else batch.grads[0].device
        self.device = device
        self.chunk_size = chunk_size
        self.rule = batch.rule.code  # update_rules.py: which per-element function the update runs
        self.ema_dtype = batch.ema.dtype if batch.emas is not None else None
        # How the state buffers are stored: one code per launch (state_precision.py).
        self.state_code = batch.state_precision.code if batch.state_precision is not None else 0
        self.placeholder = torch.zeros(4, dtype=torch.float32, device=device)  # see _pair_plan
        by_pair: dict = {}
        for i, (p, g, m) in enumerate(zip(batch.params, batch.grads, batch.masters)):
            by_pair.setdefault((p.dtype, g.dtype, MASTER_KINDS[m.dtype]), []).append(i)
        self.pairs = []
        base = 0
        for (param_dtype, grad_dtype, master_kind), members in by_pair.items():
            pair = self._pair_plan(batch, members, param_dtype, grad_dtype, base)
            pair.master_kind = master_kind
            base += pair.num_chunks
            self.pairs.append(pair)
        self.total_chunks = base
        self.norm_runs = self._norm_runs(batch.flat_grads, device) if batch.flat_grads else None
        # The norm pass's partials: one per update chunk, or one per chunk of the flat runs.
        self.norm_chunks = base if self.norm_runs is None else sum(r.num_chunks for r in self.norm_runs)
        slots = max(base, self.norm_chunks, 1)
        self.partials = torch.zeros(slots, dtype=torch.float32, device=device)
        self.flags = torch.zeros(slots, dtype=torch.int32, device=device)
        self.scalars = torch.zeros(SCALARS, dtype=torch.float32, device=device)
        if batch.emas is not None:
            settings = torch.zeros(SCALARS, dtype=torch.float32)
            settings[EMA_ONE_MINUS_DECAY:EMA_INV_TAU + 1] = torch.tensor(batch.ema.scalars)
            self.scalars.copy_(upload(settings, device))
        # DTensor params on several meshes: each layout's partials slots, reduced over its own mesh.
        self.layout_slots = self._layout_slots(batch) if batch.reduce_stats is not None else [None]
        # DTensor params on one mesh: the [1, 2] row {statistic, inf flag} the partials are
        # folded into for the all-reduce (reduce_across_shards; the native step folds it itself).
        self.fold_row = None
        if batch.reduce_stats is not None and len(self.layout_slots) == 1:
            self.fold_row = torch.zeros(1, 2, dtype=torch.float32, device=device)
        self.group_rows = None
        self.group_table = None
        self.tables_version = 0  # counts replaced chunk tables (what a backend caches addresses of)
        self.cache = {}  # what a backend derives from the plan once (native_backend: addresses)

    def _pair_plan(self, batch, members, param_dtype, grad_dtype, base) -> PairPlan:
        host = torch.zeros(len(members), TABLE_COLUMNS, dtype=torch.int64)
        chunks, odd_rows, addresses = [], [], []
        for row, i in enumerate(members):
            p, master, bufs, count = batch.params[i], batch.masters[i], batch.buffers[i], batch.counts[i]
            ema = batch.emas[i] if batch.emas is not None else None
            scales = batch.scales[i] if batch.scales is not None else None
            n = master.numel()
            host[row, MASTER] = master.data_ptr()
            for column, buf in zip(BUFFER_COLUMNS, bufs):
                # An empty buffer (an empty param, or FSDP2's empty last shards) has no memory,
                # and a 0 address reads as "no buffer": the placeholder says it exists (its
                # first-step flag is claimed, as every rank's must be), and nothing reads it.
                host[row, column] = buf.data_ptr() or self.placeholder.data_ptr()
            for column, scale in zip(SCALE_COLUMNS, scales or ()):
                host[row, column] = scale.data_ptr()
            host[row, COUNT] = count.data_ptr() if count is not None else 0
            host[row, PARAM] = 0 if p is master else p.data_ptr()
            host[row, EMA] = 0 if ema is None else ema.data_ptr()
            addresses += [master.data_ptr(), *(b.data_ptr() for b in bufs), 0 if p is master else p.data_ptr(),
                          0 if ema is None else ema.data_ptr()]
            host[row, NUMEL] = n
            host[row, GROUP] = batch.group_index[i]
            # An empty tensor gets one empty chunk: its count still advances (AdamW's step).
            chunks.extend((row, start) for start in range(0, max(n, 1), self.chunk_size))
            if not master.is_contiguous() or (p is not master and p.stride() != master.stride() and n > 1):
                odd_rows.append(row)  # staged every step (see refresh)
        chunk_table = torch.tensor(chunks, dtype=torch.int64).reshape(-1, 2)
        return PairPlan(param_dtype, grad_dtype, members, host, upload(chunk_table, self.device),
                        len(chunks), base, odd_rows=odd_rows, static_aligned=not any(a & 15 for a in addresses),
                        chunk_members=torch.tensor(members, dtype=torch.int64)[chunk_table[:, 0]],
                        index=torch.tensor(members, dtype=torch.int64))

    def _layout_slots(self, batch: StepBatch) -> list:
        members = batch.reduce_stats.members
        if len(members) == 1:
            return [None]
        layout_of = torch.empty(len(batch.params), dtype=torch.int64)
        for k, positions in enumerate(members):
            layout_of[positions] = k
        slot_layout = layout_of[torch.cat([pair.chunk_members for pair in self.pairs])]
        return [upload(torch.nonzero(slot_layout == k).flatten(), self.device) for k in range(len(members))]

    def norm_passes(self) -> list:
        """What the norm pass launches over: each flat run, or else each pair (both have
        grad_dtype, chunks, num_chunks, table, chunk_base and aligned). A pair's table is
        re-uploaded when grads move: read it at launch time."""
        return self.norm_runs if self.norm_runs is not None else self.pairs

    def _norm_runs(self, flat_grads: dict, device) -> list:
        runs, base = [], 0
        for dtype, buffer in flat_grads.items():
            host = torch.zeros(1, TABLE_COLUMNS, dtype=torch.int64)
            host[0, GRAD], host[0, NUMEL] = buffer.data_ptr(), buffer.numel()
            chunks = torch.tensor([(0, s) for s in range(0, buffer.numel(), self.chunk_size)], dtype=torch.int64)
            runs.append(NormRun(dtype, upload(host, device), upload(chunks.reshape(-1, 2), device), chunks.shape[0], base))
            base += chunks.shape[0]
        return runs

    def refresh(self, batch: StepBatch) -> None:
        """Per step: the grad addresses (a grad laid out unlike its master is staged to the
        master's layout), params that need a dense staging copy, and the group table. Which
        grads need staging is kept while the grads' layout is (batch.grad_version), and the
        addresses come read already (batch.grad_ptrs) when the storage has them. Flat grads
        stay put (dense, laid out as their params, nothing staged): once is enough."""
        if batch.flat_grads is not None and all(pair.table is not None for pair in self.pairs):
            self._refresh_groups(batch)
            return
        for pair in self.pairs:
            if batch.grad_version is None or pair.grad_version != batch.grad_version:
                pair.strided_grads = [row for row, i in enumerate(pair.members) if not batch.grads[i].is_contiguous()]
                pair.grad_version = batch.grad_version
            pair.staged = []
            for row in pair.odd_rows:  # a staged master's column points to last step's copy
                pair.host_table[row, MASTER] = batch.masters[pair.members[row]].data_ptr()
            staged = {row: self._stage(batch, pair, row) for row in sorted({*pair.strided_grads, *pair.odd_rows})}
            if batch.grad_ptrs is not None:
                ptrs = batch.grad_ptrs[pair.index]
            else:
                ptrs = torch.tensor([batch.grads[i].data_ptr() for i in pair.members], dtype=torch.int64)
            for row, g in staged.items():
                ptrs[row] = g.data_ptr()
            if pair.grad_ptrs is None or pair.staged or not torch.equal(ptrs, pair.grad_ptrs):
                pair.aligned = pair.static_aligned and torch.equal(ptrs & 15, torch.zeros_like(ptrs))
                pair.host_table[:, GRAD] = ptrs
                pair.table = upload(pair.host_table.clone(), self.device)
                self.tables_version += 1
                pair.grad_ptrs = ptrs
        self._refresh_groups(batch)

    @staticmethod
    def _stage(batch: StepBatch, pair: "PairPlan", row: int) -> torch.Tensor:
        """The kernels pair element k of every tensor of a row by memory order, so all of them
        must be dense and laid out alike: whatever is not goes through a dense copy. A master
        that is not dense (an FP32 param that is a view with gaps is its own master) is staged
        in and written back; otherwise the kernels would step the gaps instead of it. Returns
        the grad the row reads (the grad itself, or its staged copy)."""
        i = pair.members[row]
        g, master, p = batch.grads[i], batch.masters[i], batch.params[i]
        target = master
        if not is_dense(master):
            target = torch.empty_like(master).copy_(master)  # dense (empty_like: contiguous)
            pair.staged.append((master, target))
            pair.host_table[row, MASTER] = target.data_ptr()
        if g.stride() != target.stride() and g.numel() > 1:
            g = torch.empty_like(target, dtype=g.dtype).copy_(g)
            pair.staged.append((None, g))  # keeps the staged grad alive for the launch
        if p is not master and p.stride() != target.stride() and p.numel() > 1:
            staged = torch.empty_like(target, dtype=p.dtype).copy_(p)
            pair.staged.append((p, staged))
            pair.host_table[row, PARAM] = staged.data_ptr()
        return g

    def _refresh_groups(self, batch: StepBatch) -> None:
        rows = [h.row() for h in batch.groups]
        if rows != self.group_rows:
            self.group_table = upload(torch.tensor(rows, dtype=torch.float32), self.device)
            self.group_rows = rows
        # Tensor hyperparameters (a scheduler's lr) are read on the device: one copy launch
        # whatever the number of groups.
        slots, values = [], []
        for gi, h in enumerate(batch.groups):
            for column, value in h.device_values(self.device):
                slots.append(self.group_table[gi, column])
                values.append(value)
        if slots:
            torch._foreach_copy_(slots, values)

    def reduce_across_shards(self, batch: StepBatch, norm_inf: bool) -> int:
        """With DTensor params (distributed.py): this rank's partials and inf flags folded into
        slot 0 and made global by batch.reduce_stats (one row per sharding layout, each over
        its own slots). Returns how many slots finalize reads."""
        n = self.norm_chunks
        if batch.reduce_stats is None:
            return n
        if self.fold_row is not None:
            total = batch.reduce_stats(self._fold(norm_inf), norm_inf)
        else:
            rows = []
            for slots in self.layout_slots:
                if not n:  # a rank may hold only empty shards
                    rows.append(torch.zeros(2, dtype=torch.float32, device=self.device))
                    continue
                partials = self.partials[:n] if slots is None else self.partials.index_select(0, slots)
                flags = self.flags[:n] if slots is None else self.flags.index_select(0, slots)
                rows.append(torch.stack([partials.amax() if norm_inf else partials.sum(), flags.amax().float()]))
            total = batch.reduce_stats(torch.stack(rows), norm_inf)
        self.partials[:1].copy_(total[:1])
        self.flags[:1].copy_(total[1:])
        return 1

    def _fold(self, norm_inf: bool) -> torch.Tensor:
        """fold_row, from this rank's partials in two ops on views kept with it (a dozen small
        ops each step were most of what sharding added to the host's work at a few hundred
        tensors). The inf flags are summed: more than 0 is an inf on either side of the
        all-reduce, whether it sums or takes the max."""
        views = self.cache.get("fold")
        if views is None:
            n = self.norm_chunks
            views = self.cache["fold"] = (self.fold_row[0, :1], self.fold_row[0, 1:], self.partials[:n],
                                          self.flags[:n])
        norm, flag, partials, flags = views
        if partials.numel():  # a rank may hold only empty shards
            (torch.amax if norm_inf else torch.sum)(partials, 0, keepdim=True, out=norm)
        else:
            norm.zero_()
        torch.sum(flags, 0, keepdim=True, dtype=torch.float32, out=flag)
        return self.fold_row

    def write_back(self, batch: StepBatch) -> None:
        """After the update launches: staged params and masters get their update from the
        staging copy, and every param's version counter is bumped, as a torch op's write
        would bump it (the kernels' raw writes don't), so autograd's "modified by an inplace
        operation" check and other optimizers over the same params see the step."""
        for pair in self.pairs:
            for dst, staged in pair.staged:
                if dst is not None:
                    dst.copy_(staged)
        if batch.flat_grads is None:  # flat grads: not bumped (README "flat grads": ~100 ns of cache misses each)
            increment_version(batch.params)


def increment_version(tensors: list) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.6 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def plan_for(batch: StepBatch, chunk_size: int) -> Plan:
    """The cached Plan for this batch's layout (rebuilt when it changed), refreshed for this step."""
    key = (chunk_size, batch.layout_id)
    if batch.cache.get("key") != key:
        batch.cache["plan"], batch.cache["key"] = Plan(batch, chunk_size), key
    plan = batch.cache["plan"]
    plan.refresh(batch)
    return plan

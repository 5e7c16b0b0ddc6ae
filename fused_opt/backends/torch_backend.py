"""The pure-PyTorch backend: the step of docs/semantics.md line by line. It is the oracle the fused backends are
tested against, so it favours readability; it uses torch._foreach_* ops where they exist so
that it is also a usable fallback on any device.

No host sync: the skip is decided on the device and applied with torch.where, so every
tensor is rewritten with its old value on a skipped step rather than branched around.
"""
from __future__ import annotations

import math

import torch

from . import StepBatch, buckets
from .. import newton_schulz
from ..state_precision import DITHER_ABOVE, INT8_CODE, dithered_salt
from ..remainder import is_remainder, rebuild_any, remainder_of, split8
from ..update_rules import commit

# Its writes are torch ops, which bump the params' version counters on every step, flat grads
# too (the fused backends write through raw pointers and bump them only off the flat path).
WRITES_BUMP_VERSIONS = True


def availability(device: torch.device) -> str | None:
    return None  # runs wherever torch runs


def _per_tensor_norms(unscaled: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Each tensor's norm in float64 (0 for an empty one): inf or NaN exactly where the tensor
    holds an inf or NaN (squares of FP32 values cannot overflow float64)."""
    # The oracle must be at least as accurate as what it judges: torch's FP32 norm drifts by
    # ~1e-3 at 2^24 elements on the CPU, so the squares are summed in float64; the max of the
    # inf-norm is exact anyway. Empty tensors have no max-norm, so they are left out.
    device = unscaled[0].device
    nonempty = [k for k, u in enumerate(unscaled) if u.numel() > 0]
    if not nonempty:
        return torch.zeros(len(unscaled), dtype=torch.float64, device=device)
    norms = torch.stack(torch._foreach_norm([unscaled[k] for k in nonempty], norm_type, dtype=torch.float64))
    if len(nonempty) == len(unscaled):
        return norms
    out = torch.zeros(len(unscaled), dtype=torch.float64, device=device)
    out[torch.tensor(nonempty, device=device)] = norms
    return out


# Pieces short enough that an FP32 norm of one is accurate to FP32 rounding (torch's FP32 norm of a
# whole tensor drifts by ~1e-3 at 2^24 elements).
NORM_PIECE = 1 << 16


def _piece_norms(unscaled: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norms, as float64, of pieces of at most NORM_PIECE elements of the tensors, in FP32:
    the rules with a matrix stage (whose stacks are large, and float64 conversions the slowest
    part of a step around Newton-Schulz) sum squares per piece in FP32, as the CUDA norm pass
    sums a chunk, the pieces' in float64. inf or NaN where a piece holds one, or where its FP32
    squares overflow (a skipped step, as on the fused backends)."""
    device = unscaled[0].device
    # On the CPU torch's _foreach_norm is a loop of per-tensor norms (~10 us each); a tensor's
    # whole pieces are the rows of one view there, one reduction over them all: the same bits
    # (each row reduced alone, as a piece is), in half the time on GPT-2 small's grads.
    cpu = device.type == "cpu"
    segments, loose = [], []  # in order: a tensor's rows' norms, or a count of loose pieces
    for u in unscaled:
        flat = u.reshape(-1)
        rows = flat.numel() // NORM_PIECE if cpu else 0
        if rows > 1:
            segments.append(torch.linalg.vector_norm(flat[:rows * NORM_PIECE].view(rows, NORM_PIECE), norm_type,
                                                     dim=1))
            flat = flat[rows * NORM_PIECE:]
        pieces = flat.split(NORM_PIECE) if flat.numel() > 0 else ()
        loose += pieces
        if pieces:
            segments.append(len(pieces))
    if not segments:
        return torch.zeros(1, dtype=torch.float64, device=device)
    loose_norms = torch.stack(torch._foreach_norm(loose, norm_type)) if loose else None
    if all(isinstance(s, int) for s in segments):
        return loose_norms.double()
    parts, at = [], 0
    for s in segments:
        if isinstance(s, int):
            parts.append(loose_norms[at:at + s])
            at += s
        else:
            parts.append(s)
    return torch.cat(parts).double()


# The fused backends sum squares in FP32: a sum that rounds beyond FP32's largest (grads of 2^64
# and more, finite) makes N inf there, and so here; such a step is skipped as an overflow
# (step() below), never clipped to a zero gradient.
SQUARES_OVERFLOW = 2.0 ** 128 - 2.0 ** 103


def _fp32_norm(squares_or_max: torch.Tensor, norm_inf: bool) -> torch.Tensor:
    """N in FP32 from the float64 sum of squares (or max): inf where FP32 squares overflow."""
    if norm_inf:
        return squares_or_max.float()
    return torch.where(squares_or_max >= SQUARES_OVERFLOW, math.inf, squares_or_max.sqrt()).float()


def _global_norm(per_tensor: torch.Tensor, norm_type: float) -> torch.Tensor:
    # The norm of the per-tensor norms, rounded once to FP32.
    if norm_type == math.inf:
        return _fp32_norm(per_tensor.amax(), True)
    return _fp32_norm(per_tensor.square().sum(), False)


def _global_stats(per_tensor: torch.Tensor, infs: torch.Tensor, batch: StepBatch):
    """DTensor params: this rank's [sum of squares (or max), inf count] per sharding layout,
    made global (distributed.py). `infs`: each tensor's "has an inf or NaN"."""
    norm_inf = batch.norm_type == math.inf
    rows = []
    for members in batch.reduce_stats.members:
        stats = per_tensor if members is None else per_tensor[members]
        flags = infs if members is None else infs[members]
        rows.append(torch.stack([stats.amax() if norm_inf else stats.square().sum(), flags.any().double()]))
    total = batch.reduce_stats(torch.stack(rows), norm_inf)
    return _fp32_norm(total[0], norm_inf), total[1] > 0


def _count_up(count: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """An int32 count + 1 where `where`, saturating at 2^31 - 1 (the kernels' too): never wraps."""
    return torch.where(where & (count < 2**31 - 1), count + 1, count)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)  # FP16/BF16 storage as integers: -0 != +0, a NaN equals itself


def step(batch: StepBatch, stages=None) -> None:
    """One step; `stages`: a rule with a matrix stage runs its elementwise stages as these
    kernels (stack_kernels.py) where they take the stack, else as torch ops."""
    inv_scale = torch.reciprocal(batch.scaler.scale)                        # 1/S in FP32

    # A rule with a matrix stage steps the params of one group and shape as one stack (their
    # first dim): the same ops, a few per stack instead of per param (buckets.py).
    stacks, rest, views = _stack_plan(batch) if _stackable(batch) else (None, None, None)
    # Params of a per-element rule beside them (Muon's AdamW groups) take the stages' multi-tensor
    # update kernel where they have one, after the norm (stack_kernels.py).
    elementwise = stages.elementwise_members(batch) if stacks is not None and hasattr(
        stages, "elementwise_members") else []
    kernel_stepped = set(elementwise)

    # 1. u_i = float32(g_i) * (1/S), and 2. found_inf: any element of any u_i is inf or NaN
    if stacks is None:
        unscaled = torch._foreach_mul([g.float() for g in batch.grads], inv_scale)
        per_tensor = _per_tensor_norms(unscaled, batch.norm_type)
    else:  # per stack; a large stack's u is taken again when it steps (None here: _stack_norms)
        unscaled, per_tensor = _stack_norms(batch, stacks, rest, inv_scale, kernel_stepped)
    infs = ~torch.isfinite(per_tensor)
    found_inf = infs.any()

    # 3. N, accumulated in FP32
    if batch.reduce_stats is None:
        norm = _global_norm(per_tensor, batch.norm_type)
    else:  # sharded params: over all ranks' shards (distributed.py)
        norm, found_inf = _global_stats(per_tensor, infs, batch)

    found_inf = found_inf | ~torch.isfinite(norm)  # finite grads whose squares overflow FP32

    # 4. c = min(1, max_norm / (N + 1e-6))
    clip = None
    if batch.max_grad_norm is not None:
        clip = torch.clamp(batch.max_grad_norm / (norm + 1e-6), max=1.0)
        # (params the update kernel steps read their raw grads with c: not clipped here)
        firsts = [m[0] for m in stacks] + rest if stacks is not None else None
        clipped = unscaled if stacks is None else [u for u, i in zip(unscaled, firsts)
                                                   if u is not None and i not in kernel_stepped]
        if clipped:
            torch._foreach_mul_(clipped, clip)

    # 5. the update rule (update_rules.py), per param with its group's hyperparameters, kept only if finite
    applied_steps = _count_up(batch.applied_steps, ~found_inf)
    # the EMA's weight a = 1 - d_t for this step (ema.py)
    ema_weight = batch.ema.weight(applied_steps) if batch.emas is not None else None
    if stacks is not None:
        if elementwise:
            stages.elementwise_step(batch, elementwise, inv_scale, clip if clip is not None else torch.ones_like(norm),
                                    found_inf, applied_steps, ema_weight)
        # One stack of state at a time, each to its matrix stage; the stacks of small matrices
        # wait there for each other (up to WAITING_ELEMENTS of them, which bounds the state
        # held meanwhile) and run Newton-Schulz together (newton_schulz.run_together).
        waiting, held = [], 0
        for members, u in zip(stacks, unscaled):
            if members[0] in kernel_stepped:  # (a stack is one group's)
                continue
            if u is None:  # a large stack's u, again, now that its step needs it
                u = _unscaled(batch, members, inv_scale, clip, stages)
            params = [batch.params[i] for i in members] if _applies_in_kernel(batch, members, stages, views) else None
            stack = buckets.Stack(batch, members, gather_params=params is None, views=views)
            steps = _update_steps(stack.batch, [u], applied_steps, found_inf, ema_weight, len(members), stages, params)
            requests = newton_schulz.start(steps)
            if requests is None or not newton_schulz.shares_batches(requests):
                if requests is not None:
                    newton_schulz.complete(steps, newton_schulz.run(requests))
                stack.scatter()
                continue
            waiting.append((steps, requests, stack))
            held += len(members) * batch.grads[members[0]].numel()
            if held >= WAITING_ELEMENTS:
                _complete_together(waiting)
                waiting, held = [], 0
        _complete_together(waiting)
        rest_left = [k for k, i in enumerate(rest) if i not in kernel_stepped]
        if rest_left:
            _update(buckets.subset(batch, [rest[k] for k in rest_left]),
                    [unscaled[len(stacks) + k] for k in rest_left], applied_steps, found_inf, ema_weight)
    else:
        _update(batch, unscaled, applied_steps, found_inf, ema_weight)

    batch.applied_steps.copy_(applied_steps)
    skips = batch.consecutive_skips
    skips.copy_(torch.where(found_inf, _count_up(skips, found_inf), torch.zeros_like(skips)))
    batch.found_inf.copy_(found_inf)
    batch.grad_norm.copy_(norm)
    # 7. dynamic scale update
    batch.scaler.update_(found_inf)


WAITING_ELEMENTS = 1 << 24

# The stacks' u, 4 B per param, is not held through the whole step: the norm pass keeps at most
# KEPT_BYTES of it for the update (enough for a model of small matrices, taken once), and takes
# a larger stack's norm in windows of WINDOW elements through one scratch tensor; that stack's u
# is taken again when it steps, and freed after. On the CPU a stack's u is at most STACK_BYTES
# (_stack_plan). A second conversion costs less than a fresh 4 B per param every step: on the
# CPU large allocations are mapped anew and faulted in page by page (a sixth of GPT-2 small's
# Muon step on a 2-core x86-64), on a GPU they are peak memory.
KEPT_BYTES = 64 << 20
WINDOW = 4 * NORM_PIECE  # a multiple of NORM_PIECE: the pieces are the ones of the whole stack. On
# the CPU 1 MiB: the window stays in a core's cache from its conversion to its norm
# (GPT-2 small's norm pass 40 ms against 50 with 8 MiB windows on a 2-core x86-64).
GPU_WINDOWS = 64  # a GPU's windows are this many times longer: fewer launches, each cheap
STACK_BYTES = 16 << 20


def _stack_norms(batch: StepBatch, stacks: list, rest: list, inv_scale, kernel_stepped: set) -> tuple:
    """(unscaled, piece norms): each stack's u (None where not kept), then each of `rest`'s;
    and the norms of _piece_norms over them all, in that order."""
    unscaled, norms, pending, budget = [], [], [], KEPT_BYTES
    scratch, window_size = None, WINDOW * (1 if inv_scale.device.type == "cpu" else GPU_WINDOWS)
    for members in stacks:
        grads = [batch.grads[i] for i in members]
        size = len(grads) * grads[0].numel()
        if 4 * size <= budget:
            u = buckets.ScaledGrads(grads, inv_scale, None).rows()  # (clipped later, with the rest)
            budget -= 4 * size
            # params the update kernel steps read their raw grads: their u is only for the norm
            unscaled.append(None if members[0] in kernel_stepped else u)
            pending.append(u)
            continue
        unscaled.append(None)
        if size and (scratch is None or scratch.numel() < min(window_size, size)):
            scratch = torch.empty(min(window_size, size), dtype=torch.float32, device=inv_scale.device)
        for parts in buckets.windows(grads, window_size):
            if pending:
                norms.append(_piece_norms(pending, batch.norm_type))
                pending = []
            window = scratch[:sum(part.numel() for part in parts)]
            torch.cat(parts, out=window)
            norms.append(_piece_norms([window.mul_(inv_scale)], batch.norm_type))  # before the scratch is reused
    if rest:
        rest_unscaled = torch._foreach_mul([batch.grads[i].float() for i in rest], inv_scale)
        unscaled += rest_unscaled
        pending += rest_unscaled
    if pending or not norms:
        norms.append(_piece_norms(pending, batch.norm_type))
    return unscaled, torch.cat(norms) if len(norms) > 1 else norms[0]


def _unscaled(batch: StepBatch, members: list, inv_scale, clip, stages):
    """A stack's u as its step takes it, unscaled, then clipped: its raw grads with both
    scalars where the rule reads u in its momentum kernel alone (buckets.ScaledGrads: no FP32
    copy written and read back), else as FP32 rows."""
    u = buckets.ScaledGrads([batch.grads[i] for i in members], inv_scale, clip)
    return u if stages is not None and getattr(batch.rule, "momentum_reads_grads", False) else u.rows()


def _complete_together(waiting: list) -> None:
    """The waiting stacks' steps (generator, requests, buckets.Stack) completed, their matrix
    stages run together."""
    if waiting:
        for (steps, _, stack), results in zip(waiting, newton_schulz.run_together([r for _, r, _ in waiting])):
            newton_schulz.complete(steps, results)
            stack.scatter()


def _stackable(batch: StepBatch) -> bool:
    return getattr(batch.rule, "matrix", False) and batch.reduce_stats is None


def _stack_plan(batch: StepBatch) -> tuple:
    """(stacks, rest, views): buckets.plan and a dict for the stacks' state views, kept while
    the layout is (its id changes whenever a param, state tensor or their memory does)."""
    cached = batch.cache.get("stacks")
    if cached is None or cached[0] != batch.layout_id:
        stacks, rest = buckets.plan(batch)
        if batch.params and batch.params[0].device.type == "cpu":  # each stack's u within STACK_BYTES
            stacks = [part for members in stacks for part in _cpu_split(batch, members)]
        cached = batch.cache["stacks"] = (batch.layout_id, stacks, rest, {})
    return cached[1:]


def _cpu_split(batch: StepBatch, members: list) -> list[list[int]]:
    """A stack in parts of at most STACK_BYTES of FP32 u, but of as many matrices as torch has
    threads where that is more: its matrix stage batches them (newton_schulz.cpu_batch)."""
    numel = batch.params[members[0]].numel()
    return buckets.split(members, numel, max(STACK_BYTES // 4, max(1, torch.get_num_threads()) * numel))


def _applies_in_kernel(batch: StepBatch, members: list, stages, views: dict) -> bool:
    """Whether a stack's weight step is the stages' apply kernel: masters (FP32, or a BF16
    param's remainders) as rows of one tensor, no EMA, a group the rule says it can take (its
    lr a float)."""
    if stages is None or batch.emas is not None:
        return False
    first = members[0]
    h = batch.groups[batch.group_index[first]]
    if not batch.rule.applies_in_kernel(h, batch.masters[first]):
        return False
    key = ("apply", tuple(members))
    if key not in views:  # what does not change while the layout stays
        master = batch.masters[first]
        rows = buckets.rows_of_one([batch.masters[i] for i in members]) if len(members) > 1 else master.unsqueeze(0)
        views[key] = (rows is not None and master is not batch.params[first]
                      and stages.can_apply(rows, [batch.params[i] for i in members], h.lr))
    return views[key]


def _update(batch: StepBatch, unscaled: list, applied_steps, found_inf, ema_weight) -> None:
    """Masters loaded, the rule's update, state encoded and masters, params and EMAs stored,
    for every param of `batch`."""
    newton_schulz.complete(_update_steps(batch, unscaled, applied_steps, found_inf, ema_weight))


def _update_steps(batch: StepBatch, unscaled: list, applied_steps, found_inf, ema_weight, rows: int | None = None,
                  stages=None, params: list | None = None):
    """_update as a generator that yields a matrix rule's matrix stage (newton_schulz.start);
    with `rows`, its one param is a stack of that many params (buckets.py). `stages`,
    `params`: see step(); with `params` (the stack's members) the apply kernel re-takes edited
    params, and stores masters and params, itself."""
    stacked = rows is not None
    precision = batch.state_precision
    hypers = [batch.groups[gi] for gi in batch.group_index]
    if params is not None:
        masters = [(batch.masters[0], None)]
    else:
        masters = [_master(batch, i, found_inf) for i in range(len(unscaled))]  # (FP32 master, remainder or None)
    # The rule steps FP32 values: state kept in BF16 or int8 is decoded first and encoded
    # after (state_precision.py; int8 stacks by the stages' kernels where they have them),
    # where the step is applied.
    codec = stages.codec_for(precision) if stages is not None and stacked else None
    bufs = [[(codec or precision).decode(b, s, rows or 1) for b, s in zip(stored, scales or [None] * len(stored))]
            for stored, scales in zip(batch.buffers, batch.scales or [None] * len(unscaled))]
    ws = [w for w, _ in masters]
    bounded = precision.code == INT8_CODE
    if getattr(batch.rule, "matrix", False):  # Muon, MuSGD: a matrix stage over all params (matrix_rules.py)
        new_ws = yield from batch.rule.update_all(ws, unscaled, bufs, batch.counts, hypers, applied_steps, found_inf,
                                                  bounded, stacked, stages, params)
    else:
        new_ws = [batch.rule.update(w, d, b, count, h, applied_steps, found_inf, bounded=bounded)
                  for w, d, b, count, h in zip(ws, unscaled, bufs, batch.counts, hypers)]
    for i, (w, remainder) in enumerate(masters):
        if precision.code != 0:
            _encode(batch, i, hypers[i], bufs[i], applied_steps, found_inf, rows or 1, codec)
        if new_ws[i] is not None:  # None: stored by the apply kernel
            _store(batch, i, w, remainder, new_ws[i], found_inf)
        if ema_weight is not None:  # 6. the EMA of the master, on applied steps: e + a * (w - e)
            e = batch.emas[i]
            e32 = e.float()
            e.copy_(torch.where(found_inf, e32, e32 + ema_weight * (w - e32)))


def _master(batch: StepBatch, i: int, found_inf: torch.Tensor):
    """Param i's FP32 master as the step starts from it, and its remainder (None for FP32 masters)."""
    w, p = batch.masters[i], batch.params[i]
    if is_remainder(w):  # master_weights="remainder"/"remainder8": the master is p and its remainder
        return rebuild_any(p, w), w
    if p is not w:
        # A param edited outside the optimizer (e.g. p.data.clamp_, which its version
        # counter never sees) no longer equals its master rounded: keep the edit, as
        # torch.optim does, by re-taking those elements' master. Bits, not values.
        same = _bits(w.to(p.dtype)) == _bits(p)
        torch.where(same | found_inf, w, p.float(), out=w)
    return w, None


def _encode(batch: StepBatch, i: int, h, bufs: list, applied_steps, found_inf, rows: int = 1, codec=None) -> None:
    """State kept in BF16 or int8: param i's new FP32 state values encoded where the step is
    applied (`rows`: a stack of that many params, each encoded as alone; `codec`: kernels
    that encode in place, stack_kernels.py)."""
    precision, stored = batch.state_precision, batch.buffers[i]
    scales = batch.scales[i] if batch.scales is not None else None
    # the dither's salt (state_precision.dithered_salt): AdamW's t, else the applied-step count
    if hasattr(h, "beta1"):
        salt = dithered_salt(h.beta1, batch.counts[i])
    else:  # a tensor momentum is compared on the device
        salt = torch.where(torch.as_tensor(h.momentum) > DITHER_ABOVE, applied_steps, 0)
    for k, (b, x) in enumerate(zip(stored, bufs)):
        signed = h.buffers[k] not in batch.rule.unsigned_buffers
        if codec is not None:
            codec.encode_into(x, b, scales[k], signed, salt, rows, found_inf)
            continue
        codes, scale = precision.encode(x, signed, salt, rows)
        commit(b, codes, found_inf)
        if scale is not None:
            commit(scales[k], scale, found_inf)


def _store(batch: StepBatch, i: int, w: torch.Tensor, remainder, new_w: torch.Tensor, found_inf) -> None:
    """Param i's new master kept, and its param written, where the step is applied."""
    p = batch.params[i]
    if new_w is not w:  # (a rule that stepped w in place skipped it itself)
        commit(w, new_w, found_inf)
    if remainder is not None:  # a skipped step writes nothing, as the kernels' return early
        if remainder.dtype == torch.int8:  # remainder8: the master is now w rounded to 24 bits
            new_p, new_r, w24 = split8(w)
            commit(w, w24, found_inf)
        else:
            new_p = w.to(p.dtype)
            new_r = remainder_of(w, new_p)
        commit(p, new_p, found_inf)
        commit(remainder, new_r, found_inf)
    elif p is not w:
        p.copy_(w)  # round to nearest even in the param's dtype (unchanged master -> unchanged p)

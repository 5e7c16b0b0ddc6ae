"""Stacks of params that step as one: the params of one group, shape and dtype, with their
masters, state buffers, counts and EMAs stacked along a new first dim, so that the pure-PyTorch
step runs a few ops per stack instead of per param (what bounds a step of many small
tensors), and a matrix stage gets its batch of one shape for free. Every op of the step is
elementwise per param or (Newton–Schulz) per matrix, so a stack steps each member exactly as
it would step alone.

The optimizer keeps the state of a stack's members as rows of one tensor (`pack`, when the
step's layout is built), so a stack of state is a view and its step writes in place: only
the grads are gathered and the params written back per member. State laid out otherwise
(loaded, replaced by hand) is stacked by copy and scattered back (`Stack.scatter`).
"""
from __future__ import annotations

import dataclasses

import torch

from . import StepBatch
from ..state_precision import INT8_CODE


def plan(batch: StepBatch, int8: bool | None = None) -> tuple[list[list[int]], list[int]]:
    """(stacks, rest): positions of the params that share a stack (same group, shape and
    dtypes, masters and state kept alike), and of those stepped alone. int8 state is encoded
    in blocks of each tensor's memory order: a param with int8 state stacks only where that
    is its logical order (contiguous buffers). `batch`: a StepBatch or a StepLayout."""
    if int8 is None:
        int8 = batch.state_precision.code == INT8_CODE
    buckets: dict[tuple, list[int]] = {}
    rest = []
    for i, p in enumerate(batch.params):
        w = batch.masters[i]
        if int8 and not all(b.is_contiguous() for b in batch.buffers[i]):
            rest.append(i)
            continue
        key = (batch.group_index[i], tuple(p.shape), p.dtype, w is p, w.dtype,
               tuple(b.dtype for b in batch.buffers[i]), batch.counts[i] is None,
               None if batch.emas is None else batch.emas[i].dtype)
        buckets.setdefault(key, []).append(i)
    return list(buckets.values()), rest


def fp32_rows(tensors: list) -> torch.Tensor:
    """The tensors as rows of one new FP32 tensor (gathered and converted in one pass)."""
    first = tensors[0]
    out = torch.empty((len(tensors), *first.shape), dtype=torch.float32, device=first.device)
    return torch.stack(tensors, out=out)


@dataclasses.dataclass(frozen=True)
class ScaledGrads:
    """A stack's u not taken yet: its members' raw grads, which the step reads as
    float32(g) * (1/S), then times the clip coefficient c (`clip`, None: not clipped). A
    kernel that takes them reads the grads themselves (the stages' momentum); anything else
    takes the rows (`rows()`, torch ops)."""
    grads: list
    inv_scale: torch.Tensor
    clip: torch.Tensor | None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.grads), *self.grads[0].shape))

    def rows(self) -> torch.Tensor:
        u = fp32_rows(self.grads).mul_(self.inv_scale)
        return u if self.clip is None else u.mul_(self.clip)


def rows(u) -> torch.Tensor:
    """A stack's u as FP32 rows (ScaledGrads taken, a tensor as it is)."""
    return u.rows() if isinstance(u, ScaledGrads) else u


def split(members: list[int], numel: int, elements: int) -> list[list[int]]:
    """A stack's members in consecutive runs of at most `elements` elements (one member at
    least): stacks that step one after the other, each as the whole would."""
    per = max(1, elements // max(1, numel))
    return [members[k:k + per] for k in range(0, len(members), per)]


def windows(tensors: list, size: int):
    """The tensors (all of one numel) as consecutive windows of at most `size` elements of
    their concatenation: each a list of 1-D views (copies where a tensor is not contiguous)."""
    numel = tensors[0].numel()
    flat = [t.reshape(-1) for t in tensors]
    total, start = numel * len(tensors), 0
    while start < total:
        stop, parts, at = min(start + size, total), [], start
        while at < stop:
            k, offset = divmod(at, numel)
            take = min(numel - offset, stop - at)
            parts.append(flat[k][offset:offset + take])
            at += take
        yield parts
        start = stop


def subset(batch: StepBatch, members: list[int]) -> StepBatch:
    """The params at `members`, each stepped alone."""
    pick = lambda xs: None if xs is None else [xs[i] for i in members]  # noqa: E731
    return dataclasses.replace(batch, params=pick(batch.params), grads=pick(batch.grads),
                               masters=pick(batch.masters), buffers=pick(batch.buffers), counts=pick(batch.counts),
                               group_index=pick(batch.group_index), emas=pick(batch.emas), scales=pick(batch.scales),
                               grad_ptrs=None if batch.grad_ptrs is None else batch.grad_ptrs[members])


class Stack:
    """The members' tensors stacked (copies; a lone member's own tensors, viewed with a first
    dim of 1), as a StepBatch of one param; scatter() copies every stacked copy the step may
    have written back into its member's own."""

    def __init__(self, batch: StepBatch, members: list[int], gather_params: bool = True, views: dict | None = None):
        """`views`: a dict kept while the step's layout is (the state's tensors do not move
        then), where a stack whose state is all views of `pack`ed rows keeps them."""
        self.members = members
        self.pairs = []
        # without gather_params (a kernel writes each member's own param) the stack has none
        p = self._stacked([batch.params[i] for i in members]) if gather_params else None
        own_master = batch.masters[members[0]] is batch.params[members[0]]  # FP32 params
        key = tuple(members)
        state = None if views is None or own_master else views.get(key)
        if state is None:
            copies = len(self.pairs)
            state = self._state(batch, members, p if own_master else None)
            if views is not None and not own_master and len(self.pairs) == copies:
                views[key] = state
        w, buffers, count, scales, emas = state
        self.batch = dataclasses.replace(batch, params=[p], grads=[None], masters=[w], buffers=[tuple(buffers)],
                                         counts=[count], group_index=[batch.group_index[members[0]]], emas=emas,
                                         scales=scales, grad_ptrs=None, grad_version=None)

    def _state(self, batch: StepBatch, members: list[int], own: torch.Tensor | None) -> tuple:
        """(master, buffers, count, scales, emas) stacked; `own`: the stacked params, for FP32
        params (their own masters)."""
        w = own if own is not None else self._stacked([batch.masters[i] for i in members])
        buffers = [self._stacked([batch.buffers[i][k] for i in members]) for k in range(len(batch.buffers[members[0]]))]
        count = None
        if batch.counts[members[0]] is not None:
            flat = self._stacked([batch.counts[i] for i in members])
            count = flat.view(len(members), *[1] * batch.params[members[0]].dim())  # broadcasts over each member's elements
        scales = None
        if batch.scales is not None and batch.scales[members[0]] is not None:  # int8: each member's block scales in turn
            scales = [tuple(self._stacked([batch.scales[i][k] for i in members]).view(-1) for k in range(len(buffers)))]
        emas = None if batch.emas is None else [self._stacked([batch.emas[i] for i in members])]
        return w, buffers, count, scales, emas

    def _stacked(self, tensors: list) -> torch.Tensor:
        """The tensors stacked: a view where they are one tensor's rows already (one tensor,
        or state `pack` laid out), else a copy to scatter back."""
        if len(tensors) == 1:
            return tensors[0].unsqueeze(0)
        rows = rows_of_one(tensors)
        if rows is not None:
            return rows
        stack = torch.stack(tensors)
        self.pairs.append((tensors, stack))
        return stack

    def scatter(self) -> None:
        if not self.pairs:
            return
        dst = [t for tensors, _ in self.pairs for t in tensors]
        src = [row for _, s in self.pairs for row in s.unbind(0)]
        torch._foreach_copy_(dst, src)


def rows_of_one(tensors: list) -> torch.Tensor | None:
    """The tensors as a view (len, *shape) of the storage they share, where they are its
    consecutive contiguous rows (what `pack` makes), else None."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    n, shape, dtype = first.numel(), first.shape, first.dtype
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for k, t in enumerate(tensors):
        if (t.shape != shape or t.dtype != dtype or t.storage_offset() != offset + k * n or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage):
            return None
    return first.as_strided((len(tensors), *shape), (n, *first.stride()), offset)


def pack(state: dict, members: list, keys: list) -> list:
    """The members' state entries `keys` (each a tensor per member, all alike) moved into the
    rows of one new tensor each, values kept; returns the new views per member and key (or
    the old tensors where they already are one tensor's rows)."""
    out = [[None] * len(keys) for _ in members]
    for k, key in enumerate(keys):
        tensors = [state[p][key] for p in members]
        if rows_of_one(tensors) is None:
            stacked = torch.stack(tensors)  # contiguous: each row is a member's tensor, contiguous
            tensors = list(stacked.unbind(0))
            for p, row in zip(members, tensors):
                state[p][key] = row
        for j, t in enumerate(tensors):
            out[j][k] = t
    return out

"""Stacks of params that step as one: the params of one group, shape and dtype, with their
masters, state buffers, counts and EMAs stacked along a new first dim, so that the pure-PyTorch
step runs a few ops per stack instead of per param (what bounds a step of many small
tensors), and a matrix stage gets its batch of one shape for free. Every op of the step is
elementwise per param or (Newton–Schulz) per matrix, so a stack steps each member exactly as
it would step alone; `Stack.scatter` writes the results back.
"""
from __future__ import annotations

import dataclasses

import torch

from . import StepBatch
from ..state_precision import INT8_CODE


def plan(batch: StepBatch) -> tuple[list[list[int]], list[int]]:
    """(stacks, rest): positions of the params that share a stack (same group, shape and
    dtypes, masters and state kept alike), and of those stepped alone. int8 state is encoded
    in blocks of each tensor's memory order: a param with int8 state stacks only where that
    is its logical order (contiguous buffers)."""
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


def subset(batch: StepBatch, members: list[int]) -> StepBatch:
    """The params at `members`, each stepped alone."""
    pick = lambda xs: None if xs is None else [xs[i] for i in members]  # noqa: E731
    return dataclasses.replace(batch, params=pick(batch.params), grads=pick(batch.grads),
                               masters=pick(batch.masters), buffers=pick(batch.buffers), counts=pick(batch.counts),
                               group_index=pick(batch.group_index), emas=pick(batch.emas), scales=pick(batch.scales))


class Stack:
    """The members' tensors stacked (copies; a lone member's own tensors, viewed with a first
    dim of 1), as a StepBatch of one param; scatter() copies every stacked copy the step may
    have written back into its member's own."""

    def __init__(self, batch: StepBatch, members: list[int]):
        self.members = members
        self.pairs = []
        p = self._stacked([batch.params[i] for i in members])
        own_master = batch.masters[members[0]] is batch.params[members[0]]  # FP32 params
        w = p if own_master else self._stacked([batch.masters[i] for i in members])
        buffers = [self._stacked([batch.buffers[i][k] for i in members]) for k in range(len(batch.buffers[members[0]]))]
        count = None
        if batch.counts[members[0]] is not None:
            flat = self._stacked([batch.counts[i] for i in members])
            count = flat.view(len(members), *[1] * (p.dim() - 1))  # broadcasts over each member's elements
        scales = None
        if batch.scales is not None and batch.scales[members[0]] is not None:  # int8: each member's block scales in turn
            scales = [tuple(self._stacked([batch.scales[i][k] for i in members]).view(-1) for k in range(len(buffers)))]
        emas = None if batch.emas is None else [self._stacked([batch.emas[i] for i in members])]
        self.batch = dataclasses.replace(batch, params=[p], grads=[None], masters=[w], buffers=[tuple(buffers)],
                                         counts=[count], group_index=[batch.group_index[members[0]]], emas=emas,
                                         scales=scales)

    def _stacked(self, tensors: list) -> torch.Tensor:
        """The tensors stacked: a copy to scatter back, or for one tensor a view of it."""
        if len(tensors) == 1:
            return tensors[0].unsqueeze(0)
        stack = torch.stack(tensors)
        self.pairs.append((tensors, stack))
        return stack

    def scatter(self) -> None:
        if not self.pairs:
            return
        dst = [t for tensors, _ in self.pairs for t in tensors]
        src = [row for _, s in self.pairs for row in s.unbind(0)]
        torch._foreach_copy_(dst, src)

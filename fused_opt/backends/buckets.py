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
    """The members' tensors stacked (copies), as a StepBatch of one param; scatter() copies
    every stacked tensor the step may have written back into its member's own."""

    def __init__(self, batch: StepBatch, members: list[int]):
        def stacked(tensors):
            return torch.stack(tensors)

        self.members = members
        params = [batch.params[i] for i in members]
        p = stacked(params)
        self.pairs = [(params, p)]
        own_master = batch.masters[members[0]] is batch.params[members[0]]  # FP32 params
        if own_master:
            w = p
        else:
            w = stacked([batch.masters[i] for i in members])
            self.pairs.append(([batch.masters[i] for i in members], w))
        buffers = []
        for k in range(len(batch.buffers[members[0]])):
            b = stacked([batch.buffers[i][k] for i in members])
            self.pairs.append(([batch.buffers[i][k] for i in members], b))
            buffers.append(b)
        count = None
        if batch.counts[members[0]] is not None:
            flat = stacked([batch.counts[i] for i in members])
            self.pairs.append(([batch.counts[i] for i in members], flat))
            count = flat.view(len(members), *[1] * (p.dim() - 1))  # broadcasts over each member's elements
        scales = None
        if batch.scales is not None and batch.scales[members[0]] is not None:  # int8 state: each member's block scales, one after another
            scales = []
            for k in range(len(buffers)):
                sc = stacked([batch.scales[i][k] for i in members])
                self.pairs.append(([batch.scales[i][k] for i in members], sc))
                scales.append(sc.view(-1))
            scales = [tuple(scales)]
        emas = None
        if batch.emas is not None:
            e = stacked([batch.emas[i] for i in members])
            self.pairs.append(([batch.emas[i] for i in members], e))
            emas = [e]
        self.batch = dataclasses.replace(batch, params=[p], grads=[None], masters=[w], buffers=[tuple(buffers)],
                                         counts=[count], group_index=[batch.group_index[members[0]]], emas=emas,
                                         scales=scales)

    def scatter(self) -> None:
        dst = [t for tensors, _ in self.pairs for t in tensors]
        src = [row for _, s in self.pairs for row in s.unbind(0)]
        torch._foreach_copy_(dst, src)

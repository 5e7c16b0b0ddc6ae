"""DTensor params (FSDP2's `fully_shard`, HSDP, tensor parallel): the step runs on each rank's
local shards, and only two numbers cross ranks.

The global grad norm and the inf flag are sums (or maxima) over every element of every grad,
so each rank reduces its own shards to one [norm statistic, inf count] pair, and one
all_reduce per sharded mesh dimension makes it global: clipping and skipping then match the
unsharded model. Mesh dimensions on which the params are replicated (HSDP's outer dimension)
hold copies, which must not be counted twice, so they are left out. Params on several meshes
(dense params on HSDP's 2-D mesh, experts on an expert-parallel mesh) get one pair per
layout, each made global over its own mesh, then added up: one norm over all of them. The collective is
enqueued on the device like any kernel: no host sync, and it can be captured in a CUDA graph.
"""
from __future__ import annotations

import operator
import sys

import torch


def is_dtensor(t) -> bool:
    # A DTensor exists only once torch.distributed.tensor has been imported, so the check
    # never imports it: importing it (and what it pulls in) costs half a second.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel can read: a DTensor's local shard, or the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


class ShardReduction:
    """Makes a rank's [norm statistic, inf count] global. `layouts`: per sharding layout (a
    device mesh and the dimensions params are sharded over), the process groups of those
    dimensions and the positions of its tensors in the step (None: all of them)."""

    def __init__(self, layouts: list[tuple[list, list | None]]):
        self.layouts = layouts
        self._options = {}

    @property
    def members(self) -> list[list | None]:
        return [members for _, members in self.layouts]

    def __call__(self, stats: torch.Tensor, norm_inf: bool) -> torch.Tensor:
        """stats: [layouts, 2], row k over layout k's tensors on this rank (reduced in place);
        returns the global [norm statistic, inf count] over all of them."""
        import torch.distributed as dist
        # L2: sums of squares and inf counts add up; inf-norm: maxima and "any inf" take the max.
        op = dist.ReduceOp.MAX if norm_inf else dist.ReduceOp.SUM
        if len(self.layouts) == 1:
            for group in self.layouts[0][0]:
                self._all_reduce(stats, op, group)
            return stats[0]
        for row, (groups, _) in zip(stats, self.layouts):
            for group in groups:
                self._all_reduce(row, op, group)
        # Each row is global over its own mesh now: the layouts hold disjoint params.
        return stats.amax(0) if norm_inf else stats.sum(0)

    def _all_reduce(self, tensor: torch.Tensor, op, group) -> None:
        """dist.all_reduce(tensor, op, group), called on the process group itself: the public
        wrapper's checks and logging cost more than the collective's launch (gloo, 2 CPU ranks:
        ~20-40 µs of ~200). The group is a mesh dimension's, which this rank is in."""
        import torch.distributed as dist
        options = self._options.get(op)
        if options is None:
            options = self._options[op] = dist.AllreduceOptions()
            options.reduceOp = op
        group.allreduce([tensor], options).wait()


def shard_reduction(params: list[torch.Tensor]) -> ShardReduction | None:
    """None for plain tensors; for DTensors, the reduction their step needs: one per sharding
    layout (HSDP's 2-D mesh and an expert-parallel mesh beside it are two)."""
    dtensors = [p for p in params if is_dtensor(p)]
    if not dtensors:
        return None
    if len(dtensors) != len(params):
        raise RuntimeError("fused_opt: some params are DTensors (FSDP2 / tensor parallel) and "
                           "some are plain tensors; the global grad norm cannot tell which ranks hold copies. "
                           "Shard every param (e.g. fully_shard the root module) or use one optimizer per kind.")
    layouts: dict = {}
    for k, p in enumerate(dtensors):
        if any(placement.is_partial() for placement in p.placements):
            raise RuntimeError(f"fused_opt: a param has a Partial placement {p.placements}; "
                               "params must be Shard or Replicate")
        # Mesh dimensions on which the params are replicated hold copies: left out.
        sharded_dims = tuple(d for d, placement in enumerate(p.placements) if placement.is_shard())
        layouts.setdefault((p.device_mesh, sharded_dims), []).append(k)
    if len(layouts) == 1:
        (mesh, dims), = layouts
        return ShardReduction([([mesh.get_group(d) for d in dims], None)])
    return ShardReduction([([mesh.get_group(d) for d in dims], members) for (mesh, dims), members in layouts.items()])


_LOCAL_TENSOR = operator.attrgetter("_local_tensor")
_SPEC = operator.attrgetter("_spec")


def local_tensors(dtensors: list) -> list[torch.Tensor]:
    """The local shards of a list of DTensors."""
    return list(map(_LOCAL_TENSOR, dtensors))


def specs_of(params: list) -> list:
    """Each DTensor param's sharding spec, for local_grads' fast check."""
    return list(map(_SPEC, params))


def local_grads(grads: list, params: list, name_of, specs: list | None = None) -> list[torch.Tensor]:
    """The local shards of DTensor grads, which must be laid out like their params (a Partial
    grad is not reduced yet: its norm would be wrong). FSDP2 makes a new DTensor per grad every
    step, on its param's own spec object: with `specs` (specs_of(params)) that identity is the
    whole check, a C-level pass; anything else is compared in full."""
    if specs is not None:
        try:
            local_tensors = list(map(_LOCAL_TENSOR, grads))
            if all(map(operator.is_, map(_SPEC, grads), specs)):
                return local_tensors
        except AttributeError:  # a plain tensor among them: said below
            pass
    for k, (g, p) in enumerate(zip(grads, params)):
        if not is_dtensor(g) or g.placements != p.placements or g.device_mesh != p.device_mesh:
            got = g.placements if is_dtensor(g) else "a plain tensor"
            raise RuntimeError(f"{name_of(k)}: the grad of a DTensor param must be a DTensor with the param's "
                               f"placements {p.placements}, got {got}")
    return [g._local_tensor for g in grads]


def placed_like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A loaded FP32 state tensor, on p's device and, for a DTensor p, sharded like p (a full
    tensor from a full state dict is split; a DTensor from a sharded checkpoint stays as is)."""
    if is_dtensor(value):
        return value.to(torch.float32)
    value = value.to(device=p.device, dtype=torch.float32)
    if is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value, p.device_mesh, p.placements)
    return value

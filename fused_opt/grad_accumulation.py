"""FP32 gradient accumulation (`fp32_grad_accumulation=True`), in the spirit of Megatron's
`main_grad`.

Summing k micro-batches in an FP16 `.grad` rounds the running sum to 11 bits after every
micro-batch, and the sum can overflow where each part does not. Here a post-accumulate-grad
hook adds each micro-batch's FP16/BF16 grad into an FP32 buffer the moment backward produces
it and frees the FP16 one, so the sum is rounded once per micro-batch to 24 bits and memory
holds one low-precision grad at a time. The step reads the FP32 buffers (the kernels take FP32
grads like any other) and consumes them: the next backward starts a new accumulation. With
flat_grads=True the buffers become views into the flat FP32 grad buffer (flat_storage.py).

Freeing `.grad` inside backward is what DDP and FSDP2 cannot live with: they read `.grad`
after this hook to reduce it across ranks, and would reduce zeros. The option therefore
refuses to run in a process group of more than one rank, and on DTensor params.
"""
from __future__ import annotations

import operator
import weakref
from itertools import repeat

import torch
import torch.distributed as dist

from .distributed import is_dtensor

# The attribute naming, on a param, the accumulator whose hook owns its .grad.
OWNER = "_fused_opt_fp32_accumulator"


def check_single_process(params) -> None:
    """Raises where the hook would starve a gradient reduction (see the module docstring)."""
    why = ("fp32_grad_accumulation frees each micro-batch's FP16/BF16 .grad inside backward, before "
           "DDP's or FSDP2's gradient reduction reads it, which would then reduce zeros. ")
    if any(is_dtensor(p) for p in params):
        raise ValueError(why + "It cannot be used with DTensor (FSDP2) params.")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(why + f"It is single-process only (this process group has {dist.get_world_size()} "
                         "ranks); accumulate in .grad under DDP/FSDP2.")


class FP32GradAccumulator:
    """Owns the FP32 buffers and the hooks of the low-precision params that require grad."""

    def __init__(self, params, adopt: bool = False):
        self.main_grads: dict = {}   # param -> FP32 buffer (kept across steps: no reallocation)
        self.pending: set = set()    # params whose buffer holds this accumulation's sum
        self.handles = []
        self.hooked: dict = {}       # id(param) -> weakref to it, for the params this one hooks
        # adopt: a copy of an optimizer (deepcopy, pickle), whose params may carry the
        # original's owner attribute without its hook.
        self._adopt = adopt
        # The hooks hold only a weak reference: dropping the optimizer removes them, rather
        # than leaving a dead optimizer's hooks taking the grads of the next one.
        weakref.finalize(self, _remove_hooks, self.handles)
        self.add(params)

    def add(self, params) -> None:
        # FP32 params already accumulate in FP32: their .grad is left alone.
        params = list(params)
        check_single_process(params)
        params = [p for p in params if p.requires_grad and p.dtype != torch.float32]
        for p in params:
            owner = getattr(p, OWNER, None)
            owner = owner() if owner is not None else None
            if owner is not None and owner is not self and self._adopt:
                ref = owner.hooked.get(id(p))
                if ref is None or ref() is not p:
                    continue  # a copied param: the attribute came along, the hook did not
            if owner is not None and owner is not self:
                raise ValueError("fp32_grad_accumulation: a param is already accumulated in FP32 by another "
                                 "live optimizer, whose hook would take its grads; drop that optimizer first")
        me = weakref.ref(self)

        def hook(p):
            accumulator = me()
            if accumulator is not None:
                accumulator._accumulate(p)

        for p in params:
            setattr(p, OWNER, me)
            self.hooked[id(p)] = weakref.ref(p)
            self.handles.append(p.register_post_accumulate_grad_hook(hook))

    @torch.no_grad()
    def _accumulate(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        main = self.main_grads.get(p)
        if main is None or main.shape != p.shape or main.device != p.device:
            main = self.main_grads[p] = torch.empty_like(p, dtype=torch.float32)
        if p in self.pending:
            main.add_(p.grad)    # FP32 + widened FP16: one rounding, to 24 bits
        else:
            main.copy_(p.grad)   # the first micro-batch: no zeroing pass needed
            self.pending.add(p)
        p.grad = None

    def grads(self, params: list) -> list:
        """The grad each param steps with: its FP32 sum, or its .grad when it has none."""
        out = []
        for p in params:
            if p in self.pending:
                if p.grad is not None:
                    raise RuntimeError("FusedMixedPrecisionSGD: a param has both an FP32-accumulated grad and a "
                                       ".grad set after backward; with fp32_grad_accumulation grads come from "
                                       "backward only")
                out.append(self.main_grads[p])
            else:
                out.append(p.grad)
        return out

    def holds_sum(self, p: torch.Tensor, grad: torch.Tensor) -> bool:
        return self.main_grads.get(p) is grad

    def complete(self, summed: list, others: list) -> bool:
        """For a flat step (flat_grads=True), whose grads are the sums of `summed`: every one
        of them got a grad in this accumulation, none of `others` (the optimizer's params
        outside flat storage) did, and none has a .grad set after backward. That last one is
        read per param (~0.1-0.2 us each): nothing else would tell a hand-set grad, which the
        step would leave to be summed into the next accumulation."""
        pending = self.pending
        return (len(pending) == len(summed) and not any(p in pending for p in others)
                and all(map(operator.is_, map(_GRAD, summed), repeat(None))))

    def consume(self) -> None:
        """After a step or zero_grad: the next backward starts a new sum."""
        self.pending.clear()

    def check(self) -> None:
        if dist.is_available() and dist.is_initialized():  # a process group created after construction
            check_single_process([])


_GRAD = operator.attrgetter("grad")


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()

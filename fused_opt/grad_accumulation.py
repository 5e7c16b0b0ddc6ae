"""FP32 gradient accumulation (`fp32_grad_accumulation=True`), in the spirit of Megatron's
`main_grad`.

Summing k micro-batches in an FP16 `.grad` rounds the running sum to 11 bits after every
micro-batch, and the sum can overflow where each part does not. Here a post-accumulate-grad
hook turns the first micro-batch's FP16/BF16 grad into an FP32 one (`p.grad.data = buffer`:
the param keeps its dtype, its grad becomes FP32, as Megatron-style code sets
`p.grad.data = main_grad`); autograd then adds every later micro-batch into that FP32 grad in
place, one rounding to 24 bits each, and memory holds one low-precision grad at a time. The
step reads `.grad` like any other (the kernels take FP32 grads with 16-bit params).

So `.grad` means what it means in torch: `opt.zero_grad()`, `model.zero_grad()` and
`p.grad = None` discard the sum, a grad set by hand replaces it, and a step without
zero_grad leaves it to be added to. The FP32 buffers are kept across steps (zero_grad with
set_to_none frees nothing of ours), so no step reallocates them. With flat_grads=True the FP32
grads are views into the flat FP32 grad buffer (flat_storage.py).

Changing `.grad` inside backward is what DDP and FSDP2 cannot live with: they reduce `.grad`
in buckets of their own. The option therefore refuses to run in a process group of more than
one rank, and on DTensor params.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from .distributed import is_dtensor

# The attribute naming, on a param, the accumulator whose hook owns its .grad.
OWNER = "_fused_opt_fp32_accumulator"


def check_single_process(params) -> None:
    """Raises where the hook would break a gradient reduction (see the module docstring)."""
    why = ("fp32_grad_accumulation turns each param's FP16/BF16 .grad into an FP32 one inside backward, under "
           "DDP's or FSDP2's gradient reduction, which reduces .grad in buckets of its own. ")
    if any(is_dtensor(p) for p in params):
        raise ValueError(why + "It cannot be used with DTensor (FSDP2) params: there, FP32 gradients come from "
                         "FSDP2 itself, fully_shard(..., mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32)) "
                         "(with param_dtype=torch.bfloat16 over FP32 params: FP32 sharded grads).")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(why + f"It is single-process only (this process group has {dist.get_world_size()} "
                         "ranks); accumulate in .grad under DDP/FSDP2.")


def set_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    """p.grad = grad, also where grad is FP32 and p is not (the assignment itself refuses a
    dtype other than the param's; `.data` on a placeholder does not, as Megatron does it)."""
    if grad.dtype == p.dtype:
        p.grad = grad
        return
    p.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)  # no memory of its own
    p.grad.data = grad


def low_precision_grad_is_fp32(p: torch.Tensor, grad) -> bool:
    return grad is not None and grad.dtype == torch.float32 and p.dtype != torch.float32


class FP32GradAccumulator:
    """Owns the FP32 grad buffers and the hooks of the low-precision params that require grad."""

    def __init__(self, params, adopt: bool = False):
        self.buffers: dict = {}      # param -> its FP32 grad buffer, kept across steps
        self.handles = []
        self.hooked: dict = {}       # id(param) -> weakref to it, for the params this one hooks
        # adopt: a copy of an optimizer (deepcopy, pickle), whose params may carry the
        # original's owner attribute without its hook.
        self._adopt = adopt
        # The hooks hold only a weak reference: dropping the optimizer removes them, rather
        # than leaving a dead optimizer's hooks turning the grads of the next one.
        weakref.finalize(self, _remove_hooks, self.handles)
        self.add(params)

    def check_add(self, params) -> list:
        """The params `add` would hook; raises (before anything is changed) where it cannot."""
        params = list(params)
        check_single_process(params)
        # FP32 params already accumulate in FP32: their .grad is left alone.
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
        return params

    def add(self, params) -> None:
        params = self.check_add(params)
        me = weakref.ref(self)

        def hook(p):
            accumulator = me()
            if accumulator is not None:
                accumulator._accumulate(p)

        for p in params:
            if id(p) in self.hooked:
                continue
            setattr(p, OWNER, me)
            self.hooked[id(p)] = weakref.ref(p)
            self.handles.append(p.register_post_accumulate_grad_hook(hook))

    @torch.no_grad()
    def _accumulate(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None or grad.dtype == torch.float32:
            return  # already FP32: autograd added this micro-batch into it
        buffer = self.buffers.get(p)
        if buffer is None or buffer.shape != grad.shape or buffer.device != grad.device \
                or buffer.stride() != grad.stride():
            buffer = self.buffers[p] = torch.empty_like(grad, dtype=torch.float32)
        buffer.copy_(grad)
        grad.data = buffer  # .grad is now the FP32 sum; the FP16 memory goes back to the allocator

    def adopt_buffer(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """flat_grads: p's FP32 grad now lives in the flat buffer; keep that view, not the old one."""
        if id(p) in self.hooked:
            self.buffers[p] = grad

    def check(self) -> None:
        if dist.is_available() and dist.is_initialized():  # a process group created after construction
            check_single_process([])


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()

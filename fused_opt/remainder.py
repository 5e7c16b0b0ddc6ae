"""master_weights="remainder": BF16 params whose FP32 masters are kept as int16 remainders.

The master w and its param p = RNE(w) share their top bits; r = bits(w) - (bits(p) << 16),
an int16, is all that is kept beside the param, and w is rebuilt as p + r, exactly, in the
bits (csrc/sgd_math.h BF16Remainder states the encoding and its one inexact case: a master
exactly half an ulp above an even param comes back 1 FP32 ulp lower, still rounding to the
same param). Memory per param with momentum: 2 + 2 + 4 = 8 B instead of 10; traffic per step
20 B instead of 22. These are the host's (torch ops) versions of the kernels' encoding: the
oracle, state_dict() (which holds rebuilt FP32 masters) and load_state_dict() use them.
"""
from __future__ import annotations

import torch

from .distributed import is_dtensor, local


def rebuild(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The FP32 master of BF16 param p with remainder r (p's shape and strides). Where the
    pair cannot be one the step wrote (p edited unseen, e.g. `p.data.mul_(mask)`: p + r
    crosses into the other sign, or makes a NaN of an infinite p), the master is p itself."""
    top = (p.view(torch.int16).to(torch.int32) & 0xFFFF) << 16  # int32 wraps like uint32
    w = top + r.to(torch.int32)
    crossed = (w ^ top) < 0
    made_nan = ((w & 0x7FFFFFFF) > 0x7F800000) & ((top & 0x7FFFFFFF) <= 0x7F800000)
    return torch.where(crossed | made_nan, top, w).view(torch.float32)


def remainder_of(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The int16 remainder that rebuilds FP32 master w from p = RNE(w) (see the module doc)."""
    bits = (p.view(torch.int16).to(torch.int32) & 0xFFFF) << 16
    return torch.clamp(w.view(torch.int32) - bits, -0x8000, 0x7FFF).to(torch.int16)


def split_(w: torch.Tensor, p: torch.Tensor, r: torch.Tensor) -> None:
    """Writes master w into param p and remainder r: rounded to nearest even with an int16
    remainder, or as split8 with an int8 one. DTensors (FSDP2) are split shard by shard."""
    if is_dtensor(p):
        w, p, r = local(_placed(w, p)), local(p), local(_placed(r, p))
    if r.dtype == torch.int8:
        p8, r8, _ = split8(w)
        p.copy_(p8)
        r.copy_(r8)
    else:
        p.copy_(w)
        r.copy_(remainder_of(w, p))


# master_weights="remainder8": a 24-bit master (FP32 with its low 8 bits zero: 15 bits of
# mantissa where BF16 has 7) and an int8 remainder. A step's FP32 result w is rounded to 24 bits
# (half up in its bit pattern: away from zero), the param is that 24-bit master rounded to BF16
# (half up as well, so that the master is always within [-128, 127] * 256 bits of the param),
# and r8 = (bits(w24) - (bits(p) << 16)) >> 8. Exact: p + 256 * r8 in the bits is w24
# (csrc/state_math.h BF16Remainder8). The param differs from w rounded to nearest even only
# where w lies within half a 24-bit ulp of a BF16 tie.
def split8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP32 masters w -> (BF16 params, int8 remainders, the 24-bit masters they hold)."""
    b = w.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    b24 = (b + 128) & 0xFFFFFF00
    top = (b24 + 0x8000) & 0xFFFF0000
    r8 = (b24 - top) >> 8
    top = torch.where(nan, torch.full_like(top, 0x7FC00000), top)
    r8 = torch.where(nan, torch.zeros_like(r8), r8)
    b24 = torch.where(nan, top, b24)
    as_int32 = lambda x: torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)  # noqa: E731
    p = (as_int32(top) >> 16).to(torch.int16).view(torch.bfloat16).view(w.shape)
    w24 = as_int32(b24).view(torch.float32).view(w.shape)
    return p, r8.to(torch.int8).view(w.shape), w24


def rebuild8(p: torch.Tensor, r8: torch.Tensor) -> torch.Tensor:
    """The 24-bit master of BF16 param p with int8 remainder r8 (same guard as rebuild)."""
    return rebuild(p, r8.to(torch.int32) * 256)


def remainder8_of(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The int8 remainder of master w (p must be split8(w)'s param)."""
    return split8(w)[1]


def check_params(params, index: int | None = None, mode: str = "remainder") -> None:
    """Raises, naming why, for params this mode cannot hold exactly."""
    where = "" if index is None else f" (param group {index})"
    for p in params:
        if p.dtype != torch.bfloat16:
            raise ValueError(f"master_weights={mode!r} needs BF16 params, got {p.dtype}{where}: the remainder "
                             "is the low half of an FP32 master whose top half is the BF16 param (BF16 and FP32 "
                             "share the exponent); FP16 does not, and FP32 params are their own masters")


def is_remainder(t) -> bool:
    """A remainder master (int16, or int8 for "remainder8") rather than an FP32 one."""
    return isinstance(t, torch.Tensor) and t.dtype in (torch.int16, torch.int8)


def rebuild_any(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The master of param p and remainder r (int16 or int8). For a DTensor p (FSDP2), a
    DTensor sharded like p, rebuilt shard by shard (the remainder sharded like p first when it
    comes whole, from a full state dict)."""
    if is_dtensor(p):
        from torch.distributed.tensor import DTensor
        shard = rebuild_any(local(p), local(_placed(r, p)))
        return DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    return rebuild8(p, r) if r.dtype == torch.int8 else rebuild(p, r)


def _placed(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """t sharded like DTensor p: as it is when it is a DTensor already, else split."""
    if is_dtensor(t):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)

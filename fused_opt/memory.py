"""What memory a tensor's elements cover, and whether the tensors a step is about to touch
fit it: the questions asked before raw addresses go to kernels that trust them (a master of
the wrong size, a param that overlaps itself or another param, a buffer laid out unlike its
master would be read or written outside its tensor). These run when a step's cached layout
is rebuilt (step_layout.py), never per element, and raise before anything is modified.
"""
from __future__ import annotations

import torch

from .distributed import is_dtensor, local


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill one run of memory in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two indices of t may share an element (stride 0, expand(), as_strided).
    Sufficient for "no": each dimension, by increasing stride, steps past all the smaller ones."""
    extent = 0
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) that t's elements lie in."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def check_param_memory(tensors: list[torch.Tensor], name_of) -> None:
    """Each param has memory of its own: no self-overlap, no two params sharing memory (each
    would keep its own master, and the memory would get one update instead of two)."""
    spans = []
    for k, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        if has_internal_overlap(t):
            raise ValueError(f"{name_of(k)}: the param overlaps itself (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}, e.g. an expand()ed view): a step needs memory of its own per element")
        spans.append((*byte_span(t), k))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{name_of(a)} and {name_of(b)} share memory (views of one storage); each would "
                             "keep its own FP32 master. Make them separate tensors, or one param.")


def _dense(t: torch.Tensor) -> bool:
    return is_dense(local(t))


def usable_master(master, p: torch.Tensor) -> bool:
    """Whether a cached master still fits its FP16/BF16 param: after `p.data = ...` of another
    shape, dtype or device (or `model.half()` of an FP32 param, whose master was the param
    itself) it does not, and is re-taken from the param."""
    return (isinstance(master, torch.Tensor) and master is not p and master.dtype == torch.float32
            and master.shape == p.shape and master.device == p.device and is_dtensor(master) == is_dtensor(p)
            and _dense(master))


def usable_remainder(remainder, p: torch.Tensor, dtype=torch.int16) -> bool:
    """Whether a cached remainder (master_weights="remainder": int16, "remainder8": int8) still
    fits its param."""
    return (isinstance(remainder, torch.Tensor) and remainder.dtype == dtype and remainder.shape == p.shape
            and remainder.device == p.device and is_dtensor(remainder) == is_dtensor(p) and _dense(remainder)
            and (local(remainder).stride() == local(p).stride() or local(p).numel() <= 1))


def conform_buffer(buf, p: torch.Tensor, master, name: str, key: str, dtype=torch.float32):
    """A state buffer (state[p][key]: a momentum buffer, Adam's moments, the EMA) as the kernels
    need it: `dtype`, p's shape and device, laid out like the master (elementwise by memory order).
    A buffer of another shape cannot be meant for this param (e.g. `p.data` replaced by a
    smaller tensor after steps): that raises."""
    if buf is None:
        return None
    if not isinstance(buf, torch.Tensor) or not buf.is_floating_point() or buf.is_complex():
        raise ValueError(f"{name}: state[{key!r}] must be a floating-point tensor, got "
                         f"{type(buf).__name__ if not isinstance(buf, torch.Tensor) else buf.dtype}")
    if buf.shape != p.shape or buf.device != p.device or is_dtensor(buf) != is_dtensor(p):
        raise ValueError(f"{name}: state[{key!r}] has shape {tuple(buf.shape)} on {buf.device}, but the "
                         f"param has shape {tuple(p.shape)} on {p.device} (was the param replaced after the "
                         "optimizer stepped? clear its state: del opt.state[p])")
    if is_dtensor(p):
        return buf if buf.dtype == dtype else buf.to(dtype)
    like = master if master is not None else p
    strides = torch.empty_like(like, dtype=dtype, device="meta").stride()
    if buf.dtype == dtype and _dense(buf) and (buf.stride() == strides or buf.numel() <= 1):
        return buf
    return torch.empty_like(like, dtype=dtype).copy_(buf)

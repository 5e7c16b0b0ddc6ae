"""What memory a tensor's elements cover: the questions the step asks before it hands raw
addresses to kernels (state_checks.py, multi_tensor.py, flat_storage.py)."""
from __future__ import annotations

import torch


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

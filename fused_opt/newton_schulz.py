"""The matrix stage of Muon and MuSGD: Newton–Schulz orthogonalization of each param's update,
batched over the matrices of one shape (one batched matmul per shape and iteration, not one
per param), in BF16 as torch.optim.Muon and Ultralytics run it.

A param's update is orthogonalized as a matrix: a 2-D param as it is, a conv weight as its
2-D view (out_channels x the rest), as Ultralytics does. Both iterations below follow their
reference line by line; they differ in where eps enters (torch clamps the norm, Ultralytics
adds it) and in how the quintic is grouped (torch's two addmm, Ultralytics' products), so
each gives its own reference's BF16 roundings.
"""
from __future__ import annotations

import math

import torch

# Keller Jordan's coefficients, steps and eps, torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def matrix_shape(shape) -> tuple[int, int]:
    """The 2-D view a param's update is orthogonalized as: (rows, the rest)."""
    rows = shape[0]
    return rows, math.prod(shape[1:])


def adjusted_lr_ratio(adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's learning-rate adjustment for a param of `shape` (its 2-D view):
    "original" (Keller Jordan's, the default) sqrt(max(1, A/B)), "match_rms_adamw"
    (Moonshot's) 0.2 sqrt(max(A, B))."""
    a, b = matrix_shape(shape)
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


def _torch_iteration(x: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's _zeropower_via_newtonschulz on a batch (k, m, n) of BF16 matrices
    with m <= n: each divided by its norm clamped at eps, then `steps` quintic iterations."""
    a, b, c = coefficients
    norms = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    x = x / norms.clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.transpose(1, 2))
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x


def _ultralytics_iteration(x: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """Ultralytics' zeropower_via_newtonschulz5 on a batch: X / (|X| + eps), then
    A = X X^T, B = b A + c A A, X = a X + B X."""
    a, b, c = coefficients
    x = x / (torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True) + eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.transpose(1, 2))
        poly = b * gram + c * torch.bmm(gram, gram)
        x = a * x + torch.bmm(poly, x)
    return x


ITERATIONS = {"torch": _torch_iteration, "ultralytics": _ultralytics_iteration}


def orthogonalize(updates: list[torch.Tensor], variant: str, coefficients=NS_COEFFICIENTS, steps: int = NS_STEPS,
                  eps: float = NS_EPS, stacked: bool = False) -> list[torch.Tensor]:
    """The orthogonalized BF16 update of each tensor (each as its 2-D view), in the order
    given, shaped like its input. Matrices of one shape go through the iteration together;
    `stacked`: each tensor is already a stack of matrices of one shape (its first dim)."""
    if stacked:
        return [_batch(u.reshape(u.shape[0], *matrix_shape(u.shape[1:])), variant, coefficients, steps,
                       eps).reshape(u.shape) for u in updates]
    by_shape: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        by_shape.setdefault(matrix_shape(u.shape), []).append(i)
    out: list = [None] * len(updates)
    for (rows, cols), members in by_shape.items():
        x = _batch(torch.stack([updates[i].reshape(rows, cols) for i in members]), variant, coefficients, steps, eps)
        for k, i in enumerate(members):
            out[i] = x[k].reshape(updates[i].shape)
    return out


# On the CPU a batch of large matrices runs slower than the same matrices a few at a time: the
# batch's temporaries outgrow the caches, and above glibc's mmap threshold (32 MiB) each one is
# mapped fresh and faulted in page by page (GPT-2 small's 12 MLP matrices of 768 x 3072: 1.32 s
# as one batch, 1.20 s one by one, on a 2-core x86-64). So on the CPU a batch holds at most
# this many bytes of BF16 matrices; a GPU takes each shape's batch whole (one launch per shape
# and iteration). Each matrix's result is the same either way: the iteration is per matrix.
CPU_BATCH_BYTES = 4 << 20


def _batch(x: torch.Tensor, variant: str, coefficients, steps: int, eps: float) -> torch.Tensor:
    """(k, rows, cols) matrices -> their orthogonalized BF16 updates, (k, rows, cols)."""
    per = max(1, CPU_BATCH_BYTES // max(1, 2 * x.shape[1] * x.shape[2])) if x.device.type == "cpu" else x.shape[0]
    if per >= x.shape[0]:
        return _whole_batch(x, variant, coefficients, steps, eps)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    for start in range(0, x.shape[0], per):
        out[start:start + per] = _whole_batch(x[start:start + per], variant, coefficients, steps, eps)
    return out


def _whole_batch(x: torch.Tensor, variant: str, coefficients, steps: int, eps: float) -> torch.Tensor:
    x = x.bfloat16()  # torch: grad.bfloat16(), per matrix
    tall = x.shape[1] > x.shape[2]
    if tall:  # iterate on the wide side: X X^T is the smaller Gram matrix
        x = x.transpose(1, 2)
    x = ITERATIONS[variant](x, coefficients, steps, eps)
    return x.transpose(1, 2) if tall else x

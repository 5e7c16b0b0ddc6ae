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

import functools
import math
from dataclasses import dataclass

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


def _torch_divisor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """torch.optim.Muon divides each matrix by its norm clamped at eps."""
    return torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True).clamp(min=eps)


# The iterations run on X, a batch (k, m, n) of BF16 matrices with m <= n (X X^T is then the
# smaller Gram matrix), or, `transposed`, on its transposes (k, n, m): the layout a tall param
# already has, where X X^T = X^T^T X^T and B X = (X^T B^T)^T, the same dot products.
def _gram(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    return torch.bmm(x.mT, x) if transposed else torch.bmm(x, x.mT)


def _times(m: torch.Tensor, x: torch.Tensor, transposed: bool) -> tuple:
    """The factors of the product M X in x's layout (for bmm / baddbmm)."""
    return (x, m.mT) if transposed else (m, x)


def _torch_quintic(x: torch.Tensor, coefficients, steps: int, transposed: bool = False) -> torch.Tensor:
    """torch.optim.Muon's _zeropower_via_newtonschulz iterations on a batch of matrices, each
    already divided by its norm."""
    a, b, c = coefficients
    for _ in range(steps):
        gram = _gram(x, transposed)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, *_times(gram_update, x, transposed), beta=a)
    return x


def _ultralytics_divisor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Ultralytics' zeropower_via_newtonschulz5 divides by the norm plus eps."""
    return torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True) + eps


def _ultralytics_quintic(x: torch.Tensor, coefficients, steps: int, transposed: bool = False) -> torch.Tensor:
    """Its iterations: A = X X^T, B = b A + c A A, X = a X + B X."""
    a, b, c = coefficients
    for _ in range(steps):
        gram = _gram(x, transposed)
        poly = b * gram + c * torch.bmm(gram, gram)
        x = a * x + torch.bmm(*_times(poly, x, transposed))
    return x


ITERATIONS = {"torch": (_torch_divisor, _torch_quintic), "ultralytics": (_ultralytics_divisor, _ultralytics_quintic)}


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


def cpu_batch(rows: int, cols: int) -> int:
    """How many rows x cols matrices a CPU batch takes: within CPU_BATCH_BYTES, and a multiple
    of torch's thread count. A batched matmul runs each matrix's product on one thread; a batch
    of fewer matrices than threads splits each product over them, which costs more (GPT-2
    small's 768 x 3072: 29.8 ms a matrix alone, 18.8 two at a time on 2 threads)."""
    threads = max(1, torch.get_num_threads())
    return threads * max(1, CPU_BATCH_BYTES // max(1, 2 * threads * rows * cols))


def _batch(x: torch.Tensor, variant: str, coefficients, steps: int, eps: float) -> torch.Tensor:
    """(k, rows, cols) matrices -> their orthogonalized BF16 updates, (k, rows, cols)."""
    per = cpu_batch(x.shape[1], x.shape[2]) if x.device.type == "cpu" else x.shape[0]
    if per >= x.shape[0]:
        return _whole_batch(x, variant, coefficients, steps, eps)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    for start in range(0, x.shape[0], per):
        out[start:start + per] = _whole_batch(x[start:start + per], variant, coefficients, steps, eps)
    return out


def _whole_batch(x: torch.Tensor, variant: str, coefficients, steps: int, eps: float) -> torch.Tensor:
    x = x.bfloat16()  # torch: grad.bfloat16(), per matrix
    divisor, quintic = ITERATIONS[variant]
    tall = x.shape[1] > x.shape[2]
    if tall and x.device.type == "cpu":
        # A tall matrix iterates on its wide side. On the CPU it does so in its own layout: the
        # same products on the transposes run faster there than on a transposed view (GPT-2's
        # 3072 x 768: 29 ms against 35 on a 2-core x86-64) and its result needs no copy into
        # the param's layout. The same math; the CPU's GEMM kernels for the two layouts can
        # round differently (15 of 600 random tall shapes a few BF16 ulps apart, GPT-2's none).
        # A GPU takes the view (its GEMMs read either layout).
        return quintic(x / divisor(x, eps), coefficients, steps, transposed=True)
    if tall:
        x = x.transpose(1, 2)
    x = quintic(x / divisor(x, eps), coefficients, steps)
    return x.transpose(1, 2) if tall else x


# -- Many stacks at once -----------------------------------------------------------------------
# A model of many small matrices (a detector's convs) has many shapes, one or a few matrices
# each, and on the CPU a BF16 matmul of small matrices costs about the same ~25 us whatever its
# size: the matrix stage was that overhead, 15 calls per shape. Zero padding changes nothing in
# the iteration (X X^T, the Gram products and their sums over the padding add zeros; padded
# rows and columns stay zero), so matrices of different shapes can share a batch: each is
# divided by its own norm first, written into a zero batch of the larger shape, and cut out
# after. (The same math; not always the same BF16 roundings: where padding changes the matmul
# kernel the CPU picks, an element can land a few ulps apart, as batched and per-matrix runs
# can.) Which shapes share is chosen by the estimate below, on the CPU and for matrices of at
# most SMALL_MATRIX elements; a GPU keeps one batch per shape.
SMALL_MATRIX = 1 << 16
CALL_SECONDS, FLOPS = 30e-6, 0.3e12  # a small BF16 matmul's cost and a batch's rate on a 2-core x86-64


@dataclass(frozen=True)
class Request:
    """One matrix stage: orthogonalize `updates` (each a stack of matrices with `stacked`)."""
    updates: list
    variant: str
    coefficients: tuple = NS_COEFFICIENTS
    steps: int = NS_STEPS
    eps: float = NS_EPS
    stacked: bool = False


def run(requests: list[Request]) -> list[list[torch.Tensor]]:
    """Each request's orthogonalize()."""
    return [orthogonalize(r.updates, r.variant, r.coefficients, r.steps, r.eps, r.stacked) for r in requests]


def start(steps) -> list[Request] | None:
    """Run a generator of matrix stages (a stack's step: it yields a list of Requests and
    takes their results) to its first stage: its requests, or None when it ended before one."""
    try:
        return steps.send(None)
    except StopIteration:
        return None


def complete(steps, results=None):
    """Run such a generator to its end, `results` answering the stage it waits at (None: not
    started) and run() every later one; its value."""
    try:
        requests = steps.send(results)
        while True:
            requests = steps.send(run(requests))
    except StopIteration as done:
        return done.value


def shares_batches(requests: list[Request]) -> bool:
    """Whether these requests' matrices are ones run_together() may pad into shared batches
    (small, on the CPU): a step waits for the others' before it runs them."""
    return all(u.device.type == "cpu" and 0 < math.prod(_matrix(u, r.stacked)[1:]) <= SMALL_MATRIX
               for r in requests for u in r.updates)


def run_together(request_lists: list[list[Request]]) -> list[list[list[torch.Tensor]]]:
    """run() of each list, all their matrices in as few batches as the estimate finds fastest:
    each request's results as run() gives them."""
    out = [[[None] * len(r.updates) for r in requests] for requests in request_lists]
    by_settings: dict[tuple, list] = {}
    for a, requests in enumerate(request_lists):
        for b, r in enumerate(requests):
            for c, u in enumerate(r.updates):
                by_settings.setdefault((r.variant, r.coefficients, r.steps, r.eps), []).append((a, b, c, u, r.stacked))
    for (variant, coefficients, steps, eps), items in by_settings.items():
        wide, tall = [], []  # each update as a batch (k, m, n) of BF16 matrices, m <= n (a view where it can be)
        for _, _, _, u, stacked in items:
            x = u.reshape(_matrix(u, stacked)).bfloat16()
            tall.append(x.shape[1] > x.shape[2])
            wide.append(x.transpose(1, 2) if tall[-1] else x)
        for rows, cols, members in _plan(tuple(tuple(x.shape) for x in wide), steps):
            if len(members) == 1:  # alone in its batch: as orthogonalize() runs it (in pieces if large)
                results = [_batch(wide[members[0]], variant, coefficients, steps, eps)]
            else:
                results = _padded([wide[i] for i in members], rows, cols, variant, coefficients, steps, eps)
            for i, o in zip(members, results):
                a, b, c, u, _ = items[i]
                out[a][b][c] = (o.transpose(1, 2) if tall[i] else o).reshape(u.shape)
    return out


def _padded(xs: list, rows: int, cols: int, variant: str, coefficients, steps: int, eps: float) -> list:
    """Batches (k, m, n) of BF16 matrices, m <= rows, n <= cols, orthogonalized in one zero batch
    (k total, rows, cols): each divided by its own norm into its corner, each cut out after."""
    divisor, quintic = ITERATIONS[variant]
    batch = torch.zeros((sum(x.shape[0] for x in xs), rows, cols), dtype=torch.bfloat16, device=xs[0].device)
    corners, start = [], 0
    for x in xs:
        corner = (slice(start, start + x.shape[0]), slice(0, x.shape[1]), slice(0, x.shape[2]))
        torch.div(x, divisor(x, eps), out=batch[corner])
        corners.append(corner)
        start += x.shape[0]
    batch = quintic(batch, coefficients, steps)
    return [batch[corner] for corner in corners]


def _matrix(u: torch.Tensor, stacked: bool) -> tuple[int, int, int]:
    """The (count, rows, cols) an update is orthogonalized as."""
    return (u.shape[0], *matrix_shape(u.shape[1:])) if stacked else (1, *matrix_shape(u.shape))


def _seconds(count: int, rows: int, cols: int, steps: int) -> float:
    """The estimated time of one batch: per iteration three matmul calls and 4 r^2 c + 2 r^3
    multiply-adds per matrix."""
    return steps * (3 * CALL_SECONDS + count * (4 * rows * rows * cols + 2 * rows ** 3) / FLOPS)


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple, steps: int) -> list[tuple[int, int, list[int]]]:
    """(rows, cols, members) of each batch for matrices of `shapes` ((count, rows, cols), rows
    <= cols): one shape per batch to start with (split where it outgrows CPU_BATCH_BYTES), then
    the two batches whose merge (padded to the larger rows and cols, within CPU_BATCH_BYTES)
    saves the most estimated time, merged, until no merge saves any."""
    by_shape: dict[tuple, list] = {}
    for i, (count, rows, cols) in enumerate(shapes):
        same = by_shape.setdefault((rows, cols), [])
        if not same or 2 * (same[-1][0] + count) * rows * cols > CPU_BATCH_BYTES:
            same.append([0, rows, cols, []])
        same[-1][0] += count
        same[-1][3].append(i)
    batches = [batch for same in by_shape.values() for batch in same]
    while True:
        best = None
        for i, a in enumerate(batches):
            for b in batches[i + 1:]:
                merged = [a[0] + b[0], max(a[1], b[1]), max(a[2], b[2]), a[3] + b[3]]
                if 2 * merged[0] * merged[1] * merged[2] > CPU_BATCH_BYTES:
                    continue
                saved = _seconds(*a[:3], steps) + _seconds(*b[:3], steps) - _seconds(*merged[:3], steps)
                if saved > 0 and (best is None or saved > best[0]):
                    best = (saved, a, b, merged)
        if best is None:
            return [(rows, cols, members) for _, rows, cols, members in batches]
        _, a, b, merged = best
        batches = [x for x in batches if x is not a and x is not b] + [merged]

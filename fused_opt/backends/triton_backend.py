"""backend="triton": the step as three kinds of Triton launches (see triton_kernels.py),
whatever the number of tensors and groups: a partials and an update launch per
(param dtype, grad dtype) pair present, and one finalize launch."""
from __future__ import annotations

import math
import os

import torch

from ..update_rules import ADAMW_CODE
from . import StepBatch
from .multi_tensor import CHUNK_SIZE, plan_for

# Elements per loop iteration of a program: 4096 FP32 values keep enough loads in flight per
# SM to stream memory at full speed; the interpreter runs a block as one numpy op.
BLOCK = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
FINALIZE_BLOCK = 1024
ADVANCE_BLOCK = 1024
NUM_WARPS = 8


def availability(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before importing fused_opt)"
    return f"Triton has no support for {device.type} tensors"


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def step(batch: StepBatch) -> None:
    from . import triton_kernels as k
    plan = plan_for(batch, CHUNK_SIZE)
    chunk = plan.chunk_size
    block = min(BLOCK, chunk)
    assert chunk % block == 0, "FUSED_OPT_CHUNK_SIZE must be a multiple of the block size"
    norm_inf = batch.norm_type == math.inf
    scaler = batch.scaler
    for run in plan.norm_passes():
        if run.num_chunks:
            k.partials_kernel[(run.num_chunks,)](
                run.chunks, run.table, scaler.scale, plan.partials[run.chunk_base:], plan.flags[run.chunk_base:],
                GRAD_DTYPE=_tl_dtype(run.grad_dtype), NORM_INF=norm_inf, ALIGNED=run.aligned, CHUNK=chunk,
                BLOCK=block, num_warps=NUM_WARPS)
    num_partials = plan.reduce_across_shards(batch, norm_inf)
    k.finalize_kernel[(1,)](
        plan.partials, plan.flags, num_partials, scaler.scale, scaler.growth_tracker, scaler.hysteresis_tracker,
        batch.applied_steps, batch.consecutive_skips, plan.scalars, batch.grad_norm, batch.found_inf,
        batch.max_grad_norm or 0.0, scaler.growth_factor, scaler.backoff_factor, scaler.min_scale,
        scaler.max_scale, scaler.growth_interval, scaler.hysteresis,
        HAS_CLIP=batch.max_grad_norm is not None, NORM_INF=norm_inf, DYNAMIC=scaler.dynamic,
        CONSECUTIVE=scaler.consecutive,
        BLOCK=FINALIZE_BLOCK, num_warps=4)
    launch_updates(plan, batch.rule.code, batch.applied_steps)
    plan.write_back(batch)


def launch_updates(plan, rule_code: int, applied_steps: torch.Tensor) -> None:
    """The update launches of a plan whose scalars (1/S, clip, found_inf, EMA weight) are
    written; `applied_steps`: the applied-step count (int32)."""
    from . import triton_kernels as k
    chunk = plan.chunk_size
    block = min(BLOCK, chunk)
    for pair in plan.pairs:
        if not pair.num_chunks:
            continue
        dtypes = dict(GRAD_DTYPE=_tl_dtype(pair.grad_dtype), PARAM_DTYPE=_tl_dtype(pair.param_dtype),
                      MASTER_KIND=pair.master_kind, STATE=plan.state_code, EMA_DTYPE=_tl_dtype(plan.ema_dtype or torch.float32),
                      ALIGNED=pair.aligned, CHUNK=chunk, BLOCK=block, num_warps=NUM_WARPS)
        if rule_code == ADAMW_CODE:
            k.adamw_kernel[(pair.num_chunks,)](pair.chunks, pair.table, plan.group_table, plan.scalars, **dtypes)
            k.advance_kernel[(-(-pair.num_chunks // ADVANCE_BLOCK),)](
                pair.chunks, pair.table, plan.scalars, pair.num_chunks, BLOCK=ADVANCE_BLOCK)
        else:
            k.update_kernel[(pair.num_chunks,)](pair.chunks, pair.table, plan.group_table, plan.scalars,
                                                applied_steps, **dtypes)

"""Triton kernels of one step (docs/semantics.md), three launches per step:

  1. `partials_kernel`, one launch per (param dtype, grad dtype) pair: reads every grad once
     and writes, per chunk, the sum of squares (or max |u|) of the unscaled grad and an
     inf/NaN flag. 2 B/param for FP16 grads.
  2. `finalize_kernel`, one program: reduces the partials in a fixed order (deterministic, no
     float atomics), computes N, the clip coefficient and found_inf, and updates the loss
     scale. It runs on the device, so the host never waits.
  3. `update_kernel` (SGD) or `adamw_kernel` (AdamW), one launch per pair: reads grad, master
     and the rule's state; writes master, state and the FP16/BF16 param, or nothing at all when
     found_inf. SGD with momentum moves 22 B/param (20, and the param read back to keep edits
     made outside the optimizer), AdamW 30 B/param; AdamW then advances each param's step
     (`advance_kernel`, a few bytes per tensor).

Every program handles one chunk of one tensor, found through the chunk table; addresses and
hyperparameters come from device tables (see multi_tensor.py), so the number of tensors and
groups never changes the number of launches or compilations.
"""
import triton
import triton.language as tl

from .. import state_precision as sp
from ..update_rules import MOMENT_MARGIN as MOMENT_MARGIN_VALUE
from . import multi_tensor as mt

# Table layouts shared with the host (multi_tensor.py); kernels see globals only as constexpr.
GRAD, MASTER, BUF, PARAM = tl.constexpr(mt.GRAD), tl.constexpr(mt.MASTER), tl.constexpr(mt.BUF), tl.constexpr(mt.PARAM)
NUMEL, GROUP, COUNT = tl.constexpr(mt.NUMEL), tl.constexpr(mt.GROUP), tl.constexpr(mt.COUNT)
BUF2, BUF3, EMA = tl.constexpr(mt.BUF2), tl.constexpr(mt.BUF3), tl.constexpr(mt.EMA)
SCALE, SCALE2, SCALE3 = tl.constexpr(mt.SCALE), tl.constexpr(mt.SCALE2), tl.constexpr(mt.SCALE3)
# The master column's kinds and the state's codes (multi_tensor.py, state_precision.py).
REMAINDER16, REMAINDER8 = tl.constexpr(mt.REMAINDER16), tl.constexpr(mt.REMAINDER8)
STATE_BF16, STATE_INT8 = tl.constexpr(sp.BF16_CODE), tl.constexpr(sp.INT8_CODE)
QBLOCK = tl.constexpr(sp.BLOCK)
SIGNED_BIAS, SIGNED_MAX = tl.constexpr(sp.SIGNED_BIAS), tl.constexpr(sp.SIGNED_MAX)
DITHER_ABOVE = tl.constexpr(sp.DITHER_ABOVE)
MOMENT_MARGIN = tl.constexpr(MOMENT_MARGIN_VALUE)
TABLE_COLUMNS, GROUP_COLUMNS = tl.constexpr(mt.TABLE_COLUMNS), tl.constexpr(mt.GROUP_COLUMNS)
# A group's row (update_rules.py: SGDHyper.row, AdamWHyper.row).
LR, MOMENTUM, ONE_MINUS_DAMPENING, WEIGHT_DECAY, NESTEROV, MAXIMIZE = (tl.constexpr(i) for i in range(6))
BETA1, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, ADAMW_WEIGHT_DECAY, EPS, ADAMW_MAXIMIZE = (
    tl.constexpr(i) for i in range(1, 8))
BETA1_LO, BETA2_LO, LR_LO, WEIGHT_DECAY_LO = (tl.constexpr(i) for i in range(8, 12))
INV_SCALE, CLIP_COEF, FOUND_INF = tl.constexpr(mt.INV_SCALE), tl.constexpr(mt.CLIP_COEF), tl.constexpr(mt.FOUND_INF)
EMA_WEIGHT, EMA_ONE_MINUS_DECAY = tl.constexpr(mt.EMA_WEIGHT), tl.constexpr(mt.EMA_ONE_MINUS_DECAY)
EMA_DECAY, EMA_INV_TAU = tl.constexpr(mt.EMA_DECAY), tl.constexpr(mt.EMA_INV_TAU)


@triton.jit
def _is_finite(x):
    """By the exponent bits: float tests like x - x == 0 may be folded away by the compiler
    (seen on sm_90, where they flagged finite grads)."""
    return (x.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000


@triton.jit
def _round_to(w, DTYPE: tl.constexpr):
    """FP32 -> DTYPE, round to nearest even. BF16 is rounded with integer ops, because the
    interpreter truncates where the GPU rounds: this way both give torch's .to() exactly."""
    if DTYPE == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(is_nan, 0x7FC0, rounded).to(tl.uint16)  # keep NaN a NaN
        return rounded.to(tl.bfloat16, bitcast=True)
    else:
        return w.to(DTYPE)


@triton.jit
def _partials_block(grads, mask, inv_scale, acc, bad, NORM_INF: tl.constexpr, MASKED: tl.constexpr):
    # Addresses come in computed (grads = grad + idx): the alignment hints on grad and idx
    # reach the load only that way. Only a chunk's last, partial block is masked: a mask on
    # an arbitrary end would stop vectorization.
    if MASKED:
        u = tl.load(grads, mask=mask, other=0.0).to(tl.float32) * inv_scale
    else:
        u = tl.load(grads).to(tl.float32) * inv_scale
    bad |= (~_is_finite(u)).to(tl.int32)
    if NORM_INF:
        acc = tl.maximum(acc, tl.abs(u))
    else:
        acc += u * u
    return acc, bad


@triton.jit
def partials_kernel(chunks_ptr, table_ptr, scale_ptr, partials_ptr, flags_ptr,
                    GRAD_DTYPE: tl.constexpr, NORM_INF: tl.constexpr, ALIGNED: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # This program's chunk: a tensor row and a start, 64-bit (a tensor or the chunk table may
    # pass 2^31 elements). Inlined, not a helper: hints don't survive a helper's return.
    c = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks_ptr + 2 * c)
    start = tl.multiple_of(tl.load(chunks_ptr + 2 * c + 1), CHUNK)
    end = tl.minimum(start + CHUNK, tl.load(table_ptr + row * TABLE_COLUMNS + NUMEL))
    grad = tl.load(table_ptr + row * TABLE_COLUMNS + GRAD).to(tl.pointer_type(GRAD_DTYPE))
    if ALIGNED:  # every address 16-byte aligned (checked on the host): 16-byte vector loads
        grad = tl.multiple_of(grad, 16)
    inv_scale = tl.math.div_rn(1.0, tl.load(scale_ptr))  # IEEE 1/S, as torch.reciprocal
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    full_end = start + (end - start) // BLOCK * BLOCK
    for offset in range(start, full_end, BLOCK):
        idx = tl.multiple_of(offset, BLOCK) + tl.arange(0, BLOCK)
        acc, bad = _partials_block(grad + idx, None, inv_scale, acc, bad, NORM_INF, False)
    if full_end < end:
        idx = full_end + tl.arange(0, BLOCK)
        acc, bad = _partials_block(grad + idx, idx < end, inv_scale, acc, bad, NORM_INF, True)
    if NORM_INF:
        tl.store(partials_ptr + c, tl.max(acc, axis=0))
    else:
        tl.store(partials_ptr + c, tl.sum(acc, axis=0))
    tl.store(flags_ptr + c, tl.max(bad, axis=0))


@triton.jit
def finalize_kernel(partials_ptr, flags_ptr, num_chunks, scale_ptr, tracker_ptr, hysteresis_ptr, applied_steps_ptr,
                    skips_ptr, scalars_ptr, grad_norm_ptr, found_inf_ptr, max_norm, growth_factor, backoff_factor,
                    min_scale, max_scale, growth_interval, hysteresis, HAS_CLIP: tl.constexpr, NORM_INF: tl.constexpr,
                    DYNAMIC: tl.constexpr, CONSECUTIVE: tl.constexpr, BLOCK: tl.constexpr):
    # One program walks the partials in a fixed order: the same inputs give the same bits.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for offset in range(0, num_chunks, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        part = tl.load(partials_ptr + idx, mask=idx < num_chunks, other=0.0)
        bad |= tl.load(flags_ptr + idx, mask=idx < num_chunks, other=0)
        if NORM_INF:
            acc = tl.maximum(acc, part)
        else:
            acc += part
    found_inf = tl.max(bad, axis=0) > 0
    if NORM_INF:
        norm = tl.max(acc, axis=0)
    else:
        norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    # Finite grads whose FP32 sum of squares overflows (2^64 and more) are an overflow too: the
    # step is skipped, never clipped to a zero gradient (csrc/chunks.h finalize).
    found_inf = found_inf | ~_is_finite(norm)
    norm = tl.where(found_inf & _is_finite(norm), float("inf"), norm)  # skipped: N is not finite
    coef = 1.0
    if HAS_CLIP:
        coef = tl.minimum(tl.math.div_rn(max_norm, norm + 1e-6), 1.0)
    scale = tl.load(scale_ptr)
    tl.store(scalars_ptr + INV_SCALE, tl.math.div_rn(1.0, scale))
    tl.store(scalars_ptr + CLIP_COEF, coef)
    tl.store(scalars_ptr + FOUND_INF, found_inf.to(tl.float32))
    tl.store(grad_norm_ptr, norm)
    tl.store(found_inf_ptr, found_inf)
    applied = tl.load(applied_steps_ptr)  # counts saturate at 2^31 - 1 (csrc/chunks.h count_up)
    applied = tl.where(found_inf | (applied == 2147483647), applied, applied + 1)
    tl.store(applied_steps_ptr, applied)
    # The EMA's a = 1 - d_t for t = the applied steps so far (ema.py), in float64, rounded once.
    weight = tl.load(scalars_ptr + EMA_ONE_MINUS_DECAY).to(tl.float64)
    inv_tau = tl.load(scalars_ptr + EMA_INV_TAU).to(tl.float64)
    if inv_tau > 0:
        weight += tl.load(scalars_ptr + EMA_DECAY).to(tl.float64) * tl.exp(-applied.to(tl.float64) * inv_tau)
    tl.store(scalars_ptr + EMA_WEIGHT, weight.to(tl.float32))
    skips = tl.load(skips_ptr)
    tl.store(skips_ptr, tl.where(found_inf, tl.where(skips == 2147483647, skips, skips + 1), 0))
    if DYNAMIC:  # loss_scaler.py's rule (csrc/chunks.h update_scale), counters clamped into range first
        tracker = tl.minimum(tl.maximum(tl.load(tracker_ptr), 0), growth_interval - 1)
        overflows = tl.minimum(tl.maximum(tl.load(hysteresis_ptr), 0), hysteresis)
        clean = tl.where(found_inf, 0, tracker + 1)
        grow = clean == growth_interval
        overflows = tl.where(found_inf & (overflows < hysteresis), overflows + 1, overflows)
        if CONSECUTIVE:
            overflows = tl.where(found_inf, overflows, 0)
        else:
            overflows = tl.where(grow, 0, overflows)
        back_off = found_inf & (overflows >= hysteresis)
        grown = scale * growth_factor
        new_scale = tl.where(back_off, tl.maximum(scale * backoff_factor, min_scale),
                             tl.where(grow & _is_finite(grown), tl.minimum(grown, max_scale), scale))
        tl.store(scale_ptr, new_scale)
        tl.store(tracker_ptr, tl.where(grow, 0, clean))
        tl.store(hysteresis_ptr, overflows)


@triton.jit
def _master_of(master, param, mask, PARAM_DTYPE: tl.constexpr, MASTER_KIND: tl.constexpr, MASKED: tl.constexpr):
    """The FP32 master of this block: loaded, or rebuilt from a BF16 param and its remainder
    (master_weights="remainder": w = p + r in the bits, csrc/sgd_math.h BF16Remainder;
    "remainder8": w = p + 256 * r8, csrc/state_math.h BF16Remainder8)."""
    other = 0.0 if MASKED else None
    if MASTER_KIND != 0:
        r_old = tl.load(master, mask=mask, other=0 if MASKED else None).to(tl.int32)
        if MASTER_KIND == REMAINDER8:
            r_old = r_old * 256
        top = tl.load(param, mask=mask, other=other).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        w_bits = top + r_old.to(tl.uint32, bitcast=True)
        # an unseen edit (p.data.mul_(mask)): where p + r crosses the sign or makes a NaN of an
        # infinite p, the master is p itself (BF16Remainder::rebuild)
        crossed = ((w_bits ^ top) & 0x80000000) != 0
        made_nan = ((w_bits & 0x7FFFFFFF) > 0x7F800000) & ((top & 0x7FFFFFFF) <= 0x7F800000)
        w = tl.where(crossed | made_nan, top, w_bits).to(tl.float32, bitcast=True)
    else:  # (no early return: the compiler would still build what follows it)
        w = tl.load(master, mask=mask, other=other)
        if PARAM_DTYPE != tl.float32:
            # A param edited outside the optimizer (p.data.clamp_ and the like, unseen by its
            # version counter) no longer equals its master rounded: re-take the master from it,
            # as torch.optim would keep the edit. Bits, not values (-0 vs +0, NaN); +2 B/param.
            p_old = tl.load(param, mask=mask, other=other)
            same = _round_to(w, PARAM_DTYPE).to(tl.uint16, bitcast=True) == p_old.to(tl.uint16, bitcast=True)
            w = tl.where(same, w, p_old.to(tl.float32))
    return w


@triton.jit
def _store_master(w, master, param, ema, ema_weight, has_ema, mask, PARAM_DTYPE: tl.constexpr,
                  MASTER_KIND: tl.constexpr, EMA_DTYPE: tl.constexpr):
    """The new master, and the param as it rounded to nearest even (or the param and its
    remainder); then the EMA moves toward the new master, e + a * (w - e) (csrc/ema_math.h)."""
    if MASTER_KIND == REMAINDER8:
        # w rounded to 24 bits, the param that rounded half up, and the int8 remainder
        # (csrc/state_math.h BF16Remainder8::split); the 24-bit value is the master from now on.
        b = w.to(tl.uint32, bitcast=True)
        nan = (b & 0x7FFFFFFF) > 0x7F800000
        b24 = (b + 128) & 0xFFFFFF00
        top = (b24 + 0x8000) & 0xFFFF0000
        r8 = ((b24 - top).to(tl.int32, bitcast=True) >> 8)
        top = tl.where(nan, 0x7FC00000, top).to(tl.uint32)
        r8 = tl.where(nan, 0, r8)
        w = tl.where(nan, top, b24).to(tl.float32, bitcast=True)
        tl.store(master, r8.to(tl.int8), mask=mask)
        tl.store(param, (top >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif MASTER_KIND == REMAINDER16:
        p_new = _round_to(w, tl.bfloat16)
        diff = (w.to(tl.uint32, bitcast=True) - (p_new.to(tl.uint16, bitcast=True).to(tl.uint32) << 16))
        r_new = tl.minimum(tl.maximum(diff.to(tl.int32, bitcast=True), -32768), 32767)
        tl.store(master, r_new.to(tl.int16), mask=mask)
        tl.store(param, p_new, mask=mask)
    else:
        tl.store(master, w, mask=mask)
        if PARAM_DTYPE != tl.float32:
            tl.store(param, _round_to(w, PARAM_DTYPE), mask=mask)
    if has_ema:  # a runtime flag, uniform over the program
        e = tl.load(ema, mask=mask).to(tl.float32)  # masked-off lanes are never stored
        tl.store(ema, _round_to(e + ema_weight * (w - e), EMA_DTYPE), mask=mask)


@triton.jit
def _load_state(ptr, scales, mask, STATE: tl.constexpr, SIGNED: tl.constexpr, MASKED: tl.constexpr):
    """A state buffer's values as FP32 (state_precision.py): FP32, BF16, or int8 codes with
    their block's scale (`scales`: each element's scale address; csrc/state_math.h SignedCodes,
    UnsignedCodes)."""
    if STATE == STATE_INT8:
        scale = tl.load(scales, mask=mask, other=0.0 if MASKED else None)
        if SIGNED:
            q = tl.load(ptr, mask=mask, other=0 if MASKED else None).to(tl.int32)
            k = tl.abs(q)
            t = tl.where(k == 0, 0.0, ((k + SIGNED_BIAS) << 20).to(tl.float32, bitcast=True))
            x = t * scale
            x = tl.where(q < 0, -x, x)
        else:  # FP16 of (x / scale) * 2^15
            h = tl.load(ptr, mask=mask, other=0.0 if MASKED else None).to(tl.float32)
            x = (h * 3.0517578125e-05) * scale
    else:
        x = tl.load(ptr, mask=mask, other=0.0 if MASKED else None).to(tl.float32)
    return x


@triton.jit
def _dither20(index, salt):
    """csrc/state_math.h dither20 in int64 with the low 32 bits kept (a wrapped product's low
    bits are exact): the signed codes' rounding dither for an element index and a step."""
    h = ((index * 0x9E3779B1) & 0xFFFFFFFF) ^ ((salt.to(tl.int64) * 0x85EBCA77) & 0xFFFFFFFF)
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    d = tl.minimum(tl.maximum(h >> 12, 4), 0xFFFFB)
    return tl.where(salt == 0, 0x80000, d)  # salt 0: round to nearest (half up)


@triton.jit
def _store_state(x, ptr, scale_base, offset, end, mask, salt, STATE: tl.constexpr, SIGNED: tl.constexpr,
                 MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """FP32 values x stored in the state's precision. int8: each QBLOCK run of this block gets
    the scale of its largest magnitude (compared as bits, csrc/state_math.h encode_block), and
    the codes; `offset` is the block's first element (a multiple of QBLOCK), `salt` the step's
    (the signed codes' dither)."""
    if STATE == STATE_INT8:
        bits = (x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int32, bitcast=True)
        if MASKED:
            bits = tl.where(mask, bits, 0)
        largest = tl.max(tl.reshape(bits, [BLOCK // QBLOCK, QBLOCK]), axis=1)
        scale = largest.to(tl.float32, bitcast=True)
        each = tl.reshape(tl.broadcast_to(scale[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
        # |x| / scale where the scale is finite and positive (a division: 1 / a subnormal scale
        # overflows); 0 elsewhere, where the block decodes to zeros or, through its scale, NaN.
        ok = (each > 0) & (each < float("inf"))
        t = tl.where(ok, tl.math.div_rn(tl.abs(x), tl.where(ok, each, 1.0)), 0.0)
        if SIGNED:  # 3 mantissa bits, dithered, rebased: 1.0 is code 121, 2^-15 code 1
            index = (offset + tl.arange(0, BLOCK)).to(tl.int64) & 0xFFFFFFFF
            k = ((t.to(tl.int32, bitcast=True).to(tl.int64) + _dither20(index, salt)) >> 20) - SIGNED_BIAS
            k = tl.minimum(tl.maximum(k, 0), SIGNED_MAX).to(tl.int32)
            tl.store(ptr, tl.where(x < 0, -k, k).to(tl.int8), mask=mask)
        else:  # IEEE half, round to nearest even
            tl.store(ptr, (t * 32768.0).to(tl.float16), mask=mask)
        blocks = offset // QBLOCK + tl.arange(0, BLOCK // QBLOCK)
        tl.store(scale_base + blocks, scale, mask=blocks * QBLOCK < end)
    elif STATE == STATE_BF16:
        tl.store(ptr, _round_to(x, tl.bfloat16), mask=mask)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def _update_block(grad, master, buf, param, ema, scales, scale_base, offset, end, mask, salt, inv_scale, coef, sign,
                  weight_decay, momentum, one_minus_dampening, nesterov, lr, first, HAS_BUF, ema_weight, has_ema,
                  PARAM_DTYPE: tl.constexpr, MASTER_KIND: tl.constexpr, STATE: tl.constexpr,
                  EMA_DTYPE: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    # grad, master, buf, param are this block's addresses (see _partials_block: hints, masks).
    other = 0.0 if MASKED else None
    # u * c in this order, as the reference: unscale, then clip.
    d = (tl.load(grad, mask=mask, other=other).to(tl.float32) * inv_scale) * coef * sign
    w = _master_of(master, param, mask, PARAM_DTYPE, MASTER_KIND, MASKED)
    if weight_decay != 0:
        d = d + weight_decay * w
    if HAS_BUF:
        b = _load_state(buf, scales, mask, STATE, True, MASKED)
        b = tl.where(first, d, b * momentum + one_minus_dampening * d)
        _store_state(b, buf, scale_base, offset, end, mask, salt, STATE, True, MASKED, BLOCK)
        if nesterov:
            d = d + momentum * b
        else:
            d = b
    _store_master(w - lr * d, master, param, ema, ema_weight, has_ema, mask, PARAM_DTYPE, MASTER_KIND, EMA_DTYPE)


@triton.jit
def _state_pointer(address, STATE: tl.constexpr, SIGNED: tl.constexpr):
    """A state column's address as a pointer to its storage type (state_precision.py)."""
    if STATE == STATE_INT8:
        if SIGNED:
            ptr = address.to(tl.pointer_type(tl.int8))
        else:
            ptr = address.to(tl.pointer_type(tl.float16))
    elif STATE == STATE_BF16:
        ptr = address.to(tl.pointer_type(tl.bfloat16))
    else:
        ptr = address.to(tl.pointer_type(tl.float32))
    return ptr


@triton.jit
def _master_pointer(address, MASTER_KIND: tl.constexpr):
    """The master column: FP32 masters, or int16 / int8 remainders."""
    if MASTER_KIND == REMAINDER16:
        ptr = address.to(tl.pointer_type(tl.int16))
    elif MASTER_KIND == REMAINDER8:
        ptr = address.to(tl.pointer_type(tl.int8))
    else:
        ptr = address.to(tl.pointer_type(tl.float32))
    return ptr


@triton.jit
def update_kernel(chunks_ptr, table_ptr, groups_ptr, scalars_ptr, applied_steps_ptr,
                  GRAD_DTYPE: tl.constexpr, PARAM_DTYPE: tl.constexpr, MASTER_KIND: tl.constexpr,
                  STATE: tl.constexpr, EMA_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr):
    if tl.load(scalars_ptr + FOUND_INF) != 0:
        return  # a skipped step writes nothing
    # This program's chunk: a tensor row and a start, 64-bit (a tensor or the chunk table may
    # pass 2^31 elements). Inlined, not a helper: hints don't survive a helper's return.
    c = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks_ptr + 2 * c)
    start = tl.multiple_of(tl.load(chunks_ptr + 2 * c + 1), CHUNK)
    end = tl.minimum(start + CHUNK, tl.load(table_ptr + row * TABLE_COLUMNS + NUMEL))
    entry = table_ptr + row * TABLE_COLUMNS
    grad = tl.load(entry + GRAD).to(tl.pointer_type(GRAD_DTYPE))
    master = _master_pointer(tl.load(entry + MASTER), MASTER_KIND)
    buf_addr = tl.load(entry + BUF)
    buf = _state_pointer(buf_addr, STATE, True)
    scale = tl.load(entry + SCALE).to(tl.pointer_type(tl.float32))  # int8 state: the block scales
    param = tl.load(entry + PARAM).to(tl.pointer_type(PARAM_DTYPE))
    ema_addr = tl.load(entry + EMA)
    has_ema = ema_addr != 0
    ema = ema_addr.to(tl.pointer_type(EMA_DTYPE))
    if ALIGNED:  # every address 16-byte aligned (checked on the host): 16-byte vector accesses
        grad = tl.multiple_of(grad, 16)
        master = tl.multiple_of(master, 16)
        buf = tl.multiple_of(buf, 16)
        param = tl.multiple_of(param, 16)
        ema = tl.multiple_of(ema, 16)
    ema_weight = tl.load(scalars_ptr + EMA_WEIGHT)
    hyper = groups_ptr + tl.load(entry + GROUP) * GROUP_COLUMNS
    lr = tl.load(hyper + LR)
    momentum = tl.load(hyper + MOMENTUM)
    one_minus_dampening = tl.load(hyper + ONE_MINUS_DAMPENING)
    weight_decay = tl.load(hyper + WEIGHT_DECAY)
    nesterov = tl.load(hyper + NESTEROV) != 0
    sign = tl.where(tl.load(hyper + MAXIMIZE) != 0, -1.0, 1.0)
    inv_scale = tl.load(scalars_ptr + INV_SCALE)
    coef = tl.load(scalars_ptr + CLIP_COEF)
    has_buf = buf_addr != 0
    first = buf_addr == 0
    # this step's applied-step count: the int8 codes' dither above a momentum of 1/2, else
    # 0, rounding to nearest (csrc/state_math.h dithered_salt)
    salt = tl.where(momentum > DITHER_ABOVE, tl.load(applied_steps_ptr), 0)
    if has_buf:
        # The flag is the applied-step count of the buffer's first applied step (0: never),
        # written identically by every chunk of the tensor, so chunks never race on it.
        first_step_ptr = tl.load(entry + COUNT).to(tl.pointer_type(tl.int32))
        first_step = tl.load(first_step_ptr)
        applied = tl.load(applied_steps_ptr)
        first = (first_step == 0) | (first_step == applied)
        if first_step == 0:
            tl.store(first_step_ptr, applied)
    full_end = start + (end - start) // BLOCK * BLOCK
    for offset in range(start, full_end, BLOCK):
        idx = tl.multiple_of(offset, BLOCK) + tl.arange(0, BLOCK)
        _update_block(grad + idx, master + idx, buf + idx, param + idx, ema + idx, scale + idx // QBLOCK, scale,
                      offset, end, None, salt, inv_scale, coef, sign, weight_decay, momentum, one_minus_dampening, nesterov,
                      lr, first, has_buf, ema_weight, has_ema, PARAM_DTYPE, MASTER_KIND, STATE, EMA_DTYPE, False,
                      BLOCK)
    if full_end < end:
        idx = full_end + tl.arange(0, BLOCK)
        _update_block(grad + idx, master + idx, buf + idx, param + idx, ema + idx, scale + idx // QBLOCK, scale,
                      full_end, end, idx < end, salt, inv_scale, coef, sign, weight_decay, momentum, one_minus_dampening,
                      nesterov, lr, first, has_buf, ema_weight, has_ema, PARAM_DTYPE, MASTER_KIND, STATE, EMA_DTYPE,
                      True, BLOCK)


@triton.jit
def _adamw_block(grad, master, m_ptr, v_ptr, vmax_ptr, param, ema, m_scales, v_scales, vmax_scales, m_base, v_base,
                 vmax_base, offset, end, mask, salt, inv_scale, coef, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                 decay, step_size, bias2_sqrt, bound, amsgrad, ema_weight, has_ema, PARAM_DTYPE: tl.constexpr,
                 MASTER_KIND: tl.constexpr, STATE: tl.constexpr, EMA_DTYPE: tl.constexpr, MASKED: tl.constexpr,
                 BLOCK: tl.constexpr):
    # csrc/adamw_math.h adamw_element, in the same order; the moments decoded and encoded in
    # the state's precision (exp_avg signed, exp_avg_sq and its max unsigned). ((1 - beta2) * u) * u
    # is torch's order (u * u overflows from 1.8e19); with int8 state m is kept within
    # +-bound * sqrt(v), as FP32 state always is (update_rules.moment_bound).
    other = 0.0 if MASKED else None
    u = (tl.load(grad, mask=mask, other=other).to(tl.float32) * inv_scale) * coef
    w = _master_of(master, param, mask, PARAM_DTYPE, MASTER_KIND, MASKED)
    m = _load_state(m_ptr, m_scales, mask, STATE, True, MASKED)
    if one_minus_beta1 < 0.5:  # torch's lerp_(grad, 1 - beta1), its kernel's formula
        m = m + one_minus_beta1 * (u - m)
    else:
        m = u - (u - m) * (1.0 - one_minus_beta1)
    v = beta2 * _load_state(v_ptr, v_scales, mask, STATE, False, MASKED) + (one_minus_beta2 * u) * u
    if STATE == STATE_INT8:
        limit = bound * tl.sqrt_rn(v)
        m = tl.where(m > limit, limit, m)
        m = tl.where(m < -limit, -limit, m)
    _store_state(m, m_ptr, m_base, offset, end, mask, salt, STATE, True, MASKED, BLOCK)
    _store_state(v, v_ptr, v_base, offset, end, mask, salt, STATE, False, MASKED, BLOCK)
    if amsgrad:  # a runtime flag (groups may differ), uniform over the program
        v = tl.maximum(_load_state(vmax_ptr, vmax_scales, mask, STATE, False, MASKED), v)
        _store_state(v, vmax_ptr, vmax_base, offset, end, mask, salt, STATE, False, MASKED, BLOCK)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    w = w * decay + tl.math.div_rn(-step_size * m, denom)  # torch's mul_(decay).addcdiv_(m, denom, -step_size)
    _store_master(w, master, param, ema, ema_weight, has_ema, mask, PARAM_DTYPE, MASTER_KIND, EMA_DTYPE)


@triton.jit
def _power(base, n):
    """base^n by squaring (csrc/adamw_math.h power): float64, loop-carried, any backend."""
    result = base * 0.0 + 1.0
    while n > 0:
        result = tl.where((n & 1) != 0, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def _moment_bound(beta1, beta2, t):
    """MOMENT_MARGIN * update_rules.moment_bound (csrc/adamw_math.h): in float64, rounded once;
    inf at beta2 = 0."""
    r = beta1 * beta1 / tl.where(beta2 == 0.0, 1.0, beta2)
    total = tl.where(r == 1.0, t.to(tl.float64), (1.0 - _power(r, t)) / tl.where(r == 1.0, 0.5, 1.0 - r))
    bound = (1.0 - beta1) * tl.sqrt(total / (1.0 - beta2)) * (1.0 + 2.0 ** -20)
    return tl.where(beta2 == 0.0, float("inf"), (bound * MOMENT_MARGIN).to(tl.float32))


@triton.jit
def adamw_kernel(chunks_ptr, table_ptr, groups_ptr, scalars_ptr,
                 GRAD_DTYPE: tl.constexpr, PARAM_DTYPE: tl.constexpr, MASTER_KIND: tl.constexpr,
                 STATE: tl.constexpr, EMA_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    if tl.load(scalars_ptr + FOUND_INF) != 0:
        return  # a skipped step writes nothing
    c = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks_ptr + 2 * c)
    start = tl.multiple_of(tl.load(chunks_ptr + 2 * c + 1), CHUNK)
    entry = table_ptr + row * TABLE_COLUMNS
    end = tl.minimum(start + CHUNK, tl.load(entry + NUMEL))
    grad = tl.load(entry + GRAD).to(tl.pointer_type(GRAD_DTYPE))
    master = _master_pointer(tl.load(entry + MASTER), MASTER_KIND)
    m_ptr = _state_pointer(tl.load(entry + BUF), STATE, True)
    v_ptr = _state_pointer(tl.load(entry + BUF2), STATE, False)
    vmax_addr = tl.load(entry + BUF3)
    amsgrad = vmax_addr != 0
    vmax_ptr = _state_pointer(vmax_addr, STATE, False)
    m_base = tl.load(entry + SCALE).to(tl.pointer_type(tl.float32))
    v_base = tl.load(entry + SCALE2).to(tl.pointer_type(tl.float32))
    vmax_base = tl.load(entry + SCALE3).to(tl.pointer_type(tl.float32))
    param = tl.load(entry + PARAM).to(tl.pointer_type(PARAM_DTYPE))
    ema_addr = tl.load(entry + EMA)
    has_ema = ema_addr != 0
    ema = ema_addr.to(tl.pointer_type(EMA_DTYPE))
    if ALIGNED:
        grad = tl.multiple_of(grad, 16)
        master = tl.multiple_of(master, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        param = tl.multiple_of(param, 16)
        ema = tl.multiple_of(ema, 16)
    ema_weight = tl.load(scalars_ptr + EMA_WEIGHT)
    hyper = groups_ptr + tl.load(entry + GROUP) * GROUP_COLUMNS
    lr = tl.load(hyper + LR)
    beta1 = tl.load(hyper + BETA1)
    beta2 = tl.load(hyper + BETA2)
    # The param's t-th applied step (t = its step + 1): bias corrections in float64 from the
    # user's betas (hi + lo columns), rounded once.
    t = tl.load(tl.load(entry + COUNT).to(tl.pointer_type(tl.float32))).to(tl.int64) + 1
    beta1_64 = beta1.to(tl.float64) + tl.load(hyper + BETA1_LO).to(tl.float64)
    beta2_64 = beta2.to(tl.float64) + tl.load(hyper + BETA2_LO).to(tl.float64)
    lr_64 = lr.to(tl.float64) + tl.load(hyper + LR_LO).to(tl.float64)
    bias1 = 1.0 - _power(beta1_64, t)
    bias2 = 1.0 - _power(beta2_64, t)
    step_size = (lr_64 / bias1).to(tl.float32)
    bias2_sqrt = tl.sqrt(bias2).to(tl.float32)
    wd_64 = tl.load(hyper + ADAMW_WEIGHT_DECAY).to(tl.float64) + tl.load(hyper + WEIGHT_DECAY_LO).to(tl.float64)
    decay = (1.0 - lr_64 * wd_64).to(tl.float32)
    bound = _moment_bound(beta1_64, beta2_64, t)
    salt = tl.where(beta1 > DITHER_ABOVE, t, 0)  # the int8 codes' dither (csrc/state_math.h dithered_salt)
    coef = tl.load(scalars_ptr + CLIP_COEF)
    coef = tl.where(tl.load(hyper + ADAMW_MAXIMIZE) != 0, -coef, coef)
    inv_scale = tl.load(scalars_ptr + INV_SCALE)
    one_minus_beta1 = tl.load(hyper + ONE_MINUS_BETA1)
    one_minus_beta2 = tl.load(hyper + ONE_MINUS_BETA2)
    eps = tl.load(hyper + EPS)
    full_end = start + (end - start) // BLOCK * BLOCK
    for offset in range(start, full_end, BLOCK):
        idx = tl.multiple_of(offset, BLOCK) + tl.arange(0, BLOCK)
        blk = idx // QBLOCK
        _adamw_block(grad + idx, master + idx, m_ptr + idx, v_ptr + idx, vmax_ptr + idx, param + idx, ema + idx,
                     m_base + blk, v_base + blk, vmax_base + blk, m_base, v_base, vmax_base, offset, end, None, salt,
                     inv_scale, coef, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,
                     bias2_sqrt, bound, amsgrad, ema_weight, has_ema, PARAM_DTYPE, MASTER_KIND, STATE, EMA_DTYPE, False,
                     BLOCK)
    if full_end < end:
        idx = full_end + tl.arange(0, BLOCK)
        blk = idx // QBLOCK
        _adamw_block(grad + idx, master + idx, m_ptr + idx, v_ptr + idx, vmax_ptr + idx, param + idx, ema + idx,
                     m_base + blk, v_base + blk, vmax_base + blk, m_base, v_base, vmax_base, full_end, end,
                     idx < end, salt, inv_scale, coef, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                     step_size, bias2_sqrt, bound, amsgrad, ema_weight, has_ema, PARAM_DTYPE, MASTER_KIND, STATE, EMA_DTYPE,
                     True, BLOCK)


@triton.jit
def advance_kernel(chunks_ptr, table_ptr, scalars_ptr, num_chunks, BLOCK: tl.constexpr):
    """After an applied AdamW pass: each tensor's step += 1, by its first chunk (start 0)."""
    if tl.load(scalars_ptr + FOUND_INF) != 0:
        return
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = c < num_chunks
    rows = tl.load(chunks_ptr + 2 * c, mask=live, other=0)
    first = live & (tl.load(chunks_ptr + 2 * c + 1, mask=live, other=1) == 0)
    counts = tl.load(table_ptr + rows * TABLE_COLUMNS + COUNT, mask=first, other=0).to(tl.pointer_type(tl.float32))
    first = first & (tl.load(table_ptr + rows * TABLE_COLUMNS + COUNT, mask=first, other=0) != 0)
    tl.store(counts, tl.load(counts, mask=first, other=0.0) + 1.0, mask=first)


# -- Muon's elementwise stages on one stack (csrc/muon_math.h) -----------------------------
@triton.jit
def _lerp(start, end, weight):
    """torch.lerp: one FMA from the nearer end."""
    diff = end - start
    if (weight < 0.5) & (weight > -0.5):
        result = tl.fma(diff, weight, start)
    else:
        result = tl.fma(diff, weight - 1.0, end)
    return result


@triton.jit
def _muon_momentum(u, buf, update, mask, found_inf_ptr, one_minus_mu, mu, NESTEROV: tl.constexpr):
    """B <- lerp(B, u, 1 - mu) (not on a skipped step); U = nesterov ? lerp(u, B, mu) : B, as BF16."""
    b = _lerp(tl.load(buf, mask=mask, other=0.0), u, one_minus_mu)
    if NESTEROV:
        result = _lerp(u, b, mu)
    else:
        result = b
    tl.store(update, _round_to(result, tl.bfloat16), mask=mask)
    keep = tl.load(found_inf_ptr).to(tl.int32)
    tl.store(buf, b, mask=mask & (keep == 0))


@triton.jit
def muon_momentum_kernel(u_ptr, buf_ptr, update_ptr, n, found_inf_ptr, one_minus_mu, mu,
                         NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    """The momentum from the stack's FP32 rows of u."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0)
    _muon_momentum(u, buf_ptr + offsets, update_ptr + offsets, mask, found_inf_ptr, one_minus_mu, mu, NESTEROV)


@triton.jit
def muon_momentum_grads_kernel(grads_ptr, inv_scale_ptr, clip_ptr, buf_ptr, update_ptr, per, found_inf_ptr,
                               one_minus_mu, mu, GRAD_DTYPE: tl.constexpr, CLIP: tl.constexpr,
                               NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    """The momentum of member program_id(1) from its raw grad: u = float32(g) * (1/S), then
    times the clip coefficient (CLIP), two roundings as the step's."""
    member = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < per
    grad = tl.load(grads_ptr + member).to(tl.pointer_type(GRAD_DTYPE)) + offsets
    u = tl.load(grad, mask=mask, other=0.0).to(tl.float32) * tl.load(inv_scale_ptr)
    if CLIP:
        u = u * tl.load(clip_ptr)
    row = member * per + offsets
    _muon_momentum(u, buf_ptr + row, update_ptr + row, mask, found_inf_ptr, one_minus_mu, mu, NESTEROV)


@triton.jit
def muon_apply_kernel(master_ptr, update_ptr, params_ptr, per, found_inf_ptr, decay, alpha,
                      PARAM_DTYPE: tl.constexpr, MASTER_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Member program_id(1) of the stack: w <- (w * decay) + alpha * O, its param written; a
    skipped step writes nothing. The param re-taken first where edited (_master_of)."""
    member = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    applied = tl.load(found_inf_ptr).to(tl.int32) == 0
    mask = (offsets < per) & applied
    param = tl.load(params_ptr + member).to(tl.pointer_type(PARAM_DTYPE)) + offsets
    master = master_ptr + member * per + offsets
    w = _master_of(master, param, mask, PARAM_DTYPE, MASTER_KIND, True)
    o = tl.load(update_ptr + member * per + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.fma(o, alpha, w * decay)
    _store_master(w, master, param, master, 0.0, 0, mask, PARAM_DTYPE, MASTER_KIND, tl.float32)


@triton.jit
def musgd_apply_kernel(master_ptr, update_ptr, u_ptr, buf_ptr, params_ptr, per, found_inf_ptr, muon_alpha, scale,
                       weight_decay, mu, sgd_alpha, PARAM_DTYPE: tl.constexpr, MASTER_KIND: tl.constexpr,
                       MUON: tl.constexpr,
                       DECAY: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    """MuSGD's weight step on member program_id(1) (csrc/muon_math.h musgd_apply): the Muon
    part (MUON: their O * s in BF16, at muon_alpha), then SGD with momentum and L2 decay."""
    member = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    applied = tl.load(found_inf_ptr).to(tl.int32) == 0
    mask = (offsets < per) & applied
    row = member * per + offsets
    param = tl.load(params_ptr + member).to(tl.pointer_type(PARAM_DTYPE)) + offsets
    master = master_ptr + row
    w = _master_of(master, param, mask, PARAM_DTYPE, MASTER_KIND, True)
    if MUON:
        o = tl.load(update_ptr + row, mask=mask, other=0.0).to(tl.float32)
        o = _round_to(o * scale, tl.bfloat16).to(tl.float32)
        w = tl.fma(o, muon_alpha, w)
    d = tl.load(u_ptr + row, mask=mask, other=0.0)
    if DECAY:
        d = tl.fma(w, weight_decay, d)
    b = tl.load(buf_ptr + row, mask=mask, other=0.0) * mu + d
    if NESTEROV:
        step = tl.fma(b, mu, d)
    else:
        step = b
    w = tl.fma(step, sgd_alpha, w)
    tl.store(buf_ptr + row, b, mask=mask)
    _store_master(w, master, param, master, 0.0, 0, mask, PARAM_DTYPE, MASTER_KIND, tl.float32)

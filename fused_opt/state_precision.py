"""How the update rule's state is stored: the `state_precision` policy, chosen once per optimizer.

SGD's momentum buffer and AdamW's moments are FP32 by default. Every step decodes them to FP32,
runs the rule's math in FP32, and encodes the result again, inside the update pass (no extra
launch, no extra pass over memory): only the stored form changes.

- "fp32": 4 B per element, as torch.optim.
- "bf16": 2 B, the FP32 result rounded to nearest even.
- "int8": 8-bit codes for signed state (momentum, exp_avg) and 16-bit codes for unsigned state
  (exp_avg_sq, max_exp_avg_sq), each with one FP32 scale per block of `BLOCK` consecutive
  elements (in memory order, from the start of each tensor: a block never spans two tensors, nor
  two shards). The scale is the block's largest magnitude; codes are floating-point numbers
  relative to it, so every element keeps its own relative precision, however small it is next
  to its block's largest (Adam divides by sqrt(v) element by element: a code relative to the
  block's largest value would round a small element's v to 0 and step it by lr*m/eps):
  * signed: x / scale in [-1, 1] as sign, 4-bit exponent and 3-bit mantissa (an E4M3 number
    whose largest is 1): 121 magnitudes from 2^-15 to 1, relative spacing 6-12 %, below 2^-15 of
    the block's largest an element is 0. Where the stored value is mostly memory (momentum or
    beta1 above 1/2) the rounding is stochastic with a deterministic dither of the element's
    index and the step (`dither20`, integer ops, the same bits on every backend): unbiased, so
    a slowly moving value moves as FP32's does. Rounded to nearest it would stick to its code
    whenever a step moves it by less than half a code (above beta = 15/16 many codes are fixed
    points of x * beta: a momentum that never decays). At beta <= 1/2 the fresh value outweighs
    the stored error, and rounding to nearest (half up in the bits) halves it.
  * unsigned: (x / scale) * 2^15 as an IEEE half (FP16, round to nearest even): 11 bits of
    precision from 2^-29 of the block's largest, and less down to 2^-39. 2 B, where one byte
    cannot follow v at all: beta2 = 0.999 moves v by 0.1 % a step, below any 8-bit spacing.
  A block whose scale is 0 decodes to zeros; a non-finite value gives its block a non-finite
  scale, and the block decodes to NaN, as an FP32 state that overflowed would poison its
  elements. AdamW with int8 state also keeps |exp_avg| <= 2 C_t * sqrt(exp_avg_sq) (update_rules.py
  `moment_bound`; FP32 state satisfies it with C_t alone): no code can make a step larger than
  twice the largest step FP32 state can take.

The functions below are the oracle of the encoding (torch ops, exact bits); the kernels'
versions are csrc/state_math.h and triton_kernels.py, in the same operation order.
"""
from __future__ import annotations

import torch

from .distributed import is_dtensor, local, placed_like
from .memory import conform_buffer, is_dense

# Elements per int8 scale block (csrc/state_math.h kStateBlock). A chunk of the kernels is a
# multiple of it, so a block is always inside one program's work.
BLOCK = 32
# Codes shared with the kernels (csrc/state_math.h StateCode).
FP32_CODE, BF16_CODE, INT8_CODE = 0, 1, 2


def scale_key(key: str) -> str:
    """The state key of an int8 buffer's scales: state["exp_avg_scale"] beside state["exp_avg"]."""
    return f"{key}_scale"


def codes_key(key: str) -> str:
    """The key under which a state dict saves an int8 buffer's codes: "exp_avg_codes", not
    "exp_avg", so that no optimizer reading torch's names can take codes for values (torch's
    AdamW would cast them to floats and step with exp_avg = 127.0)."""
    return f"{key}_codes"


# The dtypes of codes, signed and unsigned, and those of the first format (decode_legacy).
CODE_DTYPES = {True: torch.int8, False: torch.float16}
LEGACY_CODE_DTYPES = {True: torch.int8, False: torch.uint8}


def is_codes(buf, scale) -> bool:
    """A buffer held as codes with block scales beside it (not values)."""
    return (isinstance(buf, torch.Tensor) and isinstance(scale, torch.Tensor)
            and buf.dtype in (torch.int8, torch.uint8, torch.float16))


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-D view in memory order (what the kernels walk)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _blocks(flat: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """(blocks, BLOCK): a 1-D tensor cut in blocks, or with `rows` its equal rows each cut in
    its own blocks (a stack of tensors, buckets.py), the last of each zero-padded."""
    per_row = flat.numel() // rows if rows else 0
    pad = num_blocks(per_row) * BLOCK - per_row
    return torch.nn.functional.pad(flat.view(rows, per_row), (0, pad)).view(-1, BLOCK)


def _unblocked(x: torch.Tensor, numel: int, rows: int) -> torch.Tensor:
    """_blocks undone: the first numel / rows elements of each row, in one 1-D tensor."""
    return x.reshape(rows, -1)[:, :numel // rows].reshape(-1) if rows else x.reshape(-1)[:0]


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's largest |x|, by the bits: a NaN anywhere makes the block's a NaN on every
    backend (float max() disagrees across them on NaN)."""
    bits = blocks.view(torch.int32) & 0x7FFFFFFF
    return bits.amax(dim=1).view(torch.float32)


# Signed codes: the magnitude's FP32 bits rounded to 3 mantissa bits (to nearest, or dithered),
# rebased so that 1.0 is code 121 and 2^-15 code 1 (csrc/state_math.h SignedCodes).
SIGNED_BIAS, SIGNED_MAX = 895, 121
# Unsigned codes: FP16 of (x / scale) * 2^15 (csrc/state_math.h UnsignedCodes).
UNSIGNED_SHIFT = 2.0 ** 15


DITHER_ABOVE = 0.5  # a beta above which signed codes are dithered (csrc/state_math.h kDitherAbove)


def dithered_salt(beta: float, step):
    """The salt of an encode after a step whose decay factor is beta: the step's count, or 0
    (round to nearest)."""
    return step if beta > DITHER_ABOVE else 0


def dither20(index: torch.Tensor, salt) -> torch.Tensor:
    """csrc/state_math.h dither20: a deterministic dither in [0, 2^20) per element index and
    step (uint32 arithmetic, emulated in int64: the low 32 bits of a wrapped product are exact)."""
    m = 0xFFFFFFFF
    salt = torch.as_tensor(salt, dtype=torch.int64, device=index.device) & m
    h = ((index * 0x9E3779B1) & m) ^ ((salt * 0x85EBCA77) & m)
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & m
    h = h ^ (h >> 15)
    d = torch.clamp(h >> 12, 4, 0xFFFFB)  # 4 ulps inside: a decoded value encodes to its own code
    return torch.where(salt == 0, 0x80000, d)  # salt 0: half a code step, round to nearest


def _signed_codes(t: torch.Tensor, salt, rows: int = 1) -> torch.Tensor:
    """t in [-1, 1] (finite, blocks of BLOCK) -> int8 codes, rounded with the dither (each
    row's elements indexed from 0; a salt per row where it is a tensor of `rows` values)."""
    bits = t.abs().view(torch.int32).to(torch.int64)
    per_row = t.numel() // rows if rows else 0
    index = torch.arange(per_row, dtype=torch.int64, device=t.device)
    if per_row > 2**32:
        index = index & 0xFFFFFFFF  # the kernels' uint32 index
    index = index.expand(rows, per_row).reshape(t.shape)
    if isinstance(salt, torch.Tensor) and salt.numel() > 1:
        salt = salt.reshape(rows, 1).expand(rows, t.numel() // rows).reshape(t.shape)
    k = torch.clamp(((bits + dither20(index, salt)) >> 20) - SIGNED_BIAS, 0, SIGNED_MAX)
    return torch.where(t < 0, -k, k).to(torch.int8)


def _signed_values(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes -> (their magnitudes' values in [0, 1], where they are negative)."""
    k = codes.to(torch.int32)
    mag = ((k.abs() + SIGNED_BIAS) << 20).view(torch.float32)
    mag = torch.where(k == 0, torch.zeros_like(mag), mag)
    return mag, k < 0


def encode(x: torch.Tensor, signed: bool, salt=0, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 values x (any dense layout) -> (codes laid out like x, FP32 scales per block).
    `salt`: 0 to round signed codes to nearest, else the step's (dithered_salt), which with
    each element's index in memory order picks its rounding dither. `rows`: x is a
    contiguous stack of that many tensors, each encoded as it would be alone (its own blocks
    and indices, its own salt where `salt` holds one per row)."""
    flat = _memory_order(x.contiguous() if not _is_dense(x) else x).float()
    blocks = _blocks(flat, rows)
    scale = _absmax(blocks)
    # Only blocks with a finite, positive scale get codes; the others are all 0 (zeros, or NaN
    # through the scale).
    ok = ((scale > 0) & torch.isfinite(scale))[:, None]
    t = torch.where(ok, blocks / torch.where(ok, scale[:, None], torch.ones_like(scale[:, None])),
                    torch.zeros_like(blocks))
    if signed:
        q = _signed_codes(t, salt, rows)
    else:
        q = (t.abs() * UNSIGNED_SHIFT).to(torch.float16)  # -0 as 0
    codes = torch.empty_like(x, dtype=q.dtype)
    _memory_order(codes).copy_(_unblocked(q, flat.numel(), rows))
    return codes, scale


def _by_block(codes: torch.Tensor, values, rows: int = 1) -> torch.Tensor:
    """FP32 values laid out like `codes`, from values(blocks of codes) computed per block."""
    flat = _memory_order(codes)
    x = values(_blocks(flat, rows))
    out = torch.empty_like(codes, dtype=torch.float32)
    _memory_order(out).copy_(_unblocked(x, flat.numel(), rows))
    return out


def decode(codes: torch.Tensor, scale: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """Codes and their block scales -> FP32 values laid out like the codes (`rows`: a stack,
    as encode's)."""
    def values(blocks):
        if codes.dtype != torch.int8:
            return (blocks.float() * (1.0 / UNSIGNED_SHIFT)) * scale[:, None]
        mag, negative = _signed_values(blocks)
        x = mag * scale[:, None]
        return torch.where(negative, -x, x)
    return _by_block(codes, values, rows)


def decode_legacy(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes of the first int8 format (checkpoints saved before the format above): softsign
    int8 for signed state, sqrt(x) in 255 linear steps as uint8 for unsigned. Read only, to load
    such a checkpoint (it is re-encoded in the current format)."""
    def values(blocks):
        blocks = blocks.float()
        if codes.dtype == torch.int8:
            y = blocks / 127.0
            return scale[:, None] * (y / (2.0 - y.abs()))
        r = (blocks / 255.0) * scale[:, None]
        return r * r
    return _by_block(codes, values)


def _is_dense(t: torch.Tensor) -> bool:
    return is_dense(t)


def placed_codes(codes: torch.Tensor, like) -> torch.Tensor:
    """Local codes as a DTensor placed like `like` when that is one (else the codes)."""
    if not is_dtensor(like):
        return codes
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(codes, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def check_codes(codes, scale, p, master, name: str, key: str) -> None:
    """int8 codes the kernels can trust: p's shape and device, laid out like the master, with one
    FP32 scale per block (a wrong count would be read or written past its end)."""
    if codes.shape != p.shape or codes.device != p.device or is_dtensor(codes) != is_dtensor(p):
        raise ValueError(f"{name}: state[{key!r}] has shape {tuple(codes.shape)} on {codes.device}, but the param "
                         f"has shape {tuple(p.shape)} on {p.device}")
    lc = local(codes)
    like = local(master if master is not None else p)
    strides = torch.empty_like(like, dtype=codes.dtype, device="meta").stride()
    if not is_dense(lc) or (lc.stride() != strides and lc.numel() > 1):
        raise ValueError(f"{name}: state[{key!r}] must be laid out like its param (strides {strides}), got "
                         f"{lc.stride()}")
    if (not isinstance(scale, torch.Tensor) or is_dtensor(scale) or scale.dtype != torch.float32 or scale.dim() != 1
            or scale.numel() != num_blocks(lc.numel()) or scale.device != lc.device or not scale.is_contiguous()):
        what = "none" if scale is None else (f"{scale.dtype} of shape {tuple(scale.shape)}"
                                             if isinstance(scale, torch.Tensor) else type(scale).__name__)
        raise ValueError(f"{name}: state[{scale_key(key)!r}] must be a contiguous 1-D FP32 tensor of "
                         f"{num_blocks(lc.numel())} block scales on {lc.device} (one per {BLOCK} elements of "
                         f"state[{key!r}]), got {what}")


class FP32State:
    name, code = "fp32", FP32_CODE
    scaled = False

    def dtype(self, signed: bool) -> torch.dtype:
        return torch.float32

    def zeros(self, master: torch.Tensor, signed: bool) -> tuple:
        """A new buffer laid out like the master (and its scales): all zeros, decoding to 0."""
        buf = torch.zeros_like(master, dtype=self.dtype(signed))
        scale = None
        if self.scaled:
            scale = torch.zeros(num_blocks(local(buf).numel()), dtype=torch.float32, device=buf.device)
        return buf, scale

    def conform(self, buf, scale, p, master, name: str, key: str, signed: bool) -> tuple:
        """(buffer, scales) as the kernels need them, from what state[p] holds: a buffer in
        another precision (an FP32 one put in by hand, or one kept before the precision
        changed) is converted; codes without fitting scales raise."""
        if buf is None:
            return None, None
        dtype = self.dtype(signed)
        if is_codes(buf, scale) or (isinstance(buf, torch.Tensor) and buf.dtype in (torch.int8, torch.uint8)):
            if buf.dtype != dtype or not self.scaled:
                raise ValueError(f"{name}: state[{key!r}] holds {buf.dtype} codes, but this optimizer keeps its "
                                 f"state as {self.name} ({dtype}); load a state dict instead (it converts)")
            check_codes(buf, scale, p, master, name, key)
            return buf, scale
        as_fp32 = conform_buffer(buf, p, master, name, key, torch.float32 if self.scaled else dtype)
        if not self.scaled:
            return as_fp32, None
        return self.encode_like(as_fp32, signed)

    def loaded(self, value: torch.Tensor, scale, p: torch.Tensor, signed: bool, legacy: bool = False) -> tuple:
        """A saved buffer (FP32 or BF16 values, or codes and their scales; checked by
        validation.py) as this precision keeps it for param p: codes laid out as p's state
        is are taken as they are, anything else is decoded and re-encoded. `legacy`: codes of
        the first int8 format (decode_legacy)."""
        if legacy:
            value = decode_legacy(value.contiguous() if not is_dense(value) else value, scale.float())
        elif scale is not None:
            if self.scaled and value.dtype == self.dtype(signed) and not is_dtensor(p):
                codes = torch.empty_like(p, dtype=value.dtype)
                if value.stride() == codes.stride() or value.numel() <= 1:
                    return codes.copy_(value), scale.to(p.device, torch.float32, copy=True)
            value = decode(value.contiguous() if not is_dense(value) else value, scale.float())
        x = torch.empty_like(p, dtype=torch.float32).copy_(placed_like(value, p))
        if self.scaled:
            return self.encode_like(x, signed)
        return x.to(self.dtype(signed)), None

    def decoded_dtensor(self, codes, scale):
        """A DTensor's codes (blocks per local shard) as an FP32 DTensor placed alike."""
        from torch.distributed.tensor import DTensor
        values = decode(local(codes), scale)
        return DTensor.from_local(values, codes.device_mesh, codes.placements, run_check=False, shape=codes.shape,
                                  stride=codes.stride())

    def encode_like(self, x: torch.Tensor, signed: bool) -> tuple:
        """FP32 values x (a DTensor's local shard is encoded: blocks are per shard) encoded."""
        codes, scale = self.encode(local(x), signed, 0)
        return placed_codes(codes, x), scale

    def decode(self, buf, scale, rows=1):
        return buf

    def encode(self, x, signed, salt=0, rows=1):
        return x, None


class BF16State(FP32State):
    name, code = "bf16", BF16_CODE

    def dtype(self, signed: bool) -> torch.dtype:
        return torch.bfloat16

    def decode(self, buf, scale, rows=1):
        return buf.float()

    def encode(self, x, signed, salt=0, rows=1):
        return x.to(torch.bfloat16), None


class Int8State(FP32State):
    name, code = "int8", INT8_CODE
    scaled = True

    def dtype(self, signed: bool) -> torch.dtype:
        return torch.int8 if signed else torch.float16

    def decode(self, buf, scale, rows=1):
        return decode(buf, scale, rows)

    def encode(self, x, signed, salt=0, rows=1):
        return encode(x, signed, salt, rows)


STATE_PRECISIONS = {"fp32": FP32State, "bf16": BF16State, "int8": Int8State}


def state_precision(name: str):
    if name not in STATE_PRECISIONS:
        raise ValueError(f'state_precision must be "fp32", "bf16" or "int8", got {name!r}')
    return STATE_PRECISIONS[name]()

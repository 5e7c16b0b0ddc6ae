"""How the update rule's state is stored: the `state_precision` policy, chosen once per optimizer.

SGD's momentum buffer and AdamW's moments are FP32 by default. Every step decodes them to FP32,
runs the rule's math in FP32, and encodes the result again, inside the update pass (no extra
launch, no extra pass over memory): only the stored form changes.

- "fp32": 4 B per element, as torch.optim.
- "bf16": 2 B, the FP32 result rounded to nearest even.
- "int8": 1 B plus one FP32 scale per block of `BLOCK` consecutive elements (in memory order,
  from the start of each tensor: a block never spans two tensors, nor two shards). The scale is
  the block's largest magnitude, so each block has its own range and an outlier spoils 31
  neighbours, not a tensor. The codes are companded, as FlashOptim's 8-bit states are:
  * signed state (momentum, exp_avg): q = round(127 * softsign(x / scale)) in [-127, 127], with
    softsign(t) = 2t / (1 + |t|), which spends more codes near 0, where most values are;
    decoded as x = scale * y / (2 - |y|), y = q / 127.
  * unsigned state (exp_avg_sq, max_exp_avg_sq: never negative): r = sqrt(x) is stored,
    q = round(255 * r / scale) in [0, 255] with scale = the block's largest r; decoded as
    x = (scale * q / 255)^2. The square root halves the dynamic range the codes must span.
  Rounding is half up (floor(y + 0.5)), which integer-free kernels reproduce exactly. A block
  whose scale is 0 decodes to zeros; a non-finite value gives its block a non-finite scale, and
  the block decodes to NaN, as an FP32 state that overflowed would poison its elements.

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


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-D view in memory order (what the kernels walk)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    pad = num_blocks(flat.numel()) * BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's largest |x|, by the bits: a NaN anywhere makes the block's a NaN on every
    backend (float max() disagrees across them on NaN)."""
    bits = blocks.view(torch.int32) & 0x7FFFFFFF
    return bits.amax(dim=1).view(torch.float32)


def _over(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale per block, 0 where the scale is 0 (or NaN). A division, not a multiplication
    by 1 / scale: the reciprocal of a subnormal scale overflows."""
    ok = (scale > 0)[:, None]
    return torch.where(ok, x / torch.where(ok, scale[:, None], torch.ones_like(scale[:, None])), torch.zeros_like(x))


def _round_clamped(y: torch.Tensor, low: float, high: float) -> torch.Tensor:
    q = torch.clamp(torch.floor(y + 0.5), low, high)
    return torch.where(torch.isnan(y), torch.zeros_like(q), q)


def encode(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 values x (any dense layout) -> (codes laid out like x, FP32 scales per block)."""
    flat = _memory_order(x.contiguous() if not _is_dense(x) else x).float()
    blocks = _blocks(flat)
    if signed:
        scale = _absmax(blocks)
        t = _over(blocks, scale)
        q = _round_clamped(127.0 * ((2.0 * t) / (1.0 + t.abs())), -127.0, 127.0).to(torch.int8)
    else:
        r = torch.sqrt(blocks)
        scale = _absmax(r)
        q = _round_clamped(_over(r, scale) * 255.0, 0.0, 255.0).to(torch.uint8)
    codes = torch.empty_like(x, dtype=q.dtype)
    _memory_order(codes).copy_(q.reshape(-1)[:flat.numel()])
    return codes, scale


def decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes and their block scales -> FP32 values laid out like the codes."""
    flat = _memory_order(codes)
    blocks = _blocks(flat).float()
    if codes.dtype == torch.int8:
        y = blocks / 127.0
        x = scale[:, None] * (y / (2.0 - y.abs()))
    else:
        r = (blocks / 255.0) * scale[:, None]
        x = r * r
    out = torch.empty_like(codes, dtype=torch.float32)
    _memory_order(out).copy_(x.reshape(-1)[:flat.numel()])
    return out


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
        if isinstance(buf, torch.Tensor) and buf.dtype in (torch.int8, torch.uint8):
            if buf.dtype != dtype:
                raise ValueError(f"{name}: state[{key!r}] holds {buf.dtype} codes, but this optimizer keeps its "
                                 f"state as {self.name} ({dtype}); load a state dict instead (it converts)")
            check_codes(buf, scale, p, master, name, key)
            return buf, scale
        as_fp32 = conform_buffer(buf, p, master, name, key, torch.float32 if self.scaled else dtype)
        if not self.scaled:
            return as_fp32, None
        return self.encode_like(as_fp32, signed)

    def loaded(self, value: torch.Tensor, scale, p: torch.Tensor, signed: bool) -> tuple:
        """A saved buffer (FP32 or BF16 values, or int8 codes and their scales; checked by
        validation.py) as this precision keeps it for param p: codes laid out as p's state
        is are taken as they are, anything else is decoded and re-encoded."""
        if value.dtype in (torch.int8, torch.uint8):
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
        codes, scale = self.encode(local(x), signed)
        return placed_codes(codes, x), scale

    def decode(self, buf, scale):
        return buf

    def encode(self, x, signed):
        return x, None


class BF16State(FP32State):
    name, code = "bf16", BF16_CODE

    def dtype(self, signed: bool) -> torch.dtype:
        return torch.bfloat16

    def decode(self, buf, scale):
        return buf.float()

    def encode(self, x, signed):
        return x.to(torch.bfloat16), None


class Int8State(FP32State):
    name, code = "int8", INT8_CODE
    scaled = True

    def dtype(self, signed: bool) -> torch.dtype:
        return torch.int8 if signed else torch.uint8

    def decode(self, buf, scale):
        return decode(buf, scale)

    def encode(self, x, signed):
        return encode(x, signed)


STATE_PRECISIONS = {"fp32": FP32State, "bf16": BF16State, "int8": Int8State}


def state_precision(name: str):
    if name not in STATE_PRECISIONS:
        raise ValueError(f'state_precision must be "fp32", "bf16" or "int8", got {name!r}')
    return STATE_PRECISIONS[name]()

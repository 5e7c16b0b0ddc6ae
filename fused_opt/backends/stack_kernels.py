"""The elementwise stages of a rule with a matrix stage (Muon, MuSGD), on one stack of params
(buckets.py), as kernels of the native (C++ / CUDA) or Triton backend; the math is
csrc/muon_math.h's (Triton: triton_kernels.py), the torch ops of matrix_rules.py are its oracle.

  momentum     B <- lerp(B, u, 1 - mu) (kept on a skipped step), U = nesterov ? lerp(u, B, mu) : B,
               written as BF16, the dtype Newton–Schulz runs in.
  apply        Muon's weight step: the param re-taken where it was edited, w <- (w * (1 - lr wd))
               + (-lr ratio) O, master (FP32 or a remainder) and param written; nothing on a
               skipped step.
  musgd_apply  MuSGD's weight step: the Muon part, then SGD with momentum and L2 decay.
  elementwise_step  Muon's AdamW groups: the backend's multi-tensor AdamW update kernel (the
               one FusedMixedPrecisionAdamW runs), from the pipeline's scalars.
  decode / encode_into   int8 state of a stack, each member as alone (C++ / CUDA only).

Each member's own param is written through a table of their addresses (a stack's params are
never copied). The rest of the step (unscale, inf check, norm and clip, Newton–Schulz) is the
torch backend's on every backend; what the kernels do not take (an EMA, a tensor lr's weight
step, non-contiguous params) stays torch ops, decided per stack.
"""
from __future__ import annotations

import dataclasses

import torch

from . import buckets, torch_backend
from .multi_tensor import MASTER_KINDS, increment_version
from .. import state_precision
from ..state_precision import INT8_CODE
from ..update_rules import AdamW, AdamWHyper, _fp32, commit

TRITON_BLOCK = 1024
GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class StagedStep:
    """A backend module's face for a rule with a matrix stage: the torch backend's step, with
    the elementwise stages as backend `name`'s kernels ("torch": torch ops)."""
    WRITES_BUMP_VERSIONS = True

    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.stages = for_backend(name, device)

    def step(self, batch) -> None:
        torch_backend.step(batch, self.stages)


def for_backend(name: str, device: torch.device):
    """The stage kernels of backend `name` on `device`, or None for torch ops."""
    if name == "native":
        from . import native_backend
        module, _ = native_backend._module_and_stream(torch.device(device))
        return NativeStages(module)
    if name == "triton":
        return TritonStages()
    return None


def _param_code(w: torch.Tensor, params: list) -> int:
    """csrc/muon_math.h dispatch_stack_param: FP16 / BF16 params with FP32 masters, or BF16
    params with int16 / int8 remainders (the codes of csrc/dispatch.h)."""
    from .native_backend import BF16_REMAINDER, BF16_REMAINDER8, DTYPE_CODES
    if w.dtype == torch.float32:
        return DTYPE_CODES[params[0].dtype]
    return {torch.int16: BF16_REMAINDER, torch.int8: BF16_REMAINDER8}[w.dtype]


class _Stages:
    def __init__(self):
        self._tables: dict = {}

    def can_step(self, u, buf: torch.Tensor) -> bool:
        """Whether `momentum` takes this buffer: FP32 rows in the grads' order; u FP32 rows, or
        the members' raw grads (buckets.ScaledGrads) if contiguous, of a float dtype."""
        if not (buf.dtype == torch.float32 and buf.is_contiguous() and buf.shape == u.shape):
            return False
        if isinstance(u, buckets.ScaledGrads):
            return all(g.is_contiguous() and g.dtype in GRAD_DTYPES and g.dtype == u.grads[0].dtype for g in u.grads)
        return u.is_contiguous()

    def can_apply(self, w: torch.Tensor, params: list, lr) -> bool:
        """Whether `apply` takes this stack: FP32 master rows beside contiguous FP16/BF16
        params, or remainder rows beside BF16 params; a float lr (a tensor lr stays on torch
        ops, which read it on the device)."""
        dtypes = (torch.float16, torch.bfloat16) if w.dtype == torch.float32 else (
            (torch.bfloat16,) if w.dtype in (torch.int16, torch.int8) else ())
        return (not isinstance(lr, torch.Tensor) and w.is_contiguous()
                and all(p.dtype in dtypes and p.dtype == params[0].dtype and p.is_contiguous() for p in params))

    @staticmethod
    def _grad_table(u) -> torch.Tensor:
        """The members' grad addresses, on their device (new grads every step: not kept)."""
        table = torch.tensor([g.data_ptr() for g in u.grads], dtype=torch.int64)
        device = u.grads[0].device
        return table if device.type == "cpu" else table.to(device, non_blocking=True)

    def _table(self, params: list) -> torch.Tensor:
        """The members' param addresses, on their device (kept while they stay where they are)."""
        key = tuple(p.data_ptr() for p in params)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > 4096:
                self._tables.clear()
            table = self._tables[key] = torch.tensor(key, dtype=torch.int64).to(params[0].device)
        return table

    @staticmethod
    def _weights(mu: float) -> tuple[float, float]:
        return _fp32(1 - mu), _fp32(mu)  # torch.lerp's weights, as FP32 scalars

    def elementwise_members(self, batch) -> list:
        """Positions of the params whose group steps by a per-element rule (Muon's
        algorithm="adamw" groups): the multi-tensor update kernel FusedMixedPrecisionAdamW runs
        steps them, with every master format, state precision and the EMA."""
        return [i for i, gi in enumerate(batch.group_index) if isinstance(batch.groups[gi], AdamWHyper)]

    def elementwise_step(self, batch, members: list, inv_scale, clip, found_inf, applied_steps, ema_weight) -> None:
        """Those params stepped by this backend's update kernel, from their raw grads with the
        pipeline's 1/S, clip coefficient, found_inf and EMA weight (device tensors: no host
        sync); a skipped step writes nothing."""
        from .multi_tensor import CHUNK_SIZE, EMA_WEIGHT, INV_SCALE, plan_for
        sub = _elementwise_batch(batch, members)
        plan = plan_for(sub, CHUNK_SIZE)
        weight = ema_weight if ema_weight is not None else inv_scale.new_zeros(())
        plan.scalars[INV_SCALE:EMA_WEIGHT + 1].copy_(torch.stack([inv_scale, clip, found_inf.float(), weight]))
        self._launch_updates(plan, applied_steps)
        plan.write_back(sub)


class NativeStages(_Stages):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def _launch_updates(self, plan, applied_steps: torch.Tensor) -> None:
        from . import native_backend
        native_backend.launch_updates(plan, AdamW.code, applied_steps.data_ptr())

    def _stream(self, t: torch.Tensor) -> int:
        return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0

    def momentum(self, u, buf: torch.Tensor, found_inf: torch.Tensor, mu: float, nesterov: bool) -> torch.Tensor:
        update = torch.empty_like(buf, dtype=torch.bfloat16)
        one_minus_mu, mu32 = self._weights(mu)
        if isinstance(u, buckets.ScaledGrads):
            from .native_backend import DTYPE_CODES
            table = self._grad_table(u)
            self.module.muon_momentum_grads(table.data_ptr(), DTYPE_CODES[u.grads[0].dtype], u.inv_scale.data_ptr(),
                                            0 if u.clip is None else u.clip.data_ptr(), buf.data_ptr(),
                                            update.data_ptr(), u.grads[0].numel(), buf.numel(), found_inf.data_ptr(),
                                            one_minus_mu, mu32, nesterov, self._stream(buf))
            return update
        self.module.muon_momentum(u.data_ptr(), buf.data_ptr(), update.data_ptr(), u.numel(), found_inf.data_ptr(),
                                  one_minus_mu, mu32, nesterov, self._stream(u))
        return update

    def apply(self, w: torch.Tensor, update: torch.Tensor, params: list, found_inf: torch.Tensor, decay: float,
              alpha: float) -> None:
        update = update.contiguous()  # a tall matrix's comes back transposed (newton_schulz.py)
        self.module.muon_apply(w.data_ptr(), update.data_ptr(), self._table(params).data_ptr(), params[0].numel(),
                               w.numel(), found_inf.data_ptr(), _fp32(decay), _fp32(alpha),
                               _param_code(w, params), self._stream(w))
        increment_version(params)  # the raw writes don't; autograd's in-place check must see them

    def codec_for(self, precision):
        """Kernels for int8 state's decode and encode of a stack, or None (torch ops)."""
        return self if precision.code == INT8_CODE else None

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, rows: int) -> torch.Tensor:
        if not codes.is_contiguous():
            return state_precision.decode(codes, scales, rows)
        out = torch.empty_like(codes, dtype=torch.float32)
        self.module.state_decode(codes.data_ptr(), scales.data_ptr(), out.data_ptr(), rows, codes.numel() // rows,
                                 codes.dtype == torch.int8, self._stream(codes))
        return out

    def encode_into(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, signed: bool, salt, rows: int,
                    found_inf: torch.Tensor) -> None:
        """x encoded into the codes and scales, each member as alone; nothing on a skipped step."""
        if not (codes.is_contiguous() and x.is_contiguous()):
            new_codes, new_scales = state_precision.encode(x, signed, salt, rows)
            commit(codes, new_codes, found_inf)
            commit(scales, new_scales, found_inf)
            return
        salts = self._salts(salt, x.device)
        self.module.state_encode(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), rows, codes.numel() // rows,
                                 signed, salts.data_ptr(), salts.numel() > 1, found_inf.data_ptr(),
                                 self._stream(x))

    def _salts(self, salt, device) -> torch.Tensor:
        """The dither's salt as int32 (state_precision.dithered_salt: a count, or 0)."""
        if isinstance(salt, torch.Tensor):
            return salt.reshape(-1).to(torch.int32)
        key = ("salt", int(salt), device)
        if key not in self._tables:
            self._tables[key] = torch.tensor([int(salt)], dtype=torch.int32, device=device)
        return self._tables[key]

    def musgd_apply(self, w, update, scale, u, buf, params, found_inf, h) -> None:
        update = None if update is None else update.contiguous()
        self.module.musgd_apply(w.data_ptr(), 0 if update is None else update.data_ptr(), u.data_ptr(), buf.data_ptr(),
                                self._table(params).data_ptr(), params[0].numel(), w.numel(), found_inf.data_ptr(),
                                *_musgd_scalars(h, scale), _param_code(w, params), self._stream(w))
        increment_version(params)


def _elementwise_batch(batch, members: list):
    """The params at `members` as a StepBatch of AdamW's, their groups renumbered; its own
    cache (the multi-tensor plan), kept while the layout is."""
    groups = sorted({batch.group_index[i] for i in members})
    number = {g: k for k, g in enumerate(groups)}
    sub = buckets.subset(batch, members)
    return dataclasses.replace(sub, groups=[batch.groups[g] for g in groups],
                               group_index=[number[g] for g in sub.group_index], rule=AdamW,
                               cache=batch.cache.setdefault("elementwise", {}))


def _musgd_scalars(h, scale: float) -> tuple:
    """(muon_alpha, scale, weight_decay, momentum, nesterov, sgd_alpha) as the kernels take them:
    FP32, as torch casts a Python scalar for a float tensor's op."""
    sgd_lr = h.lr * h.sgd if h.use_muon else h.lr
    return (_fp32(-(h.lr * h.muon)), _fp32(scale), _fp32(h.weight_decay), _fp32(h.momentum), h.nesterov,
            _fp32(-sgd_lr))


class TritonStages(_Stages):
    def codec_for(self, precision):
        return None  # int8 state through torch ops

    def _launch_updates(self, plan, applied_steps: torch.Tensor) -> None:
        from . import triton_backend
        triton_backend.launch_updates(plan, AdamW.code, applied_steps)

    def momentum(self, u, buf, found_inf, mu, nesterov):
        from . import triton_kernels as k
        update = torch.empty_like(buf, dtype=torch.bfloat16)
        one_minus_mu, mu32 = self._weights(mu)
        n = buf.numel()
        if n == 0:
            return update
        if isinstance(u, buckets.ScaledGrads):
            from .triton_backend import _tl_dtype
            per = u.grads[0].numel()
            clip = u.clip if u.clip is not None else u.inv_scale  # (not read)
            k.muon_momentum_grads_kernel[(-(-per // TRITON_BLOCK), len(u.grads))](
                self._grad_table(u), u.inv_scale, clip, buf, update, per, found_inf, one_minus_mu, mu32,
                GRAD_DTYPE=_tl_dtype(u.grads[0].dtype), CLIP=u.clip is not None, NESTEROV=nesterov,
                BLOCK=TRITON_BLOCK)
            return update
        k.muon_momentum_kernel[(-(-n // TRITON_BLOCK),)](u, buf, update, n, found_inf, one_minus_mu, mu32,
                                                         NESTEROV=nesterov, BLOCK=TRITON_BLOCK)
        return update

    def apply(self, w, update, params, found_inf, decay, alpha):
        from . import triton_kernels as k
        from .triton_backend import _tl_dtype
        update = update.contiguous()
        per = params[0].numel()
        if per == 0:
            return
        k.muon_apply_kernel[(-(-per // TRITON_BLOCK), len(params))](
            w, update, self._table(params), per, found_inf, _fp32(decay), _fp32(alpha),
            PARAM_DTYPE=_tl_dtype(params[0].dtype), MASTER_KIND=MASTER_KINDS[w.dtype], BLOCK=TRITON_BLOCK)
        increment_version(params)

    def musgd_apply(self, w, update, scale, u, buf, params, found_inf, h) -> None:
        from . import triton_kernels as k
        from .triton_backend import _tl_dtype
        muon_alpha, scale, weight_decay, mu, nesterov, sgd_alpha = _musgd_scalars(h, scale)
        per = params[0].numel()
        if per == 0:
            return
        k.musgd_apply_kernel[(-(-per // TRITON_BLOCK), len(params))](
            w, w if update is None else update.contiguous(), u, buf, self._table(params), per, found_inf, muon_alpha,
            scale, weight_decay, mu, sgd_alpha, PARAM_DTYPE=_tl_dtype(params[0].dtype),
            MASTER_KIND=MASTER_KINDS[w.dtype], MUON=update is not None,
            DECAY=weight_decay != 0.0, NESTEROV=nesterov, BLOCK=TRITON_BLOCK)
        increment_version(params)

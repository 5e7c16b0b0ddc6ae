"""The model EMA the optimizer keeps when built with `ema_decay=d` (docs/ema.md).

Per param, `state[p]["ema_param"]` (FP32, or BF16 with `ema_dtype=torch.bfloat16`) starts as
the param's weights when it first steps (or when `ema_params()` is first asked): in a plain
loop the weights at construction, as timm's ModelEma copies the model; weights loaded after
the optimizer was built (a resumed or pretrained model) are where it starts then. Made
lazily, like the masters, so that an optimizer that never stepped has no state
(`torch.distributed.checkpoint` initializes the state of such an optimizer with one step).
On every applied step it moves toward the param's master w (the param itself when it is FP32):

    ema = ema + a * (w - ema),   a = 1 - d_t

inside the update pass, right after w is written: no launch of its own. A skipped step (inf/NaN
grads) leaves it, as it leaves w. With `ema_warmup=tau` the decay ramps up as Ultralytics' ModelEMA
does, d_t = d * (1 - exp(-t / tau)), t the optimizer's count of applied steps including this one,
so that early weights (far from where training goes) fade fast; a = (1 - d) + d * exp(-t / tau).
The kernels compute a once per step on the device (in finalize, from the applied-step count),
in float64, rounded once to FP32.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch

from .distributed import local

KEY = "ema_param"
EMA_DTYPES = (torch.float32, torch.bfloat16)


def _f32(x: float) -> float:
    """x rounded to FP32, as the kernels' scalar table holds it."""
    return float(torch.tensor(x, dtype=torch.float32))


class ModelEMA:
    """The EMA policy of one optimizer: its decay, warm-up and storage dtype."""

    def __init__(self, decay, dtype=torch.float32, warmup=None):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 <= float(decay) < 1.0):
            raise ValueError(f"ema_decay must be a number in [0, 1) or None, got {decay!r}")
        if dtype not in EMA_DTYPES:
            raise ValueError(f"ema_dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
        if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, (int, float))
                                   or not (0.0 < float(warmup) < math.inf)):
            raise ValueError(f"ema_warmup must be a positive number of steps (tau) or None, got {warmup!r}")
        if dtype == torch.bfloat16 and float(decay) > 0.99:
            warnings.warn(f"ema_dtype=torch.bfloat16 with ema_decay={decay}: a BF16 average moves only toward "
                          f"weights at least 2^-9 / (1 - decay) = {2**-9 / (1 - float(decay)):.0%} of it away, so it "
                          "will barely move; keep this EMA in FP32 (docs/semantics.md, Model EMA)", stacklevel=4)
        self.decay = float(decay)
        self.dtype = dtype
        self.warmup = None if warmup is None else float(warmup)
        # What the kernels read (multi_tensor.EMA_* slots), FP32 as they hold it: 1 - d (from
        # float64, so d = 0.9999 gives a = 1e-4 to FP32 precision), d, and 1/tau (0: no warm-up).
        self.scalars = (_f32(1.0 - self.decay), _f32(self.decay), 0.0 if warmup is None else _f32(1.0 / self.warmup))

    def weight(self, applied_steps: torch.Tensor) -> torch.Tensor:
        """a = 1 - d_t (FP32, on the device) for t = applied_steps: the kernels' formula in torch ops."""
        one_minus, decay, inv_tau = self.scalars
        if inv_tau == 0.0:
            return torch.full((), one_minus, dtype=torch.float32, device=applied_steps.device)
        t = applied_steps.to(torch.float64)
        return (one_minus + decay * torch.exp(-t * inv_tau)).to(torch.float32)

    def make(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A new EMA holding `weights` (FP32 values), laid out like `like` (the master)."""
        return torch.empty_like(like, dtype=self.dtype).copy_(weights)

    def conform(self, ema, p: torch.Tensor, like: torch.Tensor, name: str):
        """state[p]["ema_param"] as the kernels need it (self.dtype, p's shape, laid out like
        the master), or None when there is none; another shape raises."""
        from .memory import conform_buffer
        return conform_buffer(ema, p, like, name, KEY, dtype=self.dtype)


class BufferEMA:
    """With `ema_model=model`: the average of the model's floating-point buffers (BatchNorm's
    running statistics), which the optimizer does not own, kept as Ultralytics' ModelEMA and
    timm's ModelEmaV3 keep them: from their values at construction (those libraries copy the
    model then), moved on every applied step with the params' weight a,
    `e = e + a * (b - e)`. All buffers live in one FP32 vector, so a step adds a few launches
    however many buffers the model has. A buffer is looked up in its module on every step, as
    `model.half()` or `model.to()` replace buffer tensors."""

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ema_model must be the torch.nn.Module whose parameters are optimized, got "
                            f"{type(model).__name__}")
        self.model = model
        # (owning module, key, full name) of every floating buffer, in model.state_dict() order
        self.slots = [(module, key, f"{prefix}.{key}" if prefix else key)
                      for prefix, module in model.named_modules() for key, b in module._buffers.items()
                      if b is not None and b.is_floating_point() and key not in module._non_persistent_buffers_set]
        buffers = self.buffers()
        self.names = [name for _, _, name in self.slots]
        self.sizes = [b.numel() for b in buffers]
        device = buffers[0].device if buffers else torch.device("cpu")
        with torch.no_grad():
            self.flat = (torch.cat([b.detach().reshape(-1).float() for b in buffers]) if buffers
                         else torch.zeros(0, device=device))

    def buffers(self) -> list[torch.Tensor]:
        return [module._buffers[key] for module, key, _ in self.slots]

    def views(self) -> list[torch.Tensor]:
        """Each buffer's average, shaped like it (views into the one FP32 vector)."""
        return [v.view_as(b) for v, b in zip(self.flat.split(self.sizes), self.buffers())]

    def update(self, weight: torch.Tensor, skipped: torch.Tensor) -> None:
        """One step's move (device ops, no sync); a skipped step leaves the average as it is,
        whatever the buffers hold (an overflowing forward may have left NaN in them)."""
        if not self.slots:
            return
        current = torch.cat([b.detach().reshape(-1).float() for b in self.buffers()])
        if current.device != self.flat.device:  # the model moved (model.cuda()) after construction
            self.flat = self.flat.to(current.device)
        moved = torch.lerp(self.flat, current, weight.to(self.flat.device))
        self.flat.copy_(torch.where(skipped.to(self.flat.device), self.flat, moved))

    def state(self) -> dict:
        return dict(zip(self.names, (v.clone() for v in self.views())))

    def check_state(self, saved) -> None:
        """Raises (before anything is loaded) unless `saved` holds every buffer's average."""
        if not isinstance(saved, dict) or set(saved) != set(self.names):
            missing = sorted(set(self.names) - set(saved or {}))
            extra = sorted(set(saved or {}) - set(self.names))
            raise ValueError(f"the state dict's EMA of the model's buffers does not match ema_model's buffers "
                             f"(missing {missing[:5]}, unknown {extra[:5]})")
        for name, view in zip(self.names, self.views()):
            value = saved[name]
            if not isinstance(value, torch.Tensor) or value.shape != view.shape or not value.is_floating_point():
                raise ValueError(f"the state dict's EMA of buffer {name!r} is not a floating tensor of shape "
                                 f"{tuple(view.shape)}")

    def load(self, saved: dict) -> None:
        for name, view in zip(self.names, self.views()):
            view.copy_(saved[name])


def ema_state_dict(opt, model: torch.nn.Module | None) -> dict:
    """The EMA model's state dict, under `model.state_dict()`'s names: each optimized param's
    EMA, each floating buffer's average (with ema_model; else the buffer itself), and every
    other entry (a frozen param, an integer buffer) as the model holds it."""
    if opt._ema is None:
        raise RuntimeError(f"{type(opt).__name__}.ema_state_dict(): the optimizer keeps no EMA "
                           "(build it with ema_decay=...)")
    buffers = opt._ema_buffers
    model = model if model is not None else (buffers.model if buffers is not None else None)
    if model is None:
        raise TypeError("ema_state_dict(model): pass the model (or build the optimizer with ema_model=model)")
    optimized = {id(p) for p in opt._flat_params()}
    averaged = dict(zip(buffers.names, buffers.views())) if buffers is not None and model is buffers.model else {}
    out = {}
    with torch.no_grad():
        for name, value in model.state_dict(keep_vars=True).items():
            if id(value) in optimized:
                out[name] = ema_of(opt, value).detach().clone()
            elif name in averaged:
                out[name] = averaged[name].clone()
            else:
                out[name] = value.detach().clone()
    return out


def ema_of(opt, p: torch.Tensor) -> torch.Tensor:
    """p's EMA tensor, made from its current master (or p) if it has none yet. Made outside
    inference mode even when first asked for inside it (evaluation code calls ema_params() or
    swap_ema() under torch.inference_mode()): an inference tensor could never be updated by a
    later step."""
    state = opt.state[p]
    ema = state.get(KEY)
    if (isinstance(ema, torch.Tensor) and ema.shape == p.shape and ema.dtype == opt._ema.dtype
            and not ema.is_inference()):
        return ema
    with torch.inference_mode(False), torch.no_grad():
        if isinstance(ema, torch.Tensor) and ema.shape == p.shape and ema.dtype == opt._ema.dtype:
            state[KEY] = ema = ema.clone()  # an inference tensor put there by other code
            return ema
        master = opt._masters.current_master(state, p)
        state[KEY] = ema = opt._ema.make(master, master if master.dtype == torch.float32 else p)
    return ema


def swap(opt):
    """opt.swap_ema(): the params take their EMA (rounded to their dtype) and get their own
    values back, bit for bit, on exit. Masters are untouched; a step inside raises."""
    if opt._ema is None:
        raise RuntimeError(f"{type(opt).__name__}.swap_ema(): the optimizer keeps no EMA (build it with ema_decay=...)")
    if opt._ema_swapped:
        raise RuntimeError("swap_ema(): the EMA is already swapped in (swaps do not nest)")
    return _Swap(opt)


class _Swap:
    """What swap_ema() returns: the swap happens on `with` entry. Called without `with` it
    would do nothing at all, silently: it warns when dropped unentered."""

    def __init__(self, opt):
        self._opt, self._cm, self._entered = opt, None, False

    def __enter__(self):
        self._entered = True
        self._cm = _swapped(self._opt)
        return self._cm.__enter__()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def __del__(self):
        if not self._entered:
            warnings.warn("swap_ema() was called without `with`: nothing was swapped. Use "
                          "`with opt.swap_ema(): evaluate(model)`.", RuntimeWarning, stacklevel=2)


@contextlib.contextmanager
def _swapped(opt):
    params = opt._flat_params()
    buffers = opt._ema_buffers
    with torch.no_grad():
        # Edits made before the swap are taken in now (master_weights="remainder" sees them by
        # version counter, which the swap itself bumps), so the restore below is no edit.
        opt._masters.sync_from_params(opt, params)
        emas = [ema_of(opt, p) for p in params]
        if buffers is not None:  # the model's buffers too (ema_model=...): their averages, in their dtype
            params, emas = params + buffers.buffers(), emas + buffers.views()
        saved = [local(p).detach().clone() for p in params]
        for p, e in zip(params, emas):
            local(p).copy_(local(e))
    opt._ema_swapped = True
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                local(p).copy_(s)
        opt._ema_swapped = False

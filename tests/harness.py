"""Shared test machinery: which backends/devices to run, how to build a model, how to drive
our optimizer and the float64 reference side by side, and the comparisons."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import fused_opt
from fused_opt.backends import BACKENDS
from fused_opt.remainder import rebuild
from reference import ReferenceAdamW, ReferenceSGD

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Every (backend, device) that can run here: the same matrix runs through all of them.
BACKEND_DEVICES = [(b, d) for d in DEVICES for b in BACKENDS
                   if fused_opt.backend_availability(d)[b] is None]
BACKEND_DEVICE_IDS = [f"{b}-{d}" for b, d in BACKEND_DEVICES]
# The same, on CPU tensors only (for tests of host-side behaviour that CUDA adds nothing to).
CPU_BACKEND_DEVICES = [(b, d) for b, d in BACKEND_DEVICES if d == "cpu"]
CPU_BACKEND_DEVICE_IDS = [f"{b}-{d}" for b, d in CPU_BACKEND_DEVICES]

SIZES = (1, 7, 1023, 4097)


@dataclass
class Config:
    dtype: torch.dtype = torch.float16
    groups: list = field(default_factory=lambda: [dict(lr=0.1, momentum=0.9, dampening=0.0,
                                                       weight_decay=1e-2, nesterov=False, maximize=False)])
    max_grad_norm: float | None = None
    norm_type: float = 2.0
    loss_scale: object = "dynamic"
    init_scale: float = 2.0**10
    growth_interval: int = 3
    hysteresis: int = 1
    hysteresis_mode: str = "megatron"
    min_scale: float | None = None
    max_scale: float | None = None
    inject: dict = field(default_factory=dict)   # step -> "inf" | "nan"
    steps: int = 10
    sizes: tuple = SIZES
    optimizer: str = "sgd"  # or "adamw" (groups then hold AdamW's hyperparameters)
    ema_decay: float | None = None  # the optimizer's model EMA (ema_dtype FP32)
    ema_warmup: float | None = None
    master_weights: str = "fp32"


def make_params(config: Config, device, seed=0):
    """Params of `config.sizes`, plus the awkward ones: empty, non-contiguous (permuted), a view
    at storage offset 1, one that never gets a grad and one that gets grads only from step 3."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n,) for n in config.sizes]
    values = [torch.randn(s, generator=gen) for s in shapes]
    values.append(torch.empty(0))                                        # empty
    values.append(torch.randn(5, 3, generator=gen).t())                  # permuted (non-contiguous)
    values.append(torch.randn(34, generator=gen)[1:])                    # storage offset 1
    values.append(torch.randn(9, generator=gen))                         # never a grad
    values.append(torch.randn(11, generator=gen))                        # grads from step 3 on
    params = []
    for v in values:
        if v.is_contiguous() and v.storage_offset() == 0:
            params.append(torch.nn.Parameter(v.to(device=device, dtype=config.dtype)))
        else:  # keep the odd layout: same strides and offset, in the target dtype
            base = torch.zeros(v.untyped_storage().nbytes() // v.element_size(), dtype=config.dtype, device=device)
            view = base.as_strided(v.shape, v.stride(), v.storage_offset())
            view.copy_(v)
            params.append(torch.nn.Parameter(view))
    return params


def grad_plan(config: Config, params, step):
    """Which params get a grad at `step` (index list)."""
    n = len(params)
    never, late = n - 2, n - 1
    return [i for i in range(n) if i != never and (i != late or step >= 3)]


def make_grads(config: Config, params, step, scale, seed=1):
    """Stored grads for `step`: g_true * S rounded to the param dtype, with inf/NaN injected."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = [None] * len(params)
    for i in grad_plan(config, params, step):
        p = params[i]
        g_true = torch.randn(p.shape, generator=gen) * 1e-2
        g = torch.empty_like(p)  # same layout as the param, as autograd gives
        g.copy_((g_true * scale).to(p.dtype))
        grads[i] = g
    kind = config.inject.get(step)
    if kind is not None:
        target = grads[1]
        target.view(-1)[min(3, target.numel() - 1)] = math.inf if kind == "inf" else math.nan
    return grads


def assign_groups(config: Config, params):
    """Round-robin the params over the config's groups; returns torch-style groups, group_of."""
    k = len(config.groups)
    group_of = [i % k for i in range(len(params))]
    groups = [dict(config.groups[g], params=[p for i, p in enumerate(params) if group_of[i] == g])
              for g in range(k)]
    return groups, group_of


def build(config: Config, backend, device, seed=0):
    params = make_params(config, device, seed)
    groups, group_of = assign_groups(config, params)
    cls = fused_opt.FusedMixedPrecisionAdamW if config.optimizer == "adamw" else fused_opt.FusedMixedPrecisionSGD
    opt = cls(
        groups, max_grad_norm=config.max_grad_norm, norm_type=config.norm_type,
        loss_scale=config.loss_scale, init_scale=config.init_scale,
        growth_interval=config.growth_interval, hysteresis=config.hysteresis, min_scale=config.min_scale,
        max_scale=config.max_scale, hysteresis_mode=config.hysteresis_mode, backend=backend,
        ema_decay=config.ema_decay, ema_warmup=config.ema_warmup, master_weights=config.master_weights)
    return params, opt, group_of


def run_step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(p.device)
    opt.scale_loss(torch.zeros((), device=params[0].device))
    opt.step()


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map FP16/BF16 values to integers in the order of the reals, so ulps can be counted."""
    bits = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_close_fp32(actual, expected, what, scale=None):
    """rtol 1e-5, atol 1e-6 x max|expected| (or x `scale`, the size of what the value was
    computed from, where it can cancel: exp_avg's m + w * (u - m))."""
    expected = expected.detach().to(torch.float32)
    atol = 1e-6 * float(expected.abs().max()) if expected.numel() else 0.0
    if scale is not None:
        atol = max(atol, 1e-6 * scale)
    torch.testing.assert_close(actual.detach().float().cpu(), expected.cpu(), rtol=1e-5, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def check_against_reference(opt, params, ref: ReferenceSGD, what=""):
    """Masters and buffers to rtol 1e-5; FP16/BF16 params bit-equal to their own
    master rounded, and within 1 ulp of the reference's rounded master."""
    for i, p in enumerate(params):
        state = opt.state.get(p, {})
        if ref.e is not None and "ema_param" in state:  # the EMA, as FP32 state
            assert_close_fp32(state["ema_param"], ref.e[i], f"{what} EMA {i}")
        elif ref.e is not None:  # made when the param first steps: this one never did
            assert torch.equal(ref.e[i], ref.w[i]), f"{what} EMA {i} absent, but the reference's moved"
        if p.grad is None and "master_param" not in state and "master_remainder" not in state:
            torch.testing.assert_close(p.detach().double().cpu(), ref.w[i].cpu(), rtol=0, atol=0)
            continue
        if "master_remainder" in state:  # a BF16 param and its remainder rebuild the master
            master = rebuild(p.detach(), state["master_remainder"])
        else:
            master = state["master_param"]
        assert master.dtype == torch.float32
        assert_close_fp32(master, ref.w[i], f"{what} master {i}")
        if p.dtype != torch.float32:
            assert torch.equal(p.detach(), master.to(p.dtype)), f"{what} param {i} != own master rounded"
            ulps = (ordered_bits(p.detach().cpu()) - ordered_bits(ref.w[i].to(p.dtype).cpu())).abs()
            # Near zero an ulp is far below the masters' atol (1e-6 x max|w|): allow that instead.
            largest = float(ref.w[i].abs().max()) if ref.w[i].numel() else 0.0
            near_zero = (p.detach().cpu().double() - ref.w[i].cpu()).abs() <= 1e-6 * largest
            bad = (ulps > 1) & ~near_zero
            assert not bool(bad.any()), f"{what} param {i}: {int(ulps[bad].max())} ulps off"
        if ref.b[i] is not None:
            assert_close_fp32(state["momentum_buffer"], ref.b[i], f"{what} momentum buffer {i}")
        if isinstance(ref, ReferenceAdamW) and ref.m[i] is not None:
            assert float(state["step"]) == ref.t[i], f"{what} step {i}: {float(state['step'])} != {ref.t[i]}"
            # |u| is about sqrt(v / (1 - beta2)): the size of the terms exp_avg is a sum of
            beta2 = ref.groups[ref.group_of[i]].get("betas", (0.9, 0.999))[1]
            grad_size = float((ref.v[i].abs().max() / (1 - beta2)).sqrt()) if ref.v[i].numel() else 0.0
            assert_close_fp32(state["exp_avg"], ref.m[i], f"{what} exp_avg {i}", scale=grad_size)
            assert_close_fp32(state["exp_avg_sq"], ref.v[i], f"{what} exp_avg_sq {i}")
            if "max_exp_avg_sq" in state:
                assert_close_fp32(state["max_exp_avg_sq"], ref.vmax[i], f"{what} max_exp_avg_sq {i}")


def reference_for(config: Config, params, group_of):
    cls = ReferenceAdamW if config.optimizer == "adamw" else ReferenceSGD
    return cls(params, group_of, config.groups, max_grad_norm=config.max_grad_norm,
                        norm_type=config.norm_type, loss_scale=config.loss_scale,
                        init_scale=config.init_scale, growth_interval=config.growth_interval,
                        hysteresis=config.hysteresis, min_scale=config.min_scale, max_scale=config.max_scale,
                        hysteresis_mode=config.hysteresis_mode, ema_decay=config.ema_decay,
                        ema_warmup=config.ema_warmup)


def run_against_reference(config: Config, backend, device):
    params, opt, group_of = build(config, backend, device)
    ref = reference_for(config, params, group_of)
    for step in range(config.steps):
        scale = float(opt.loss_scale)
        assert scale == ref.scale, f"step {step}: loss scale {scale} != reference {ref.scale}"
        grads = make_grads(config, params, step, scale)
        run_step(opt, params, grads)
        norm, skipped = ref.step(grads)
        assert bool(opt.last_step_skipped) == skipped, f"step {step}: skipped flag"
        assert int(opt.consecutive_skips) == ref.consecutive_skips, f"step {step}: consecutive skips"
        assert int(opt._scaler.hysteresis_tracker) == ref.overflows, f"step {step}: overflows counted"
        if skipped:
            assert not math.isfinite(float(opt.last_grad_norm))
        else:
            torch.testing.assert_close(float(opt.last_grad_norm), norm, rtol=1e-5, atol=1e-12)
        check_against_reference(opt, params, ref, f"step {step}")
    assert float(opt.loss_scale) == ref.scale
    assert int(opt._scaler.growth_tracker) == ref.growth_tracker
    return opt, params


# torch's own optimizer inputs (torch.testing._internal.common_optimizers), as our tests take them
TORCH_ONLY = ("foreach", "fused", "differentiable", "capturable")  # torch's implementation switches


def torch_input_kwargs(optim_input, device):
    """An OptimizerInput's kwargs without torch's implementation switches, a tensor lr on `device`."""
    kwargs = {k: v for k, v in optim_input.kwargs.items() if k not in TORCH_ONLY}
    if isinstance(kwargs.get("lr"), torch.Tensor):
        kwargs["lr"] = kwargs["lr"].to(device)
    return kwargs


def tiny_model(device, dtype, seed=0):
    """The small MLP torch's optimizer inputs are run on."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device=device,
                                                                                               dtype=dtype)

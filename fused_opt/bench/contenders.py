"""What is timed: each contender owns its optimizer state and does, per call, one whole
optimizer step for a model whose grads are already there. Two jobs per model:

- FP16/BF16 params: scale the loss, unscale, inf check, clip, SGD or AdamW update on FP32
  masters, write-back.
- FP32 params (the autocast loop): GradScaler's unscale and inf check, clip, the update, and
  with `+ EMA` a model EMA after it (timm ModelEmaV3's / swa_utils' foreach lerp for torch).

Each contender says which job it does (`job`), and ours are paired with the fastest torch
pipeline of the same job."""
from __future__ import annotations

import torch

import fused_opt
from fused_opt.backends import native_backend

HYPER = {"sgd": dict(lr=0.01, momentum=0.9, weight_decay=1e-4), "adamw": dict(lr=1e-3, weight_decay=1e-2)}
OURS = {"sgd": fused_opt.FusedMixedPrecisionSGD, "adamw": fused_opt.FusedMixedPrecisionAdamW}
TORCH = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
# The least a step moves per param with FP16/BF16 grads and FP32 masters (docs/performance.md):
# one pass over grad, master and state writing the param, plus the grad read again for the
# norm and the inf check. Ours also reads the param back (+2); remainders replace the 8 B of
# a master read and written by 4 B of remainder and 2 B of param read.
BOUND = {"sgd": 22, "adamw": 30}
# FP32 params are their own masters: grad read twice (norm, update), param and state read and
# written: SGD 4 + 4 + 8 + 8, AdamW 4 + 4 + 8 + 16. An EMA reads and writes its own (+8, or +4 in BF16).
BOUND_FP32 = {"sgd": 24, "adamw": 32}
EMA_DECAY = 0.9999
EMA_DECAY_BF16 = 0.99  # a BF16 average needs a = 1 - d large enough to move (docs/semantics.md)
MAX_NORM = 1.0


def job_bytes(optimizer: str, dtype: torch.dtype, ema_dtype=None) -> int:
    """The least bytes per param a job moves (docs/performance.md)."""
    moved = BOUND_FP32[optimizer] if dtype == torch.float32 else BOUND[optimizer]
    return moved + {None: 0, torch.float32: 8, torch.bfloat16: 4}[ema_dtype]


def storage_bytes_per_param(params, tensors) -> float:
    """Bytes per param of the params and the given state tensors, measured from their storages
    (each storage once: flat buffers hold many entries)."""
    storages = {}
    for t in list(params) + list(tensors):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / sum(p.numel() for p in params)


class Model:
    """FP16/BF16 params with persistent grads of realistic size (N(0, 1e-3) x loss scale).
    Each contender steps its own copy of the params (`fresh_params`): one that wrote params
    another also writes would be "a param changed outside the optimizer" to ours. The grads
    are read-only to every contender, so one set is shared."""

    def __init__(self, shapes, dtype, device, scale=2.0**16, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.values = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
        self.grads = [(torch.randn(s, device=device, generator=gen) * 1e-3 * scale).to(dtype) for s in shapes]
        self.loss = torch.zeros((), device=device)
        self.scale = scale

    def unscaled_grads(self) -> list:
        """The grads divided by the loss scale, for contenders with no loss scale of their own
        (made once, then shared read-only like the scaled ones)."""
        if getattr(self, "_unscaled", None) is None:
            self._unscaled = [(g.float() / self.scale).to(g.dtype) for g in self.grads]
        return self._unscaled

    def fresh_params(self) -> list:
        params = [torch.nn.Parameter(v.clone()) for v in self.values]
        for p, g in zip(params, self.grads):
            p.grad = g
        return params


# Bytes per param a compressed format saves against the FP32 bound (docs/performance.md). Masters:
# "remainder" reads and writes 2 B instead of 4 and reads the param (2): -2; "remainder8" 1 B: -4.
# State, per buffer read and written: BF16 -4; int8 -6 for momentum and exp_avg (1 B codes),
# -4 for exp_avg_sq (2 B codes), each + 2 x 4 / 32 for its block scales.
MASTER_SAVING = {"fp32": 0, "remainder": 2, "remainder8": 4}
STATE_SAVING = {"sgd": {"fp32": 0.0, "bf16": 4.0, "int8": 6.0 - 8.0 / 32},
                "adamw": {"fp32": 0.0, "bf16": 8.0, "int8": (6.0 - 8.0 / 32) + (4.0 - 8.0 / 32)}}


def _mode_label(master_weights: str, state_precision: str) -> str:
    return ((f" {master_weights}" if master_weights != "fp32" else "")
            + (f" {state_precision} state" if state_precision != "fp32" else ""))


class Ours:
    def __init__(self, model: Model, backend: str, optimizer: str, flat_grads: bool = False,
                 master_weights: str = "fp32", ema_dtype=None, state_precision: str = "fp32"):
        self.name = f"fused_opt[{backend}]" + (" flat_grads" if flat_grads else "") + _mode_label(
            master_weights, state_precision) + _ema_label(ema_dtype)
        self.job = "step + EMA" if ema_dtype is not None else "step"
        self.model = model
        # The bound with FP32 masters and state (docs/performance.md), less what the formats save
        self.bytes_per_param = (job_bytes(optimizer, model.values[0].dtype, ema_dtype) - MASTER_SAVING[master_weights]
                                - STATE_SAVING[optimizer][state_precision])
        # The shared grads are scaled by 2^16 (Model): the dynamic scale, for FP16 and BF16 alike.
        # With flat_grads the first step copies them into the optimizer's buffers, once.
        ema = {} if ema_dtype is None else dict(ema_dtype=ema_dtype, ema_decay=EMA_DECAY_BF16 if ema_dtype ==
                                                torch.bfloat16 else EMA_DECAY)
        self.opt = OURS[optimizer](model.fresh_params(), max_grad_norm=MAX_NORM, backend=backend,
                                   loss_scale="dynamic", flat_grads=flat_grads, master_weights=master_weights,
                                   state_precision=state_precision, **ema, **HYPER[optimizer])
        # On the CPU the kernels run on the host: the time outside them is the host time.
        self.kernel_clock = [0.0] if backend == "native" and model.loss.device.type == "cpu" else None

    def step(self):
        native_backend.kernel_clock = self.kernel_clock
        self.opt.scale_loss(self.model.loss)
        self.opt.step()
        native_backend.kernel_clock = None

    def memory_per_param(self) -> float:
        """Bytes per param of the params and every tensor in the optimizer's state (the EMA included)."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        return storage_bytes_per_param(params, [t for s in self.opt.state.values() for t in s.values()
                                                if isinstance(t, torch.Tensor)])


def _ema_label(ema_dtype) -> str:
    return {None: "", torch.float32: " + EMA", torch.bfloat16: " + EMA(bf16)"}[ema_dtype]


class OursUnderGradScaler:
    """Ours with loss_scale=None, driven by torch.amp.GradScaler as an existing loop would:
    GradScaler runs its own inf-check pass over the grads before handing over the scale."""

    def __init__(self, model: Model, backend: str, optimizer: str):
        self.name = f"fused_opt[{backend}] driven by GradScaler"
        self.job = "step"
        self.model = model
        self.opt = OURS[optimizer](model.fresh_params(), max_grad_norm=MAX_NORM, backend=backend, loss_scale=None,
                                   **HYPER[optimizer])
        self.scaler = torch.amp.GradScaler(model.loss.device.type, init_scale=2.0**16)

    def step(self):
        self.scaler.scale(self.model.loss)
        self.scaler.step(self.opt)
        self.scaler.update()


class TorchPipeline:
    """The baseline, the job done with torch.optim: FP32 masters, grads copied in,
    unscaled and inf-checked by torch's AMP kernel, clip_grad_norm_(foreach=True),
    torch.optim.SGD or AdamW, masters copied back, GradScaler's scale update. The skip works
    as GradScaler does it: fused=True takes found_inf on the device, the others read it on
    the host (GradScaler's .item()). Also the baseline of examples/train_digits.py."""

    def __init__(self, params, mode: str, compiled: bool = False, max_norm: float = MAX_NORM,
                 init_scale: float = 2.0**16, growth_interval: int = 2000, optimizer: str = "sgd", **hyper):
        self.name = f"torch.optim.{TORCH[optimizer].__name__}({mode})" + (" compiled" if compiled else "")
        self.params = list(params)
        self.max_norm = max_norm
        self.masters = [p.detach().float() for p in self.params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        kwargs = {"foreach": False} if mode == "for-loop" else {mode: True}
        self.sgd = TORCH[optimizer](self.masters, **{**HYPER[optimizer], **hyper}, **kwargs)
        self.fused = mode == "fused"
        device = self.params[0].device
        self.scale = torch.full((), init_scale, device=device)
        self.growth_interval = growth_interval
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), device=device)
        self._unscale_clip = torch.compile(self._unscale_clip_eager) if compiled else self._unscale_clip_eager

    def scale_loss(self, loss):
        return loss * self.scale

    def _unscale_clip_eager(self):
        grads = [m.grad for m in self.masters]
        torch._foreach_copy_(grads, [p.grad for p in self.params])
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.scale.reciprocal())
        torch.nn.utils.clip_grad_norm_(self.masters, self.max_norm, foreach=True)

    def step(self):
        self._unscale_clip()
        if self.fused:
            self.sgd.found_inf = self.found_inf
            self.sgd.step()
        elif not self.found_inf.item():
            self.sgd.step()
        torch._foreach_copy_([p.data for p in self.params], self.masters)
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, 2.0, 0.5, self.growth_interval)


class Baseline:
    """A torch pipeline as a benchmark contender: its own params, the model's shared grads."""

    def __init__(self, model: Model, mode: str, optimizer: str, compiled: bool = False):
        self.model = model
        self.pipeline = TorchPipeline(model.fresh_params(), mode, compiled, optimizer=optimizer)
        self.name = self.pipeline.name
        self.job = "step"

    def step(self):
        self.pipeline.scale_loss(self.model.loss)
        self.pipeline.step()


class TorchFP32:
    """The loop SGD and AdamW users run on FP32 weights under autocast (timm, Ultralytics,
    torchvision recipes): GradScaler.unscale_ (its inf check), clip_grad_norm_(foreach),
    GradScaler.step of torch.optim.SGD/AdamW (foreach or fused), update, and with an EMA
    timm ModelEmaV3's update, `torch._foreach_lerp_(ema, params, 1 - decay)` (two kernels
    per tensor on the CPU, one multi-tensor launch on CUDA).
    The grads are reused every call and GradScaler unscales (and clipping scales) them in
    place, so scale 1 and an unreachable max norm keep them from decaying into denormals:
    the kernels and the bytes they move are the same."""

    def __init__(self, model: Model, optimizer: str, mode: str, ema: bool):
        self.name = f"GradScaler + clip + {TORCH[optimizer].__name__}({mode})" + (" + EMA" if ema else "")
        self.job = "step + EMA" if ema else "step"
        self.params = [torch.nn.Parameter(v.to(torch.float32, copy=True)) for v in model.values]
        for p, g in zip(self.params, model.grads):
            p.grad = g.float()
        device = self.params[0].device
        self.opt = TORCH[optimizer](self.params, **{mode: True}, **HYPER[optimizer])
        self.scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
        self.loss = torch.zeros((), device=device)
        self.ema = [p.detach().clone() for p in self.params] if ema else None

    def step(self):
        self.scaler.scale(self.loss)
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, 1e30, foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - EMA_DECAY)

    def memory_per_param(self) -> float:
        state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
        return storage_bytes_per_param(self.params, state + (self.ema or []))


class GradScalerFP32(TorchFP32):
    """What a user does without master weights (torch AMP: FP32 params under autocast):
    GradScaler and the fused SGD or AdamW. Its job is smaller (no FP16 copy, no masters) but
    its params are FP32 (4 B, not 2)."""

    def __init__(self, model: Model, optimizer: str):
        super().__init__(model, optimizer, "fused", ema=False)
        self.name = f"GradScaler + {TORCH[optimizer].__name__}(fused) on FP32 params"
        self.job = "FP32 params"  # another job (no masters, FP32 params): never a pairing baseline


# The default run's contenders (the main job, a few minutes): torch's foreach and fused
# pipelines (and GradScaler's), and ours in the modes a user picks first; --full times all.
REPRESENTATIVE_MODES = ("", " flat_grads", " remainder", " remainder8 int8 state", " + EMA", " flat_grads + EMA")


def representative(contenders: dict) -> dict:
    def kept(name: str) -> bool:
        if not name.startswith("fused_opt["):
            return "compiled" not in name and "for-loop" not in name
        backend, _, mode = name[len("fused_opt["):].partition("]")
        return backend != "torch" and mode in REPRESENTATIVE_MODES
    return {name: build for name, build in contenders.items() if kept(name)}


def fp32_factories(model: Model, device: torch.device, optimizer: str) -> tuple[dict, dict]:
    """(torch pipelines, ours) for FP32 params: each job without and with an EMA."""
    baselines = {}
    for ema in (False, True):
        for mode in ("foreach", "fused"):
            contender = lambda mode=mode, ema=ema: TorchFP32(model, optimizer, mode, ema)
            baselines[f"GradScaler + clip + {TORCH[optimizer].__name__}({mode})" + (" + EMA" if ema else "")] = contender
    available = [name for name, reason in fused_opt.backend_availability(device).items()
                 if reason is None and name != "torch" and not (name == "triton" and device.type == "cpu")]
    ours = {}
    for ema_dtype in (None, torch.float32, torch.bfloat16):
        for name in available:
            for flat in (False, True):
                label = f"fused_opt[{name}]" + (" flat_grads" if flat else "") + _ema_label(ema_dtype)
                ours[label] = lambda name=name, flat=flat, e=ema_dtype: Ours(model, name, optimizer, flat_grads=flat,
                                                                            ema_dtype=e)
    return baselines, ours


def factories(model: Model, device: torch.device, include_compiled: bool, optimizer: str = "sgd") -> tuple[dict, dict]:
    """(torch pipelines, ours): name -> a function that builds that contender. Contenders are
    built one at a time and freed after timing, so a run holds at most two contenders' params
    and state at once (the best torch pipeline and one of ours)."""
    if model.values[0].dtype == torch.float32:
        return fp32_factories(model, device, optimizer)
    # Triton on CPU tensors is its interpreter: a test tool, not a contender. The torch oracle
    # loops over tensors in Python, so past 1,000 tensors it would dominate the run: left out.
    many = len(model.values) > 1000
    available = [name for name, reason in fused_opt.backend_availability(device).items()
                 if reason is None and not (name == "triton" and device.type == "cpu") and not (name == "torch" and many)]
    ours = {}
    for name in available:
        ours[f"fused_opt[{name}]"] = lambda name=name: Ours(model, name, optimizer)
    for name in available:
        if name != "torch":
            ours[f"fused_opt[{name}] flat_grads"] = lambda name=name: Ours(model, name, optimizer, flat_grads=True)
    if model.values[0].dtype == torch.bfloat16:  # BF16 params with int16 master remainders
        for flat in (False, True):
            for name in available:
                if name != "torch":
                    label = f"fused_opt[{name}]" + (" flat_grads" if flat else "") + " remainder"
                    ours[label] = lambda name=name, flat=flat: Ours(model, name, optimizer, flat_grads=flat,
                                                                   master_weights="remainder")
    if model.values[0].dtype == torch.bfloat16:  # compressed state and 24-bit masters (state_precision.py)
        for master, state in (("fp32", "bf16"), ("fp32", "int8"), ("remainder8", "fp32"), ("remainder8", "int8")):
            for name in available:
                if name != "torch":
                    label = f"fused_opt[{name}]" + _mode_label(master, state)
                    ours[label] = lambda name=name, master=master, state=state: Ours(
                        model, name, optimizer, master_weights=master, state_precision=state)
    # GradScaler's CUDA inf check has no BF16 kernel: it can drive FP16 models only.
    if device.type == "cuda" and model.values[0].dtype == torch.float16:
        for name in available:
            if name != "torch":
                ours[f"fused_opt[{name}] driven by GradScaler"] = lambda name=name: OursUnderGradScaler(model, name,
                                                                                                       optimizer)
    torch_name = TORCH[optimizer].__name__
    baselines = {f"torch.optim.{torch_name}({mode})": (lambda mode=mode: Baseline(model, mode, optimizer))
                 for mode in ("for-loop", "foreach", "fused")}
    if include_compiled:
        baselines[f"torch.optim.{torch_name}(fused) compiled"] = lambda: Baseline(model, "fused", optimizer, compiled=True)
    baselines[f"GradScaler + {torch_name}(fused) on FP32 params"] = lambda: GradScalerFP32(model, optimizer)
    return baselines, ours

"""The loss scale, kept on the device so that no step ever waits on the GPU.

Three modes: "dynamic", a static positive number, or None (S = 1, no scaling). The scale and
its counters are 0-dim device tensors updated in place, so they stay valid across CUDA-graph
replays.

The dynamic rule, as every backend's finalize applies it (Megatron-core's DynamicGradScaler):
a step with inf/NaN is always skipped and restarts the count of clean steps; it also spends
one unit of a budget of `hysteresis` (H) overflows, and once the budget is spent, it and
every later overflow multiply the scale by `backoff_factor` (never below `min_scale`, nor
below 2^-126, whose reciprocal is the last finite one), until the scale grows again. On the
`growth_interval`-th clean step in a row the scale is multiplied by `growth_factor` (if the
product is finite; never above `max_scale`) and the budget is refilled.
`hysteresis_mode="consecutive"` is DeepSpeed's `consecutive_hysteresis=True`: every clean
step refills the budget, so only H overflows in a row back off. H = 1 is
torch.amp.GradScaler.update exactly, in either mode.
"""
from __future__ import annotations

import math

import torch

# The smallest scale: its reciprocal, the unscale factor, is 2^126; below 2^-126 it soon
# overflows FP32, and every step would then unscale to inf and be skipped.
MIN_SCALE = 2.0**-126
HYSTERESIS_MODES = ("megatron", "consecutive")


class LossScaler:
    def __init__(self, mode, init_scale: float, growth_factor: float, backoff_factor: float,
                 growth_interval: int, device: torch.device, hysteresis: int = 1, min_scale=None,
                 max_scale=None, hysteresis_mode: str = "megatron"):
        self.init_scale = float(init_scale)
        self.dynamic = mode == "dynamic"
        self.consecutive = hysteresis_mode == "consecutive"
        self.enabled = mode is not None
        start = init_scale if self.dynamic else (float(mode) if self.enabled else 1.0)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.min_scale = max(MIN_SCALE, 0.0 if min_scale is None else float(min_scale))
        self.max_scale = math.inf if max_scale is None else float(max_scale)
        self.scale = torch.full((), start, dtype=torch.float32, device=device)
        # int32 like GradScaler's _growth_tracker, so the trajectories can be compared exactly.
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        # Overflowing steps since the last growth (consecutive mode: in a row), at most H.
        self.hysteresis_tracker = torch.zeros((), dtype=torch.int32, device=device)
        # Host flags: scale_loss() was called since the last step (the drop-in check), and a
        # step has used the last scale_loss() (so a missing one is a second step, not a forgotten call).
        self.loss_scaled = False
        self.scale_used = False

    def turn_on_dynamic(self) -> None:
        """From no scale to the dynamic scale at init_scale (loss_scale="auto" deciding again)."""
        self.enabled = self.dynamic = True
        self.scale.fill_(self.init_scale)
        self.growth_tracker.zero_()
        self.hysteresis_tracker.zero_()
        self.loss_scaled = False

    @property
    def counters(self) -> list:
        """The tensors a step's finalize writes: restored when a step is interrupted."""
        return [self.scale, self.growth_tracker, self.hysteresis_tracker]

    def update_(self, found_inf: torch.Tensor) -> None:
        """The rule of the module docstring, with torch.where so it never syncs (the torch
        backend's finalize; the kernels' is csrc/chunks.h update_scale). Counters loaded
        from elsewhere are clamped into range first, as the kernels do."""
        if not self.dynamic:
            return
        tracker = torch.clamp(self.growth_tracker, 0, self.growth_interval - 1)
        overflows = torch.clamp(self.hysteresis_tracker, 0, self.hysteresis)
        clean_steps = torch.where(found_inf, torch.zeros_like(tracker), tracker + 1)
        grow = clean_steps == self.growth_interval
        overflows = torch.where(found_inf & (overflows < self.hysteresis), overflows + 1, overflows)
        refill = ~found_inf if self.consecutive else grow
        overflows = torch.where(refill, torch.zeros_like(overflows), overflows)
        back_off = found_inf & (overflows >= self.hysteresis)
        grown = self.scale * self.growth_factor
        new_scale = torch.where(back_off, torch.clamp(self.scale * self.backoff_factor, min=self.min_scale),
                                torch.where(grow & torch.isfinite(grown), torch.clamp(grown, max=self.max_scale),
                                            self.scale))
        self.scale.copy_(new_scale)
        self.growth_tracker.copy_(torch.where(grow, torch.zeros_like(clean_steps), clean_steps))
        self.hysteresis_tracker.copy_(overflows)

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone(),
                "hysteresis_tracker": self.hysteresis_tracker.clone(),
                "dynamic": self.dynamic, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        if bool(state["enabled"]) != self.enabled or bool(state["dynamic"]) != self.dynamic:
            raise ValueError("loss scaler state dict: saved with a different loss_scale mode "
                             f"(enabled={state['enabled']}, dynamic={state['dynamic']})")
        self.scale.copy_(state["scale"])
        # Counters saved under other settings (a larger growth_interval or hysteresis) are
        # bounded by this scaler's: at most one step from growing, at most H overflows.
        # State dicts saved before hysteresis existed: no overflow counted yet.
        self.growth_tracker.copy_(torch.as_tensor(state["growth_tracker"]).clamp(0, self.growth_interval - 1))
        self.hysteresis_tracker.copy_(torch.as_tensor(state.get("hysteresis_tracker", 0)).clamp(0, self.hysteresis))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _usable_scale(value) -> bool:
    """A scale the kernels can divide by: finite in FP32, and at least MIN_SCALE."""
    return _is_number(value) and math.isfinite(value) and value > 0 and (
        MIN_SCALE <= float(torch.tensor(float(value), dtype=torch.float32)) < math.inf)


def check_scale_bounds(init_scale, hysteresis, min_scale, max_scale, hysteresis_mode="megatron") -> None:
    if not (isinstance(hysteresis, int) and not isinstance(hysteresis, bool) and 0 < hysteresis < 2**31):
        raise ValueError(f"hysteresis must be a positive int32 (1 = back off on every overflow), got {hysteresis!r}")
    if hysteresis_mode not in HYSTERESIS_MODES:
        raise ValueError(f'hysteresis_mode must be "megatron" (Megatron-core\'s rule: the budget is refilled when '
                         f'the scale grows) or "consecutive" (DeepSpeed\'s consecutive_hysteresis: refilled on every '
                         f'clean step), got {hysteresis_mode!r}')
    for name, value in (("min_scale", min_scale), ("max_scale", max_scale)):
        if value is not None and not _usable_scale(value):
            raise ValueError(f"{name} must be None or a finite number in [2**-126, FP32 max] (the step divides by "
                             f"the scale in FP32), got {value!r}")
    low = 0.0 if min_scale is None else min_scale
    high = math.inf if max_scale is None else max_scale
    if low > high:
        raise ValueError(f"min_scale {min_scale!r} is above max_scale {max_scale!r}")
    if not low <= init_scale <= high:
        raise ValueError(f"init_scale {init_scale!r} is outside [min_scale, max_scale] = [{low}, {high}]")


def check_scaler_args(loss_scale, init_scale, growth_factor, backoff_factor, growth_interval) -> None:
    """Refused at construction, as torch.amp.GradScaler refuses them: scales the step cannot
    divide by in FP32 (not finite, not positive, or so small that 1/S overflows), a
    growth_factor that does not grow, a backoff_factor that does not shrink."""
    if loss_scale is not None and loss_scale != "dynamic":
        if isinstance(loss_scale, str) or not _is_number(loss_scale):
            raise ValueError(f'loss_scale must be "dynamic", a positive number or None, got {loss_scale!r}')
        if not _usable_scale(loss_scale):
            raise ValueError(f"loss_scale must be a finite number in [2**-126, FP32 max] (the step divides by it "
                             f"in FP32; 1/S must be finite), got {loss_scale!r}")
    if not _usable_scale(init_scale):
        raise ValueError(f"init_scale must be a finite number in [2**-126, FP32 max] (the step divides by it in "
                         f"FP32; 1/S must be finite), got {init_scale!r}")
    if not (_is_number(growth_factor) and 1.0 < growth_factor and math.isfinite(growth_factor)):
        raise ValueError(f"growth_factor must be a finite number > 1 (as torch.amp.GradScaler), got {growth_factor!r}")
    if not (_is_number(backoff_factor) and 0.0 < backoff_factor < 1.0):
        raise ValueError(f"backoff_factor must be in (0, 1) (as torch.amp.GradScaler), got {backoff_factor!r}")
    # The clean-step counter is int32 on the device (as GradScaler's), compared in the kernels.
    if not (isinstance(growth_interval, int) and not isinstance(growth_interval, bool) and 0 < growth_interval < 2**31):
        raise ValueError(f"growth_interval must be a positive int32 (< 2**31), got {growth_interval!r}")

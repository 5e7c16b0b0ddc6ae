"""The loss scale, kept on the device so that no step ever waits on the GPU.

Three modes, as SPEC §2: "dynamic" (torch.amp.GradScaler's rule), a static positive number,
or None (S = 1, no scaling). The scale and its counters are 0-dim device tensors updated in
place, so they stay valid across CUDA-graph replays.

The dynamic rule, as every backend's finalize applies it: a step with inf/NaN is always
skipped; the scale is multiplied by `backoff_factor` once `hysteresis` overflowing steps
happened since the last backoff or growth (1: every one, GradScaler's rule; Megatron and
DeepSpeed count since the last growth only), never below `min_scale`; after
`growth_interval` clean steps in a row it is multiplied by `growth_factor` (if the product
is finite), never above `max_scale`.
"""
from __future__ import annotations

import math

import torch


class LossScaler:
    def __init__(self, mode, init_scale: float, growth_factor: float, backoff_factor: float,
                 growth_interval: int, device: torch.device, hysteresis: int = 1, min_scale=None,
                 max_scale=None):
        self.dynamic = mode == "dynamic"
        self.enabled = mode is not None
        start = init_scale if self.dynamic else (float(mode) if self.enabled else 1.0)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.min_scale = 0.0 if min_scale is None else float(min_scale)
        self.max_scale = math.inf if max_scale is None else float(max_scale)
        self.scale = torch.full((), start, dtype=torch.float32, device=device)
        # int32 like GradScaler's _growth_tracker, so the trajectories can be compared exactly.
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        # Overflowing steps since the last backoff or growth.
        self.hysteresis_tracker = torch.zeros((), dtype=torch.int32, device=device)
        # Host flag: scale_loss() was called since the last step (the drop-in check).
        self.loss_scaled = False

    @property
    def counters(self) -> list:
        """The tensors a step's finalize writes: restored when a step is interrupted."""
        return [self.scale, self.growth_tracker, self.hysteresis_tracker]

    def update_(self, found_inf: torch.Tensor) -> None:
        """The rule of the module docstring, with torch.where so it never syncs (the torch
        backend's finalize; the kernels' is csrc/chunks.h update_scale)."""
        if not self.dynamic:
            return
        clean_steps = torch.where(found_inf, torch.zeros_like(self.growth_tracker), self.growth_tracker + 1)
        grow = clean_steps == self.growth_interval
        overflows = self.hysteresis_tracker + found_inf.to(torch.int32)
        back_off = found_inf & (overflows >= self.hysteresis)
        grown = self.scale * self.growth_factor
        new_scale = torch.where(back_off, torch.clamp(self.scale * self.backoff_factor, min=self.min_scale),
                                torch.where(grow & torch.isfinite(grown), torch.clamp(grown, max=self.max_scale),
                                            self.scale))
        self.scale.copy_(new_scale)
        self.growth_tracker.copy_(torch.where(grow, torch.zeros_like(clean_steps), clean_steps))
        self.hysteresis_tracker.copy_(torch.where(back_off | grow, torch.zeros_like(overflows), overflows))

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone(),
                "hysteresis_tracker": self.hysteresis_tracker.clone(),
                "dynamic": self.dynamic, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        if bool(state["enabled"]) != self.enabled or bool(state["dynamic"]) != self.dynamic:
            raise ValueError("loss scaler state dict: saved with a different loss_scale mode "
                             f"(enabled={state['enabled']}, dynamic={state['dynamic']})")
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
        # State dicts saved before hysteresis existed: no overflow counted yet.
        self.hysteresis_tracker.copy_(state.get("hysteresis_tracker", 0))


def check_scale_bounds(init_scale, hysteresis, min_scale, max_scale) -> None:
    if not (isinstance(hysteresis, int) and not isinstance(hysteresis, bool) and 0 < hysteresis < 2**31):
        raise ValueError(f"hysteresis must be a positive int32 (1 = back off on every overflow), got {hysteresis!r}")
    for name, value in (("min_scale", min_scale), ("max_scale", max_scale)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be None or a positive finite number, got {value!r}")
    low = 0.0 if min_scale is None else min_scale
    high = math.inf if max_scale is None else max_scale
    if low > high:
        raise ValueError(f"min_scale {min_scale!r} is above max_scale {max_scale!r}")
    if not low <= init_scale <= high:
        raise ValueError(f"init_scale {init_scale!r} is outside [min_scale, max_scale] = [{low}, {high}]")


def check_scaler_args(loss_scale, init_scale, growth_factor, backoff_factor, growth_interval) -> None:
    """SPEC §4: a non-positive scale or factor is refused at construction."""
    if loss_scale is not None and loss_scale != "dynamic":
        if isinstance(loss_scale, str) or not isinstance(loss_scale, (int, float)) or isinstance(loss_scale, bool):
            raise ValueError(f'loss_scale must be "dynamic", a positive number or None, got {loss_scale!r}')
        if not (loss_scale > 0 and math.isfinite(loss_scale)):
            raise ValueError(f"loss_scale must be a positive finite number, got {loss_scale!r}")
    for name, value in (("init_scale", init_scale), ("growth_factor", growth_factor),
                        ("backoff_factor", backoff_factor)):
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    for name, value in (("init_scale", init_scale), ("growth_factor", growth_factor),
                        ("backoff_factor", backoff_factor)):
        if not math.isfinite(float(torch.tensor(float(value), dtype=torch.float32))):
            raise ValueError(f"{name} {value!r} overflows FP32, in which the scale is kept")
    if loss_scale not in (None, "dynamic") and not math.isfinite(float(torch.tensor(float(loss_scale), dtype=torch.float32))):
        raise ValueError(f"loss_scale {loss_scale!r} overflows FP32, in which the scale is kept")
    # The clean-step counter is int32 on the device (as GradScaler's), compared in the kernels.
    if not (isinstance(growth_interval, int) and not isinstance(growth_interval, bool) and 0 < growth_interval < 2**31):
        raise ValueError(f"growth_interval must be a positive int32 (< 2**31), got {growth_interval!r}")

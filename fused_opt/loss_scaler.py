"""The loss scale, kept on the device so that no step ever waits on the GPU.

Three modes, as SPEC §2: "dynamic" (torch.amp.GradScaler's rule), a static positive number,
or None (S = 1, no scaling). The scale and the clean-step counter are 0-dim device tensors
updated in place, so they stay valid across CUDA-graph replays.
"""
from __future__ import annotations

import math

import torch


class LossScaler:
    def __init__(self, mode, init_scale: float, growth_factor: float, backoff_factor: float,
                 growth_interval: int, device: torch.device):
        self.dynamic = mode == "dynamic"
        self.enabled = mode is not None
        start = init_scale if self.dynamic else (float(mode) if self.enabled else 1.0)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.scale = torch.full((), start, dtype=torch.float32, device=device)
        # int32 like GradScaler's _growth_tracker, so the trajectories can be compared exactly.
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        # Host flag: scale_loss() was called since the last step (the drop-in check).
        self.loss_scaled = False

    def update_(self, found_inf: torch.Tensor) -> None:
        """GradScaler.update's rule, written with torch.where so it never syncs."""
        if not self.dynamic:
            return
        clean_steps = torch.where(found_inf, torch.zeros_like(self.growth_tracker), self.growth_tracker + 1)
        grow = clean_steps == self.growth_interval
        grown = self.scale * self.growth_factor
        new_scale = torch.where(found_inf, self.scale * self.backoff_factor,
                                torch.where(grow & torch.isfinite(grown), grown, self.scale))
        self.scale.copy_(new_scale)
        self.growth_tracker.copy_(torch.where(grow, torch.zeros_like(clean_steps), clean_steps))

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone(),
                "dynamic": self.dynamic, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        if bool(state["enabled"]) != self.enabled or bool(state["dynamic"]) != self.dynamic:
            raise ValueError("loss scaler state dict: saved with a different loss_scale mode "
                             f"(enabled={state['enabled']}, dynamic={state['dynamic']})")
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


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

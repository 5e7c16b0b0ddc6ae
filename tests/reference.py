"""An independent float64 reference of one step (docs/semantics.md), written with plain loops.

It imports nothing from fused_opt, so a shared mistake cannot hide in both. It keeps its
own float64 masters, momentum buffers and loss scale on the host.
"""
from __future__ import annotations

import math

import torch


class ReferenceSGD:
    def __init__(self, params, group_of, groups, *, max_grad_norm=None, norm_type=2.0,
                 loss_scale="dynamic", init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, hysteresis=1, min_scale=None, max_scale=None, hysteresis_mode="megatron",
                 ema_decay=None, ema_warmup=None):
        self.w = [p.detach().double().clone() for p in params]
        # The model EMA: from the weights at construction, toward w after each applied update,
        # e + (1 - d_t)(w - e), d_t = d (1 - exp(-t / tau)) with a warm-up (t: applied steps).
        self.ema_decay, self.ema_warmup, self.applied = ema_decay, ema_warmup, 0
        self.e = [w.clone() for w in self.w] if ema_decay is not None else None
        self.b = [None] * len(params)
        self.group_of = list(group_of)
        self.groups = [dict(g) for g in groups]
        self.max_grad_norm = max_grad_norm
        self.norm_type = norm_type
        self.dynamic = loss_scale == "dynamic"
        self.scale = init_scale if self.dynamic else (1.0 if loss_scale is None else float(loss_scale))
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0
        self.hysteresis, self.min_scale, self.max_scale = hysteresis, min_scale, max_scale
        self.consecutive = hysteresis_mode == "consecutive"
        self.budget = hysteresis    # Megatron's _hysteresis_tracker: overflows left before backing off
        self.consecutive_skips = 0

    def step(self, grads):
        """grads: one tensor (as stored, any dtype) or None per param. Returns (norm, skipped)."""
        live = [i for i, g in enumerate(grads) if g is not None]
        if not live:
            return 0.0, False
        u = {i: grads[i].double() * (1.0 / self.scale) for i in live}
        found_inf = any(not bool(torch.isfinite(u[i]).all()) for i in live)
        if self.norm_type == math.inf:
            norm = max((float(u[i].abs().max()) if u[i].numel() else 0.0) for i in live)
        else:
            norm = math.sqrt(sum(float((u[i] * u[i]).sum()) for i in live))
        if found_inf:
            norm = math.inf if not any(bool(torch.isnan(u[i]).any()) for i in live) else math.nan
        clip = 1.0 if self.max_grad_norm is None else min(1.0, self.max_grad_norm / (norm + 1e-6))
        if not found_inf:
            self.applied += 1
            for i in live:
                self.update(i, u[i] * clip, self.groups[self.group_of[i]])
                if self.e is not None:
                    self.e[i] = self.e[i] + self.ema_weight() * (self.w[i] - self.e[i])
        self.consecutive_skips = self.consecutive_skips + 1 if found_inf else 0
        self._update_scale(found_inf)
        return norm, found_inf

    def update(self, i, d, h):
        """torch.optim.SGD's update of param i by its unscaled, clipped grad d."""
        if h["maximize"]:
            d = -d
        d = d + h["weight_decay"] * self.w[i]
        if h["momentum"] != 0:
            if self.b[i] is None:
                self.b[i] = d.clone()
            else:
                self.b[i] = h["momentum"] * self.b[i] + (1 - h["dampening"]) * d
            d = d + h["momentum"] * self.b[i] if h["nesterov"] else self.b[i]
        self.w[i] = self.w[i] - float(h["lr"]) * d

    def ema_weight(self) -> float:
        d = self.ema_decay
        if self.ema_warmup is not None:
            d = d * (1 - math.exp(-self.applied / self.ema_warmup))
        return 1 - d

    @property
    def overflows(self) -> int:
        """The budget spent, as the optimizer keeps it (hysteresis_tracker, at most H)."""
        return self.hysteresis - max(self.budget, 0)

    def _update_scale(self, found_inf):
        """Megatron-core's DynamicGradScaler.update, transcribed (hysteresis budget refilled on
        growth), with the optional [min_scale, max_scale] bounds, growth only to a finite
        scale, and 2^-126 as the lowest scale; consecutive: DeepSpeed's consecutive_hysteresis
        (refilled on every clean step)."""
        if not self.dynamic:
            return
        if found_inf:
            self.growth_tracker = 0
            self.budget -= 1
            if self.budget <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale or 0.0, 2.0**-126)
            return
        if self.consecutive:
            self.budget = self.hysteresis
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.growth_tracker = 0
            self.budget = self.hysteresis
            if math.isfinite(self.scale * self.growth_factor):
                self.scale *= self.growth_factor
                if self.max_scale is not None:
                    self.scale = min(self.scale, self.max_scale)


class ReferenceAdamW(ReferenceSGD):
    """The same pipeline with torch.optim.AdamW's update: t counts the param's applied steps
    (skipped steps and steps without a grad do not count)."""

    def __init__(self, params, group_of, groups, **kwargs):
        super().__init__(params, group_of, groups, **kwargs)
        self.m = [None] * len(params)
        self.v = [None] * len(params)
        self.vmax = [None] * len(params)
        self.t = [0] * len(params)

    def update(self, i, u, h):
        if h["maximize"]:
            u = -u
        beta1, beta2 = h["betas"]
        lr = float(h["lr"])
        if self.m[i] is None:
            self.m[i], self.v[i], self.vmax[i] = (torch.zeros_like(u) for _ in range(3))
        self.t[i] += 1
        t = self.t[i]
        self.w[i] = self.w[i] * (1 - lr * h["weight_decay"])
        self.m[i] = beta1 * self.m[i] + (1 - beta1) * u
        self.v[i] = beta2 * self.v[i] + (1 - beta2) * u * u
        second = self.v[i]
        if h["amsgrad"]:
            self.vmax[i] = torch.maximum(self.vmax[i], self.v[i])
            second = self.vmax[i]
        denom = second.sqrt() / math.sqrt(1 - beta2**t) + h["eps"]
        self.w[i] = self.w[i] - lr / (1 - beta1**t) * self.m[i] / denom

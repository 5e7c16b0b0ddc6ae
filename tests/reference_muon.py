"""Float64 transcriptions of torch.optim.Muon's and Ultralytics' MuSGD's updates, inside the same
reference pipeline as SGD and AdamW (reference.py: loss scale, skip, clip, EMA). Newton–Schulz
runs in float64 here (the optimizers run it in BF16, as their references do): tests compare
with a tolerance for that, and compare torch.optim.Muon itself on FP32 params exactly.

Like reference.py, it imports nothing from fused_opt.
"""
from __future__ import annotations

import math

import torch

from reference import ReferenceAdamW

COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz64(g: torch.Tensor, coefficients=COEFFICIENTS, steps=5, eps=1e-7, add_eps=False) -> torch.Tensor:
    """torch's _zeropower_via_newtonschulz (norm clamped at eps) or Ultralytics' (norm + eps), in float64."""
    a, b, c = coefficients
    x = g.reshape(g.shape[0], -1).double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = x.norm()
    x = x / (norm + eps if add_eps else max(norm, eps))
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).reshape(g.shape)


class ReferenceMuon(ReferenceAdamW):
    """torch.optim.Muon per param (groups with algorithm="adamw": AdamW), float64."""

    def update(self, i, u, h):
        if h.get("algorithm", "muon") == "adamw":
            return super().update(i, u, h)
        mu, lr = h["momentum"], float(h["lr"])
        if self.b[i] is None:
            self.b[i] = torch.zeros_like(u)
        self.b[i] = self.b[i] + (1 - mu) * (u - self.b[i])
        update = u + mu * (self.b[i] - u) if h["nesterov"] else self.b[i]
        o = newton_schulz64(update, h["ns_coefficients"], h["ns_steps"], h["eps"])
        rows, cols = u.shape[0], u[0].numel()
        fn = h["adjust_lr_fn"]
        ratio = math.sqrt(max(1, rows / cols)) if fn in (None, "original") else 0.2 * math.sqrt(max(rows, cols))
        self.w[i] = self.w[i] * (1 - lr * h["weight_decay"]) - lr * ratio * o


class ReferenceMuSGD(ReferenceAdamW):
    """Ultralytics' MuSGD per param, float64: use_muon groups a Muon step at lr * muon then an
    SGD step at lr * sgd (weight decay on the updated weight); other groups SGD at lr."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.b_sgd = [None] * len(self.w)

    def update(self, i, u, h):
        mu, lr, wd = h["momentum"], float(h["lr"]), h["weight_decay"]
        if self.b[i] is None:
            self.b[i] = torch.zeros_like(u)
            self.b_sgd[i] = torch.zeros_like(u)
        if h["use_muon"]:
            self.b[i] = self.b[i] + (1 - mu) * (u - self.b[i])
            update = u + mu * (self.b[i] - u) if h["nesterov"] else self.b[i]
            o = newton_schulz64(update, add_eps=True) * max(1, u.shape[-2] / u.shape[-1]) ** 0.5
            self.w[i] = self.w[i] - lr * h["muon"] * o
            key, sgd_lr = "b_sgd", lr * h["sgd"]
        else:
            key, sgd_lr = "b", lr
        bufs = getattr(self, key)
        d = u + wd * self.w[i]
        bufs[i] = mu * bufs[i] + d
        step = d + mu * bufs[i] if h["nesterov"] else bufs[i]
        self.w[i] = self.w[i] - sgd_lr * step

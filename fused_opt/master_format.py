"""How a param's FP32 master is kept: the `master_weights` policy, chosen once per optimizer.

The step asks the policy, never the option: which state key holds the master, whether a
cached one still fits its param, how to make a new one, what to do around a step, and how to
load and report one. Two policies:

- `FP32Masters` ("fp32"): an FP32 copy per FP16/BF16 param (an FP32 param is its own). A
  param edited outside the optimizer is seen per element by the kernels (the param no longer
  equals its master rounded), so nothing happens around a step.
- `RemainderMasters` ("remainder"): BF16 params keep an int16 remainder (remainder.py). The
  master is always the param and its remainder, so it follows a write to the param element by
  element: where the written value is unchanged (`p.copy_(p.clone())`,
  `model.load_state_dict(model.state_dict())`) the master is unchanged, bit for bit; where it
  changed, the master is the written value and the kept remainder, which is less than half a
  BF16 ulp and rounds to the written value (an FP32 master would be the written value itself).
"""
from __future__ import annotations

import torch

from . import remainder
from .memory import usable_master, usable_remainder


class FP32Masters:
    key = "master_param"

    def check_params(self, params, index=None) -> None:
        pass

    def cached(self, state: dict, p: torch.Tensor):
        """The master in `state` if it still fits p (an FP32 param is its own), else None."""
        if p.dtype == torch.float32:
            return p
        master = state.get(self.key)
        return master if usable_master(master, p) else None  # none yet, or stale: p.data = ... since

    def make(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)

    def current_master(self, state: dict, p: torch.Tensor) -> torch.Tensor:
        """The FP32 values the next step would start from (where a master exists)."""
        master = self.cached(state, p)
        return master if master is not None else p.detach().float()

    def sync_from_params(self, opt, params) -> None:
        """Each FP16/BF16 master re-taken where its param no longer equals it rounded (what
        every step does per element)."""
        for p in params:
            master = opt.state[p].get(self.key) if p in opt.state else None
            if master is not None and master is not p and usable_master(master, p):
                same = master.to(p.dtype).view(torch.int16) == p.view(torch.int16)
                master.copy_(torch.where(same, master, p.to(torch.float32)))

    def master_of(self, p: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """The FP32 master a state dict holds."""
        return stored

    def load(self, state: dict, p: torch.Tensor, master: torch.Tensor) -> None:
        """A loaded FP32 master put in place, its param written from it (rounded)."""
        state[self.key] = torch.empty_like(p, dtype=torch.float32).copy_(master)
        p.copy_(state[self.key])


class RemainderMasters:
    key = "master_remainder"
    name = "remainder"
    dtype = torch.int16

    def check_params(self, params, index=None) -> None:
        remainder.check_params(params, index, self.name)

    def cached(self, state: dict, p: torch.Tensor):
        stored = state.get(self.key)
        return stored if usable_remainder(stored, p, self.dtype) else None

    def make(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=self.dtype)  # 0: the master is the param itself

    def current_master(self, state: dict, p: torch.Tensor) -> torch.Tensor:
        stored = state.get(self.key)
        return (remainder.rebuild_any(p.detach(), stored) if usable_remainder(stored, p, self.dtype)
                else p.detach().float())

    def sync_from_params(self, opt, params) -> None:
        pass  # the master is rebuilt from the param wherever it is read

    def master_of(self, p: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return remainder.rebuild_any(p.detach(), stored)

    def load(self, state: dict, p: torch.Tensor, master: torch.Tensor) -> None:
        """The param takes the master's top half, the remainder the rest."""
        state[self.key] = torch.empty_like(p, dtype=self.dtype)
        remainder.split_(torch.empty_like(p, dtype=torch.float32).copy_(master), p, state[self.key])


class Remainder8Masters(RemainderMasters):
    """"remainder8": the top 8 bits of the remainder only (remainder.py rebuild8): a 24-bit
    master, 1 B per param beside the BF16 param instead of 2 (or 4 for an FP32 master)."""
    name = "remainder8"
    dtype = torch.int8


MASTER_FORMATS = {"fp32": FP32Masters, "remainder": RemainderMasters, "remainder8": Remainder8Masters}


def master_format(master_weights: str):
    if master_weights not in MASTER_FORMATS:
        raise ValueError(f'master_weights must be "fp32", "remainder" or "remainder8", got {master_weights!r}')
    return MASTER_FORMATS[master_weights]()

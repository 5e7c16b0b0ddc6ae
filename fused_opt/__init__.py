"""fused_opt: one fused optimizer step for mixed-precision training (see README.md)."""
from __future__ import annotations

import torch

from . import backends
from .optimizer import (FusedMixedPrecisionAdamW, FusedMixedPrecisionMuon, FusedMixedPrecisionMuSGD,
                        FusedMixedPrecisionOptimizer, FusedMixedPrecisionSGD)
from .state_dict import decoded_state_dict

__version__ = "0.1.0"
__all__ = ["FusedMixedPrecisionSGD", "FusedMixedPrecisionAdamW", "FusedMixedPrecisionMuon", "FusedMixedPrecisionMuSGD",
           "FusedMixedPrecisionOptimizer", "backend_availability",
           "build_info", "decoded_state_dict", "__version__"]


def backend_availability(device) -> dict[str, str | None]:
    """For each backend: None if it can run on tensors of `device`, else a one-line reason."""
    return {name: backends.availability(name, torch.device(device)) for name in backends.BACKENDS}


def build_info() -> dict:
    """Package version and what the native extension was built with."""
    from .backends import native_backend
    return {"version": __version__, **native_backend.build_info()}

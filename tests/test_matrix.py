"""The configuration matrix of a step, run through every available backend against the
independent float64 reference (tests/reference.py), 10+ steps each."""
import math

import pytest
import torch

from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, Config, run_against_reference


def group(**kw):
    base = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    return {**base, **kw}


CONFIGS = {
    "plain": Config(groups=[group()]),
    "momentum": Config(groups=[group(momentum=0.9)]),
    "momentum-dampening": Config(groups=[group(momentum=0.9, dampening=0.3)]),
    "nesterov-wd": Config(groups=[group(momentum=0.9, nesterov=True, weight_decay=1e-2)]),
    "weight-decay": Config(groups=[group(weight_decay=0.1)]),
    "maximize": Config(groups=[group(momentum=0.5, maximize=True, weight_decay=1e-2)]),
    "two-groups": Config(groups=[group(lr=0.05, momentum=0.9, weight_decay=1e-3),
                                 group(lr=0.2, momentum=0.5, nesterov=True, maximize=True)]),
    "three-groups-mixed": Config(groups=[group(lr=0.1), group(lr=0.01, momentum=0.9, dampening=0.1),
                                         group(lr=0.3, weight_decay=0.05)]),
    "clip-l2": Config(groups=[group(momentum=0.9)], max_grad_norm=0.05),
    "clip-inf": Config(groups=[group(momentum=0.9)], max_grad_norm=0.01, norm_type=math.inf),
    "clip-inactive": Config(groups=[group(momentum=0.9)], max_grad_norm=1e6),
    "static-scale": Config(groups=[group(momentum=0.9)], loss_scale=1000.0),
    "no-scale": Config(groups=[group(momentum=0.9)], loss_scale=None),
    "inf-injected": Config(groups=[group(momentum=0.9, weight_decay=1e-2)], max_grad_norm=0.05,
                           inject={0: "inf", 4: "inf", 5: "nan"}, steps=12),
    "nan-first-steps": Config(groups=[group(momentum=0.9, nesterov=True)], inject={0: "nan", 1: "inf"}),
    "static-scale-inf": Config(groups=[group(momentum=0.9)], loss_scale=512.0, inject={2: "inf"}),
    "no-scale-nan": Config(groups=[group(momentum=0.9)], loss_scale=None, inject={3: "nan"},
                           norm_type=math.inf, max_grad_norm=0.01),
    "growth-and-backoff": Config(groups=[group(momentum=0.9)], growth_interval=2, inject={5: "inf"}, steps=14),
    # The loss scale's hysteresis and bounds (loss_scaler.py): backoffs wait for 2 or 3
    # overflows, the scale floors at min_scale and stops growing at max_scale.
    "hysteresis-2": Config(groups=[group(momentum=0.9)], hysteresis=2, growth_interval=2,
                           inject={1: "inf", 2: "inf", 3: "nan", 6: "inf", 9: "inf"}, steps=12),
    "hysteresis-3-floor": Config(groups=[group(momentum=0.9, weight_decay=1e-2)], hysteresis=3, min_scale=2.0**8,
                                 inject={k: "inf" for k in range(1, 10)}, max_grad_norm=0.05, steps=12),
    "max-scale-cap": Config(groups=[group(momentum=0.9)], growth_interval=1, max_scale=2.0**12,
                            inject={4: "nan"}, steps=9),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", CONFIGS.keys())
def test_matches_float64_reference(name, dtype, backend, device):
    config = CONFIGS[name]
    config = Config(**{**config.__dict__, "dtype": dtype})
    run_against_reference(config, backend, device)


NATIVE_DEVICES = [d for b, d in BACKEND_DEVICES if b == "native"]


@pytest.mark.parametrize("device", NATIVE_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", CONFIGS.keys())
def test_native_three_launch_path_matches_float64_reference(name, dtype, device, monkeypatch):
    """The native backend's step is one call into the module unless a reduction across ranks
    runs between its passes (DTensor params); the three separate launches of that path, here
    without ranks, against the same reference."""
    from fused_opt.backends import native_backend
    monkeypatch.setattr(native_backend, "ONE_CALL", False)
    config = Config(**{**CONFIGS[name].__dict__, "dtype": dtype})
    run_against_reference(config, "native", device)

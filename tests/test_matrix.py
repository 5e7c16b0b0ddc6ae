"""The configuration matrix of SPEC §3, run through every available backend against the
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
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", CONFIGS.keys())
def test_matches_float64_reference(name, dtype, backend, device):
    config = CONFIGS[name]
    config = Config(**{**config.__dict__, "dtype": dtype})
    run_against_reference(config, backend, device)

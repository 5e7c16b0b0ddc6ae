"""Every bad input raises a clear error, and nothing was modified before it."""
import math

import pytest
import torch

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES

SGD = fused_opt.FusedMixedPrecisionSGD


def fp16_param(n=4, device="cpu"):
    return torch.nn.Parameter(torch.ones(n, dtype=torch.float16, device=device))


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), "learning rate"),
    (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(dampening=-0.1), "dampening"),
    (dict(nesterov=True), "nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    (dict(norm_type=1.0), "norm_type"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(loss_scale=0.0), "loss_scale"),
    (dict(loss_scale=-2.0), "loss_scale"),
    (dict(loss_scale="static"), "loss_scale"),
    (dict(init_scale=0.0), "init_scale"),
    (dict(growth_factor=-2.0), "growth_factor"),
    (dict(backoff_factor=0.0), "backoff_factor"),
    (dict(growth_interval=0), "growth_interval"),
    (dict(backend="cudnn"), "unknown backend"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        SGD([fp16_param()], **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("make,match", [
    (lambda: [torch.nn.Parameter(torch.ones(3, dtype=torch.int32), requires_grad=False)], "not supported"),
    (lambda: [torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))], "not supported"),
    (lambda: [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], "not supported"),
    (lambda: (lambda p: [p, p])(fp16_param()), "twice"),
    (lambda: (lambda p: [{"params": [p]}, {"params": [p]}])(fp16_param()), "more than one"),
])
def test_bad_params_raise(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SGD(make(), lr=0.1)


def state_snapshot(opt, params):
    tensors = [p.detach().clone() for p in params]
    tensors += [v.clone() for p in params for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    tensors += [opt.loss_scale.clone(), opt._scaler.growth_tracker.clone(), opt.last_grad_norm.clone()]
    return tensors


def assert_unchanged(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def warm_optimizer(backend, device):
    """An optimizer after two applied steps, so that state exists and could be damaged."""
    params = [fp16_param(5, device), fp16_param(3, device)]
    opt = SGD(params, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
    return opt, params


BAD_STEPS = {
    "sparse grad": (lambda opt, ps: setattr(ps[1], "grad", torch.eye(3, dtype=torch.float16).to_sparse()[0].to(ps[1].device)),
                    "sparse"),
    "lr edited negative": (lambda opt, ps: opt.param_groups[0].update(lr=-1.0), "learning rate"),
    "momentum edited negative": (lambda opt, ps: opt.param_groups[0].update(momentum=-0.1), "momentum"),
    "nesterov with dampening": (lambda opt, ps: opt.param_groups[0].update(nesterov=True, dampening=0.5), "nesterov"),
    "no scale_loss": (lambda opt, ps: setattr(opt._scaler, "loss_scaled", False), "scale_loss"),
    "GradScaler attrs": (lambda opt, ps: setattr(opt, "found_inf", torch.zeros(())), "GradScaler"),
}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("case", BAD_STEPS.keys())
def test_bad_step_raises_before_any_write(case, backend, device):
    opt, params = warm_optimizer(backend, device)
    for p in params:
        p.grad = torch.full_like(p, 0.25)
    opt.scale_loss(torch.zeros((), device=device))
    corrupt, match = BAD_STEPS[case]
    corrupt(opt, params)
    before = state_snapshot(opt, params)
    with pytest.raises((RuntimeError, ValueError), match=match):
        opt.step()
    assert_unchanged(before, state_snapshot(opt, params))


def test_param_on_another_device_raises():
    """Two devices in one step: needs a second device; 'meta' plays that role on CPU."""
    a, b = fp16_param(), torch.nn.Parameter(torch.ones(3, dtype=torch.float16, device="meta"))
    opt = SGD([a, b], lr=0.1, loss_scale=None, backend="torch")
    a.grad = torch.ones_like(a)
    b.grad = torch.ones_like(b)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="one step runs on one device"):
        opt.step()
    assert torch.equal(a.detach(), before)


def test_non_contiguous_and_empty_params_work():
    p = torch.nn.Parameter(torch.randn(4, 6).half().t())
    e = torch.nn.Parameter(torch.empty(0, dtype=torch.float16))
    opt = SGD([p, e], lr=0.1, loss_scale=None, max_grad_norm=1.0, norm_type=math.inf)
    p.grad, e.grad = torch.ones_like(p), torch.ones_like(e)
    opt.step()
    assert not bool(opt.last_step_skipped) and float(opt.last_grad_norm) == 1.0

"""Against the real thing (the tolerances of tests/harness.py): torch.optim.SGD, clip_grad_norm_, GradScaler."""
import math

import pytest
import torch

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, assert_close_fp32

SGD_OPTIONS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.2, weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.5, maximize=True),
    dict(weight_decay=0.1, maximize=True),
]


def fp32_params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in (1, 7, 1023, 300)]


def grads_for(step, params, seed=5):
    gen = torch.Generator().manual_seed(seed * 100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.device) for p in params]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("max_norm,norm_type", [(None, 2.0), (0.5, 2.0), (0.2, math.inf)],
                         ids=["no-clip", "clip-l2", "clip-inf"])
def test_matches_torch_sgd_on_fp32(options, max_norm, norm_type, backend, device):
    ours, theirs = fp32_params(device), fp32_params(device)
    opt = fused_opt.FusedMixedPrecisionSGD(ours, lr=0.05, loss_scale=None, max_grad_norm=max_norm,
                                           norm_type=norm_type, backend=backend, **options)
    sgd = torch.optim.SGD(theirs, lr=0.05, **options)
    for step in range(10):
        grads = grads_for(step, ours)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type, foreach=True)
            torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-5, atol=0)
        sgd.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            assert_close_fp32(p, q, f"step {step} param {i}")
            if "momentum" in options:
                assert_close_fp32(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"],
                                  f"step {step} buffer {i}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_dynamic_scale_follows_grad_scaler_exactly(backend, device):
    """The same overflow pattern through ours and through torch.amp.GradScaler: identical
    scale and growth-tracker trajectories, growth and backoff both happening."""
    p = torch.nn.Parameter(torch.zeros(4, device=device))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, init_scale=2.0**4, growth_interval=3,
                                           loss_scale="dynamic", backend=backend)
    q = torch.nn.Parameter(torch.zeros(4, device=device))
    sgd = torch.optim.SGD([q], lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**4, growth_interval=3)
    overflow_steps = {2, 3, 9, 10, 11, 17}
    for step in range(20):
        g = torch.full((4,), math.inf if step in overflow_steps else 1.0, device=device)
        p.grad, q.grad = g.clone(), g.clone()
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
        scaler.scale(torch.zeros((), device=device))
        scaler.step(sgd)
        scaler.update()
        assert float(opt.loss_scale) == scaler.get_scale(), f"step {step}"
        assert int(opt._scaler.growth_tracker) == int(scaler._growth_tracker), f"step {step}"
        assert bool(opt.last_step_skipped) == (step in overflow_steps)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_a_param_losing_and_regaining_its_grad_steps_as_torch_adamw(backend, device):
    """Steps where every param has a grad take a shortcut (the lists as they are); steps where
    one lacks it leave that param and its state alone, as torch.optim.AdamW does, whichever
    came before."""
    ours, theirs = fp32_params(device), fp32_params(device)
    opt = fused_opt.FusedMixedPrecisionAdamW(ours, lr=0.05, weight_decay=0.01, loss_scale=None, backend=backend)
    adamw = torch.optim.AdamW(theirs, lr=0.05, weight_decay=0.01, foreach=True)
    for step, missing in enumerate([None, 2, None, None, 0, 3, None]):
        grads = grads_for(step, ours)
        for k, (p, q, g) in enumerate(zip(ours, theirs, grads)):
            p.grad = None if k == missing else g.clone()
            q.grad = None if k == missing else g.clone()
        before = ours[missing].detach().clone() if missing is not None else None
        opt.step()
        adamw.step()
        if missing is not None:
            assert torch.equal(ours[missing], before), step
        for p, q in zip(ours, theirs):
            assert_close_fp32(p, q, f"step {step}")
    assert [int(opt.state[p]["step"]) for p in ours] == [6, 7, 6, 6]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_a_step_with_every_group_emptied_changes_nothing(backend, device):
    """No params at all (a group's list emptied after construction) is a step with no grads,
    not one where every param has a grad."""
    p = fp32_params(device)[2]
    p.grad = torch.ones_like(p)
    opt = fused_opt.FusedMixedPrecisionAdamW([p], lr=0.05, loss_scale=None, backend=backend)
    opt.param_groups[0]["params"].clear()
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p, before) and not opt.state

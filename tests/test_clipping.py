"""Clipping asked for between backward and step (opt.clip_grad_norm_, the integrations'
routes): the fused clip applies to exactly the next step, and a subset of the params is
clipped as torch.nn.utils.clip_grad_norm_ clips it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batches(steps):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(steps)]


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
def test_a_clip_call_clips_the_next_step_only(backend, device, flat):
    # Clipping asked at steps 0 and 3 only: equal, step by step, to an optimizer clipping
    # by max_grad_norm at those steps and not at the others.
    clip_at, max_norm = {0, 3}, 0.05
    model, twin = mlp().half().to(device), mlp().half().to(device)
    kw = dict(lr=0.1, momentum=0.9, backend=backend, flat_grads=flat, init_scale=2.0**8)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), **kw)
    ref = fused_opt.FusedMixedPrecisionSGD(twin.parameters(), **kw)
    for step, (x, y) in enumerate(batches(6)):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            o.scale_loss(loss_of(m, x.to(device), y.to(device))).backward()
        if step in clip_at:
            norm = opt.clip_grad_norm_(max_norm)
            assert norm is opt.last_grad_norm
        ref.max_grad_norm = max_norm if step in clip_at else None
        opt.step()
        ref.step()
        assert float(opt.last_grad_norm) == float(ref.last_grad_norm) and not bool(opt.last_step_skipped)
        if step in clip_at:
            assert float(opt.last_grad_norm) > max_norm  # the clip did something
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b), f"step {step}"
    assert opt.max_grad_norm is None


def test_a_clip_call_with_max_grad_norm_set_clips_at_the_smaller():
    model, twin = mlp().half(), mlp().half()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, max_grad_norm=0.5, init_scale=2.0**8)
    ref = fused_opt.FusedMixedPrecisionSGD(twin.parameters(), lr=0.1, max_grad_norm=0.02, init_scale=2.0**8)
    (x, y), = batches(1)
    for m, o in ((model, opt), (twin, ref)):
        o.scale_loss(loss_of(m, x, y)).backward()
    opt.clip_grad_norm_(0.02)
    opt.step()
    ref.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert opt.max_grad_norm == 0.5
    with pytest.raises(ValueError, match="one step clips by one norm"):
        opt.clip_grad_norm_(1.0, norm_type=float("inf"))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("scale", [None, 1024.0], ids=["unscaled", "scaled"])
def test_a_subset_is_clipped_as_torch_clips_it(backend, device, scale):
    # FP32 params (their own masters): ours, clipping only the head through clip_grad_norm_
    # (the loss scaled by S or not), against torch.optim.SGD and torch's clip_grad_norm_ on
    # the same head.
    model, twin = mlp().to(device), mlp().to(device)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend,
                                           loss_scale=scale)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(4):
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        sgd.zero_grad()
        opt.scale_loss(loss_of(model, x, y)).backward()
        loss_of(twin, x, y).backward()
        ours = opt.clip_grad_norm_(0.05, parameters=model[2].parameters())
        theirs = torch.nn.utils.clip_grad_norm_(twin[2].parameters(), 0.05)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
        assert float(theirs) > 0.05  # the clip did something
        opt.step()
        sgd.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the fused clip was not asked for: the global norm is reported, unclipped
    assert opt._clip_request is None and opt.max_grad_norm is None


def test_all_params_given_explicitly_are_fused():
    model = mlp().half()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1)
    (x, y), = batches(1)
    opt.scale_loss(loss_of(model, x, y)).backward()
    assert opt.clip_grad_norm_(0.1, parameters=list(model.parameters())) is opt.last_grad_norm
    assert opt._clip_request == (0.1, 2.0)

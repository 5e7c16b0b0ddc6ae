"""torch.amp.GradScaler driving our optimizer (loss_scale=None on ours): the loop people
already have keeps working, fused and sync-free, and gives exactly our built-in scaling."""
import math

import pytest
import torch

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES

SGD = fused_opt.FusedMixedPrecisionSGD
OVERFLOW_STEPS = {1, 4, 5}


def run(driver, backend, device, dtype=torch.float16, steps=9):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(device=device, dtype=dtype)) for n in (3, 1030, 17)]
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, max_grad_norm=0.5, backend=backend)
    if driver == "ours":
        opt = SGD(params, init_scale=2.0**8, growth_interval=3, **kwargs)
        scale_of = lambda: float(opt.loss_scale)  # noqa: E731
    else:
        opt = SGD(params, loss_scale=None, **kwargs)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=3)
        scale_of = scaler.get_scale
    loss = torch.zeros((), device=device)
    for step in range(steps):
        s = scale_of()
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2 * s).to(device=device, dtype=dtype)
        if step in OVERFLOW_STEPS:
            params[1].grad[7] = math.inf
        if driver == "ours":
            opt.scale_loss(loss)
            opt.step()
        else:
            scaler.scale(loss)
            scaler.step(opt)
            scaler.update()
        assert bool(opt.last_step_skipped) == (step in OVERFLOW_STEPS), step
    return params, opt, scale_of()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_grad_scaler_driving_equals_built_in_scaling(backend, device):
    ours, opt, scale = run("ours", backend, device)
    theirs, opt2, scale2 = run("GradScaler", backend, device)
    assert scale == scale2
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    assert not hasattr(opt2, "grad_scale") and not hasattr(opt2, "found_inf")  # GradScaler cleaned up


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_unscale_then_user_clipping_is_not_unscaled_twice(dtype, backend, device):
    if device == "cuda" and dtype == torch.bfloat16:
        pytest.skip("torch's CUDA inf check behind GradScaler.unscale_ has no BF16 kernel (torch 2.11)")
    params = [torch.nn.Parameter(torch.ones(6, dtype=dtype, device=device))]
    opt = SGD(params, lr=1.0, loss_scale=None, backend=backend)
    scaler = torch.amp.GradScaler(device, init_scale=64.0)
    scaler.scale(torch.zeros((), device=device))
    params[0].grad = torch.full((6,), 64.0 * 3.0, dtype=dtype, device=device)  # true grad 3
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, max_norm=math.sqrt(6.0))  # the user's clipping: 3 -> 1
    scaler.step(opt)
    scaler.update()
    # w = 1 - 1 * (3 clipped to 1) = 0; unscaled twice it would be 1 - 1/64. BF16 grads hold
    # the clipped 1 to within an ulp (2^-8).
    atol = 1e-5 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(opt.state[params[0]]["master_param"], torch.zeros(6, device=device),
                               atol=atol, rtol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_grad_scaler_with_our_scale_on_raises_before_any_write(backend, device):
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float32, device=device))
    opt = SGD([p], lr=0.1, loss_scale="dynamic", backend=backend)
    scaler = torch.amp.GradScaler(device)
    scaler.scale(torch.zeros((), device=device))
    opt.scale_loss(torch.zeros((), device=device))
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="GradScaler is driving"):
        scaler.step(opt)
    assert torch.equal(p.detach(), torch.ones(4, device=device)) and not opt.state

"""The model EMA kept inside the step (ema_decay=...): every backend against the float64
reference (tests/reference.py) and against the EMAs users keep beside their optimizer
(torch.optim.swa_utils' get_ema_multi_avg_fn, which is timm ModelEmaV3's `_foreach_lerp_`; Ultralytics' warm-up
formula) on the same weight trajectory; skipped steps; swap exactness; state dicts,
checkpoints and copies; flat grads and remainder masters; bad input."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import fused_opt
from harness import (BACKEND_DEVICE_IDS, BACKEND_DEVICES, CPU_BACKEND_DEVICE_IDS, CPU_BACKEND_DEVICES, Config,
                     ordered_bits, run_against_reference, tiny_model)

SGD_GROUP = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False, maximize=False)
ADAMW_GROUP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False)
CONFIGS = {
    # clipping, skipped steps (an EMA never moves on one) and a warm-up whose t counts applied steps only
    "sgd-clip-inf-warmup": Config(groups=[SGD_GROUP], max_grad_norm=0.05, inject={2: "inf", 5: "nan"},
                                  ema_decay=0.8, ema_warmup=3.0),
    "sgd-nesterov-two-groups": Config(groups=[dict(SGD_GROUP, nesterov=True), dict(SGD_GROUP, lr=0.05, momentum=0.0)],
                                      ema_decay=0.5),
    "adamw-amsgrad": Config(optimizer="adamw", groups=[dict(ADAMW_GROUP, amsgrad=True)], inject={3: "inf"},
                            ema_decay=0.9),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", CONFIGS.keys())
def test_ema_matches_float64_reference(name, dtype, backend, device):
    """Masters, buffers and the EMA of every param (odd sizes, empty, permuted, offset 1, one
    never stepped, one stepped late) at every step, to rtol 1e-5."""
    run_against_reference(Config(**{**CONFIGS[name].__dict__, "dtype": dtype}), backend, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_ema_with_remainder_masters_matches_reference(backend, device):
    """master_weights="remainder": the EMA follows the master rebuilt from param and remainder."""
    config = Config(dtype=torch.bfloat16, groups=[SGD_GROUP], master_weights="remainder", ema_decay=0.7,
                    inject={4: "nan"}, loss_scale=None)
    run_against_reference(config, backend, device)


def _trajectory(model, steps, seed=0, inf_at=()):
    """The grads of a fixed trajectory: step k's grads for each param (inf at steps in inf_at)."""
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 0.1 for p in model.parameters()]
             for _ in range(steps)]
    for k in inf_at:
        grads[k][0].view(-1)[0] = math.inf
    return grads


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_ema_equals_swa_utils_and_timm_update(backend, device):
    """FP32 weights: torch.optim.SGD plus torch.optim.swa_utils.AveragedModel with
    get_ema_multi_avg_fn(d) (its update is `torch._foreach_lerp_(ema, w, 1 - d)`, the line timm's
    ModelEmaV3 runs) against our SGD with ema_decay=d, on the same grads."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    decay, steps = 0.9, 8
    model = tiny_model(device, torch.float32)
    ours = copy.deepcopy(model)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    averaged.update_parameters(model)  # its first call copies: the EMA then starts at the initial weights
    timm_ema = [p.detach().clone() for p in model.parameters()]
    opt_ref = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = fused_opt.FusedMixedPrecisionSGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                                           ema_decay=decay, backend=backend)
    for grads in _trajectory(model, steps):
        for p, q, g in zip(model.parameters(), ours.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        averaged.update_parameters(model)
        torch._foreach_lerp_(timm_ema, [p.detach() for p in model.parameters()], 1.0 - decay)  # timm ModelEmaV3
        opt.step()
    for e, a, t in zip(opt.ema_params(), averaged.module.parameters(), timm_ema):
        torch.testing.assert_close(e, a.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e, t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_warmup_is_ultralytics_formula(backend, device):
    """ema_warmup=tau: Ultralytics' ModelEMA.update, d = decay * (1 - exp(-updates / tau)),
    `v *= d; v += (1 - d) * w`, with `updates` counting applied steps only."""
    decay, tau, steps = 0.99, 4.0, 9
    model = tiny_model(device, torch.float32)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, ema_decay=decay, ema_warmup=tau,
                                           backend=backend, loss_scale=None)
    ema = [p.detach().clone() for p in model.parameters()]
    updates = 0
    for k, grads in enumerate(_trajectory(model, steps, inf_at=(3,))):
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()
        if k == 3:
            assert bool(opt.last_step_skipped)
            continue
        updates += 1
        d = decay * (1 - math.exp(-updates / tau))
        for v, p in zip(ema, model.parameters()):
            v *= d
            v += (1 - d) * p.detach()
    for e, v in zip(opt.ema_params(), ema):
        torch.testing.assert_close(e, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("ema_dtype", [torch.float32, torch.bfloat16], ids=["ema-fp32", "ema-bf16"])
def test_skipped_step_leaves_ema(backend, device, ema_dtype):
    model = tiny_model(device, torch.float16)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, ema_decay=0.5,
                                           ema_dtype=ema_dtype, backend=backend)
    grads = _trajectory(model, 3, inf_at=(1,))
    for k, step_grads in enumerate(grads):
        before = [e.clone() for e in opt.ema_params()]
        opt.scale_loss(torch.zeros((), device=device))
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g * float(opt.loss_scale)
        opt.step()
        after = opt.ema_params()
        assert all(e.dtype == ema_dtype for e in after)
        same = all(torch.equal(a, b) for a, b in zip(after, before))
        assert same == (k == 1), f"step {k}: skipped={bool(opt.last_step_skipped)}, EMA unchanged={same}"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_bf16_ema_is_fp32_update_rounded(backend, device):
    """ema_dtype=torch.bfloat16: each step's FP32 update rounded to nearest even, within one
    BF16 ulp of the torch backend's (the backends' masters may differ in the last FP32 bit)."""
    results = {}
    for name in dict.fromkeys(["torch", backend]):
        model = tiny_model(device, torch.bfloat16)
        opt = fused_opt.FusedMixedPrecisionAdamW(model.parameters(), lr=1e-2, ema_decay=0.5,
                                                 ema_dtype=torch.bfloat16, backend=name, loss_scale=None)
        for grads in _trajectory(model, 4):
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()
        results[name] = [e.clone() for e in opt.ema_params()]
    for e, r in zip(results[backend], results["torch"]):
        assert int((ordered_bits(e.cpu()) - ordered_bits(r.cpu())).abs().max()) <= 1


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("master_weights,flat", [("fp32", False), ("fp32", True), ("remainder", False),
                                                 ("remainder", True)])
def test_swap_is_exact_and_changes_nothing(backend, device, master_weights, flat):
    """Inside swap_ema() the params hold their EMA rounded to their dtype; after it they hold
    their own bits, and training goes on exactly as if no swap had happened (a remainder is
    not restarted, flat storage keeps its state)."""
    dtype = torch.bfloat16
    runs = []
    for swap in (False, True):
        model = tiny_model(device, dtype)
        opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, ema_decay=0.6,
                                               master_weights=master_weights, flat_grads=flat, backend=backend,
                                               loss_scale=None)
        for grads in _trajectory(model, 4):
            for p, g in zip(model.parameters(), grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            opt.step()
            if swap:
                before = [p.detach().clone() for p in model.parameters()]
                with opt.swap_ema():
                    for p, e in zip(model.parameters(), opt.ema_params()):
                        assert torch.equal(p.detach(), e.to(dtype))
                    model(torch.randn(2, 5, device=device, dtype=dtype))  # evaluate
                    with pytest.raises(RuntimeError, match="inside swap_ema"):
                        opt.step()
                    with pytest.raises(RuntimeError, match="inside swap_ema"):
                        opt.state_dict()
                for p, b in zip(model.parameters(), before):
                    assert torch.equal(p.detach().view(torch.int16), b.view(torch.int16))
        runs.append(([p.detach().clone() for p in model.parameters()], [e.clone() for e in opt.ema_params()]))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_ema_starts_at_construction_weights_and_skips_gradless_params(backend, device):
    model = tiny_model(device, torch.float16)
    initial = [p.detach().float().clone() for p in model.parameters()]
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, ema_decay=0.9, backend=backend,
                                           loss_scale=None)
    assert all(torch.equal(e, w) for e, w in zip(opt.ema_params(), initial))
    first, *rest = list(model.parameters())
    for p in rest:
        p.grad = torch.ones_like(p)
    opt.step()
    emas = opt.ema_params()
    assert torch.equal(emas[0], initial[0])  # no grad: its EMA, like its weight, did not move
    assert not torch.equal(emas[1], initial[1])


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("ema_dtype", [torch.float32, torch.bfloat16], ids=["ema-fp32", "ema-bf16"])
def test_state_dict_checkpoint_and_copies_resume_exactly(backend, device, ema_dtype):
    """The EMA is in state_dict() (and through torch.save), deepcopy and pickle: a resumed run's
    EMA equals the uninterrupted run's, bit for bit."""
    def make():
        model = tiny_model(device, torch.bfloat16)
        return model, fused_opt.FusedMixedPrecisionAdamW(model.parameters(), lr=1e-2, ema_decay=0.8,
                                                         ema_dtype=ema_dtype, ema_warmup=2.0, backend=backend,
                                                         loss_scale=None)

    grads = _trajectory(tiny_model(device, torch.bfloat16), 6)

    def run(model, opt, steps):
        for step_grads in steps:
            for p, g in zip(model.parameters(), step_grads):
                p.grad = g.clone()
            opt.step()

    model, opt = make()
    run(model, opt, grads[:3])
    sd = opt.state_dict()
    assert all(sd["state"][i]["ema_param"].dtype == ema_dtype for i in range(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buffer)
    copied_model = copy.deepcopy(model)
    copied = copy.deepcopy(opt)  # a copy steps its own params: rebind to the copied model's
    copied_model2, copied_opt = make()
    copied_model2.load_state_dict(copied_model.state_dict())
    copied_opt.load_state_dict(copied.state_dict())
    run(model, opt, grads[3:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed = make()
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    run(resumed_model, resumed, grads[3:])
    run(copied_model2, copied_opt, grads[3:])
    for other in (resumed, copied_opt):
        for a, b in zip(opt.ema_params(), other.ema_params()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_loading_a_state_dict_without_ema_restarts_it_from_the_loaded_weights(backend, device):
    model = tiny_model(device, torch.float32)
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    torch_opt.step()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, ema_decay=0.9,
                                           backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the weights the load finds
    opt.load_state_dict(torch_opt.state_dict())
    for e, p in zip(opt.ema_params(), model.parameters()):
        assert torch.equal(e, p.detach())
    # an optimizer without an EMA ignores a saved one
    plain = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    plain.load_state_dict(opt.state_dict())
    assert all("ema_param" not in s for s in plain.state.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(ema_decay=1.0), "ema_decay"), (dict(ema_decay=-0.1), "ema_decay"), (dict(ema_decay="0.9"), "ema_decay"),
    (dict(ema_decay=True), "ema_decay"), (dict(ema_decay=0.9, ema_dtype=torch.float16), "ema_dtype"),
    (dict(ema_decay=0.9, ema_warmup=0), "ema_warmup"), (dict(ema_decay=0.9, ema_warmup=math.inf), "ema_warmup"),
])
def test_bad_ema_arguments_raise(kwargs, match):
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=match):
        fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, **kwargs)


def test_bf16_ema_with_a_decay_it_cannot_follow_warns():
    p = nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="barely move"):
        fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, ema_decay=0.9999, ema_dtype=torch.bfloat16)


def test_ema_api_without_ema_raises_and_bad_loaded_ema_is_refused():
    p = nn.Parameter(torch.randn(3))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, backend="torch")
    with pytest.raises(RuntimeError, match="no EMA"):
        opt.ema_params()
    with pytest.raises(RuntimeError, match="no EMA"):
        opt.swap_ema()
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, ema_decay=0.9, backend="torch")
    assert opt.state_dict()["state"] == {}  # made lazily: an optimizer that never stepped holds no state
    opt.ema_params()
    sd = opt.state_dict()
    sd["state"][0]["ema_param"] = torch.randn(4)
    before = opt.ema_params()[0].clone()
    with pytest.raises(ValueError, match="ema_param"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.ema_params()[0], before)
    with opt.swap_ema():
        with pytest.raises(RuntimeError, match="nest"):
            opt.swap_ema()
        with pytest.raises(RuntimeError, match="inside swap_ema"):
            copy.deepcopy(opt)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_moved_ema_storage_is_followed(backend, device):
    """`state[p]["ema_param"].data = t` (or a new tensor assigned) moves the EMA: the step
    updates the new storage and never writes the old one."""
    model = tiny_model(device, torch.float16)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, ema_decay=0.5, backend=backend,
                                           loss_scale=None)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        if step == 1:
            p0 = next(model.parameters())
            ema = opt.state[p0]["ema_param"]
            old_storage = ema.detach()  # a view that keeps the old storage
            kept = ema.clone()
            ema.data = ema.detach().clone()  # new storage, no write to opt.state
        opt.step()
    assert torch.equal(old_storage, kept)  # never written after the move
    assert not torch.equal(opt.state[p0]["ema_param"], kept)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_grad_scaler_driven_skip_leaves_ema(backend, device):
    """FP32 weights with torch.amp.GradScaler driving the step (loss_scale=None): an overflow
    GradScaler finds skips the step inside ours, and the EMA with it."""
    model = tiny_model(device, torch.float32)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, ema_decay=0.5, loss_scale=None,
                                           backend=backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    x = torch.randn(4, 5, device=device)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if step == 1:
            next(model.parameters()).grad.view(-1)[0] = math.inf
        before = [e.clone() for e in opt.ema_params()]
        scaler.step(opt)
        scaler.update()
        moved = [not torch.equal(a, b) for a, b in zip(opt.ema_params(), before)]
        assert (not any(moved)) if step == 1 else all(moved), (step, moved)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("ema_dtype", [torch.float32, torch.bfloat16], ids=["ema-fp32", "ema-bf16"])
def test_native_ema_across_slices_of_a_full_size_chunk(monkeypatch, optimizer, ema_dtype):
    """With the production chunk size (65,536; tests run with 1,024) the native update runs a
    chunk in slices, each slice's EMA right after it: 200,003 elements cross chunks, slices and
    a ragged tail, against the torch backend."""
    from fused_opt.backends import native_backend
    monkeypatch.setattr(native_backend, "CHUNK_SIZE", 65536)
    results = {}
    for backend in ("torch", "native"):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(200_003).to(torch.bfloat16)), nn.Parameter(torch.randn(4100))]
        cls = fused_opt.FusedMixedPrecisionAdamW if optimizer == "adamw" else fused_opt.FusedMixedPrecisionSGD
        kwargs = dict(lr=1e-2) if optimizer == "adamw" else dict(lr=0.1, momentum=0.9)
        opt = cls(params, ema_decay=0.5, ema_dtype=ema_dtype, backend=backend, loss_scale=None, **kwargs)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        results[backend] = opt.ema_params()
    for ours, ref in zip(results["native"], results["torch"]):
        if ema_dtype == torch.float32:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        else:
            assert int((ordered_bits(ours) - ordered_bits(ref)).abs().max()) <= 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_fp32_loop_equals_grad_scaler_unscale_clip_step(backend, device, optimizer):
    """FP32 weights, the loop people run (GradScaler.scale, unscale_, clip_grad_norm_,
    scaler.step, update, an EMA lerp) against `opt.scale_loss(loss).backward(); opt.step()`
    with the same scale, clip and EMA: the same weights and EMA to FP32 rounding."""
    torch_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    ours_cls = fused_opt.FusedMixedPrecisionAdamW if optimizer == "adamw" else fused_opt.FusedMixedPrecisionSGD
    kwargs = dict(lr=1e-2, weight_decay=1e-2) if optimizer == "adamw" else dict(lr=0.1, momentum=0.9, nesterov=True)
    model = tiny_model(device, torch.float32)
    ours_model = copy.deepcopy(model)
    opt_ref = torch_cls(model.parameters(), **kwargs)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = ours_cls(ours_model.parameters(), max_grad_norm=0.1, loss_scale="dynamic", init_scale=2.0**10,
                   ema_decay=0.7, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 5, generator=gen).to(device)
        opt_ref.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.unscale_(opt_ref)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt_ref)
        scaler.update()
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.3)
        opt.zero_grad()
        opt.scale_loss(ours_model(x).square().mean()).backward()
        opt.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-5, atol=0)
    for p, q, e, f in zip(model.parameters(), ours_model.parameters(), ema, opt.ema_params()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)


# -- ema_model=model: the model's floating buffers too, and the EMA by the model's names ---------

def _bn_model(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).to(device, dtype)


def _train(model, opt, steps, inf_at=(), seed=1):
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for k in range(steps):
        x = torch.randn(6, 3, 7, 7, generator=g).to(device, next(model.parameters()).dtype)
        loss = model(x).float().square().mean()
        opt.zero_grad()
        opt.scale_loss(loss).backward()
        if k in inf_at:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        opt.step()
        yield k


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_buffers_average_as_ultralytics_model_ema(backend, device):
    """ema_model=model: params and BatchNorm buffers (running mean and var) follow
    Ultralytics' ModelEMA.update on the model's state dict (`v *= d; v += (1 - d) * msd[k]`
    for every floating entry, d with its warm-up), a skipped step excepted: it moves nothing."""
    decay, tau = 0.9, 3.0
    model = _bn_model(device)
    reference = copy.deepcopy(model)  # Ultralytics' ModelEMA deep-copies the model at construction
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.05, momentum=0.9, ema_decay=decay,
                                           ema_warmup=tau, ema_model=model, backend=backend, loss_scale="dynamic",
                                           check_scaled_grads=False)  # the inf is written into a grad
    updates = 0
    for k in _train(model, opt, 8, inf_at=(4,)):
        if k == 4:
            assert bool(opt.last_step_skipped)
            continue
        updates += 1
        d = decay * (1 - math.exp(-updates / tau))
        msd = model.state_dict()
        with torch.no_grad():
            for name, v in reference.state_dict().items():
                if v.dtype.is_floating_point:
                    v *= d
                    v += (1 - d) * msd[name].detach()
    got = opt.ema_state_dict()
    assert list(got) == list(model.state_dict())  # the model's names, in its order
    for name, v in reference.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(got[name], v, rtol=1e-5, atol=1e-6, msg=name)
    assert "1.running_var" in got and not torch.equal(got["1.running_var"], model[1].running_var)
    # an integer buffer is the model's own (timm ModelEmaV3 copies it; Ultralytics leaves it)
    assert int(got["1.num_batches_tracked"]) == 8 == int(model[1].num_batches_tracked)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_swap_puts_the_buffers_average_in_and_restores_bit_for_bit(backend, device):
    model = _bn_model(device, torch.bfloat16)
    opt = fused_opt.FusedMixedPrecisionAdamW(model.parameters(), lr=1e-2, ema_decay=0.8, ema_model=model,
                                             backend=backend)
    for _ in _train(model, opt, 3):
        pass
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = opt.ema_state_dict()
    with opt.swap_ema():
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name].to(value.dtype)), name  # params and buffers, rounded
        model.eval()(torch.randn(2, 3, 7, 7, dtype=torch.bfloat16))  # evaluates with the averaged statistics
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    model.train()
    for _ in _train(model, opt, 1):  # steps on
        pass


def test_without_ema_model_the_buffers_are_left_and_names_need_the_model():
    model = _bn_model("cpu")
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.05, ema_decay=0.5)
    for _ in _train(model, opt, 2):
        pass
    with pytest.raises(TypeError, match="pass the model"):
        opt.ema_state_dict()
    by_name = opt.ema_state_dict(model)
    for (name, p), e in zip(model.named_parameters(), opt.ema_params()):
        assert torch.equal(by_name[name], e)  # ema_params() is in model.parameters() order here
    assert torch.equal(by_name["1.running_mean"], model[1].running_mean)  # not averaged
    with opt.swap_ema():
        assert torch.equal(model[1].running_mean, by_name["1.running_mean"])
    copy_model = _bn_model("cpu", seed=5)
    copy_model.load_state_dict(by_name)  # a model of the same architecture takes it
    assert torch.equal(copy_model[0].weight, by_name["0.weight"])


def test_ema_params_follow_the_groups_order_and_state_dict_has_names():
    model = _bn_model("cpu")
    params = list(model.parameters())
    opt = fused_opt.FusedMixedPrecisionSGD([{"params": params[3:]}, {"params": params[:3], "lr": 0.01}], lr=0.05,
                                           ema_decay=0.5, ema_model=model)
    for _ in _train(model, opt, 2):
        pass
    by_name = opt.ema_state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, e in zip(params[3:] + params[:3], opt.ema_params()):
        assert torch.equal(by_name[names[id(p)]], e)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_buffers_average_in_state_dicts_and_copies(backend, device):
    model = _bn_model(device)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.05, momentum=0.9, ema_decay=0.7,
                                           ema_model=model, backend=backend)
    for _ in _train(model, opt, 3):
        pass
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for _ in _train(model, opt, 3, seed=2):
        pass
    resumed = _bn_model(device, seed=7)
    resumed_opt = fused_opt.FusedMixedPrecisionSGD(resumed.parameters(), lr=0.05, momentum=0.9, ema_decay=0.7,
                                                   ema_model=resumed, backend=backend)
    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    for m, o in ((resumed, resumed_opt), (twin_model, twin_opt)):
        for _ in _train(m, o, 3, seed=2):
            pass
        for name, value in opt.ema_state_dict().items():
            assert torch.equal(o.ema_state_dict()[name], value), name
    # another model's buffers are refused before anything is loaded
    other = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    other_opt = fused_opt.FusedMixedPrecisionSGD(other.parameters(), lr=0.05, ema_decay=0.7, ema_model=other,
                                                 backend=backend)
    sd = opt.state_dict()
    sd["param_groups"] = sd["param_groups"][:1]
    bad = copy.deepcopy(other_opt.state_dict())
    bad["param_groups"][0]["fused_opt"]["ema_buffers"] = {"1.running_mean": torch.zeros(4)}
    with pytest.raises(ValueError, match="buffers"):
        other_opt.load_state_dict(bad)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fused_opt.FusedMixedPrecisionSGD(other.parameters(), ema_decay=0.5, ema_model=other.state_dict())

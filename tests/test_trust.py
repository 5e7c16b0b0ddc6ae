"""What a user of torch.optim.AdamW and of its checkpoints relies on: AdamW's results as close to
torch's as torch's own implementations are to each other, huge finite grads handled alike by
every backend and never turned into a zero-gradient step, and state dicts that load what they
should and refuse what they should not (another update rule, codes read as values, values
beyond FP32, counters at their limit) before anything changes."""
import copy
import math

import pytest
import torch
from torch import nn

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES

SIZES = (1, 7, 300, 1025)


# -- AdamW against torch.optim.AdamW -----------------------------------------------------------
def adamw_run(make, lr, steps=12, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(n, generator=g).to(device, dtype)) for n in SIZES]
    opt = make(ps, lr)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
        opt.step()
    return torch.cat([p.detach().flatten().double().cpu() for p in ps])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.95)])
def test_adamw_is_as_close_to_torch_as_torch_is_to_itself(betas, amsgrad, backend, device):
    """FP32 params, 12 steps, lr 1e-2 and 3e-2, weight decay 1e-2: ours against
    torch.optim.AdamW (its default, single-tensor implementation), next to torch's fused one
    against the same. (Bias corrections from betas rounded to FP32 put native and Triton 2e-6
    away, 20x torch's own spread.) torch's CPU float sqrt is not correctly rounded everywhere
    (1 ulp off in 1 of ~30 elements) where ours is: an ulp or two of the weight's size remain."""
    for lr in (1e-2, 3e-2):
        kw = dict(lr=lr, weight_decay=1e-2, betas=betas, amsgrad=amsgrad)
        ref = adamw_run(lambda ps, lr: torch.optim.AdamW(ps, foreach=False, **kw), lr, device=device)
        fused = adamw_run(lambda ps, lr: torch.optim.AdamW(ps, fused=True, **kw), lr, device=device)
        ours = adamw_run(lambda ps, lr: fused_opt.FusedMixedPrecisionAdamW(ps, loss_scale=None, backend=backend,
                                                                            **kw), lr, device=device)
        ulp = 2.0**-23 * float(ref.abs().max())
        torch_spread = float((fused - ref).abs().max())
        assert float((ours - ref).abs().max()) <= max(2 * torch_spread, 4 * ulp), (lr, torch_spread)
        # and no further from the float64 AdamW than torch is
        f64 = adamw_run(lambda ps, lr: torch.optim.AdamW(ps, **kw), lr, dtype=torch.float64, device=device)
        assert float((ours - f64).abs().max()) <= float((ref - f64).abs().max()) + 2 * ulp


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_second_moment_uses_torch_order(backend, device):
    """exp_avg_sq as torch's addcmul_ computes it, ((1 - beta2) * u) * u, up to the largest
    grads whose squares FP32 holds (beyond, the step is skipped: below)."""
    for g in (1e-30, 3.0, 1e19, 1.8e19):
        p = nn.Parameter(torch.ones(1, device=device))
        q = nn.Parameter(torch.ones(1, device=device))
        ours = fused_opt.FusedMixedPrecisionAdamW([p], lr=1e-2, loss_scale=None, backend=backend)
        ref = torch.optim.AdamW([q], lr=1e-2)
        for _ in range(3):
            p.grad = torch.full_like(p, g)
            q.grad = torch.full_like(q, g)
            ours.step()
            ref.step()
        assert not bool(ours.last_step_skipped)
        # (an ulp: torch's CPU kernels may fuse the multiply-add)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=2.0**-22, atol=0)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


# -- huge finite grads: the same on every backend ---------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip"])
@pytest.mark.parametrize("grad", [2.0**64, 3e19, 1e30, 3e38])
def test_grads_whose_squares_overflow_skip_the_step_on_every_backend(grad, clip, optimizer, backend, device):
    """Finite grads at or beyond 2^64 overflow the FP32 sum of squares: N is inf. The step is
    skipped as an overflow (weights, moments, counts and the EMA untouched, the dynamic scale
    backed off), never applied with a clip coefficient of 0 (a step of weight decay and
    moments with no gradient), and every backend says so."""
    p = nn.Parameter(torch.ones(4, device=device, dtype=torch.float32))
    cls = fused_opt.FusedMixedPrecisionAdamW if optimizer == "adamw" else fused_opt.FusedMixedPrecisionSGD
    extra = dict(momentum=0.9) if optimizer == "sgd" else {}
    opt = cls([p], lr=0.1, weight_decay=0.1, max_grad_norm=clip, loss_scale=None, ema_decay=0.9, backend=backend,
              **extra)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    weights = p.detach().clone()
    p.grad = torch.tensor([grad, 0.0, 1.0, -1.0], device=device)
    opt.step()
    assert bool(opt.last_step_skipped) and math.isinf(float(opt.last_grad_norm))
    assert torch.equal(p.detach(), weights)
    for k, v in opt.state[p].items():
        if isinstance(v, torch.Tensor) and k in before:
            assert torch.equal(v, before[k]), k
    # and just below, the norm is finite and the step applied, alike everywhere
    p.grad = torch.tensor([2.0**63, 0.0, 1.0, -1.0], device=device)
    opt.step()
    assert not bool(opt.last_step_skipped)
    torch.testing.assert_close(float(opt.last_grad_norm), 2.0**63, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_loaded_counts_at_their_limit_saturate(backend, device):
    """applied_steps and consecutive_skips of 2^31 - 1 load and stay there (the finalize
    saturates: no signed overflow, no negative warm-up step for the EMA)."""
    p = nn.Parameter(torch.ones(3, device=device))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, loss_scale=None, ema_decay=0.9, ema_warmup=10.0,
                                           backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["fused_opt"]["applied_steps"] = torch.tensor(2**31 - 1, dtype=torch.int32)
    sd["param_groups"][0]["fused_opt"]["consecutive_skips"] = torch.tensor(2**31 - 1, dtype=torch.int32)
    opt.load_state_dict(sd)
    p.grad = torch.ones_like(p)
    opt.step()
    assert int(opt._applied_steps) == 2**31 - 1
    p.grad = torch.full_like(p, math.nan)
    opt.step()
    assert int(opt.consecutive_skips) == 1
    p.grad = torch.full_like(p, math.nan)
    opt.step()
    assert bool(torch.isfinite(opt.ema_params()[0]).all())


# -- state dicts ---------------------------------------------------------------------------------
def stepped(cls, state_precision="fp32", **kw):
    p = nn.Parameter(torch.randn(40).to(torch.bfloat16))
    opt = cls([p], lr=0.1, state_precision=state_precision, loss_scale=None, **kw)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    return p, opt


def torch_stepped(cls, **kw):
    p = nn.Parameter(torch.randn(40))
    opt = cls([p], lr=0.1, **kw)
    p.grad = torch.randn_like(p)
    opt.step()
    return opt


def snapshot(opt, p):
    return ([copy.deepcopy(g) for g in opt.param_groups],
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}, p.detach().clone())


def assert_unchanged(opt, p, before):
    groups, state, weights = before
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in groups]
    assert torch.equal(p.detach(), weights)
    for k, v in state.items():
        assert torch.equal(opt.state[p][k], v) if isinstance(v, torch.Tensor) else opt.state[p][k] == v, k


@pytest.mark.parametrize("source", ["ours-sgd", "ours-adamw", "torch-sgd", "torch-adamw"])
def test_a_state_dict_of_another_update_rule_is_refused(source):
    sgd, adamw = fused_opt.FusedMixedPrecisionSGD, fused_opt.FusedMixedPrecisionAdamW
    saved = {"ours-sgd": lambda: stepped(sgd, momentum=0.9)[1].state_dict(),
             "ours-adamw": lambda: stepped(adamw)[1].state_dict(),
             "torch-sgd": lambda: torch_stepped(torch.optim.SGD, momentum=0.9).state_dict(),
             "torch-adamw": lambda: torch_stepped(torch.optim.AdamW).state_dict()}[source]()
    target = adamw if source.endswith("sgd") else sgd
    p, opt = stepped(target, **({"momentum": 0.9} if target is sgd else {}))
    before = snapshot(opt, p)
    other = "SGD" if source.endswith("sgd") else "AdamW"
    with pytest.raises(ValueError, match=f"another update rule \\({other}"):
        opt.load_state_dict(saved)
    assert_unchanged(opt, p, before)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_torch_steps_from_an_int8_checkpoint_as_from_fp32_state(optimizer):
    """An int8-state checkpoint holds the decoded values under torch's names (never codes a
    reader of those names would take for values, stepping AdamW with exp_avg = 127.0, the raw
    code): torch.optim loads it and continues as ours would from FP32 state. A checkpoint
    of the earlier format, codes under "<name>_codes", is converted by decoded_state_dict()."""
    from fused_opt import state_precision as sp
    kw = dict(momentum=0.9) if optimizer == "sgd" else {}
    cls = fused_opt.FusedMixedPrecisionSGD if optimizer == "sgd" else fused_opt.FusedMixedPrecisionAdamW
    torch_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    p = nn.Parameter(torch.randn(40))
    opt = cls([p], lr=0.1, state_precision="int8", loss_scale=None, **kw)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    saved = opt.state_dict()
    name = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
    live = sp.decode(opt.state[p][name], opt.state[p][sp.scale_key(name)])
    entry = saved["state"][0]
    assert entry[name].dtype == torch.float32 and torch.equal(entry[name], live)
    assert not any(k.endswith(("_codes", "_scale")) for k in entry)
    # the earlier format: codes and scales under their own keys
    old = copy.deepcopy(saved)
    old["state"][0][f"{name}_codes"] = opt.state[p][name].clone()
    old["state"][0][sp.scale_key(name)] = opt.state[p][sp.scale_key(name)].clone()
    del old["state"][0][name]
    for sd in (saved, fused_opt.decoded_state_dict(old)):
        q = nn.Parameter(p.detach().clone())
        theirs = torch_cls([q], lr=0.1, **kw)
        theirs.load_state_dict(sd)
        assert torch.equal(theirs.state[q][name], live)
        q.grad = torch.randn_like(q)
        theirs.step()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_a_run_that_reached_inf_state_loads_its_own_checkpoint(backend, device):
    """A grad of 1e21 makes torch.optim.AdamW's exp_avg_sq inf, and it goes on stepping and
    saving: its checkpoint, and ours of a state that holds inf, load back (a checkpoint's
    finiteness check refused them while the run itself went on)."""
    q = nn.Parameter(torch.ones(8, device=device))
    ref = torch.optim.AdamW([q], lr=1e-2)
    q.grad = torch.full_like(q, 1e21)
    ref.step()
    assert math.isinf(float(ref.state[q]["exp_avg_sq"][0]))
    p = nn.Parameter(torch.ones(8, device=device))
    opt = fused_opt.FusedMixedPrecisionAdamW([p], lr=1e-2, loss_scale=None, backend=backend)
    opt.load_state_dict(ref.state_dict())
    assert math.isinf(float(opt.state[p]["exp_avg_sq"][0]))
    opt.load_state_dict(opt.state_dict())  # and its own
    for precision in ("bf16", "int8"):
        other = fused_opt.FusedMixedPrecisionAdamW([nn.Parameter(torch.ones(8, device=device))], lr=1e-2,
                                                   loss_scale=None, state_precision=precision, backend=backend)
        other.load_state_dict(ref.state_dict())
        other.load_state_dict(other.state_dict())


def values_beyond_fp32(entry):
    entry["exp_avg"] = torch.full((40,), -1e300, dtype=torch.float64)


def test_what_a_state_dict_must_not_load():
    p, opt = stepped(fused_opt.FusedMixedPrecisionAdamW, state_precision="int8", ema_decay=0.9)
    good = opt.state_dict()

    def edited(fn):
        sd = copy.deepcopy(good)
        fn(sd["state"][0])
        return sd
    codes, scale = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_scale"].clone()  # int8 codes
    cases = [
        # int8 codes with scales beside them never load as a master or an EMA
        ("master_param", edited(lambda e: e.update(master_param=codes.clone(), master_param_scale=scale.clone()))),
        ("ema_param", edited(lambda e: e.update(ema_param=codes.clone(), ema_param_scale=scale.clone()))),
        # finite float64 values beyond FP32's range would load as inf
        ("range", edited(lambda e: e.update(master_param=torch.full((40,), 1e300, dtype=torch.float64)))),
        ("range", edited(values_beyond_fp32)),
        ("range", edited(lambda e: e.update(ema_param=torch.full((40,), 1e40, dtype=torch.float64)))),
        # a master or an EMA that is not finite is written into the model
        ("inf or NaN", edited(lambda e: e.update(master_param=torch.full((40,), math.nan)))),
    ]
    for match, sd in cases:
        before = snapshot(opt, p)
        with pytest.raises(ValueError, match=match if match != "range" else "beyond"):
            opt.load_state_dict(sd)
        assert_unchanged(opt, p, before)
    extra = good["param_groups"][0]["fused_opt"]
    for name in ("applied_steps", "consecutive_skips"):
        sd = copy.deepcopy(good)
        sd["param_groups"][0]["fused_opt"] = {**extra, name: torch.tensor(2**31, dtype=torch.int64)}
        with pytest.raises(ValueError, match=name):
            opt.load_state_dict(sd)


def test_first_int8_format_checkpoints_still_load():
    """Codes of the first int8 format (softsign int8 and sqrt-linear uint8 under torch's names,
    scales beside them) are decoded by that format's rule and re-encoded."""
    from fused_opt.state_precision import decode_legacy
    p, opt = stepped(fused_opt.FusedMixedPrecisionAdamW, state_precision="int8")
    sd = copy.deepcopy(opt.state_dict())
    entry = sd["state"][0]
    g = torch.Generator().manual_seed(0)
    old_m = torch.randint(-127, 128, (40,), generator=g, dtype=torch.int8)
    old_v = torch.randint(0, 256, (40,), generator=g, dtype=torch.int16).to(torch.uint8)
    entry.update(exp_avg=old_m, exp_avg_sq=old_v, exp_avg_scale=opt.state[p]["exp_avg_scale"].clone(),
                 exp_avg_sq_scale=opt.state[p]["exp_avg_sq_scale"].clone())
    opt.load_state_dict(sd)
    from fused_opt import state_precision as sp
    got_m = sp.decode(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_scale"])
    want_m = decode_legacy(old_m, entry["exp_avg_scale"])
    assert bool(((got_m - want_m).abs() <= want_m.abs() / 16 + 1e-30).all())
    got_v = sp.decode(opt.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq_scale"])
    want_v = decode_legacy(old_v, entry["exp_avg_sq_scale"])
    torch.testing.assert_close(got_v, want_v, rtol=2.0**-10, atol=float(want_v.max()) * 2.0**-30)


# -- the EMA under evaluation code ---------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("first", ["ema_params", "swap_ema"])
def test_an_ema_first_asked_for_under_inference_mode_keeps_training(first, backend, device):
    p = nn.Parameter(torch.randn(33, device=device).to(torch.bfloat16))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, momentum=0.9, ema_decay=0.5, loss_scale=None, backend=backend)
    with torch.inference_mode():
        if first == "ema_params":
            emas = opt.ema_params()
        else:
            with opt.swap_ema():
                pass
            emas = opt.ema_params()
    assert not emas[0].is_inference()
    start = emas[0].clone()
    p.grad = torch.ones_like(p)
    opt.step()  # raised on the torch backend before (an inference tensor updated outside it)
    p.grad = torch.ones_like(p)
    opt.step()
    ema = opt.ema_params()[0]
    assert not torch.equal(ema, start)
    ema.add_(0.0)  # user code can update it


def test_swap_ema_without_with_warns():
    p = nn.Parameter(torch.randn(3))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, ema_decay=0.9, loss_scale=None)
    with pytest.warns(RuntimeWarning, match="without `with`"):
        opt.swap_ema()
        import gc
        gc.collect()
    with opt.swap_ema():  # used as documented: no warning
        pass

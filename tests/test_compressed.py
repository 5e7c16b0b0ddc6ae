"""Compressed state and masters: state_precision="bf16" | "int8" (state_precision.py) and
master_weights="remainder8" (remainder.py rebuild8). The torch backend is the oracle of the
encodings; every fused backend is held to its bits where the math is the same operations
(SGD without clipping), and to one code step where it is not (AdamW's bias corrections and the
clip coefficient round alike only to an ulp)."""
import copy
import io
import math

import pytest
import torch

import fused_opt
from fused_opt import state_precision as sp
from fused_opt.remainder import rebuild8, split8
from harness import (BACKEND_DEVICE_IDS, BACKEND_DEVICES, Config, assign_groups, make_grads, make_params,
                     ordered_bits, run_step)
from test_flat_grads import write_grads
from test_matrix import CONFIGS
from test_remainder import bits, f32, stress_masters

FUSED = [(b, d) for b, d in BACKEND_DEVICES if b != "torch"]
FUSED_IDS = [f"{b}-{d}" for b, d in FUSED]
# (master_weights, state_precision) beyond the default fp32/fp32
MODES = [("fp32", "bf16"), ("fp32", "int8"), ("remainder8", "fp32"), ("remainder8", "int8"),
         ("remainder", "int8"), ("remainder8", "bf16")]
MODE_IDS = [f"{m}-{s}" for m, s in MODES]
# Configs whose math is the same operations on every backend (no clip coefficient).
EXACT = ["plain", "momentum", "momentum-dampening", "nesterov-wd", "maximize", "two-groups", "three-groups-mixed",
         "static-scale-inf", "nan-first-steps", "growth-and-backoff"]
CLIPPED = ["clip-l2", "clip-inf", "inf-injected"]


# -- the encodings, on the host -------------------------------------------------------------
def test_int8_signed_codes_keep_each_element_relative_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.logspace(-6, 3, 1000)  # blocks of very different ranges
    x[::7] *= 1e-3                                                       # and small elements beside large
    codes, scale = sp.encode(x, signed=True)
    assert codes.dtype == torch.int8 and scale.shape == (sp.num_blocks(1000),)
    blocks = torch.nn.functional.pad(x, (0, scale.numel() * sp.BLOCK - 1000)).view(-1, sp.BLOCK)
    assert torch.equal(scale, blocks.abs().amax(dim=1))
    y = sp.decode(codes, scale)
    each = scale.repeat_interleave(sp.BLOCK)[:1000]
    # 3 mantissa bits, dithered: within 1/8 of the element itself (not of its block's largest)
    # down to 2^-15 of the scale; below that, 0 or the smallest code
    kept = x.abs() >= 2.0**-15 * each
    assert bool(((y - x).abs() <= x.abs() / 8 * 1.000001)[kept].all())
    assert bool((torch.sign(y) == torch.sign(x))[kept].all())
    assert bool(((y - x).abs() <= 2.0**-15 * each)[~kept].all())
    # and unbiased: over many salts the mean code value is the value
    mean = torch.stack([sp.decode(*sp.encode(x, True, salt)) for salt in range(200)]).mean(0)
    assert bool(((mean - x).abs() <= x.abs() * 0.03 + 2.0**-15 * each).all())
    largest = blocks.abs().argmax(dim=1) + torch.arange(scale.numel()) * sp.BLOCK
    largest = largest[largest < 1000]
    assert torch.equal(y[largest], x[largest])  # a block's largest is exact (code 121)
    assert int(codes.abs().max()) == sp.SIGNED_MAX


def test_int8_signed_decay_follows_fp32():
    """x * beta, step after step, beside a neighbour that keeps the block's scale. Above
    beta = 1/2 the codes are dithered (rounded to nearest, above 15/16 every code near the
    bottom of its octave would be a fixed point: a momentum that never decays); at 1/2 they are
    rounded to nearest. Either way the total (what a momentum moves its weight by) is FP32's
    within 15 %, and the codes reach 0 once FP32 is below the smallest code."""
    scale = torch.ones(1)
    for beta in (0.5, 0.9, 0.95, 0.99):
        block = torch.full((sp.BLOCK,), 90, dtype=torch.int8)
        block[0] = sp.SIGNED_MAX
        block[1::2] *= -1
        x = sp.decode(block, scale)
        fp32 = x.clone()
        total, total_fp32 = 0.0, 0.0
        for step in range(1, int(30 / (1 - beta))):
            y = x * beta
            y[0] = 1.0
            x = sp.decode(*sp.encode(y, True, sp.dithered_salt(beta, step)))
            fp32 = fp32 * beta
            fp32[0] = 1.0
            total += float(x[1:].abs().sum())
            total_fp32 += float(fp32[1:].abs().sum())
        assert abs(total / total_fp32 - 1) < 0.15, (beta, total / total_fp32)
        assert float(fp32[1:].abs().max()) < 2.0**-20 and bool((x[1:] == 0).all()), beta
    # rounded to nearest at 0.99, the codes would not move
    block = torch.full((sp.BLOCK,), 9, dtype=torch.int8)
    block[0] = sp.SIGNED_MAX
    y = sp.decode(block, scale) * 0.99
    y[0] = 1.0
    assert torch.equal(sp.encode(y, True, 0)[0], block)


def test_int8_unsigned_codes_are_halves_relative_to_the_block():
    g = torch.Generator().manual_seed(1)
    v = torch.rand(4097, generator=g) ** 8 * 1e-3
    v[::5] *= 1e-6                                              # v of 1e-9 beside v of 1e-3: kept
    codes, scale = sp.encode(v, signed=False)
    assert codes.dtype == torch.float16
    blocks = torch.nn.functional.pad(v, (0, scale.numel() * sp.BLOCK - 4097)).view(-1, sp.BLOCK)
    assert torch.equal(scale, blocks.amax(dim=1))
    back = sp.decode(codes, scale)
    each = scale.repeat_interleave(sp.BLOCK)[:4097]
    normal = v >= 2.0**-29 * each                               # half's normals: 11 bits
    assert bool(((back - v).abs() <= v * 2.0**-11)[normal].all())
    assert bool(((back - v).abs() <= 2.0**-40 * each)[~normal].all())
    assert bool((back >= 0).all()) and bool((back[v > 2.0**-39 * each] > 0).all())
    # beta2 = 0.999 moves every element (one byte cannot: 0.1 % is below its spacing)
    again, s2 = sp.encode(back * 0.999, signed=False)
    moved = sp.decode(again, s2) < back
    assert bool(moved[normal].all())


def test_int8_encoding_is_stable_under_reencoding():
    """Decoding and encoding again gives the same codes and scales: a step that leaves a state
    unchanged leaves its bytes unchanged."""
    g = torch.Generator().manual_seed(2)
    for signed in (True, False):
        x = torch.randn(777, generator=g)
        x = x if signed else x.abs()
        codes, scale = sp.encode(x, signed)
        again, scale2 = sp.encode(sp.decode(codes, scale), signed)
        assert torch.equal(again.view(torch.int8 if signed else torch.int16),
                           codes.view(torch.int8 if signed else torch.int16)) and torch.equal(scale2, scale)


def test_int8_stress_values():
    for signed in (True, False):
        x = torch.zeros(4 * sp.BLOCK)
        x[0] = 3e38                          # the largest magnitudes: no overflow in t = x / scale
        x[1] = -3e38 if signed else 1e38
        x[sp.BLOCK:2 * sp.BLOCK] = 1e-40     # subnormals
        x[2 * sp.BLOCK + 5] = math.inf       # a non-finite value poisons its block only
        x[3 * sp.BLOCK:] = -0.0              # an all-zero block
        codes, scale = sp.encode(x, signed=signed)
        y = sp.decode(codes, scale)
        assert y[0] == x[0]
        if signed:
            assert y[1] == x[1] and codes[0] == sp.SIGNED_MAX and codes[1] == -sp.SIGNED_MAX
        else:
            assert abs(float(y[1]) - 1e38) <= 1e38 * 2.0**-11
        assert torch.equal(y[sp.BLOCK:2 * sp.BLOCK], x[sp.BLOCK:2 * sp.BLOCK])  # a block of equal values is exact
        assert math.isinf(float(scale[2])) and bool(y[2 * sp.BLOCK:3 * sp.BLOCK].isnan().all())
        assert float(scale[3]) == 0 and bool((y[3 * sp.BLOCK:] == 0).all())
    nan_codes, nan_scale = sp.encode(torch.tensor([1.0, math.nan, 2.0]), signed=False)
    assert math.isnan(float(nan_scale[0])) and bool(sp.decode(nan_codes, nan_scale).isnan().all())


def test_remainder8_is_the_master_rounded_to_24_bits():
    for w in (stress_masters(), torch.randn(100_000, generator=torch.Generator().manual_seed(3)) * 10):
        w = w[torch.isfinite(w) & (w.abs() < 3e38)]
        p, r8, w24 = split8(w)
        assert torch.equal(bits(rebuild8(p, r8)), bits(w24))  # exact: the pair holds the 24-bit master
        expected = (bits(w).to(torch.int64) + 128) & 0xFFFFFF00  # half up in the bits
        assert torch.equal(bits(w24).to(torch.int64) & 0xFFFFFFFF, expected & 0xFFFFFFFF)
        assert int((bits(w24).to(torch.int64) - bits(w).to(torch.int64)).abs().max()) <= 128  # 2^-16 relative
        # the param is the 24-bit master rounded to BF16 (half up), so RNE(w) but within half a
        # 24-bit ulp of a BF16 tie
        near_tie = ((bits(w).to(torch.int64) & 0xFFFF) - 0x8000).abs() <= 128
        rne = w.to(torch.bfloat16)
        assert torch.equal(p[~near_tie].view(torch.int16), rne[~near_tie].view(torch.int16))
        assert int((ordered_bits(p) - ordered_bits(rne)).abs().max()) <= 1


def test_remainder8_error_bound_over_long_runs():
    """A master stepped by a constant update below a BF16 ulp, against an FP32 master: exact
    while the update is a multiple of the 24-bit ulp, within half a 24-bit ulp per step
    otherwise, and frozen below half a 24-bit ulp (what it loses against FP32)."""
    start = torch.full((64,), 1.0) + torch.arange(64) * 2.0**-7  # in [1, 1.5): 24-bit ulp 2^-15
    for delta, steps in ((2.0**-12, 300), (3.0e-5, 300), (1.0e-5, 300)):
        p, r8, _ = split8(start)
        w32 = start.clone()
        for _ in range(steps):
            p, r8, _ = split8(rebuild8(p, r8) + delta)
            w32 = w32 + delta
        err = (rebuild8(p, r8) - w32).abs().max().item()
        if delta == 2.0**-12:
            assert err == 0.0
        elif delta == 3.0e-5:  # rounded up to 2^-15 each step
            assert 0 < err <= steps * 2.0**-16
        else:  # below half an ulp: the master never moves
            assert err == pytest.approx(steps * delta, rel=1e-2)  # (w32 itself rounds)


# -- every backend against the oracle -------------------------------------------------------
def build(config, backend, device, master, state, flat=False, adamw=False):
    params = make_params(config, device)
    groups, _ = assign_groups(config, params)
    cls = fused_opt.FusedMixedPrecisionAdamW if adamw else fused_opt.FusedMixedPrecisionSGD
    opt = cls(groups, max_grad_norm=config.max_grad_norm, norm_type=config.norm_type, loss_scale=config.loss_scale,
              init_scale=config.init_scale, growth_interval=config.growth_interval, hysteresis=config.hysteresis,
              min_scale=config.min_scale, max_scale=config.max_scale, backend=backend, master_weights=master,
              state_precision=state, flat_grads=flat, ema_decay=config.ema_decay)
    return params, opt


def state_tensors(opt, p):
    return {k: v for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor) and v is not p}


def decoded(opt, p, key):
    st = opt.state[p]
    v = st[key]
    if sp.is_codes(v, st.get(sp.scale_key(key))):
        return sp.decode(v.cpu(), st[sp.scale_key(key)].cpu())
    return v.detach().float().cpu()


def compare(oa, ob, pa, pb, step, exact):
    for i, (a, b) in enumerate(zip(pa, pb)):
        sa, sb = state_tensors(oa, a), state_tensors(ob, b)
        assert sa.keys() == sb.keys(), (step, i)
        if exact:
            assert torch.equal(bytes_of(a), bytes_of(b)), (step, i)
            for key in sa:
                x, y = sa[key].detach(), sb[key].detach().cpu()
                if x.dim() == 0 and a.numel() == 0:
                    continue  # an empty param's first-step flag: never read
                same = torch.equal(x, y) if x.dim() == 0 else torch.equal(x.contiguous().view(torch.uint8),
                                                                        y.contiguous().view(torch.uint8))
                assert same, (step, i, key)
        else:
            if a.numel():  # a few ulps: a code one step away (below) moves later updates by its 6-12 %
                assert int((ordered_bits(a.detach().contiguous()) - ordered_bits(b.detach().cpu().contiguous())
                            ).abs().max()) <= 4, (step, i)
            for key, x in sa.items():
                if key.endswith("_scale") or x.dim() == 0:
                    continue
                xa, xb = decoded(oa, a, key), decoded(ob, b, key)
                if key == "master_remainder":  # compared through the params above
                    continue
                tol = 0.02 * float(xa.abs().max()) if xa.numel() else 0.0
                # one code step of signed int8 codes (3 mantissa bits: 1/8 relative): a last-bit
                # difference of the FP32 value can round to the neighbouring code
                signed_codes = x.dtype == torch.int8 and key != "master_remainder"
                torch.testing.assert_close(xb, xa, rtol=0.13 if signed_codes else 2e-2, atol=tol + 1e-30,
                                           msg=f"{step} {i} {key}")


def lockstep(config, backend, device, master, state, exact, flat=False, adamw=False):
    (pa, oa), (pb, ob) = build(config, "torch", "cpu", master, state, flat, adamw), build(
        config, backend, device, master, state, flat, adamw)
    for step in range(config.steps):
        grads = make_grads(config, pa, step, float(oa.loss_scale))
        for opt, params, gs in ((oa, pa, grads), (ob, pb, [None if g is None else g.clone() for g in grads])):
            if flat:
                write_grads(opt, params, [None if g is None else g.to(params[0].device) for g in gs])
                opt.scale_loss(torch.zeros((), device=params[0].device))
                opt.step()
            else:
                run_step(opt, params, gs)
        assert bool(oa.last_step_skipped) == bool(ob.last_step_skipped)
        # (in a function of its own: views of flat storage held across a step would look like
        # state replaced behind the optimizer's back, flat_storage.py)
        compare(oa, ob, pa, pb, step, exact)
    return (pa, oa), (pb, ob)


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def _bf16(name, **over):
    return Config(**{**CONFIGS[name].__dict__, "dtype": torch.bfloat16, **over})


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("master,state", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("name", EXACT)
def test_sgd_bits_match_the_oracle(name, master, state, backend, device):
    lockstep(_bf16(name), backend, device, master, state, exact=True)


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("master,state", [("fp32", "int8"), ("remainder8", "int8")], ids=["fp32-int8", "remainder8-int8"])
@pytest.mark.parametrize("name", CLIPPED)
def test_sgd_with_clipping_follows_the_oracle(name, master, state, backend, device):
    lockstep(_bf16(name), backend, device, master, state, exact=False)


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("state", ["bf16", "int8"])
def test_state_precision_with_fp16_and_fp32_params(state, dtype, backend, device):
    lockstep(Config(**{**CONFIGS["nesterov-wd"].__dict__, "dtype": dtype}), backend, device, "fp32", state, exact=True)


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("master,state", MODES, ids=MODE_IDS)
def test_flat_grads(master, state, backend, device):
    (_, oa), (_, ob) = lockstep(_bf16("two-groups"), backend, device, master, state, exact=True, flat=True)
    assert ob.flat_grads_status == "active" and oa.flat_grads_status == "active"


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("master,state", [("remainder8", "int8"), ("fp32", "bf16")], ids=["remainder8-int8", "fp32-bf16"])
def test_with_ema(master, state, backend, device):
    lockstep(_bf16("momentum", ema_decay=0.9), backend, device, master, state, exact=True)


def adamw_config(**over):
    return Config(**{**CONFIGS["inf-injected"].__dict__, "dtype": torch.bfloat16, "optimizer": "adamw",
                     "groups": [dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=False,
                                     maximize=False),
                                dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.0, amsgrad=True,
                                     maximize=True)], **over})


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("master,state", MODES, ids=MODE_IDS)
def test_adamw_follows_the_oracle(master, state, backend, device):
    lockstep(adamw_config(), backend, device, master, state, exact=False, adamw=True)


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
def test_adamw_flat_grads(backend, device):
    lockstep(adamw_config(max_grad_norm=None), backend, device, "remainder8", "int8", exact=False, flat=True,
             adamw=True)


# -- the pipeline around the state ----------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("adamw", [False, True], ids=["sgd", "adamw"])
def test_a_skipped_step_modifies_nothing(adamw, backend, device):
    p = torch.nn.Parameter(torch.randn(1000, device=device).to(torch.bfloat16))
    cls = fused_opt.FusedMixedPrecisionAdamW if adamw else fused_opt.FusedMixedPrecisionSGD
    opt = cls([p], lr=0.1, momentum=0.9, backend=backend, master_weights="remainder8", state_precision="int8") \
        if not adamw else cls([p], lr=0.1, backend=backend, master_weights="remainder8", state_precision="int8")
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    before = {k: v.clone() for k, v in state_tensors(opt, p).items()}
    p_before = p.detach().clone()
    p.grad = torch.randn_like(p)
    p.grad[17] = math.inf
    opt.step()
    assert bool(opt.last_step_skipped)
    assert torch.equal(p.view(torch.int16), p_before.view(torch.int16))
    for k, v in state_tensors(opt, p).items():
        assert torch.equal(v, before[k]), k


def test_bytes_per_param_meet_the_targets():
    """Params + optimizer state, from the storages, for BF16 params (4,096 elements each)."""
    def per_param(cls, **kw):
        ps = [torch.nn.Parameter(torch.randn(4096).to(torch.bfloat16)) for _ in range(3)]
        opt = cls(ps, lr=0.1, backend="torch", **kw)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        total = sum(p.numel() * p.element_size() + sum(v.numel() * v.element_size() for v in state_tensors(opt, p).values()
                                                      if v.dim() > 0) for p in ps)
        return total / sum(p.numel() for p in ps)
    sgd = per_param(fused_opt.FusedMixedPrecisionSGD, momentum=0.9, master_weights="remainder8", state_precision="int8")
    adamw = per_param(fused_opt.FusedMixedPrecisionAdamW, master_weights="remainder8", state_precision="int8")
    assert sgd == 2 + 1 + 1 + 4 / sp.BLOCK <= 4.5
    assert adamw == 2 + 1 + 1 + 2 + 8 / sp.BLOCK <= 7  # exp_avg int8, exp_avg_sq 16-bit, two scales
    assert per_param(fused_opt.FusedMixedPrecisionSGD, momentum=0.9) == 10
    assert per_param(fused_opt.FusedMixedPrecisionAdamW, state_precision="bf16") == 2 + 4 + 4


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_state_dict_holds_values_and_loads_back_to_the_same_codes(backend, device):
    """int8 state is saved as FP32 values under torch's names (any loader, any layout can read
    them) and loads back to the very codes and scales it was saved from."""
    def make(state="int8"):
        ps = [torch.nn.Parameter(torch.randn(n, device=device).to(torch.bfloat16)) for n in (7, 1023)]
        return ps, fused_opt.FusedMixedPrecisionAdamW(ps, lr=1e-2, backend=backend, master_weights="remainder8",
                                                      state_precision=state)
    ps, opt = make()
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    saved = opt.state_dict()
    entry = saved["state"][1]
    # values under torch's names, no codes or scales; the master in FP32 and its live remainder
    assert entry["exp_avg"].dtype == torch.float32 and entry["exp_avg_sq"].dtype == torch.float32
    assert not any(k.endswith(("_codes", "_scale")) for k in entry)
    live = opt.state[ps[1]]
    assert torch.equal(entry["exp_avg"], sp.decode(live["exp_avg"], live["exp_avg_scale"]))
    assert entry["master_param"].dtype == torch.float32 and torch.equal(entry["master_remainder"],
                                                                        live["master_remainder"])
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    qs, again = make()
    again.load_state_dict(torch.load(buffer))
    for p, q in zip(ps, qs):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        a, b = state_tensors(opt, p), state_tensors(again, q)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # both continue alike
    for p, q in zip(ps, qs):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    again.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    # into FP32 and BF16 state: decoded
    for precision in ("fp32", "bf16"):
        rs, other = make(precision)
        other.load_state_dict(opt.state_dict())
        for p, r in zip(ps, rs):
            assert other.state[r]["exp_avg"].dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
            torch.testing.assert_close(other.state[r]["exp_avg"].float(), decoded(opt, p, "exp_avg").to(device),
                                       rtol=1e-2, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_loads_torch_state_dicts_into_int8_state(backend, device):
    w = torch.nn.Parameter(torch.randn(100, 3, device=device))
    ref = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    for _ in range(2):
        w.grad = torch.randn_like(w)
        ref.step()
    p = torch.nn.Parameter(w.detach().to(torch.bfloat16))  # (a torch state dict holds no weights)
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, momentum=0.9, backend=backend, state_precision="int8",
                                           master_weights="remainder8")
    opt.load_state_dict(ref.state_dict())
    st = opt.state[p]
    assert st["momentum_buffer"].dtype == torch.int8
    want = ref.state[w]["momentum_buffer"].cpu()
    got = decoded(opt, p, "momentum_buffer")
    assert bool(((got - want).abs() <= want.abs() / 8 + float(want.abs().max()) * 2.0**-15).all())
    g = torch.randn_like(w)
    w.grad, p.grad = g, g.to(torch.bfloat16)
    opt.step()
    ref.step()
    torch.testing.assert_close(p.float(), w.detach(), rtol=0, atol=0.05)


def test_bad_compressed_state_dicts_raise_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(100).to(torch.bfloat16))
    opt = fused_opt.FusedMixedPrecisionAdamW([p], lr=1e-2, backend="torch", state_precision="int8")
    p.grad = torch.randn_like(p)
    opt.step()
    good = opt.state_dict()  # values; the earlier format held codes and scales, checked here
    for name in ("exp_avg", "exp_avg_sq"):
        del good["state"][0][name]
        good["state"][0][sp.codes_key(name)] = opt.state[p][name].clone()
        good["state"][0][sp.scale_key(name)] = opt.state[p][sp.scale_key(name)].clone()
    before = {k: v.clone() for k, v in state_tensors(opt, p).items()}
    opt.load_state_dict(copy.deepcopy(good))  # it loads, to the same codes
    for k, v in state_tensors(opt, p).items():
        assert torch.equal(v, before[k]), k
    cases = {
        "exp_avg_scale": (torch.zeros(3), "block scales"),
        "exp_avg_sq_codes": (torch.zeros(100, dtype=torch.int8), "float16"),
        "exp_avg_codes": (torch.full((100,), 127, dtype=torch.int8), "beyond"),
        "exp_avg": (torch.zeros(100), "both"),
    }
    for key, (value, message) in cases.items():
        bad = copy.deepcopy(good)
        bad["state"][0][key] = value
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["state"][0]["exp_avg_scale"][0] = -1.0
    with pytest.raises(ValueError, match="negative scale"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["state"][0]["exp_avg_sq_codes"][3] = -1.0
    with pytest.raises(ValueError, match="negative or non-finite codes"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    del bad["state"][0]["exp_avg_scale"]
    with pytest.raises(ValueError, match="block scales"):
        opt.load_state_dict(bad)
    for k, v in state_tensors(opt, p).items():
        assert torch.equal(v, before[k]), k


def test_options_are_checked():
    p = torch.nn.Parameter(torch.randn(4).to(torch.float16))
    with pytest.raises(ValueError, match="state_precision"):
        fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, state_precision="fp8")
    with pytest.raises(ValueError, match="remainder8.*BF16"):
        fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, master_weights="remainder8")


def test_codes_put_in_the_state_by_hand_are_checked():
    p = torch.nn.Parameter(torch.randn(100).to(torch.bfloat16))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, momentum=0.9, backend="torch", state_precision="int8")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.state[p]["momentum_buffer_scale"] = torch.zeros(2)  # 4 blocks needed: would be written past its end
    with pytest.raises(ValueError, match="block scales"):
        opt.step()
    # an FP32 buffer put in by hand is encoded
    opt.state[p]["momentum_buffer"] = torch.ones(100)
    del opt.state[p]["momentum_buffer_scale"]
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.int8


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_copies_keep_compressed_state(backend, device):
    p = torch.nn.Parameter(torch.randn(300, device=device).to(torch.bfloat16))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, momentum=0.9, backend=backend, master_weights="remainder8",
                                           state_precision="int8")
    p.grad = torch.randn_like(p)
    opt.step()
    twin = copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    g = torch.randn_like(p)
    p.grad, q.grad = g, g.clone()
    opt.step()
    twin.step()
    assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    for k, v in state_tensors(opt, p).items():
        assert torch.equal(v, state_tensors(twin, q)[k]), k

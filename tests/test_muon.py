"""FusedMixedPrecisionMuon and FusedMixedPrecisionMuSGD: against torch.optim.Muon itself, against
float64 transcriptions of torch.optim.Muon and Ultralytics' MuSGD with every pipeline feature,
and what they refuse."""
from __future__ import annotations

import copy
import math
import os
import pickle

import pytest
import torch

import fused_opt
from fused_opt import newton_schulz
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, ordered_bits
from reference_muon import ReferenceMuon, ReferenceMuSGD, newton_schulz64

# Matrices (wide, tall, two of one shape, a conv weight), then what Muon does not orthogonalize
# (sizes 1, 7, 1023) for an AdamW / SGD group; the last two: never a grad, grads from step 2.
MATRICES = [(8, 16), (16, 8), (12, 12), (12, 12), (6, 3, 3, 3)]
VECTORS = [(1,), (7,), (1023,)]
NEVER, LATE = 5, 6  # positions: a matrix that never gets a grad, one that gets grads from step 2
SHAPES = MATRICES + [(4, 4), (5, 10)] + VECTORS


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dtype)) for s in SHAPES]


def make_grads(params, step, scale, inject=None, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = []
    for i, p in enumerate(params):
        g = (torch.randn(p.shape, generator=gen) * 1e-2 * scale).to(p.dtype)
        grads.append(None if i == NEVER or (i == LATE and step < 2) else g)
    if inject == "inf":
        grads[1].view(-1)[3] = math.inf
    elif inject == "nan":
        grads[0].view(-1)[0] = math.nan
    return grads


def split(params, matrix_group: dict, other_group: dict):
    """Two groups: the matrices, and the vectors; group_of for the reference."""
    n = len(MATRICES) + 2
    groups = [dict(matrix_group, params=params[:n]), dict(other_group, params=params[n:])]
    return groups, [0] * n + [1] * (len(params) - n)


MUON_GROUP = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_coefficients=newton_schulz.NS_COEFFICIENTS,
                  eps=1e-7, ns_steps=5, adjust_lr_fn=None)
ADAMW_GROUP = dict(algorithm="adamw", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, amsgrad=False,
                   maximize=False)


def run(kind, dtype, steps=6, inject=None, group_update=None, **options):
    """Steps ours and the float64 reference side by side; returns both and the params."""
    params = make_params(dtype)
    if kind == "muon":
        matrix, other = dict(MUON_GROUP, **(group_update or {})), ADAMW_GROUP
        cls, ref_cls = fused_opt.FusedMixedPrecisionMuon, ReferenceMuon
    else:
        matrix = dict(dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, use_muon=True, muon=0.5,
                           sgd=0.5), **(group_update or {}))
        other = dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0, use_muon=False, muon=0.5, sgd=0.5)
        cls, ref_cls = fused_opt.FusedMixedPrecisionMuSGD, ReferenceMuSGD
    groups, group_of = split(params, matrix, other)
    options.setdefault("loss_scale", "dynamic")
    options.setdefault("init_scale", 2.0**10)
    opt = cls(groups, growth_interval=3, **options)
    ref_groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    ref = ref_cls(params, group_of, ref_groups, max_grad_norm=options.get("max_grad_norm"), loss_scale="dynamic",
                  init_scale=options["init_scale"], growth_interval=3, ema_decay=options.get("ema_decay"))
    start = [p.detach().double().clone() for p in params]
    for step in range(steps):
        assert float(opt.loss_scale) == ref.scale, f"step {step}: loss scale"
        grads = make_grads(params, step, ref.scale, (inject or {}).get(step))
        for p, g in zip(params, grads):
            p.grad = g
        opt.scale_loss(torch.zeros(()))
        opt.step()
        norm, skipped = ref.step(grads)
        assert bool(opt.last_step_skipped) == skipped, f"step {step}: skipped flag"
        if not skipped:
            torch.testing.assert_close(float(opt.last_grad_norm), norm, rtol=1e-5, atol=1e-12)
    return opt, ref, params, start


def master_of(opt, p):
    state = opt.state[p]
    if "master_remainder" in state:
        from fused_opt.remainder import rebuild_any
        return rebuild_any(p.detach(), state["master_remainder"])
    return state["master_param"].detach().float()


def check(opt, ref, params, start, rel=0.05):
    """Each master within `rel` of how far the reference moved it (Frobenius norms) (Newton–Schulz in BF16 vs
    float64), params their own master rounded; state buffers that do not depend on the weights
    (Muon's momentum) to FP32 rounding."""
    for i, p in enumerate(params):
        moved = float((ref.w[i] - start[i]).norm())
        if i == NEVER:
            assert torch.equal(p.detach().double(), start[i]), "a param without a grad moved"
            continue
        w = master_of(opt, p)
        err = float((w.double() - ref.w[i]).norm())
        assert err <= rel * moved + 1e-6 * float(ref.w[i].norm()), f"param {i}: {err} off, moved {moved}"
        if p.dtype != torch.float32 and "master_param" in opt.state[p]:
            assert torch.equal(p.detach(), w.to(p.dtype)), f"param {i} is not its master rounded"
        elif "master_remainder" in opt.state[p]:  # the param is its 24- or 32-bit master's top half, rounded
            assert float((p.detach().double() - w.double()).abs().max()) <= 2.0**-8 * float(w.abs().max())


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_muon_equals_torch_optim_muon_on_fp32_params(nesterov, adjust_lr_fn):
    """FP32 params, no loss scale, no clip: torch.optim.Muon's update, BF16 Newton–Schulz
    included, to within a BF16 ulp of its update (the same ops, batched by shape)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 16), (16, 8), (12, 12), (12, 12), (1, 9)]
    values = [torch.randn(s, generator=gen) for s in shapes]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ref = torch.optim.Muon(theirs, **kw)
    opt = fused_opt.FusedMixedPrecisionMuon(ours, **kw)
    for step in range(5):
        for a, b in zip(theirs, ours):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ref.step()
        opt.step()
        for k, (a, b) in enumerate(zip(theirs, ours)):
            ratio = newton_schulz.adjusted_lr_ratio(adjust_lr_fn, a.shape)
            torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0.02 * ratio * 2**-7 * (step + 1),
                                       msg=lambda m: f"step {step} param {k}: {m}")
            torch.testing.assert_close(opt.state[b]["momentum_buffer"], ref.state[a]["momentum_buffer"], rtol=1e-6,
                                       atol=1e-7)
    # the state dicts load both ways and keep stepping as one
    theirs_sd, ours_sd = ref.state_dict(), opt.state_dict()
    assert set(ours_sd["state"][0]) == {"momentum_buffer"}
    other = torch.optim.Muon([torch.nn.Parameter(b.detach().clone()) for b in ours], **kw)
    other.load_state_dict(ours_sd)
    mine = fused_opt.FusedMixedPrecisionMuon([torch.nn.Parameter(a.detach().clone()) for a in theirs], **kw)
    mine.load_state_dict(theirs_sd)
    for k in range(len(shapes)):
        torch.testing.assert_close(other.state[other.param_groups[0]["params"][k]]["momentum_buffer"],
                                   opt.state[ours[k]]["momentum_buffer"])
        torch.testing.assert_close(mine.state[mine.param_groups[0]["params"][k]]["momentum_buffer"],
                                   ref.state[theirs[k]]["momentum_buffer"])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_only_adamw_groups_clipped(backend, device):
    """A Muon optimizer with AdamW groups alone, clipped: every param is the update kernel's,
    none left for the torch ops to clip, and the step equals the torch ops'."""
    def run_on(name):
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, torch.bfloat16)) for s in [(7,), (3, 5)]]
        opt = fused_opt.FusedMixedPrecisionMuon([dict(params=params, algorithm="adamw")], lr=0.01,
                                                max_grad_norm=0.1, backend=name)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device, torch.bfloat16)
            opt.step()
        return params

    for a, b in zip(run_on("torch"), run_on(backend)):
        torch.testing.assert_close(b.float(), a.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("kind", ["muon", "musgd"])
def test_empty_matrices_step(kind, backend, device):
    """Matrices with no elements (0 x n, a stack of two, a conv with no output channels) beside
    a real one and an AdamW/SGD vector: nothing to step for them, and the rest steps as the
    torch ops step it (the C++ stage kernels divided by a member's size of 0 before)."""
    def run_on(name):
        gen = torch.Generator().manual_seed(3)
        shapes = [(0, 5), (0, 5), (0, 2, 3, 3), (6, 4)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, torch.bfloat16)) for s in shapes]
        vector = torch.nn.Parameter(torch.randn(7, generator=gen).to(device, torch.bfloat16))
        common = dict(backend=name, max_grad_norm=1.0, master_weights="remainder8", state_precision="int8")
        if kind == "muon":
            opt = fused_opt.FusedMixedPrecisionMuon([dict(params=params), dict(params=[vector], algorithm="adamw")],
                                                    lr=0.02, **common)
        else:
            opt = fused_opt.FusedMixedPrecisionMuSGD([dict(params=params, use_muon=True), dict(params=[vector])],
                                                     lr=0.02, momentum=0.9, **common)
        for _ in range(3):
            for p in params + [vector]:
                p.grad = torch.randn(p.shape, generator=gen).to(device, torch.bfloat16)
            opt.step()
        return params + [vector]

    expected, got = run_on("torch"), run_on(backend)
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        torch.testing.assert_close(b.float(), a.float(), rtol=2**-7, atol=0)
    assert not torch.equal(got[3].float(), torch.zeros(6, 4)), "the real matrix stepped"


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype, master_weights, state_precision", [
    (torch.float16, "fp32", "fp32"), (torch.bfloat16, "fp32", "fp32"), (torch.bfloat16, "remainder", "bf16"),
    (torch.bfloat16, "remainder8", "int8"), (torch.float16, "fp32", "int8")])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("kind", ["muon", "musgd"])
def test_stage_kernels_step_as_torch_ops(kind, backend, device, dtype, master_weights, state_precision, nesterov,
                                         monkeypatch):
    """Muon's and MuSGD's elementwise kernels (C++ here; Triton in its interpreter) against the
    torch ops they replace, with every master format and state precision (int8 state's decode
    and encode are kernels of the native stages too), on stacks and lone params (wide, square,
    tall, conv), an overflow step, an edited param, and a tensor-lr group (which stays on torch
    ops after its momentum):
    the C++ path computes as torch's CPU kernels (one FMA per lerp and per add with alpha), so
    bit for bit; Triton's interpreter rounds an FMA's product first, so there to FP32 rounding,
    amplified by Newton–Schulz."""
    from fused_opt.backends import stack_kernels
    calls = []
    for name in ("momentum", "apply", "musgd_apply", "encode_into", "elementwise_step"):
        for cls in (stack_kernels.NativeStages, stack_kernels.TritonStages):
            original = getattr(cls, name, None)
            if original is not None:
                monkeypatch.setattr(cls, name, lambda self, *a, _o=original, _n=name, **kw: calls.append(_n)
                                    or _o(self, *a, **kw))

    def run_on(name):
        gen = torch.Generator().manual_seed(5)
        shapes = [(8, 16)] * 3 + [(6, 3, 3, 3)] * 2 + [(12, 12), (16, 8), (16, 8), (4, 4), (4, 4)]  # wide, square, tall
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
        vectors = [torch.nn.Parameter(torch.randn(7, generator=gen).to(device, dtype)) for _ in range(2)]
        lr = torch.tensor(0.01, device=device)
        common = dict(max_grad_norm=1.0, backend=name, loss_scale="dynamic", init_scale=256.0, growth_interval=2,
                      master_weights=master_weights, state_precision=state_precision)
        if kind == "muon":
            opt = fused_opt.FusedMixedPrecisionMuon(
                [dict(params=params[:8]), dict(params=params[8:], lr=lr, momentum=0.8),
                 dict(params=vectors, algorithm="adamw")], lr=0.02, nesterov=nesterov, weight_decay=0.1, **common)
        else:
            opt = fused_opt.FusedMixedPrecisionMuSGD(
                [dict(params=params[:8], use_muon=True), dict(params=params[8:], use_muon=True, lr=lr),
                 dict(params=vectors, weight_decay=0.0)], lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=5e-4,
                **common)
        for step in range(5):
            for p in params + vectors:
                p.grad = (torch.randn(p.shape, generator=gen) * 256).to(device, dtype)
            if step == 2:
                params[3].grad.view(-1)[5] = math.inf
            if step == 3:
                params[1].data.view(-1)[:4] = 0.5  # an edit no version counter sees
            opt.scale_loss(torch.zeros((), device=device))
            opt.step()
        return opt, params + vectors

    ref, ref_params = run_on("torch")
    assert not calls
    opt, params = run_on(backend)
    if backend == "torch":
        assert not calls
        return
    if state_precision == "int8" and backend == "native":  # every buffer of every stack: Muon's 5 (AdamW's are
        assert calls.count("encode_into") == 5 * (5 if kind == "muon" else 5 * 2 + 1)  # the update kernel's), or
    if kind == "muon":  # MuSGD's 2 and SGD's; 4 stacks in the float-lr group, 1 with a tensor lr: momentum only
        assert calls.count("momentum") == 5 * 5 and calls.count("apply") == 5 * 4
        # the AdamW group: FusedMixedPrecisionAdamW's multi-tensor update kernel, once a step
        assert calls.count("elementwise_step") == 5
    else:  # and the SGD-only group of vectors
        assert calls.count("momentum") == 5 * 5 and calls.count("musgd_apply") == 5 * 5
    native_cpu = backend == "native" and device == "cpu"  # CUDA: torch's kernels and ours contract differently
    for k, (p, q) in enumerate(zip(ref_params, params)):
        a, b = ref.state[p], opt.state[q]
        assert a.keys() == b.keys()
        # Muon's AdamW group with FP32 masters and state: the torch ops run torch's fused AdamW,
        # which rounds exp_avg's lerp otherwise than our AdamW (its oracle's torch ops and the
        # native kernel agree bit for bit: the compact cases): there within FP32 rounding.
        exact = native_cpu and not (kind == "muon" and k >= len(ref_params) - 2 and master_weights == state_precision == "fp32")
        if native_cpu and not exact:
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"param {k} {key}: {m}")
            torch.testing.assert_close(q.detach().float(), p.detach().float(), rtol=2**-7, atol=0)
            continue
        if exact:
            for key in a:
                assert torch.equal(a[key], b[key]), f"param {k} {key}"
            continue
        values_a, values_b = _fp32_state(a, p), _fp32_state(b, q)
        for key in values_a:  # masters rebuilt, int8 state decoded: a code or a remainder apart is close
            scale = float(values_a[key].abs().max())
            torch.testing.assert_close(values_b[key], values_a[key], rtol=0, atol=2e-2 * scale,
                                       msg=lambda m: f"param {k} {key}: {m}")
        assert torch.equal(q.detach(), p.detach()) if exact else True
        if master_weights == "fp32":
            assert torch.equal(q.detach(), b["master_param"].to(dtype))
    assert float(opt.loss_scale) == float(ref.loss_scale)


def _fp32_state(state: dict, p) -> dict:
    """A param's state as FP32 values: its master (rebuilt from a remainder), buffers decoded."""
    from fused_opt.remainder import rebuild_any
    from fused_opt.state_precision import decode, scale_key
    out = {}
    for key, value in state.items():
        if key.endswith("_scale"):
            continue
        if key == "master_remainder":
            out["master"] = rebuild_any(p.detach(), value)
        elif scale_key(key) in state:
            out[key] = decode(value, state[scale_key(key)])
        else:
            out[key] = value.float()
    return out


def test_newton_schulz_batched_equals_per_matrix_torch():
    """The batched matrix stage gives torch's per-matrix result, wide and tall."""
    from torch.optim._muon import _zeropower_via_newtonschulz
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=gen) for s in [(8, 16), (8, 16), (16, 8), (5, 5)]]
    out = newton_schulz.orthogonalize(xs, "torch")
    for x, o in zip(xs, out):
        expected = _zeropower_via_newtonschulz(x, newton_schulz.NS_COEFFICIENTS, 5, 1e-7)
        torch.testing.assert_close(o.float(), expected.float(), rtol=0, atol=2**-7)
        # and float64's to BF16's accuracy
        torch.testing.assert_close(o.double(), newton_schulz64(x), rtol=0, atol=0.1)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_batches_hold_as_many_matrices_as_threads(threads, monkeypatch):
    """On the CPU a batch of the matrix stage holds a multiple of torch's thread count (a
    batched matmul runs each matrix's product on one thread), more where CPU_BATCH_BYTES has
    room; each matrix comes out as alone (to BF16 rounding: batch sizes pick GEMM kernels)."""
    sizes = []
    original = newton_schulz._whole_batch
    monkeypatch.setattr(newton_schulz, "_whole_batch", lambda x, *a: sizes.append(x.shape[0]) or original(x, *a))
    monkeypatch.setattr(newton_schulz, "CPU_BATCH_BYTES", 2 * 16 * 24 * 3)  # room for 3 of these
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(7, 16, 24, generator=torch.Generator().manual_seed(2))
        out = newton_schulz.orthogonalize([x], "torch", stacked=True)[0]
        batches = list(sizes)
        alone = [newton_schulz.orthogonalize([m], "torch")[0] for m in x.unbind(0)]
    finally:
        torch.set_num_threads(before)
    per = {1: 3, 2: 2, 3: 3}[threads]
    assert batches == [per] * (7 // per) + ([7 % per] if 7 % per else [])
    for k in range(7):
        torch.testing.assert_close(out[k].float(), alone[k].float(), rtol=0, atol=2**-6)


@pytest.mark.parametrize("variant", ["torch", "ultralytics"])
def test_tall_matrices_iterate_in_their_own_layout_on_the_cpu(variant):
    """On the CPU a tall matrix's iteration runs on its transposes in its own layout: the
    result is contiguous in the param's layout, and the same math as the iteration on the
    transposed view (to BF16 rounding: the two layouts' GEMM kernels may round apart)."""
    gen = torch.Generator().manual_seed(4)
    divisor, quintic = newton_schulz.ITERATIONS[variant]
    for k, rows, cols in [(1, 300, 40), (3, 64, 9), (2, 129, 128), (1, 7, 1)]:
        x = torch.randn(k, rows, cols, generator=gen)
        out = newton_schulz.orthogonalize([x], variant, stacked=True)[0]
        assert out.shape == x.shape and out.is_contiguous() and out.dtype == torch.bfloat16
        view = x.bfloat16().transpose(1, 2)
        expected = quintic(view / divisor(view, 1e-7), newton_schulz.NS_COEFFICIENTS, 5).transpose(1, 2)
        torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=2**-6)


@pytest.mark.parametrize("variant", ["torch", "ultralytics"])
def test_newton_schulz_of_many_shapes_together(variant):
    """Small matrices of different shapes (wide, tall, square, a conv weight, stacks, a 1 x n
    row) share zero-padded batches and come out as each shape alone gives them (the same
    math, to BF16 rounding), their own shapes; other settings batch apart."""
    gen = torch.Generator().manual_seed(1)
    ones = [torch.randn(s, generator=gen) for s in [(8, 16), (16, 8), (5, 5), (6, 3, 3, 3), (1, 9), (12, 7)]]
    stacks = [torch.randn(s, generator=gen).bfloat16() for s in [(3, 8, 16), (2, 10, 4), (4, 6, 3, 3, 3)]]
    lists = [[newton_schulz.Request(ones[:3], variant), newton_schulz.Request(ones[3:], variant, steps=3)],
             [newton_schulz.Request(stacks[:2], variant, stacked=True)],
             [newton_schulz.Request(stacks[2:], variant, stacked=True, steps=3)]]
    padded = []
    original = newton_schulz._padded
    newton_schulz._padded = lambda xs, *a: padded.append([x.shape for x in xs]) or original(xs, *a)
    try:
        together = newton_schulz.run_together(lists)
    finally:
        newton_schulz._padded = original
    assert padded and any(len({x[1:] for x in shapes}) > 1 for shapes in padded), "no shapes shared a batch"
    for requests, got in zip(lists, together):
        for r, rows in zip(requests, got):
            for u, o, alone in zip(r.updates, rows, newton_schulz.run([r])[0]):
                assert o.shape == u.shape and o.dtype == torch.bfloat16
                torch.testing.assert_close(o.float(), alone.float(), rtol=0, atol=2**-4)  # (see the fuzzed test)
    # what a step may pad: small matrices on the CPU; 0 x n and large ones alone
    assert newton_schulz.shares_batches([newton_schulz.Request(ones, variant)])
    assert not newton_schulz.shares_batches([newton_schulz.Request([torch.zeros(0, 4)], variant)])
    assert not newton_schulz.shares_batches([newton_schulz.Request([torch.zeros(257, 256)], variant)])
    assert not newton_schulz.shares_batches([newton_schulz.Request([torch.zeros(8, 8, device="meta")], variant)])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("kind", ["muon", "musgd"])
def test_a_step_runs_its_small_stacks_matrix_stages_together(kind, backend, device, monkeypatch):
    """Every stack of small matrices waits at its matrix stage and all run Newton-Schulz in
    one call per step (on the CPU); the step equals one that runs each stack's alone: the
    same momentum, the same params within a BF16 step of Newton-Schulz."""
    calls = []
    together = newton_schulz.run_together
    monkeypatch.setattr(newton_schulz, "run_together", lambda lists: calls.append(len(lists)) or together(lists))

    def run_on(shared):
        gen = torch.Generator().manual_seed(6)
        shapes = [(8, 16)] * 2 + [(16, 8), (12, 12), (6, 3, 3, 3), (6, 3, 3, 3), (4, 4), (1, 9)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, torch.bfloat16)) for s in shapes]
        vector = torch.nn.Parameter(torch.randn(7, generator=gen).to(device, torch.bfloat16))
        common = dict(backend=backend, max_grad_norm=1.0, lr=0.02)
        if kind == "muon":
            opt = fused_opt.FusedMixedPrecisionMuon([dict(params=params), dict(params=[vector], algorithm="adamw")],
                                                    **common)
        else:
            opt = fused_opt.FusedMixedPrecisionMuSGD([dict(params=params, use_muon=True), dict(params=[vector])],
                                                     momentum=0.9, **common)
        with monkeypatch.context() as m:
            if not shared:
                m.setattr(newton_schulz, "shares_batches", lambda requests: False)
            for _ in range(3):
                for p in params + [vector]:
                    p.grad = torch.randn(p.shape, generator=gen).to(device, torch.bfloat16)
                opt.step()
        return opt, params

    apart, apart_params = run_on(False)
    assert not calls
    opt, params = run_on(True)
    assert calls == ([6] * 3 if device == "cpu" else []), calls  # 6 stacks of one group and shape each
    for p, q in zip(apart_params, params):
        assert torch.equal(opt.state[q]["momentum_buffer"], apart.state[p]["momentum_buffer"])
        torch.testing.assert_close(q.float(), p.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_piece_norms_are_each_pieces_own_norm(norm_type, monkeypatch):
    """The norm pass of the rules with a matrix stage: one FP32 norm per piece, in order, whether
    the pieces go through torch's _foreach_norm or, on the CPU, as the rows of one view (tensors
    of several whole pieces, their tail apart), with empty tensors, 2-D ones, inf and NaN, tiny
    and huge values; bit for bit."""
    from fused_opt.backends import torch_backend
    monkeypatch.setattr(torch_backend, "NORM_PIECE", 64)
    gen = torch.Generator().manual_seed(3)
    rows_seen = 0
    for trial in range(120):
        tensors = []
        for _ in range(int(torch.randint(1, 6, (), generator=gen))):
            size = int(torch.randint(0, 64 * 5, (), generator=gen)) if trial % 3 else 64 * int(
                torch.randint(0, 4, (), generator=gen))
            t = torch.randn(size, generator=gen) * 10.0 ** float(torch.randint(-20, 20, (), generator=gen))
            if size and trial % 5 == 0:
                t[int(torch.randint(0, size, (), generator=gen))] = math.inf if trial % 2 else math.nan
            tensors.append(t.view(2, -1) if size % 2 == 0 and size else t)
            rows_seen += size // 64 > 1
        expected = [torch.linalg.vector_norm(piece, norm_type) for t in tensors if t.numel()
                    for piece in t.reshape(-1).split(64)]
        got = torch_backend._piece_norms(tensors, norm_type)
        assert got.dtype == torch.float64
        if not expected:
            assert torch.equal(got, torch.zeros(1, dtype=torch.float64))
            continue
        assert torch.equal(got.float().view(torch.int32), torch.stack(expected).view(torch.int32)), trial
    assert rows_seen > 50


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("kind, options", [("muon", {}), ("musgd", {}),
                                           ("muon", dict(master_weights="remainder8", state_precision="int8",
                                                         ema_decay=0.9)),
                                           ("muon", dict(dtype=torch.float16)), ("muon", dict(dtype=torch.float32))])
def test_large_stacks_unscale_when_they_step_and_step_as_kept_ones(kind, options, backend, device, monkeypatch):
    """A step keeps the FP32 unscaled grads of its stacks from the norm pass to their update only
    up to a budget: beyond it a stack's norm is taken in windows and its grads unscaled again
    when it steps (Muon's momentum kernel from the raw grads, of each param dtype), and on the
    CPU a stack's unscaled grads stay within a bound (longer stacks step in parts). The result
    is the same, bit for bit, clipped, with an overflow step."""
    from fused_opt.backends import buckets, stack_kernels, torch_backend
    monkeypatch.setattr(torch_backend, "NORM_PIECE", 16)  # pieces both runs share; several per matrix
    options = dict(options)
    dtype = options.pop("dtype", torch.bfloat16)

    def run_with(limits: dict):
        gen = torch.Generator().manual_seed(8)
        shapes = [(8, 16)] * 5 + [(6, 3, 3, 3)] * 3 + [(1, 7), (12, 12)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
        vectors = [torch.nn.Parameter(torch.randn(n, generator=gen).to(device, dtype)) for n in (1, 7, 33)]
        cls = fused_opt.FusedMixedPrecisionMuon if kind == "muon" else fused_opt.FusedMixedPrecisionMuSGD
        groups = ([dict(params=params), dict(params=vectors, algorithm="adamw")] if kind == "muon" else
                  [dict(params=params, use_muon=True), dict(params=vectors)])
        opt = cls(groups, lr=0.02, momentum=0.9, weight_decay=0.01, max_grad_norm=0.5, backend=backend,
                  loss_scale="dynamic", init_scale=2.0**8, **options)
        rows, windows, norms, sources = [], [], [], []
        fp32_rows, all_windows = buckets.fp32_rows, buckets.windows
        with monkeypatch.context() as m:
            for name, value in limits.items():
                m.setattr(torch_backend, name, value)
            for stages in (stack_kernels.NativeStages, stack_kernels.TritonStages):  # what the momentum reads
                m.setattr(stages, "momentum", lambda self, u, *a, _o=stages.momentum: sources.append(
                    isinstance(u, buckets.ScaledGrads)) or _o(self, u, *a))
            m.setattr(buckets, "fp32_rows", lambda tensors: rows.append(len(tensors) * tensors[0].numel())
                      or fp32_rows(tensors))
            m.setattr(buckets, "windows", lambda tensors, size: windows.extend(all_windows(tensors, size))
                      or iter(all_windows(tensors, size)))
            for step in range(4):
                for p in params + vectors:
                    p.grad = (torch.randn(p.shape, generator=gen) * 256).to(device, dtype)
                if step == 2:
                    params[3].grad.view(-1)[5] = math.inf
                opt.scale_loss(torch.zeros(()))
                opt.step()
                norms.append((float(opt.last_grad_norm), bool(opt.last_step_skipped)))
        return opt, params + vectors, rows, windows, norms, sources

    kept, kept_params, kept_rows, kept_windows, kept_norms, kept_sources = run_with({})
    limits = dict(KEPT_BYTES=4 * 2 * 128, WINDOW=3 * 16, STACK_BYTES=4 * 2 * 128)
    again, params, rows, windows, norms, sources = run_with(limits)
    # Muon's momentum kernel reads a large stack's raw grads, unscaled and clipped on the way in
    # (MuSGD's apply reads u too: its stacks take the rows); the kept run reads rows.
    assert not any(kept_sources)
    assert sum(sources) >= 4 * 5 if kind == "muon" and backend != "torch" else not any(sources)
    assert [skipped for _, skipped in norms] == [False, False, True, False]
    assert norms == kept_norms
    for p, q in zip(params, kept_params):
        assert torch.equal(p, q)
        for key, value in again.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, kept.state[q][key]), key
    assert max(kept_rows) == 5 * 128 and not kept_windows  # kept: each stack's rows whole, once
    longest = 3 * 16 * (1 if device == "cpu" else torch_backend.GPU_WINDOWS)
    assert all(sum(part.numel() for part in w) <= longest for w in windows)
    assert len(windows) > 8
    if device == "cpu":
        # stacks in parts: at most 256 elements, or as many members as torch has threads
        assert max(rows) <= max(2 * 128, torch.get_num_threads() * 162) and 5 * 128 not in rows


def test_newton_schulz_together_fuzzed():
    """Random sets of small matrices (stacks and lone ones, 2-D and conv shapes, wide and tall,
    both variants, two step counts) through run_together against each request alone: the
    padded batches cut back out what each shape alone gives. Where padding changes the matmul
    kernel the BF16 roundings can differ and the iterations carry them (in 18,682 random
    tensors: 35 differed, by at most 0.0117, 3 ulps at 0.76), so the bound is 2^-4: a padding
    or cutting bug is off by far more. Derandomized: the same examples every run."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    shape = st.one_of(st.tuples(st.integers(1, 40), st.integers(1, 40)),
                      st.tuples(st.integers(1, 12), st.integers(1, 4), st.sampled_from([1, 3]), st.sampled_from([1, 3])))
    request = st.tuples(st.lists(shape, min_size=1, max_size=4), st.booleans(), st.sampled_from([3, 5]),
                        st.sampled_from(["torch", "ultralytics"]), st.integers(1, 3))

    @hypothesis.settings(max_examples=int(os.environ.get("FUSED_OPT_FUZZ_EXAMPLES", "25")), deadline=None,
                         derandomize=True, database=None)
    @hypothesis.given(st.lists(st.lists(request, min_size=1, max_size=3), min_size=1, max_size=4), st.integers(0, 99))
    def check(lists, seed):
        gen = torch.Generator().manual_seed(seed)
        made = [[newton_schulz.Request([torch.randn(((k,) if stacked else ()) + s, generator=gen) for s in shapes],
                                       variant, steps=steps, stacked=stacked)
                 for shapes, stacked, steps, variant, k in requests] for requests in lists]
        for requests, got in zip(made, newton_schulz.run_together(made)):
            for r, rows in zip(requests, got):
                for u, o, alone in zip(r.updates, rows, newton_schulz.run([r])[0]):
                    assert o.shape == u.shape and o.dtype == torch.bfloat16
                    torch.testing.assert_close(o.float(), alone.float(), rtol=0, atol=2**-4)

    check()


def test_padded_batches_stay_within_the_cpu_batch_bytes():
    """The plan merges shapes only while the padded batch fits CPU_BATCH_BYTES, and every
    matrix is in exactly one batch at least as large as it."""
    shapes = ((1, 8, 16), (2, 8, 16), (1, 16, 576), (60, 64, 576), (1, 5, 5), (3, 32, 288), (30, 64, 576),
              (30, 64, 576))
    plan = newton_schulz._plan(shapes, 5)
    assert sorted(i for _, _, members in plan for i in members) == list(range(len(shapes)))
    for rows, cols, members in plan:
        assert all(shapes[i][1] <= rows and shapes[i][2] <= cols for i in members)
        if len(members) > 1:
            assert 2 * sum(shapes[i][0] for i in members) * rows * cols <= newton_schulz.CPU_BATCH_BYTES
    assert len(plan) < len(shapes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_muon_pipeline_against_float64(dtype, clip):
    """Loss scale with an inf and a NaN step (skipped, scale backed off), clipping, an AdamW
    group of sizes 1, 7, 1023, a conv weight, a param without grads, one with grads from step 2."""
    opt, ref, params, start = run("muon", dtype, inject={2: "inf", 4: "nan"}, max_grad_norm=clip)
    assert float(opt.loss_scale) == ref.scale
    check(opt, ref, params, start)
    for i in range(len(MATRICES)):
        torch.testing.assert_close(opt.state[params[i]]["momentum_buffer"].double(), ref.b[i], rtol=1e-5, atol=1e-9)
    for i in range(len(MATRICES) + 2, len(params)):
        assert float(opt.state[params[i]]["step"]) == ref.t[i]


@pytest.mark.parametrize("update", [dict(nesterov=False), dict(adjust_lr_fn="match_rms_adamw"),
                                    dict(weight_decay=0.0, momentum=0.0), dict(ns_steps=3, eps=1e-3),
                                    dict(ns_coefficients=(2.0, -1.5, 0.5))])
def test_muon_settings_against_float64(update):
    opt, ref, params, start = run("muon", torch.bfloat16, group_update=update)
    check(opt, ref, params, start)


@pytest.mark.parametrize("master_weights", ["remainder", "remainder8"])
@pytest.mark.parametrize("state_precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("kind", ["muon", "musgd"])
def test_compact_masters_and_state(kind, master_weights, state_precision):
    """BF16 params with remainders and BF16 / int8 momentum against the float64 reference.
    Newton–Schulz amplifies the momentum's error in its small singular directions: int8
    momentum (1/127 of a block's largest) moves the weights up to ~10 % off the float64 path
    in these few steps; bench.quality measures what that does to training."""
    opt, ref, params, start = run(kind, torch.bfloat16, inject={3: "inf"}, master_weights=master_weights,
                                  state_precision=state_precision, ema_decay=0.9)
    check(opt, ref, params, start, rel=0.15 if state_precision == "int8" else 0.05)
    for i, p in enumerate(params):
        if i != NEVER:
            ema = opt.state[p]["ema_param"].double()
            assert float((ema - ref.e[i]).abs().max()) <= 0.05 * float((ref.w[i] - start[i]).abs().max()) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nesterov", [True, False])
def test_musgd_pipeline_against_float64(dtype, nesterov):
    opt, ref, params, start = run("musgd", dtype, inject={2: "nan"}, max_grad_norm=0.05,
                                  group_update=dict(nesterov=nesterov))
    check(opt, ref, params, start)
    muon_params = params[:len(MATRICES) + 2]
    for i, p in enumerate(muon_params):
        if i != NEVER:
            assert set(opt.state[p]) >= {"momentum_buffer", "momentum_buffer_SGD"}
            torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), ref.b[i], rtol=1e-5, atol=1e-9)
    for p in params[len(MATRICES) + 2:]:
        assert "momentum_buffer_SGD" not in opt.state[p]


def test_skipped_step_writes_nothing():
    """An overflow step leaves every param, master, buffer, count and EMA bit for bit."""
    for cls, group in ((fused_opt.FusedMixedPrecisionMuon, {}), (fused_opt.FusedMixedPrecisionMuSGD,
                                                                dict(use_muon=True, momentum=0.9))):
        params = make_params(torch.bfloat16)[:5]
        opt = cls([dict(group, params=params)], loss_scale="dynamic", init_scale=4.0, state_precision="int8",
                  master_weights="remainder8", ema_decay=0.9)
        for step in range(2):
            for p, g in zip(params, make_grads(params, step, 4.0)):
                p.grad = g
            opt.scale_loss(torch.zeros(()))
            opt.step()
        before = copy.deepcopy(opt.state_dict())
        values = [p.detach().clone() for p in params]
        grads = make_grads(params, 5, float(opt.loss_scale), "inf")
        for p, g in zip(params, grads):
            p.grad = g
        opt.scale_loss(torch.zeros(()))
        opt.step()
        assert bool(opt.last_step_skipped)
        after = opt.state_dict()
        for p, v in zip(params, values):
            assert torch.equal(ordered_bits(p.detach()), ordered_bits(v))
        for k, entry in before["state"].items():
            for key, t in entry.items():
                assert torch.equal(after["state"][k][key], t), f"{cls.__name__} {key} changed on a skipped step"


def test_musgd_loads_an_ultralytics_checkpoint():
    """Their state names and groups (use_muon, no fused_opt entry) load and keep stepping as their update."""
    params = make_params(torch.float32)[:5]
    gen = torch.Generator().manual_seed(5)
    saved = {"state": {i: {"momentum_buffer": torch.randn(p.shape, generator=gen),
                           "momentum_buffer_SGD": torch.randn(p.shape, generator=gen)} for i, p in enumerate(params)},
             "param_groups": [dict(lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True, use_muon=True,
                                   params=list(range(5)))]}
    opt = fused_opt.FusedMixedPrecisionMuSGD(params, lr=0.1)
    opt.load_state_dict(saved)
    ref = ReferenceMuSGD(params, [0] * 5, [dict(saved["param_groups"][0], muon=0.5, sgd=0.5)], loss_scale=None)
    ref.b = [saved["state"][i]["momentum_buffer"].double() for i in range(5)]
    ref.b_sgd = [saved["state"][i]["momentum_buffer_SGD"].double() for i in range(5)]
    start = [p.detach().double().clone() for p in params]
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    for i, p in enumerate(params):
        err = float((p.detach().double() - ref.w[i]).abs().max())
        assert err <= 0.03 * float((ref.w[i] - start[i]).abs().max()) + 1e-7
        torch.testing.assert_close(opt.state[p]["momentum_buffer_SGD"].double(), ref.b_sgd[i], rtol=1e-4, atol=1e-6)
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer", "momentum_buffer_SGD"}


def test_grad_scaler_drives_muon_and_copies_keep_stepping():
    params = make_params(torch.float32)[:4]
    opt = fused_opt.FusedMixedPrecisionMuon(params, lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.Muon(twin, lr=0.02)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        scaler.scale(torch.zeros(()))
        for p, q in zip(params, twin):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g * scaler.get_scale()
            q.grad = g
        scaler.step(opt)
        scaler.update()
        ref.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-3)
    clone = copy.deepcopy(opt)
    again = pickle.loads(pickle.dumps(opt))
    for o in (clone, again):
        ps = [p for g in o.param_groups for p in g["params"]]
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
        assert all(torch.isfinite(p).all() for p in ps)


def test_scheduler_and_tensor_lr():
    params = make_params(torch.float32)[:4]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fused_opt.FusedMixedPrecisionMuon(params, lr=torch.tensor(0.02))
    ref = torch.optim.Muon(twin, lr=0.02)
    s1 = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, 1, gamma=0.5)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        for p, q in zip(params, twin):
            q.grad = torch.randn(p.shape, generator=gen)
            p.grad = q.grad.clone()
        opt.step()
        ref.step()
        s1.step()
        s2.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-4)


def test_flat_grads_steps_as_the_per_tensor_path():
    results = []
    for flat in (False, True):
        params = make_params(torch.bfloat16)[:5]
        opt = fused_opt.FusedMixedPrecisionMuon(params, lr=0.02, flat_grads=flat, max_grad_norm=1.0)
        for step in range(3):
            for p, g in zip(params, make_grads(params, step, float(opt.loss_scale))):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            opt.scale_loss(torch.zeros(()))
            opt.step()
        if flat:
            assert opt.flat_grads_status == "active"
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_remainder8_and_int8_momentum_hold_under_5_bytes_per_param():
    from fused_opt.bench.contenders import storage_bytes_per_param
    params = [torch.nn.Parameter(torch.randn(256, 512).bfloat16()) for _ in range(3)]
    opt = fused_opt.FusedMixedPrecisionMuon(params, master_weights="remainder8", state_precision="int8")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    held = storage_bytes_per_param(params, [t for p in params for t in opt.state[p].values()
                                            if isinstance(t, torch.Tensor)])
    assert held <= 5.0, held


def test_refusals_before_anything_is_written():
    vector = torch.nn.Parameter(torch.randn(7))
    matrix = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="algorithm=\"adamw\""):
        fused_opt.FusedMixedPrecisionMuon([matrix, vector])
    with pytest.raises(ValueError, match="use_muon=False"):
        fused_opt.FusedMixedPrecisionMuSGD([vector], use_muon=True)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_opt.FusedMixedPrecisionMuon([matrix], backend="cuda")
    with pytest.raises(ValueError, match="ns_steps"):
        fused_opt.FusedMixedPrecisionMuon([matrix], ns_steps=100)
    with pytest.raises(ValueError, match="ns_coefficients"):
        fused_opt.FusedMixedPrecisionMuon([matrix], ns_coefficients=(1.0, 2.0))
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        fused_opt.FusedMixedPrecisionMuon([matrix], adjust_lr_fn="other")
    with pytest.raises(ValueError, match="algorithm"):
        fused_opt.FusedMixedPrecisionMuon([matrix], algorithm="sgd")
    with pytest.raises(TypeError, match="unexpected keyword"):
        fused_opt.FusedMixedPrecisionMuon([matrix], clip=1.0)
    opt = fused_opt.FusedMixedPrecisionMuon([matrix])
    opt.param_groups[0]["ns_steps"] = -1  # an edited group is refused at the step, before any write
    matrix.grad = torch.ones_like(matrix)
    value = matrix.detach().clone()
    with pytest.raises(ValueError, match="ns_steps"):
        opt.step()
    assert torch.equal(matrix.detach(), value) and not opt.state


def test_adamw_group_takes_adamw_defaults():
    opt = fused_opt.FusedMixedPrecisionMuon([{"params": [torch.nn.Parameter(torch.randn(4, 4))]},
                                             {"params": [torch.nn.Parameter(torch.randn(4))], "algorithm": "adamw"}],
                                            lr=0.02)
    muon, adamw = opt.param_groups
    assert muon["eps"] == 1e-7 and muon["weight_decay"] == 0.1
    assert adamw["eps"] == 1e-8 and adamw["weight_decay"] == 1e-2 and adamw["betas"] == (0.9, 0.999)
    assert adamw["lr"] == 0.02


@pytest.mark.parametrize("numel", [7, 32, 100])
def test_stacked_int8_encoding_equals_each_tensor_alone(numel):
    """A stack of tensors encodes (blocks, dither index, a salt per tensor) and decodes as each alone."""
    from fused_opt.state_precision import decode, encode
    gen = torch.Generator().manual_seed(numel)
    xs = [torch.randn(numel, generator=gen) * 10 ** k for k in range(3)]
    salts = torch.tensor([0.0, 5.0, 9.0])
    codes, scales = encode(torch.stack(xs), True, salts.view(3, 1), rows=3)
    stacked = decode(codes, scales, rows=3)
    for k, x in enumerate(xs):
        c, s = encode(x, True, salts[k])
        assert torch.equal(codes[k], c) and torch.equal(scales.view(3, -1)[k], s)
        assert torch.equal(stacked[k], decode(c, s))
    codes, scales = encode(torch.stack(xs).abs(), False, 0, rows=3)
    for k, x in enumerate(xs):
        c, s = encode(x.abs(), False)
        assert torch.equal(codes[k], c) and torch.equal(scales.view(3, -1)[k], s)


def _stack_run(monkeypatch, kind, pack: bool, edit=None, steps=4, **options):
    """Many params of a few shapes stepped `steps` times; `pack=False` turns off keeping a
    stack's state as one tensor's rows; `edit(opt, params)` after step 1."""
    from fused_opt import step_layout
    if not pack:
        monkeypatch.setattr(step_layout, "_pack_stacks", lambda *args: None)
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 16)] * 3 + [(6, 3, 3, 3)] * 2 + [(12, 12)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes]
    vectors = [torch.nn.Parameter(torch.randn(7, generator=gen).bfloat16()) for _ in range(2)]
    cls = fused_opt.FusedMixedPrecisionMuon if kind == "muon" else fused_opt.FusedMixedPrecisionMuSGD
    groups = ([dict(params=params), dict(params=vectors, algorithm="adamw")] if kind == "muon" else
              [dict(params=params, use_muon=True), dict(params=vectors)])
    opt = cls(groups, lr=0.02, momentum=0.9, weight_decay=0.01, max_grad_norm=1.0, **options)
    for step in range(steps):
        for p in params + vectors:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
        if step == 0 and edit is not None:
            edit(opt, params)
    monkeypatch.undo()
    return opt, params + vectors


@pytest.mark.parametrize("kind", ["muon", "musgd"])
@pytest.mark.parametrize("options", [{}, dict(master_weights="remainder8", state_precision="int8", ema_decay=0.9),
                                     dict(state_precision="bf16")])
def test_a_stacks_state_lives_in_one_tensor_and_steps_as_apart(monkeypatch, kind, options):
    """After a step, the state of params of one group and shape is the rows of one tensor per
    entry (stepped in place, no gather or scatter); the values are those of state kept apart."""
    packed, params = _stack_run(monkeypatch, kind, True, **options)
    apart, params_apart = _stack_run(monkeypatch, kind, False, **options)
    for p, q in zip(params, params_apart):
        assert torch.equal(p, q)
        assert packed.state[p].keys() == apart.state[q].keys()
        for key, value in packed.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, apart.state[q][key]), key
    first, second = params[0], params[1]
    for key, value in packed.state[first].items():
        if isinstance(value, torch.Tensor):  # rows 0 and 1 of one storage
            other = packed.state[second][key]
            assert value.untyped_storage().data_ptr() == other.untyped_storage().data_ptr(), key
            assert other.storage_offset() == value.storage_offset() + value.numel(), key
    assert packed.state[first]["momentum_buffer"].untyped_storage().data_ptr() != \
        apart.state[params_apart[0]]["momentum_buffer"].untyped_storage().data_ptr()
    assert apart.state[params_apart[0]]["momentum_buffer"].untyped_storage().nbytes() == \
        apart.state[params_apart[0]]["momentum_buffer"].nbytes


def test_state_replaced_by_hand_steps_and_is_packed_again(monkeypatch):
    """A buffer put in state by hand (not one tensor's row) steps from its values, as in state
    kept apart, and is moved into the stack's tensor at the next step."""
    def edit(opt, params):
        opt.state[params[1]]["momentum_buffer"] = opt.state[params[1]]["momentum_buffer"] * 2 + 0.25
    packed, params = _stack_run(monkeypatch, "muon", True, edit=edit)
    apart, params_apart = _stack_run(monkeypatch, "muon", False, edit=edit)
    for p, q in zip(params, params_apart):
        assert torch.equal(p, q)
    for p, q in zip(params[:6], params_apart):
        assert torch.equal(packed.state[p]["momentum_buffer"], apart.state[q]["momentum_buffer"])
    rows = [packed.state[p]["momentum_buffer"] for p in params[:3]]
    assert len({r.untyped_storage().data_ptr() for r in rows}) == 1


def test_quick_muon_benchmark_pairs_ours_with_torch(tmp_path):
    """`--muon-only --quick`: the torch pipelines and ours in one run, with ratios, held bytes and host ops."""
    from fused_opt.bench.__main__ import main
    main(["--muon-only", "--quick", "--repeats", "2", "--steps", "1", "--out", str(tmp_path)])
    import json
    record = json.loads((tmp_path / "muon-cpu.json").read_text())
    rows = record["muon"]
    names = {r["contender"] for r in rows}
    assert {"torch.optim.Muon + AdamW(foreach)", "MuSGD (Ultralytics' step, transcribed)", "FusedMixedPrecisionMuon",
            "FusedMixedPrecisionMuSGD", "FusedMixedPrecisionMuon [remainder8 + int8 momentum]"} <= names
    for r in rows:
        assert r["time_ms"] > 0 and r["host_ops"] > 0 and r["tensors"] == 303
        assert (r["speedup_vs_torch_paired"] is None) == (not r["contender"].startswith("Fused"))
    compact = [r for r in rows if "remainder8" in r["contender"] and r["optimizer"] == "muon"]
    assert compact[0]["bytes_per_param_held"] < 5
    assert "| workload | optimizer | contender |" in (tmp_path / "muon-cpu.md").read_text()


def test_the_muon_benchmark_steps_what_the_transcription_steps():
    """The benchmark's MuSGD transcription and torch.optim.Muon pipeline take the same steps as ours."""
    from fused_opt.bench import workloads
    from fused_opt.bench.contenders import Model
    from fused_opt.bench.muon import OursMuon, TorchMuonPipeline
    model = Model(workloads.detector(0.05)[:12], torch.bfloat16, torch.device("cpu"))
    for optimizer in ("muon", "musgd"):
        theirs, ours = TorchMuonPipeline(model, optimizer), OursMuon(model, optimizer)
        for _ in range(2):
            theirs.step()
            ours.step()
        for a, b in zip(theirs.params, ours.params):
            ulps = (ordered_bits(a.detach()) - ordered_bits(b.detach())).abs()
            assert int(ulps.max()) <= 1, optimizer


def test_quality_runs_muon_and_musgd_beside_torch_on_fp32_weights(tmp_path):
    from fused_opt.bench import quality
    quality.main(["--steps", "20", "--tasks", "muon", "musgd", "--masters", "fp32", "remainder8", "--states", "int8",
                  "--out", str(tmp_path)])
    import json
    record = json.loads((tmp_path / "quality-cpu-muon-musgd.json").read_text())
    for task in ("muon", "musgd"):
        runs = [r for r in record["runs"] if r["task"] == task]
        reference = [r for r in runs if r["reference"]]
        assert len(reference) == 1 and reference[0]["master"] == "torch, FP32 weights"
        ours = next(r for r in runs if r["master"] == "fp32" and r["state"] == "fp32")
        assert abs(ours["final"] - reference[0]["final"]) <= 0.01 * reference[0]["final"]
    assert "vs torch FP32" in (tmp_path / "quality-cpu-muon-musgd.md").read_text()

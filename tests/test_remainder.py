"""master_weights="remainder" (remainder.py, csrc/sgd_math.h BF16Remainder): BF16 params with
int16 master remainders, bit for bit against the same backend with FP32 masters."""
import copy

import pytest
import torch

import fused_opt
from fused_opt.remainder import rebuild, remainder_of
from harness import (BACKEND_DEVICE_IDS, BACKEND_DEVICES, CPU_BACKEND_DEVICE_IDS, CPU_BACKEND_DEVICES, Config,
                     assign_groups, make_grads, make_params, run_step)
from test_flat_grads import FLAT_CONFIGS, write_grads
from test_matrix import CONFIGS


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().view(torch.int32)


def f32(*patterns) -> torch.Tensor:
    return torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


def stress_masters() -> torch.Tensor:
    """Masters that stress the encoding: around powers of two, signed zeros, subnormals, RNE
    carrying into the next exponent, the largest finite BF16 and what rounds past it, ties."""
    patterns = []
    for base in (0x3F800000, 0x40000000, 0x00800000, 0x7F000000):  # 1, 2, the smallest normal, 2^127
        patterns += [base + d for d in (-0x10001, -0x8001, -0x8000, -0x7FFF, -1, 0, 1, 0x7FFF, 0x8000, 0x8001)]
    patterns += [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x00007FFF, 0x00008000, 0x0000FFFF,
                 0x807FFFFF, 0x3F7FFFFF, 0x3F7F8000, 0x3F7F7FFF, 0xBF7FFFFF,          # carries into 1.0
                 0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F7FFF,          # largest finite BF16
                 0x3F818000, 0x3F828000, 0xBF818000, 0xBF828000]                      # ties, odd and even
    return f32(*[p & 0xFFFFFFFF if p >= 0 else p + 2**32 for p in patterns])


def tie_rounded_down(w: torch.Tensor) -> torch.Tensor:
    """The one master the remainder cannot hold: half an ulp above an even BF16 param."""
    b = bits(w).to(torch.int64) & 0xFFFFFFFF
    return ((b & 0xFFFF) == 0x8000) & (((b >> 16) & 1) == 0)


def expected_rebuilt(w: torch.Tensor) -> torch.Tensor:
    """w, or 1 ulp below it (in magnitude) where it is that one tie."""
    return torch.where(tie_rounded_down(w), bits(w) - 1, bits(w))


def test_host_encoding_on_stress_values():
    w = stress_masters()
    p = w.to(torch.bfloat16)
    r = remainder_of(w, p)
    assert torch.equal(bits(rebuild(p, r)), expected_rebuilt(w))
    assert torch.equal(rebuild(p, r).to(torch.bfloat16).view(torch.int16), p.view(torch.int16))
    assert int(tie_rounded_down(w).sum()) >= 4  # the case is in the set


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_kernels_encode_like_the_host(backend, device):
    # Stress masters loaded (the host splits them), stepped with lr = 0 (the kernels rebuild and
    # split them again), saved (the host rebuilds them): the same bits all the way.
    w = stress_masters()
    p = torch.nn.Parameter(torch.zeros(w.numel(), dtype=torch.bfloat16, device=device))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.0, momentum=0.9, backend=backend, master_weights="remainder")
    opt.load_state_dict({"state": {0: {"master_param": w}}, "param_groups": [dict(opt.state_dict()["param_groups"][0])]})
    assert torch.equal(p.detach().cpu().view(torch.int16), w.to(torch.bfloat16).view(torch.int16))
    p.grad = torch.zeros_like(p)
    opt.step()
    assert not bool(opt.last_step_skipped)
    saved = opt.state_dict()["state"][0]["master_param"].cpu()
    assert torch.equal(bits(saved), expected_rebuilt(w))
    assert torch.equal(p.detach().cpu().view(torch.int16), w.to(torch.bfloat16).view(torch.int16))


def build(config, backend, device, mode, flat=False):
    params = make_params(config, device)
    groups, _ = assign_groups(config, params)
    opt = fused_opt.FusedMixedPrecisionSGD(
        groups, max_grad_norm=config.max_grad_norm, norm_type=config.norm_type, loss_scale=config.loss_scale,
        init_scale=config.init_scale, growth_interval=config.growth_interval, hysteresis=config.hysteresis,
        min_scale=config.min_scale, max_scale=config.max_scale, backend=backend, master_weights=mode,
        flat_grads=flat)
    return params, opt


def masters_of(opt, params, mode):
    out = []
    for p in params:
        state = opt.state.get(p, {})
        if mode == "fp32":
            out.append(state.get("master_param", p.detach().float()).detach().clone())
        else:
            r = state.get("master_remainder")
            out.append(p.detach().float() if r is None else rebuild(p.detach(), r))
    return out


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("name", CONFIGS.keys())
def test_bit_exact_against_fp32_masters(name, backend, device):
    lockstep_against_fp32_masters(Config(**{**CONFIGS[name].__dict__, "dtype": torch.bfloat16}), backend, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("name", FLAT_CONFIGS)
def test_flat_grads_bit_exact_against_flat_fp32_masters(name, backend, device):
    # flat_grads=True in both runs (the same flat norm pass): the remainders live in a flat
    # int16 buffer, and the fast step runs from the second step on.
    opts = lockstep_against_fp32_masters(Config(**{**CONFIGS[name].__dict__, "dtype": torch.bfloat16}), backend,
                                         device, flat=True)
    for opt in opts:
        assert opt.flat_grads_status == "active" and opt._flat_grads.ran >= 5
    views = [t for t in opts[1].state.values() if "master_remainder" in t]
    assert views and all(e["master_remainder"].untyped_storage().data_ptr()
                         == opts[1]._flat_grads.storage.masters.data_ptr() for e in views)


def lockstep_against_fp32_masters(config, backend, device, flat=False):
    """Both modes in lockstep on the same grads (which do not depend on the params): params and
    rebuilt masters equal bit for bit, except where the FP32 run's master was the one tie the
    remainder cannot hold (rebuilt 1 ulp lower, checked); such an element is followed no
    further (its later steps start from another master)."""
    (params_a, opt_a), (params_b, opt_b) = (build(config, backend, device, "fp32", flat),
                                            build(config, backend, device, "remainder", flat))
    diverged = [torch.zeros(p.shape, dtype=torch.bool) for p in params_a]
    ties = 0
    for step in range(config.steps):
        assert float(opt_a.loss_scale) == float(opt_b.loss_scale)
        grads = make_grads(config, params_a, step, float(opt_a.loss_scale))
        for opt, params, gs in ((opt_a, params_a, grads), (opt_b, params_b, [None if g is None else g.clone()
                                                                               for g in grads])):
            if flat:
                write_grads(opt, params, gs)
                opt.scale_loss(torch.zeros((), device=device))
                opt.step()
            else:
                run_step(opt, params, gs)
        assert bool(opt_a.last_step_skipped) == bool(opt_b.last_step_skipped)
        for i, (wa, wb, pa, pb) in enumerate(zip(masters_of(opt_a, params_a, "fp32"),
                                                  masters_of(opt_b, params_b, "remainder"), params_a, params_b)):
            wa, wb = wa.cpu(), wb.cpu()
            tie = tie_rounded_down(wa) & ~diverged[i]
            ties += int(tie.sum())
            ok = ~diverged[i] & ~tie
            assert torch.equal(bits(wb)[ok], bits(wa)[ok]), f"step {step} master {i}"
            assert torch.equal((bits(wb) - bits(wa))[tie], -torch.ones(int(tie.sum()), dtype=torch.int32))
            same_p = pa.detach().cpu().view(torch.int16) == pb.detach().cpu().view(torch.int16)
            assert bool(same_p[ok].all()), f"step {step} param {i}"
            # The remainder run's param is always its own master rounded to nearest even.
            assert torch.equal(wb.to(torch.bfloat16).view(torch.int16), pb.detach().cpu().view(torch.int16))
            diverged[i] |= tie
    assert sum(int(d.sum()) for d in diverged) <= max(2, ties)
    return opt_a, opt_b


def bf16_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).bfloat16()


def train(model, opt, steps=3, seed=0, edit=None):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=gen).bfloat16()).float().square().mean().backward()
        if edit is not None:
            edit(step, model)
        opt.step()


HYPER = dict(lr=0.1, momentum=0.9, weight_decay=0.01, loss_scale=None)


def test_state_dict_holds_fp32_masters_and_loads_everywhere():
    model = bf16_mlp()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), master_weights="remainder", **HYPER)
    train(model, opt)
    assert set(opt.state[next(model.parameters())]) == {"master_remainder", "momentum_buffer", "momentum_first_step"}
    sd = opt.state_dict()
    # the FP32 master torch reads, and the remainder under its live name (DCP's flattened loads ask for those)
    assert set(sd["state"][0]) == {"master_param", "master_remainder", "momentum_buffer"}
    assert sd["state"][0]["master_param"].dtype == torch.float32
    # into FP32-master mode and back, and into torch's SGD (on FP32 copies of the params)
    twin = copy.deepcopy(model)
    fp32_opt = fused_opt.FusedMixedPrecisionSGD(twin.parameters(), **HYPER)
    fp32_opt.load_state_dict(sd)
    assert all(torch.equal(fp32_opt.state[q]["master_param"], rebuild(p.detach(), opt.state[p]["master_remainder"]))
               for p, q in zip(model.parameters(), twin.parameters()))
    torch.optim.SGD(copy.deepcopy(model).float().parameters(), lr=0.1, momentum=0.9).load_state_dict(sd)
    back = fused_opt.FusedMixedPrecisionSGD(copy.deepcopy(model).parameters(), master_weights="remainder", **HYPER)
    back.load_state_dict(fp32_opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip([opt.state[p]["master_remainder"] for p in model.parameters()],
                                                 [back.state[p]["master_remainder"] for p in back.param_groups[0]["params"]]))


def test_resume_is_bit_identical():
    model = bf16_mlp()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), master_weights="remainder", **HYPER)
    train(model, opt)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, seed=1)
    again = bf16_mlp(seed=7)
    again.load_state_dict(saved_model)
    opt2 = fused_opt.FusedMixedPrecisionSGD(again.parameters(), master_weights="remainder", **HYPER)
    opt2.load_state_dict(saved_opt)
    train(again, opt2, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def assert_follows_written(master: torch.Tensor, written: torch.Tensor):
    """A remainder master after a write of new values: the written value and the kept
    remainder, which rounds to the written value and lies within half a BF16 ulp of it."""
    assert torch.equal(master.to(torch.bfloat16).view(torch.int16), written.view(torch.int16))
    half_ulp = written.float().abs() * 2.0**-8 + 2.0**-133
    assert bool(((master - written.float()).abs() <= half_ulp).all())


@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
@pytest.mark.parametrize("how", ["init", "copy", "new_storage", "load_state_dict"])
def test_param_changed_outside_is_followed_by_its_master(how, flat):
    # A write is followed element by element: the written param rounds from its master, which
    # is the written value and the kept remainder (the FP32-master run re-takes it exactly);
    # training goes on from there, within a BF16 ulp of the FP32-master run.
    source = bf16_mlp(seed=3)

    def edit(step, model):
        if step != 1:
            return
        w = model[0].weight
        with torch.no_grad():
            if how == "init":
                torch.nn.init.constant_(w, 0.375)
            if how == "copy":
                w.copy_(source[0].weight)
            if how == "new_storage":
                w.data = source[0].weight.detach().clone()
        if how == "load_state_dict":
            model.load_state_dict(source.state_dict())
    runs = []
    for mode in ("fp32", "remainder"):
        model = bf16_mlp()
        opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), master_weights=mode, flat_grads=flat, **HYPER)
        train(model, opt, steps=2)
        edit(1, model)
        written = model[0].weight.detach().clone()
        assert_follows_written(opt.state_dict()["state"][0]["master_param"], written)
        train(model, opt, steps=3, seed=1)
        runs.append([p.detach().float().clone() for p in model.parameters()])
        assert opt.flat_grads_status == ("active" if flat else None)
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=2.0**-6, atol=1e-6)  # a BF16 ulp or two


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
@pytest.mark.parametrize("mode", ["fp32", "remainder", "remainder8"])
@pytest.mark.parametrize("adamw", [False, True], ids=["sgd", "adamw"])
@pytest.mark.parametrize("write", ["copy_", "load_state_dict"])
def test_a_write_of_unchanged_values_changes_no_master(write, adamw, mode, flat, backend, device):
    # p.copy_(p.clone()) after every step, or model.load_state_dict(model.state_dict()): the
    # masters go on bit for bit as without the writes, in every master format.
    runs = []
    for writes in (False, True):
        model = bf16_mlp()
        cls = fused_opt.FusedMixedPrecisionAdamW if adamw else fused_opt.FusedMixedPrecisionSGD
        hyper = dict(lr=1e-3, loss_scale=None) if adamw else HYPER
        opt = cls(model.parameters(), master_weights=mode, flat_grads=flat, backend=backend, **hyper)
        gen = torch.Generator().manual_seed(0)
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(4, 6, generator=gen).bfloat16()).float().square().mean().backward()
            opt.step()
            if writes and write == "copy_":
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(p.clone())
            elif writes:
                model.load_state_dict(model.state_dict())
        runs.append(opt.state_dict())
    for k in runs[0]["state"]:
        assert torch.equal(runs[1]["state"][k]["master_param"], runs[0]["state"][k]["master_param"]), k


def test_memory_per_param():
    model = bf16_mlp()
    sizes = {}
    for mode in ("fp32", "remainder"):
        opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), master_weights=mode, **HYPER)
        train(model, opt, steps=1)
        n = sum(p.numel() for p in model.parameters())
        state = sum(t.untyped_storage().nbytes() for s in opt.state.values() for k, t in s.items()
                    if k in ("master_param", "master_remainder", "momentum_buffer"))
        sizes[mode] = (2 * n + state) / n
    assert sizes == {"fp32": 10.0, "remainder": 8.0}


def test_refusals_name_why():
    for dtype, why in ((torch.float16, "needs BF16 params"), (torch.float32, "FP32 params are their own")):
        with pytest.raises(ValueError, match=why):
            fused_opt.FusedMixedPrecisionSGD([torch.nn.Parameter(torch.zeros(3, dtype=dtype))], lr=0.1,
                                             master_weights="remainder")
    opt = fused_opt.FusedMixedPrecisionSGD(bf16_mlp().parameters(), lr=0.1, master_weights="remainder")
    with pytest.raises(ValueError, match="needs BF16 params"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(ValueError, match="master_weights must be"):
        fused_opt.FusedMixedPrecisionSGD(bf16_mlp().parameters(), lr=0.1, master_weights="int16")


# -- writes the step does not make: pruning, writes between steps, state dicts taken between --

def side_by_side(backend, edit, flat=False, steps=5, between=None):
    """FP32 masters and remainders on the same model, grads and edits; `edit(step, model,
    opt)` runs after each backward, `between(step, model, opt)` after each step. Returns the
    two (model, opt) pairs."""
    runs = []
    for mode in ("fp32", "remainder"):
        model = bf16_mlp()
        opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), master_weights=mode, flat_grads=flat,
                                               backend=backend, **HYPER)
        gen = torch.Generator().manual_seed(0)
        for step in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 6, generator=gen).bfloat16()).float().square().mean().backward()
            edit(step, model, opt)
            opt.step()
            if between is not None:
                between(step, model, opt)
        runs.append((model, opt))
    return runs


def assert_same_params(runs):
    (a, _), (b, _) = runs
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert not bool(torch.isnan(pb.detach().float()).any())
        assert torch.equal(pa.detach().view(torch.int16), pb.detach().view(torch.int16))


def assert_masters_close(runs):
    (a, opt_a), (b, opt_b) = runs
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    for k in sd_a["state"]:
        wa, wb = sd_a["state"][k]["master_param"], sd_b["state"][k]["master_param"]
        assert bool(torch.isfinite(wb).all()), f"master {k}"
        torch.testing.assert_close(wb, wa, rtol=0, atol=1e-30)  # equal up to the sub-BF16 residue of pruned zeros


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
def test_pruning_through_data_gives_zeros_not_nans(backend, device, flat):
    # p.data.mul_(mask) is seen by no version counter: the step pairs the pruned param with
    # its old remainder. A negative remainder under +0 (or -0, from pruning a negative weight)
    # used to wrap into a NaN master; now the master is the pruned 0, as with FP32 masters.
    def prune(step, model, opt):
        if step == 2:
            for p in model.parameters():
                mask = torch.arange(p.numel()).reshape(p.shape) % 2 == 0
                p.data.mul_(mask)
    runs = side_by_side(backend, prune, flat)
    assert_same_params(runs)
    assert_masters_close(runs)
    if flat:
        assert runs[1][1].flat_grads_status == "active"


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("write", ["zeros_", "copy_"])
def test_write_to_a_param_that_had_no_grad_in_the_last_step_is_seen(backend, device, write):
    def edit(step, model, opt):
        w = model[0].weight
        if step == 1:
            w.grad = None  # no grad this step: the next write must still be seen
        if step == 2:
            with torch.no_grad():
                torch.nn.init.zeros_(w) if write == "zeros_" else w.copy_(torch.full_like(w, -0.5))
    runs = side_by_side(backend, edit)
    if write == "zeros_":
        assert_same_params(runs)
        assert_masters_close(runs)
    else:  # a new value: followed to within a BF16 ulp (the kept remainder)
        for (pa, pb) in zip(runs[0][0].parameters(), runs[1][0].parameters()):
            torch.testing.assert_close(pb.detach().float(), pa.detach().float(), rtol=2.0**-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
def test_write_after_load_state_dict_is_seen(backend, device, flat):
    def between(step, model, opt):
        if step == 1:
            opt.load_state_dict(opt.state_dict())
            with torch.no_grad():
                torch.nn.init.zeros_(model[0].weight)
    runs = side_by_side(backend, lambda *a: None, flat, between=between)
    assert_same_params(runs)
    assert_masters_close(runs)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_state_dict_between_a_write_and_the_next_step_holds_the_written_master(backend, device):
    # nn.init.zeros_ after a step, then state_dict(): the masters are the zeros (what the next
    # step would use), and the checkpoint loads, into either mode, and resumes like the original.
    saved = {}

    def between(step, model, opt):
        if step == 2:
            with torch.no_grad():
                torch.nn.init.zeros_(model[0].weight)
            saved[opt.defaults.get("_mode", len(saved))] = copy.deepcopy(opt.state_dict())
    runs = side_by_side(backend, lambda *a: None, between=between)
    assert_same_params(runs)
    sd_fp32, sd_rem = saved[0], saved[1]
    # zeros and the kept remainders: 0 up to a sub-BF16 residue (below 2^-126)
    torch.testing.assert_close(sd_rem["state"][0]["master_param"], torch.zeros_like(sd_rem["state"][0]["master_param"]),
                               rtol=0, atol=1e-30)
    for k in sd_fp32["state"]:
        torch.testing.assert_close(sd_rem["state"][k]["master_param"], sd_fp32["state"][k]["master_param"], rtol=0,
                                   atol=1e-30)
    for mode in ("fp32", "remainder"):
        model = bf16_mlp()
        with torch.no_grad():
            torch.nn.init.zeros_(model[0].weight)
        opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), master_weights=mode, backend=backend, **HYPER)
        opt.load_state_dict(sd_rem)  # refused before: NaN masters
        assert torch.equal(opt.state_dict()["state"][0]["master_param"], sd_rem["state"][0]["master_param"])

"""State and param storage moved in place, under a step that caches their addresses.

`buf.data = t`, `.set_(t)`, `.share_memory_()` and `untyped_storage().resize_()` give a tensor
new memory without a write to `opt.state` and without the tensor object dying. The step must
use the new memory, as torch.optim.SGD does (a `.data =` momentum reset takes effect), and
never the old, freed one. Every backend, per-tensor and flat (flat_grads=True) storage, is
compared with the torch backend on per-tensor storage, which reads the tensors afresh each
step; the values are exact in binary, so the comparison is bit for bit. Run under
AddressSanitizer by `make asan`.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_opt
from harness import CPU_BACKEND_DEVICE_IDS, CPU_BACKEND_DEVICES

NEAR = -2.5 - 2.0**-11  # rounds to the FP16 param's -2.5: kept as the master, not re-taken


def _full(value):
    return torch.full((6,), value, dtype=torch.float32)


def _shared(t):
    t.share_memory_()


def _storage_reallocated(t):
    # FSDP1 / ZeRO-3 free a param's storage between steps and re-allocate it: same
    # StorageImpl, same tensor object, new memory (here with the old bytes copied back).
    storage = t.untyped_storage()
    saved = storage.clone()
    storage.resize_(0)
    storage.resize_(saved.nbytes())
    storage.copy_(saved)


# name -> (what it edits, how). Each runs after two steps (w = -2.5, b = 1.5).
EDITS = {
    "buf.data = zeros": ("buf", lambda t: setattr(t, "data", _full(0.0))),
    "buf.set_(twos)": ("buf", lambda t: t.set_(_full(2.0))),
    "buf.share_memory_()": ("buf", _shared),
    "buf storage reallocated": ("buf", _storage_reallocated),
    "master.data = near": ("master", lambda t: setattr(t, "data", _full(NEAR))),
    "master.set_(near)": ("master", lambda t: t.set_(_full(NEAR))),
    "master.share_memory_()": ("master", _shared),
    "p.share_memory_()": ("param", _shared),
    "model.share_memory()": ("model", lambda m: m.share_memory()),
    "p storage reallocated": ("param", _storage_reallocated),
    "grad.share_memory_()": ("grad", _shared),
    "grad storage reallocated": ("grad", _storage_reallocated),
}


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(6, dtype=torch.float16))
        self.b = nn.Parameter(torch.zeros(5, dtype=torch.float16))


def _backward(model):
    ((model.a.float() * 1.0).sum() + (model.b.float() * 0.5).sum()).backward()


def run(backend, flat, edit):
    model = Pair()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=1.0, momentum=0.5, loss_scale=None,
                                           backend=backend, flat_grads=flat)
    statuses = []
    for step in range(4):
        opt.zero_grad()
        _backward(model)
        statuses.append(opt.flat_grads_status)
        if step == 2:
            target, how = EDITS[edit]
            state = opt.state[model.a]
            tensor = {"buf": state.get("momentum_buffer"), "master": state.get("master_param"),
                      "param": model.a, "model": model, "grad": model.a.grad}[target]
            how(tensor)
        opt.step()
    sd = opt.state_dict()
    return model, opt, sd, statuses


def _assert_same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8)), \
        f"{what}: {a.detach().cpu().tolist()} != {b.detach().cpu().tolist()}"


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_moved_storage_is_used_not_the_old_address(backend, device, flat, edit):
    model, opt, sd, statuses = run(backend, flat, edit)
    oracle, oracle_opt, oracle_sd, _ = run("torch", False, edit)
    if flat:
        assert statuses[2] == "active"  # the fast step was on when the storage moved
    for name in ("a", "b"):
        _assert_same_bits(getattr(model, name), getattr(oracle, name), f"param {name}")
    for index, param in ((0, model.a), (1, model.b)):
        for key in ("master_param", "momentum_buffer"):
            _assert_same_bits(sd["state"][index][key], oracle_sd["state"][index][key], f"{key} of param {index}")
            # and the live state tensor holds what the step wrote (not only a stale copy)
            _assert_same_bits(opt.state[param][key], oracle_opt.state[getattr(oracle, 'ab'[index])][key],
                              f"live {key} of param {index}")


def test_the_oracle_takes_the_edits_as_torch_sgd_does():
    # torch.optim.SGD on FP32 params with the same edit to its momentum buffer: the reset
    # takes effect (b = 0.5 * 0 + 1, w = -2.5 - 1 = -3.5 on the edited param).
    model, _, sd, _ = run("torch", False, "buf.data = zeros")
    reference = nn.Parameter(torch.zeros(6))
    sgd = torch.optim.SGD([reference], lr=1.0, momentum=0.5)
    for step in range(4):
        reference.grad = torch.ones(6)
        if step == 2:
            sgd.state[reference]["momentum_buffer"].data = torch.zeros(6)
        sgd.step()
    assert torch.equal(model.a.detach().float(), reference.detach())
    assert torch.equal(sd["state"][0]["momentum_buffer"], sgd.state[reference]["momentum_buffer"])


@pytest.mark.parametrize("fast", [True, False], ids=["native-words", "python-fallback"])
def test_pointer_watch_sees_every_move(fast, monkeypatch):
    # The flat step's per-param check: one host word per storage, compared in C++ where the
    # word's offset in the StorageImpl was verified; else data_ptr() in Python. Both see moves.
    from fused_opt import storage_watch
    if not fast:
        monkeypatch.setattr(storage_watch, "_native_words_equal", lambda: None)
    params = [nn.Parameter(torch.randn(n)) for n in (1, 7, 1023)]
    storages = [p.untyped_storage() for p in params]
    watch = storage_watch.PointerWatch(storages)
    assert (watch._fast is not None) == (fast and storage_watch._data_ptr_offset() >= 0)
    if fast:
        assert watch._fast is not None, "the StorageImpl layout of this torch was not recognised"
    live = lambda: iter(storages)  # noqa: E731
    assert watch.unmoved(live)
    # (a resize to a larger size: a new block while the old one is alive, so a new address)
    for k, move in ((1, lambda p: p.share_memory_()), (2, lambda p: p.untyped_storage().resize_(1 << 16))):
        move(params[k])
        assert not watch.unmoved(live)
        watch = storage_watch.PointerWatch(storages)
        assert watch.unmoved(live)


# AdamW's state (moments, amsgrad's max, the step count) moved in place: the step must use the
# new memory exactly as it would a tensor put in the state in its place.
ADAMW_EDITS = {
    "exp_avg_sq.data = zeros": ("exp_avg_sq", lambda t: setattr(t, "data", torch.zeros_like(t))),
    "exp_avg.set_(halves)": ("exp_avg", lambda t: t.set_(torch.full_like(t, 0.5))),
    "max_exp_avg_sq.share_memory_()": ("max_exp_avg_sq", _shared),
    "exp_avg_sq storage reallocated": ("exp_avg_sq", _storage_reallocated),
    "step.data = 0": ("step", lambda t: setattr(t, "data", torch.zeros_like(t))),
}


def run_adamw(backend, flat, edit, replace):
    model = Pair()
    opt = fused_opt.FusedMixedPrecisionAdamW(model.parameters(), lr=0.1, amsgrad=True, loss_scale=None,
                                             backend=backend, flat_grads=flat)
    statuses = []
    for step in range(4):
        opt.zero_grad()
        _backward(model)
        statuses.append(opt.flat_grads_status)
        if step == 2:
            key, how = ADAMW_EDITS[edit]
            state = opt.state[model.a]
            if replace:  # the same values in a new tensor, put in the state: a write the step sees
                fresh = state[key].detach().clone()
                how(fresh)
                state[key] = fresh
            else:
                how(state[key])
        opt.step()
    return model, opt, statuses


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
@pytest.mark.parametrize("edit", list(ADAMW_EDITS))
def test_moved_adamw_state_is_used_not_the_old_address(backend, device, flat, edit):
    model, opt, statuses = run_adamw(backend, flat, edit, replace=False)
    expected, expected_opt, _ = run_adamw(backend, False, edit, replace=True)
    if flat:
        assert statuses[2] == "active"
    for name in ("a", "b"):
        _assert_same_bits(getattr(model, name), getattr(expected, name), f"param {name}")
        p, q = getattr(model, name), getattr(expected, name)
        for key in ("master_param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            _assert_same_bits(opt.state[p][key], expected_opt.state[q][key], f"{key} of param {name}")

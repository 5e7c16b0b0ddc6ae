"""The per-step check that params, state and grads are where and as the cached tables say
(tensor_watch.py): read natively from the TensorImpls where this torch's layout was verified,
else in Python. Every change a user or a framework can make in place must show, both ways,
and a step whose grads move or change layout from step to step must equal the torch
backend's, which reads every tensor afresh.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_opt
from fused_opt import tensor_watch
from harness import CPU_BACKEND_DEVICE_IDS, CPU_BACKEND_DEVICES


@pytest.fixture(params=["native", "python"])
def way(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(tensor_watch, "_offsets", ())
    elif not tensor_watch.native():
        why = f"torch {torch.__version__}: its TensorImpl layout was not recognised, so steps read tensors in Python"
        if torch.__version__.startswith(("2.11", "2.13")):  # the versions we build and test against
            pytest.fail(why)
        pytest.skip(why)
    return request.param


def _edits():
    """name -> a function that changes a tensor in place (the Python object stays)."""
    def swap(t):
        torch.utils.swap_tensors(t, torch.zeros_like(t))
    return {
        "p.data = p.data[:1] (same data pointer)": lambda t: setattr(t, "data", t.data[:1]),
        "p.data = p.data.t() (strides)": lambda t: setattr(t, "data", t.data.t()),
        "p.data = a view of another dtype": lambda t: setattr(t, "data", t.data.view(torch.int32)),
        "set_ with a storage offset": lambda t: t.set_(t.untyped_storage(), 4, (2, 3), (3, 1)),
        "as_strided_": lambda t: t.as_strided_((3, 2), (1, 3)),
        "resize_ smaller": lambda t: t.resize_(2, 2),
        "share_memory_": lambda t: t.share_memory_(),
        "storage reallocated": lambda t: t.untyped_storage().resize_(t.untyped_storage().nbytes() * 64),
        "swap_tensors": swap,
        "unsqueeze_": lambda t: t.unsqueeze_(0),
    }


@pytest.mark.parametrize("edit", list(_edits()))
def test_every_in_place_change_shows(way, edit):
    keep = [torch.randn(4, 6), nn.Parameter(torch.randn(7)), torch.randn(2, 3, 4, 5)]
    rows = tensor_watch.read(keep)
    assert (rows.words is not None) == (way == "native")
    assert tensor_watch.unchanged(keep, rows) and tensor_watch.unchanged(list(keep), rows)
    with torch.no_grad():
        _edits()[edit](keep[0])
    assert not tensor_watch.unchanged(keep, rows)
    assert tensor_watch.unchanged(keep, tensor_watch.read(keep))


def test_a_list_of_other_tensors_or_other_lengths_is_not_unchanged(way):
    a = [torch.randn(3), torch.randn(3)]
    rows = tensor_watch.read(a)
    assert not tensor_watch.unchanged([a[1], a[0]], rows)
    assert not tensor_watch.unchanged(a[:1], rows)
    assert not tensor_watch.unchanged([], rows)
    assert not tensor_watch.unchanged(a, None)
    assert tensor_watch.unchanged([], tensor_watch.read([]))


def test_rows_past_what_the_words_describe_are_read_in_python():
    # more than 5 dims (sizes kept out of line), a sparse tensor, something not a tensor
    for odd in (torch.randn(1, 2, 1, 2, 1, 2), torch.randn(3, 3).to_sparse()):
        tensors = [torch.randn(2), odd]
        rows = tensor_watch.read(tensors)
        assert rows.words is None and len(rows.tuples) == 2
        assert tensor_watch.unchanged(tensors, rows)
        assert not tensor_watch.unchanged([torch.randn(2), odd], rows)  # the first elsewhere
    if tensor_watch.native():
        assert tensor_watch._native_rows([torch.randn(2), 3]) is None


def test_relaid_gives_the_data_pointers_of_grads_laid_out_alike(way):
    grads = [torch.randn(5, 3), torch.randn(40)[8:], torch.randn(3, 5).t(), torch.randn(0, 2)]
    rows = tensor_watch.read(grads)
    itemsizes = torch.tensor([g.element_size() for g in grads])
    fresh = [torch.randn(5, 3), torch.randn(40)[8:], torch.randn(3, 5).t(), torch.randn(0, 2)]  # new memory
    ptrs = tensor_watch.relaid(fresh, rows, itemsizes)
    assert ptrs is not None and ptrs.tolist() == [g.data_ptr() for g in fresh]
    elsewhere = [fresh[0], torch.randn(40)[7:39], fresh[2], fresh[3]]  # another offset, same layout
    assert tensor_watch.relaid(elsewhere, rows, itemsizes).tolist() == [g.data_ptr() for g in elsewhere]
    # BF16 grads of the same shapes, a contiguous grad where one was transposed, another shape
    for changed in ([g.bfloat16() for g in fresh], [fresh[0], fresh[1], fresh[2].contiguous(), fresh[3]],
                    [fresh[0], fresh[1], fresh[2], torch.randn(2, 0)]):
        assert tensor_watch.relaid(changed, rows, itemsizes) is None
    assert tensor_watch.relaid(fresh, None, itemsizes) is None


def _steps(backend, grads_of_step, watch_way=None):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape).to(torch.bfloat16)) for shape in ((4, 6), (7,), (6, 4), (1,))]
    opt = fused_opt.FusedMixedPrecisionAdamW(params, lr=0.1, weight_decay=0.1, max_grad_norm=1.0, loss_scale=None,
                                             backend=backend)
    for step in range(6):
        for p, g in zip(params, grads_of_step(step, params)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params], opt


def _moving_grads(step, params):
    """New grads every step at new places; their layout changes at steps 2, 3 and 4 (a
    column-major grad, then back; a slice of a larger buffer; a grad of another shape's view)."""
    g = torch.Generator().manual_seed(step)
    out = []
    for k, p in enumerate(params):
        values = torch.randn(p.shape, generator=g)
        if k == 0 and step in (2, 3):
            values = values.t().contiguous().t()  # same values, column-major
        if k == 1 and step >= 3:  # a slice of a larger buffer
            values = torch.cat([torch.randn(5, generator=g), values]).bfloat16()[5:]
        if k == 2 and step >= 4:  # a view of a (4, 6) buffer as (6, 4), transposed: not dense row-major
            values = values.reshape(4, 6).t()
        out.append(values.bfloat16())
    return out


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in CPU_BACKEND_DEVICES if b != "torch"],
                         ids=[i for i in CPU_BACKEND_DEVICE_IDS if not i.startswith("torch")])
def test_grads_that_move_and_change_layout_step_as_the_torch_backend(way, backend, device):
    ours, _ = _steps(backend, _moving_grads)
    expected, _ = _steps("torch", _moving_grads)
    for a, b in zip(ours, expected):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))

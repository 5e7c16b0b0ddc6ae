"""Whether tensors still have the memory and layout they had, one native read per tensor.

The kernels reach params, masters, state buffers and grads through addresses cached across
steps (multi_tensor.py), so every step confirms that none of them moved or changed its
shape, strides, dtype or device (`p.data = p.data[:1]` keeps the data pointer;
`torch.utils.swap_tensors` keeps the Python object). Asked attribute by attribute that is
~0.5 µs per tensor: at a thousand tensors, most of a step. The same facts are a few words of
each TensorImpl at fixed offsets, so the native CPU module copies them into one row per
tensor (`tensor_rows`), and a step compares two int64 tensors.

The offsets are found once per process by reading tensors whose facts are known, and then
verified on others: every field of every row must equal what torch's own accessors say,
a dtype and a dispatch-key change must show, two fresh tensors alike must give equal rows
(no uninitialized bytes read). Where that fails (another torch's layout, no native CPU
module), and for a tensor the words do not describe (no storage, more than 5 dims), rows
are tuples read in Python: slower, never wrong. The storage's data pointer comes from
storage_watch.py's verified offset.
"""
from __future__ import annotations

import ctypes
import operator

import torch

from . import storage_watch

# Columns of a native row (csrc/cpu_step.cpp, tensor_rows).
STORAGE_PTR, DIM, OFFSET = 0, 1, 12
WIDTH = 16
_INLINE_DIMS = 5

_CDATA = torch._C.TensorBase._cdata.__get__  # the TensorImpl's address
_DATA_PTR = torch._C.TensorBase.data_ptr
_offsets = None  # (borrowed, cdata, storage_field, storage_ptr, sizes, type_word, key_word), or () when not verified


class Rows:
    """The memory and layout of a list of tensors as read() found them: `words` ([n, WIDTH]
    int64, read natively) or `tuples` (one per tensor, read in Python: each a full tuple, or
    only its data pointer where `full` is False)."""
    __slots__ = ("words", "tuples", "full")

    def __init__(self, words=None, tuples=None, full=True):
        self.words, self.tuples, self.full = words, tuples, full


def read(tensors: list, full: bool = True) -> Rows:
    """Rows for a list of tensors, to compare later ones with (unchanged, relaid). Without
    `full`, read in Python they hold only where each tensor's data starts (the check for
    state tensors, whose shapes a step never changes; natively they hold everything)."""
    words = _native_rows(tensors)
    if words is not None:
        return Rows(words=words)
    return Rows(tuples=list(map(_tuple_of if full else _DATA_PTR, tensors)), full=full)


def unchanged(tensors: list, cached: Rows | None) -> bool:
    """Whether `tensors` are where and as `cached` (read earlier) says: the same storage
    address, storage offset, shape, strides, dtype, device and dispatch keys."""
    if cached is None:
        return False
    if cached.words is not None:
        words = _native_rows(tensors)
        return words is not None and words.shape == cached.words.shape and torch.equal(words, cached.words)
    # One tuple at a time, each freed at once: thousands kept per step would wake Python's
    # cyclic GC (10,000 tensors: 31 -> 86 ms a step).
    return len(tensors) == len(cached.tuples) and all(
        map(operator.eq, map(_tuple_of if cached.full else _DATA_PTR, tensors), cached.tuples))


def relaid(tensors: list, cached: Rows | None, itemsizes: torch.Tensor) -> torch.Tensor | None:
    """Each tensor's data_ptr() (int64) when `tensors` are laid out as `cached` says, wherever
    their storage is now (new grads every step); None when any layout changed. `itemsizes`:
    each one's element size."""
    if cached is None:
        return None
    if cached.words is not None:
        words = _native_rows(tensors)
        # all but the storage pointer and offset, which the data pointer is made of
        if (words is None or words.shape != cached.words.shape
                or not torch.equal(words[:, STORAGE_PTR + 1:OFFSET], cached.words[:, STORAGE_PTR + 1:OFFSET])
                or not torch.equal(words[:, OFFSET + 1:], cached.words[:, OFFSET + 1:])):
            return None
        return pointers(Rows(words=words), itemsizes)
    # (compared one tuple at a time, as in unchanged: none kept)
    if len(tensors) != len(cached.tuples) or not all(
            map(operator.eq, map(_layout_of, map(_tuple_of, tensors)), map(_layout_of, cached.tuples))):
        return None
    return torch.tensor(list(map(_DATA_PTR, tensors)), dtype=torch.int64)


def pointers(rows: Rows, itemsizes: torch.Tensor) -> torch.Tensor:
    """Each tensor's data_ptr() (int64) from full rows just read (`itemsizes`: each one's
    element size)."""
    if rows.words is not None:
        return rows.words[:, STORAGE_PTR] + rows.words[:, OFFSET] * itemsizes
    return torch.tensor([t[0] for t in rows.tuples], dtype=torch.int64)


def _native_rows(tensors: list) -> torch.Tensor | None:
    offsets = _native_offsets()
    fn = _tensor_rows() if offsets else None  # (the CPU module in use: tests switch it)
    if fn is None:
        return None
    words = torch.empty(len(tensors), WIDTH, dtype=torch.int64)
    return words if fn(tensors, torch._C.TensorBase, *offsets, words.data_ptr()) else None


def _tuple_of(t: torch.Tensor) -> tuple:
    try:
        return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device
    except (RuntimeError, NotImplementedError):  # sparse: no data pointer, no strides
        return 0, t.shape, None, t.dtype, t.device, t.layout


_layout_of = operator.itemgetter(slice(1, None))  # a tuple less its data pointer


def native() -> bool:
    """Whether rows are read natively in this process (tests check both ways)."""
    return bool(_native_offsets())


def _tensor_rows():
    return storage_watch.native_cpu_function("tensor_rows")


def _words(address: int, count: int) -> list[int]:
    return list((ctypes.c_int64 * count).from_address(address))


def _native_offsets():
    global _offsets
    if _offsets is None:
        _offsets = ()
        try:
            found = _find_offsets()
        except Exception:  # noqa: BLE001 -- any surprise in an unknown layout: read in Python
            found = None
        if found is not None and _verified(found):
            _offsets = found
    return _offsets


def _find_offsets():
    """(borrowed, cdata, storage_field, storage_ptr, sizes, type_word, key_word): byte offsets
    in a Python tensor object (the is-borrowed flag, or -1 without one; the TensorImpl pointer), in a TensorImpl (the StorageImpl pointer;
    the dim, then SizesAndStrides' inline sizes and strides, the storage offset and numel;
    dtype and device; the dispatch key set) and in a StorageImpl (its data pointer), or None."""
    storage_ptr = storage_watch._data_ptr_offset()
    if storage_ptr < 0 or _tensor_rows() is None:
        return None
    keep = torch.empty(4, 7)
    probe = keep[1:, 2:]  # dim 2, sizes (3, 5), strides (7, 1), storage offset 9, numel 15
    # After PyObject_HEAD (2 words): the at::Tensor, or a c10::MaybeOwned<at::Tensor> (an
    # is-borrowed flag, then the tensor) in the torch versions that have one there.
    head = _words(id(probe), 4)
    cdata = [k for k in (2, 3) if head[k] == _CDATA(probe) and (k == 2 or head[2] & 0xFF == 0)]
    words = _words(_CDATA(probe), 64)
    expected = {0: 2, 1: 3, 2: 5, 1 + _INLINE_DIMS: 7, 2 + _INLINE_DIMS: 1, 1 + 2 * _INLINE_DIMS: 9,
                2 + 2 * _INLINE_DIMS: 15}
    starts = [k for k in range(len(words) - 16) if all(words[k + d] == v for d, v in expected.items())]
    storage = [k for k in range(len(words)) if words[k] == probe.untyped_storage()._cdata]
    if len(cdata) != 1 or len(starts) != 1 or len(storage) != 1:
        return None
    sizes = starts[0] * 8
    # dtype and device follow numel; the dispatch key set follows them and the bit flags.
    return (-1 if cdata[0] == 2 else 16, cdata[0] * 8, storage[0] * 8, storage_ptr, sizes, sizes + 8 * (3 + 2 * _INLINE_DIMS),
            sizes + 8 * (4 + 2 * _INLINE_DIMS))


def _verified(offsets) -> bool:
    """Whether rows read with these offsets say what torch says, on tensors unlike the probe."""
    keep = [torch.empty(2, 3, 4, 5, 6, dtype=torch.bfloat16), torch.empty(1030, dtype=torch.float16),
            torch.empty(3, 5), torch.empty(3, 5)]
    samples = [keep[0].permute(4, 2, 3, 0, 1)[1:], keep[1][7:], torch.zeros(()), keep[2], keep[3],
               keep[2].to(torch.bfloat16), torch._neg_view(keep[2]), torch.empty(0, 4), keep[2].t(),
               torch.nn.Parameter(torch.empty(6, 2))]
    fn = _tensor_rows()
    words = torch.empty(len(samples), WIDTH, dtype=torch.int64)
    if not fn(samples, torch._C.TensorBase, *offsets, words.data_ptr()):
        return False
    rows = [_words(words.data_ptr() + 8 * WIDTH * k, WIDTH) for k in range(len(samples))]  # (host memory)
    for row, t in zip(rows, samples):
        d = t.dim()
        sizes = list(t.shape) + [0] * (_INLINE_DIMS - d)
        strides = list(t.stride()) + [0] * (_INLINE_DIMS - d)
        if (row[STORAGE_PTR] != t.untyped_storage().data_ptr() or row[DIM] != d
                or row[2:2 + _INLINE_DIMS] != sizes or row[2 + _INLINE_DIMS:OFFSET] != strides
                or row[OFFSET] != t.storage_offset() or row[OFFSET + 1] != t.numel()):
            return False
    _, _, _, a, b, bf16, neg, _, _, _ = rows
    alike = a[1:] == b[1:]  # two fresh tensors alike: nothing uninitialized in a row
    if not alike or a[14] == bf16[14] or a[15] == neg[15]:  # dtype, and a dispatch key, show
        return False
    # refused: sizes kept out of line (6 dims), and what is not a tensor
    return not any(fn(x, torch._C.TensorBase, *offsets, words.data_ptr()) for x in ([torch.empty(1, 1, 1, 1, 1, 1)], [3]))

"""Whether storages are still where they were, one host word each.

A param's storage can move in place, keeping its StorageImpl and its Python object
(`p.share_memory_()`, `model.share_memory()`, `p.untyped_storage().resize_()` as FSDP1 and
ZeRO-3 do): only its data pointer tells. Reading that with `storage.data_ptr()` is a Python
call per param (0.1-0.3 µs each on a small CPU, milliseconds at 10,000 params), which is
what flat storage exists to avoid. torch keeps the pointer in a word of the StorageImpl, at
a fixed offset; the native CPU module compares that word with the recorded pointer for
every storage in one call (`words_equal`), a few ns each.

The offset is found once per process and verified by moving a storage of our own (two
resizes, each a new allocation): a word that follows both moves is the pointer. Where it
cannot be verified (another torch's layout, no native CPU module), `PointerWatch` reads each
`data_ptr()` in Python instead: slower, never wrong. Only live storages are read: the
caller holds a weakref to each and stops at the first that died (flat_storage.py).
"""
from __future__ import annotations

import ctypes

import torch

_offset = None  # bytes from a StorageImpl's address to its data pointer; -1 when not found
_STORAGE_PTR = torch._C.StorageBase.data_ptr


def _word(address: int) -> int:
    return ctypes.c_int64.from_address(address).value


def _data_ptr_offset() -> int:
    global _offset
    if _offset is None:
        _offset = -1
        probe = torch.empty(64, dtype=torch.uint8).untyped_storage()
        base = probe._cdata
        candidates = [off for off in range(8, 64, 8) if _word(base + off) == probe.data_ptr()]
        for size in (1 << 16, 1 << 17):  # each a new allocation: the pointer moves
            probe.resize_(size)
            candidates = [off for off in candidates if _word(base + off) == probe.data_ptr()]
        if candidates:  # the first: a DataPtr starts with the data pointer (its context may equal it)
            _offset = candidates[0]
    return _offset


def native_cpu_function(name: str):
    """A function of the native CPU module in use, or None where none is built."""
    try:
        from .backends import native_backend
    except ImportError:
        return None
    module = native_backend._native_cpu
    return getattr(module, name, None) if module is not None else None


def _native_words_equal():
    return native_cpu_function("words_equal")


class PointerWatch:
    """The data pointers of some storages, as they were when watched."""

    def __init__(self, storages: list):
        # Holds no reference to the storages: the caller's weakrefs must see them die.
        self.expected = list(map(_STORAGE_PTR, storages))
        offset, words_equal = _data_ptr_offset(), _native_words_equal()
        self._fast = None
        if offset >= 0 and words_equal is not None and storages:
            addresses = [s._cdata + offset for s in storages]
            if all(_word(a) == v for a, v in zip(addresses, self.expected)):  # these storages too
                self._fast = (words_equal, torch.tensor(addresses, dtype=torch.int64),
                              torch.tensor(self.expected, dtype=torch.int64), len(storages))

    def unmoved(self, live_storages) -> bool:
        """Whether every watched storage still has its pointer. `live_storages` yields the
        storages themselves (only called while all of them are alive)."""
        if self._fast is not None:
            words_equal, addresses, values, n = self._fast
            return words_equal(addresses.data_ptr(), values.data_ptr(), n)
        return list(map(_STORAGE_PTR, live_storages())) == self.expected

"""`opt.state` as dicts that count their own changes.

The step caches the tensors it touches (masters, momentum buffers) across steps, so it must
notice when the user changes the state under it: `opt.state.clear()` (the usual momentum
reset), `del opt.state[p]["momentum_buffer"]`, `opt.state[p]["master_param"] = ...`. Checking
every entry every step costs per tensor; instead every write to the state, at either level,
bumps one shared counter, and the step compares a single integer.
"""
from __future__ import annotations

from collections import defaultdict


class Epoch:
    """A counter shared by an optimizer's state and all its per-param dicts."""
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


def _bumping(name, base=dict):
    method = getattr(base, name)

    def wrapper(self, *args, **kwargs):
        self._epoch.value += 1
        return method(self, *args, **kwargs)
    wrapper.__name__ = name
    return wrapper


_MUTATORS = ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault", "__ior__")


class ParamState(dict):
    """One param's state (`opt.state[p]`)."""

    def __init__(self, epoch: Epoch, items=()):
        self._epoch = epoch
        dict.update(self, items)

    def __reduce__(self):  # copies and pickles are plain dicts; the optimizer re-wraps them
        return (dict, (dict(self),))


class TrackedState(defaultdict):
    """`opt.state`: a defaultdict(dict), as in torch, whose values are ParamStates."""

    def __init__(self, epoch: Epoch, items=()):
        super().__init__()
        self._epoch = epoch
        for key, value in dict(items).items():
            self[key] = value

    def __missing__(self, key):
        value = ParamState(self._epoch)
        dict.__setitem__(self, key, value)
        self._epoch.value += 1
        return value

    def __setitem__(self, key, value):
        if isinstance(value, dict) and not (isinstance(value, ParamState) and value._epoch is self._epoch):
            value = ParamState(self._epoch, value)
        self._epoch.value += 1
        dict.__setitem__(self, key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self):  # see ParamState.__reduce__
        return (defaultdict, (dict,), None, None, iter((k, dict(v) if isinstance(v, dict) else v)
                                                       for k, v in self.items()))


for _name in _MUTATORS:
    setattr(ParamState, _name, _bumping(_name))
    if _name not in ("__setitem__", "update", "setdefault", "__ior__"):
        setattr(TrackedState, _name, _bumping(_name))


class ParamList(list):
    """A param group's "params" list: in-place edits (`group["params"][0] = q`, append, ...)
    bump the epoch too, so the flat-storage step (flat_storage.py) compares one integer and
    each group's list identity instead of every param."""

    def __init__(self, epoch: Epoch, items=()):
        super().__init__(items)
        self._epoch = epoch

    def __reduce__(self):  # copies and pickles are plain lists; the optimizer re-wraps them
        return (list, (list(self),))


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop",
              "remove", "clear", "sort", "reverse"):
    setattr(ParamList, _name, _bumping(_name, list))

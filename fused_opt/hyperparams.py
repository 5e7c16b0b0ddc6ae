"""Each param group's hyperparameters as the backends take them (backends.Hyper), validated
before a step writes anything, and cached: revalidated only when a value in a group is not
the object it was at the last step (a scheduler's new lr, an edited group). A tensor lr or
momentum is read on the device, so the same tensor object is the same setting; its value is
checked on the host once, when a new tensor appears.
"""
from __future__ import annotations

import operator

import torch

from .backends import Hyper
from .validation import check_group, check_tensor_lr

KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class GroupHypers:
    def __init__(self):
        self._checked_tensors = {}  # group index -> ids of the lr/momentum tensors last checked
        self._cache = None          # (each group's values, their Hypers) of the last step

    def reset(self) -> None:
        """New groups (a loaded state dict, a copy): nothing is known about them."""
        self._checked_tensors, self._cache = {}, None

    def checked(self, group: dict, index: int) -> None:
        """A group just validated in full (add_param_group): its tensors need no second read."""
        self._checked_tensors[index] = _tensor_ids(group)

    def of(self, groups: list) -> list:
        """Each group's Hyper, validated (raises before anything is written)."""
        values = [tuple(map(group.__getitem__, KEYS)) for group in groups]
        cached = self._cache
        if cached is not None and len(cached[0]) == len(values) and all(map(_same_objects, values, cached[0])):
            return cached[1]
        for index, group in enumerate(groups):
            check_group(group, index)
            ids = _tensor_ids(group)
            if any(isinstance(group[k], torch.Tensor) for k in ("lr", "momentum")) and self._checked_tensors.get(index) != ids:
                check_tensor_lr(group, index)  # a new lr/momentum tensor: its value is read once, here
                self._checked_tensors[index] = ids
        hypers = [Hyper(g["lr"], _number_or_tensor(g["momentum"]), float(g["dampening"]), float(g["weight_decay"]),
                        bool(g["nesterov"]), bool(g["maximize"])) for g in groups]
        self._cache = (values, hypers)  # holds the values: no id is reused while cached
        return hypers


def _tensor_ids(group: dict) -> tuple:
    return id(group["lr"]), id(group["momentum"])


def _same_objects(a: tuple, b: tuple) -> bool:
    return all(map(operator.is_, a, b))


def _number_or_tensor(value):
    return value if isinstance(value, torch.Tensor) else float(value)

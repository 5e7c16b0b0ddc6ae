"""Each param group's hyperparameters as the backends take them (the update rule's Hyper,
update_rules.py), validated before a step writes anything, and cached: revalidated only when
a value in a group is not the object it was at the last step (a scheduler's new lr, an
edited group). A tensor lr or momentum is read on the device, so the same tensor object is
the same setting; its value is checked on the host once, when a new tensor appears.
"""
from __future__ import annotations

import operator

import torch


class GroupHypers:
    def __init__(self, rule):
        self.rule = rule
        self._checked_tensors = {}  # group index -> ids of the tensor hyperparameters last checked
        self._cache = None          # (each group's values, their Hypers) of the last step

    def reset(self) -> None:
        """New groups (a loaded state dict, a copy): nothing is known about them."""
        self._checked_tensors, self._cache = {}, None

    def checked(self, group: dict, index: int) -> None:
        """A group just validated in full (add_param_group): its tensors need no second read."""
        self._checked_tensors[index] = self._tensor_ids(group)

    def of(self, groups: list) -> list:
        """Each group's Hyper, validated (raises before anything is written)."""
        rule = self.rule
        values = [tuple(map(group.__getitem__, rule.keys)) for group in groups]
        cached = self._cache
        if cached is not None and len(cached[0]) == len(values) and all(map(_same_objects, values, cached[0])):
            return cached[1]
        for index, group in enumerate(groups):
            rule.check_group(group, index)
            ids = self._tensor_ids(group)
            if (any(isinstance(group[k], torch.Tensor) for k in rule.tensor_keys)
                    and self._checked_tensors.get(index) != ids):
                rule.check_tensor_values(group, index)  # a new tensor: its value is read once, here
                self._checked_tensors[index] = ids
        hypers = [rule.hyper(g) for g in groups]
        self._cache = (values, hypers)  # holds the values: no id is reused while cached
        return hypers

    def _tensor_ids(self, group: dict) -> tuple:
        return tuple(id(group.get(k)) for k in self.rule.tensor_keys)


def _same_objects(a: tuple, b: tuple) -> bool:
    return all(map(operator.is_, a, b))

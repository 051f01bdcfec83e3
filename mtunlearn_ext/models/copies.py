"""A deep copy of a user's model, also of one that ``copy.deepcopy`` refuses."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

__all__ = ["copy_model"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def copy_model(model: ModuleT) -> ModuleT:
    """``copy.deepcopy(model)``, where a module that keeps a tensor computed by autograd as a
    plain attribute gets that tensor's values, detached. The legacy hook-based
    ``torch.nn.utils.weight_norm`` and ``spectral_norm`` keep such a ``weight``, recomputed
    from the parameters before every forward, and after a forward with gradients (or from
    registration on) ``copy.deepcopy`` refuses it: "Only Tensors created explicitly by the user
    (graph leaves) support the deepcopy protocol". A view of a parameter or buffer kept so is
    not copied this way (deepcopy refuses it, as before)."""
    # A view of a parameter or buffer (a tied transposed weight, `w_t = weight.t()`) is no
    # value to copy: its clone would be cut loose from the copy's parameter, which then gets
    # no gradient through it. deepcopy refuses it, loudly, as before.
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
            if t.device.type != "meta"}
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf and (
                    value.device.type == "meta"
                    or value.untyped_storage().data_ptr() not in held):
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)

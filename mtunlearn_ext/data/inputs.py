"""A data set's model inputs: one tensor, a tuple (or list) of tensors, or a dict name -> tensor.

A model that takes several inputs (token ids and an attention mask of different dtypes; an
image and a metadata vector) gets them as they are, without packing them into one tensor:
every *leaf* holds one row per instance along its first dimension, and the model is called as
``module(x)`` for a tensor, ``module(*x)`` for a tuple or list and ``module(**x)`` for a dict
(:func:`call_with`).

The structure is flat on purpose (no nesting): that covers multi-input models, keeps the row
operations one ``isinstance`` away from the tensor code they replace, and lets errors name a
leaf simply (``inputs[1]``, ``inputs['mask']``). For a plain tensor every helper performs
exactly the operation the single-tensor code did (``x[pos]``, ``x[a:b]``, ``torch.cat``,
``x.to(device)``), so results on tensor inputs are bit for bit what they were.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

__all__ = ["Inputs", "call_with", "cat_rows", "check_inputs", "describe", "inputs_to",
           "leaves", "map_leaves", "named_leaves", "num_rows", "numpy_hint", "slice_rows",
           "take_rows"]

#: Model inputs: ``[N, ...]``, a tuple / list of ``[N, ...]`` tensors, or a dict str -> ``[N, ...]``.
Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]

_EXPECTED = "a tensor, a tuple or list of tensors, or a dict str -> tensor"


def named_leaves(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    """``(path, leaf)`` in order: ``("", x)`` for a tensor, ``("[i]", x_i)`` for a tuple or list,
    ``("['k']", x_k)`` for a dict (the suffix that error messages append to ``inputs``)."""
    if isinstance(inputs, torch.Tensor):
        return [("", inputs)]
    if isinstance(inputs, Mapping):
        return [(f"[{k!r}]", v) for k, v in inputs.items()]
    if isinstance(inputs, (tuple, list)):
        return [(f"[{i}]", v) for i, v in enumerate(inputs)]
    raise TypeError(f"inputs must be {_EXPECTED}, got {type(inputs).__name__}")


def leaves(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of ``inputs``, in order (one for a plain tensor)."""
    return [leaf for _, leaf in named_leaves(inputs)]


def map_leaves(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs) -> Inputs:
    """``fn`` applied to every leaf, in the same structure (``fn(x)`` itself for a tensor; a
    tuple stays a tuple, a list a list, a mapping becomes a dict with the same key order)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(fn(v) for v in inputs)
    if isinstance(inputs, list):
        return [fn(v) for v in inputs]
    raise TypeError(f"inputs must be {_EXPECTED}, got {type(inputs).__name__}")


def numpy_hint(value: object) -> str:
    """How to pass a NumPy array, which is never converted silently (its float64 would meet
    a float32 model, and the conversion copies or shares memory as the caller chooses)."""
    return (": convert it with torch.from_numpy(...)"
            if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray" else "")


def check_inputs(inputs: object, what: str) -> int:
    """The number of rows ``N`` of ``inputs`` after checking that it is :data:`Inputs`: a tensor,
    or a non-empty tuple / list / dict (string keys: a dict is passed as keyword arguments)
    whose every leaf is a tensor with at least one dimension and the same leading size.
    Raises ``TypeError`` / ``ValueError`` naming ``what`` and what was expected."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise ValueError(f"{what} must have a leading instance dimension [N, ...], got a "
                             "0-dimensional tensor")
        return int(inputs.shape[0])
    if not isinstance(inputs, (tuple, list, Mapping)):
        raise TypeError(f"{what} must be {_EXPECTED}, got {type(inputs).__name__}"
                        + numpy_hint(inputs))
    if len(inputs) == 0:
        raise ValueError(f"{what} must hold at least one tensor, got an empty "
                         f"{type(inputs).__name__}")
    if isinstance(inputs, Mapping):
        bad_keys = [k for k in inputs if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"{what} must have string keys (they become the model's keyword "
                            f"arguments), got {bad_keys!r}")
    sizes: dict[str, int] = {}
    for path, leaf in named_leaves(inputs):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{what}{path} must be a tensor (nested structures are not "
                            f"supported), got {type(leaf).__name__}")
        if leaf.dim() == 0:
            raise ValueError(f"{what}{path} must have a leading instance dimension [N, ...], "
                             "got a 0-dimensional tensor")
        sizes[path] = int(leaf.shape[0])
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{p}: {n}" for p, n in sizes.items())
        raise ValueError(f"{what}: every input needs one row per instance (the same leading "
                         f"size), got leading sizes {shown}")
    return next(iter(sizes.values()))


def num_rows(inputs: Inputs) -> int:
    """``N``, the leading size (of the first leaf; :func:`check_inputs` makes them agree)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    return int(leaves(inputs)[0].shape[0])


def take_rows(inputs: Inputs, positions: torch.Tensor | int) -> Inputs:
    """The rows at ``positions`` (a LongTensor, or one int: that row without its leading
    dimension) of every leaf: ``x[positions]``."""
    return map_leaves(lambda x: x[positions], inputs)


def slice_rows(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Rows ``start:stop`` of every leaf (views): ``x[start:stop]``."""
    return map_leaves(lambda x: x[start:stop], inputs)


def inputs_to(inputs: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    """Every leaf on ``device``: ``x.to(device, non_blocking=non_blocking)``."""
    return map_leaves(lambda x: x.to(device, non_blocking=non_blocking), inputs)


def cat_rows(parts: Sequence[Inputs]) -> Inputs:
    """The rows of every part, in order (``torch.cat`` per leaf). The parts must share one
    structure: all tensors, tuples / lists of one length, or dicts with the same keys."""
    if not parts:
        raise ValueError("cat_rows: `parts` must hold at least one set of inputs")
    first = parts[0]
    if isinstance(first, torch.Tensor):
        tensors = [p for p in parts if isinstance(p, torch.Tensor)]
        if len(tensors) != len(parts):
            raise TypeError(f"cat_rows: the parts mix structures: {[describe(p) for p in parts]}")
        return torch.cat(tensors)
    if isinstance(first, Mapping):
        keys = list(first)
        dicts = [p for p in parts if isinstance(p, Mapping) and list(p) == keys]
        if len(dicts) != len(parts):
            raise ValueError(f"cat_rows: every part needs the keys {keys}, got "
                             f"{[describe(p) for p in parts]}")
        return {k: torch.cat([d[k] for d in dicts]) for k in keys}
    rows = [p for p in parts if isinstance(p, (tuple, list)) and len(p) == len(first)]
    if len(rows) != len(parts):
        raise ValueError(f"cat_rows: every part needs {len(first)} inputs, got "
                         f"{[describe(p) for p in parts]}")
    joined = [torch.cat([r[i] for r in rows]) for i in range(len(first))]
    return joined if isinstance(first, list) else tuple(joined)


def describe(inputs: Inputs) -> str:
    """Shapes (and dtypes, for several inputs) for error messages: ``shape (3, 8)`` for a
    tensor, ``(shape (3, 12) int64, shape (3, 12) float32)`` for a tuple, ``{'ids': shape
    (3, 12) int64, ...}`` for a dict."""
    if isinstance(inputs, torch.Tensor):
        return f"shape {tuple(inputs.shape)}"

    def one(x: object) -> str:
        if not isinstance(x, torch.Tensor):
            return type(x).__name__
        return f"shape {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"

    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(one(v) for v in inputs) + ")"
    return type(inputs).__name__


def call_with(module: nn.Module | Callable[..., Any], inputs: Inputs) -> Any:
    """``module(x)`` for a tensor, ``module(*x)`` for a tuple or list, ``module(**x)`` for a
    dict: how a user's multi-input model receives a batch."""
    if isinstance(inputs, torch.Tensor):
        return module(inputs)
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    raise TypeError(f"inputs must be {_EXPECTED}, got {type(inputs).__name__}")

"""How large a structure with shared parts is once every shared part is written out.

A YAML alias (``*name``) and a pickle's memo entry (which ``torch.load(weights_only=True)``
reads) let a file name one part many times: ten aliases of a list of two aliases of ... make
2**10 values from a few lines, sixty make more than anything can walk. Reading them shares the
part (cheap); whatever walks the result as a tree (hashing a checkpoint's metadata, writing a
config's value as JSON) takes the expanded size in time and memory. :func:`expanded_size`
counts it without expanding, so such a file can be refused before anything walks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["MAX_ADDED_BY_SHARING", "SelfContainingError", "expanded_size"]

#: How many values shared parts may add to what a file writes out: far beyond what a config's
#: merged defaults or a checkpoint's reused lists add, far below an exponential expansion.
MAX_ADDED_BY_SHARING = 1_000_000


class SelfContainingError(ValueError):
    """A part that contains itself (a YAML alias inside its own anchor, a pickled list holding
    itself): its expansion never ends."""


def expanded_size(root: Any, children: Callable[[Any], Iterable[Any] | None]
                  ) -> tuple[int, int]:
    """``(expanded, written)``: the number of nodes of ``root`` with every shared container
    counted each time it is reached, and with each container counted once (what the file
    writes out). ``children(node)`` gives a container's children, ``None`` for a leaf; leaves
    count once per place they are in, as a leaf can be one object in many places (Python's
    small integers and strings) without any file sharing it. Iterative (no recursion limit)
    and linear in the distinct containers; raises :class:`SelfContainingError` for a container
    that contains itself."""
    if children(root) is None:
        return 1, 1
    sizes: dict[int, int] = {}
    written = 0
    on_path: set[int] = set()  # the ancestors of the container being expanded
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        kids = list(children(node) or ())
        if expanded:
            on_path.discard(key)
            sizes[key] = 1 + sum(1 if children(kid) is None else sizes[id(kid)] for kid in kids)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise SelfContainingError("a part of it contains itself")
        on_path.add(key)
        stack.append((node, True))
        containers = [kid for kid in kids if children(kid) is not None]
        written += 1 + len(kids) - len(containers)
        stack.extend((kid, False) for kid in containers if id(kid) not in sizes)
    return sizes[id(root)], written

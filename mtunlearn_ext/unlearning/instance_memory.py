"""Instance constraints remembered across steps: per-sample retain gradients of earlier batches.

The instance-level orthogonalization keeps a forget step off the span of the per-sample retain
gradients of the current retain batch ``R`` (``B`` rows). Every step sees a new batch, so each
step protects only ``B`` retained instances, and the directions it protects change from step to
step: what one step leaves alone, the next may move. Keeping the newest ``(m + 1) B`` per-sample
gradients in the constraint set (as GEM keeps an episodic memory of past tasks' gradients;
``B`` is the row count of the first step, and with batches of that size these are the rows of
the current and the last ``m`` batches) makes each step respect ``(m + 1) B`` instances for the
price of a larger ``k x k`` Gram matrix, with no extra backward pass. The memory counts rows,
not steps: after a smaller batch (the last one of a pass over the retain set, or a short batch
of coupled rows) it keeps rows of more than ``m`` earlier steps, the oldest of them in part (see
:class:`PerSampleMemory`). The remembered gradients were taken at earlier parameters; with
the small learning rates of unlearning they stay close to the current ones (the step is a few
``lr`` away), and they are exactly the directions the earlier steps already avoided.

The rows live in one preallocated ring buffer per parameter (``[capacity, *shape_p]``), so a step
costs one copy of the new rows and the basis handed to the projection is a list of leading-dim
views: parameters are never flattened or concatenated. With ``track_gram`` the memory also keeps
the rows' Gram matrix up to date: a step computes only its new rows' inner products with the
stored ones (``B x (m + 1) B`` instead of the ``((m + 1) B)^2 / 2`` of a fresh Gram matrix), and
the instance projections reuse it (``basis_gram=`` of ``project_out_list`` and
``project_nonconflicting_list``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtunlearn_ext.surgery import inner_list_stats

__all__ = ["PerSampleMemory"]


class PerSampleMemory:
    """The newest per-sample gradient rows, up to ``(steps + 1) * B`` of them.

    A ring of ``capacity = (steps + 1) * B`` rows, ``B`` being the row count of the :meth:`add`
    that sized it: the first one, or a later one with more rows than ``B`` (which re-sizes the
    ring and starts it afresh, as do rows over other parameters or of another shape, dtype or
    device). Each :meth:`add` writes its rows over the oldest stored ones, so the memory holds
    the current step's rows and the most recent earlier rows that fit, whatever steps they came
    from. With every batch of ``B`` rows that is exactly the current step's rows and the last
    ``steps`` steps'. After a smaller batch it is not: it then holds rows of more than ``steps``
    earlier steps, the oldest of them in part (its last rows). For example, ``steps=1`` and
    batches of 16, 16, 6 and 16 rows: after the third add the memory holds its 6 rows, the 16 of
    the second and the last 10 of the first; after the fourth, its 16, the 6 of the third and
    the last 10 of the second.

    Args:
        steps: with ``B`` the sizing batch's rows, the ring holds ``(steps + 1) * B`` rows
            (``0``: no memory, :meth:`add` returns the current step's rows themselves).
        track_gram: keep the stored rows' Gram matrix (see :meth:`gram`).
    """

    def __init__(self, steps: int, track_gram: bool = False) -> None:
        if steps < 0:
            raise ValueError(f"PerSampleMemory: `steps` must be >= 0, got {steps}")
        self.steps = steps
        self.track_gram = track_gram
        self._gram: torch.Tensor | None = None
        self._names: tuple[str, ...] | None = None
        self._buffers: list[torch.Tensor] = []
        self._rows_per_step = 0
        self._next = 0
        self.filled = 0

    @property
    def capacity(self) -> int:
        """Rows the buffers hold (0 before the first :meth:`add`)."""
        return self._buffers[0].shape[0] if self._buffers else 0

    def reset(self) -> None:
        """Forget every row (the buffers are kept)."""
        self._next = 0
        self.filled = 0

    def add(self, names: Sequence[str], stacks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Store this step's rows (one ``[B, *shape_p]`` stack per parameter of ``names``) over
        the oldest stored rows and return every stored row (the newest ``capacity`` rows added
        since the ring was last sized), one ``[rows, *shape_p]`` view per parameter.

        Rows over other parameters than the stored ones (a different ``names``) or of another
        shape, dtype or device start the memory afresh. The first call sizes the ring for
        ``(steps + 1)`` batches of its ``B``; a larger batch later re-sizes it (and starts afresh).
        An add of no rows stores nothing: it returns the stored rows, or (where it would start
        the memory afresh) its own empty stacks, leaving the memory empty.
        """
        stacks = list(stacks)
        if len(stacks) != len(names) or not stacks:
            raise ValueError(f"PerSampleMemory.add: expected one stack per name ({len(names)}), "
                             f"got {len(stacks)}")
        rows = stacks[0].shape[0]
        if any(s.shape[0] != rows for s in stacks):
            raise ValueError("PerSampleMemory.add: every stack must have the same number of rows, "
                             f"got {[s.shape[0] for s in stacks]}")
        if self.steps == 0:
            return stacks
        if not self._fits(tuple(names), stacks):
            if rows == 0:
                # No rows to size a ring by (a ring of 0 rows has no slot to write to): the
                # memory starts afresh, empty, and the next add with rows sizes it.
                self._names, self._buffers, self._gram = None, [], None
                self.reset()
                return stacks
            capacity = (self.steps + 1) * rows
            self._names = tuple(names)
            self._buffers = [torch.empty((capacity, *s.shape[1:]), dtype=s.dtype, device=s.device)
                             for s in stacks]
            self._rows_per_step = rows
            self.reset()
        capacity = self.capacity
        start = self._next
        first = min(rows, capacity - start)
        # Multi-tensor copies: one launch per chunk of parameters, not one per parameter.
        torch._foreach_copy_([buffer[start:start + first] for buffer in self._buffers],
                             [stack[:first] for stack in stacks])
        if first < rows:
            torch._foreach_copy_([buffer[:rows - first] for buffer in self._buffers],
                                 [stack[first:] for stack in stacks])
        self._next = (start + rows) % capacity
        self.filled = min(self.filled + rows, capacity)
        # Row order does not matter to a projection on the span, so the filled rows are always
        # a leading block: the ring fills front to back before it first wraps.
        stored = [buffer[:self.filled] for buffer in self._buffers]
        if self.track_gram:
            cross = inner_list_stats(stacks, stored)  # [rows, filled]: the only new entries
            if self._gram is None or self._gram.shape[0] != capacity or \
                    self._gram.dtype != cross.dtype or self._gram.device != cross.device:
                self._gram = torch.zeros(capacity, capacity, dtype=cross.dtype,
                                         device=cross.device)
            where = (torch.arange(rows, device=cross.device) + start) % capacity
            self._gram[where, :self.filled] = cross
            self._gram[:self.filled, where] = cross.T
        return stored

    def gram(self) -> torch.Tensor:
        """The Gram matrix of the rows the last :meth:`add` returned (``[rows, rows]``, in the
        dtype the list projections solve in); needs ``track_gram`` and
        ``steps > 0``."""
        if not self.track_gram or self._gram is None or self.filled == 0:
            raise RuntimeError("PerSampleMemory.gram: no Gram matrix kept (needs track_gram=True, "
                               "steps > 0 and a first add)")
        return self._gram[:self.filled, :self.filled]

    def _fits(self, names: tuple[str, ...], stacks: Sequence[torch.Tensor]) -> bool:
        if names != self._names or not self._buffers:
            return False
        rows = stacks[0].shape[0]
        return rows <= self._rows_per_step and all(
            b.shape[1:] == s.shape[1:] and b.dtype == s.dtype and b.device == s.device
            for b, s in zip(self._buffers, stacks))

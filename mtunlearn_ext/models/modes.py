"""Eval mode for a block of work, with every module's own mode back afterwards, and the
buffers' values kept across forwards made only to measure or check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import threading
from types import TracebackType

import torch
from torch import nn

__all__ = ["BuffersKept", "eval_mode", "ignoring_compile", "measuring"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then each module's previous mode: a model whose modules
    were in mixed modes (a frozen BatchNorm in eval inside a training model) comes back as it
    was, which ``model.train(was_training)`` would not do. Forward passes made only to measure
    or check (no dropout draw, no running-statistics update) run inside it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class BuffersKept:
    """A module tree's buffers and plain attributes when made; :meth:`restore` (or leaving a
    ``with`` block) puts them back. A forward may write into its module even in eval mode: an
    observer's min/max, a call counter, a cache grown on demand (a rotary table rebuilt for a
    longer sequence with its length in an attribute beside it), a buffer registered as
    ``None`` and filled from the first batch. A model that was only measured must come back as
    it was: each buffer's value in the same tensor (a buffer replaced by another tensor is put
    back; one resized in place is replaced by its saved copy), buffers added since removed,
    ``None`` ones emptied again, and every attribute that is not a parameter, buffer or
    submodule set back to the object it held (an object changed in place stays changed). A
    module whose class changed (a lazy module materialised by its first call) is left as it
    is now: its old attributes would not fit its new class."""

    def __init__(self, model: object) -> None:
        modules = list(model.modules()) if isinstance(model, nn.Module) else []  # refused later
        # A lazy module's uninitialised buffers hold no values (and cannot be copied): the
        # module's class changes when its first call fills them, which is left as it is.
        self._saved = [(module, name, buffer, buffer.detach().clone())
                       for module in modules
                       for name, buffer in module._buffers.items()
                       if buffer is not None and not nn.parameter.is_lazy(buffer)]
        self._layouts = [(module, type(module), dict(module._buffers),
                          {k: v for k, v in module.__dict__.items() if k not in _CONTAINERS})
                         for module in modules]

    def restore(self) -> None:
        changed_class = set()
        for module, kind, buffers, attributes in self._layouts:
            if type(module) is not kind:
                changed_class.add(id(module))
                continue
            for name in [n for n in module._buffers if n not in buffers]:
                del module._buffers[name]
            for name, buffer in buffers.items():
                if buffer is None:
                    module._buffers[name] = None
            own = module.__dict__
            for name in [n for n in own if n not in attributes and n not in _CONTAINERS]:
                del own[name]
            for name, value in attributes.items():
                if own.get(name, _MISSING) is not value:
                    own[name] = value
        with torch.no_grad():
            for module, name, buffer, value in self._saved:
                if id(module) in changed_class:
                    continue
                if buffer.shape != value.shape or buffer.dtype != value.dtype:
                    module._buffers[name] = value  # resized in place: the saved copy instead
                    continue
                if module._buffers.get(name) is not buffer:
                    module._buffers[name] = buffer
                # Copied back whether or not it changed: a comparison would wait for the device
                # once per buffer, and the version counter misses writes (BatchNorm's running
                # statistics do not move it). An inference tensor takes no in-place write outside
                # inference mode, so a forward could not have changed it there.
                if not (buffer.is_inference() and not torch.is_inference_mode_enabled()):
                    buffer.copy_(value)

    def __enter__(self) -> BuffersKept:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.restore()


#: A module's own dicts of parameters, buffers and submodules: :class:`BuffersKept` restores
#: the buffers entry by entry and leaves parameters and submodules to their owners.
_CONTAINERS = frozenset({"_parameters", "_buffers", "_modules"})
_MISSING = object()


@contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Forwards made only to measure or check: eval mode (:func:`eval_mode`), no gradients,
    and every buffer's value back afterwards (:class:`BuffersKept`)."""
    with BuffersKept(model), eval_mode(model), torch.no_grad():
        yield


_COMPILE_LOCK = threading.Lock()
_IGNORING = 0  # blocks inside ignoring_compile(), across threads
_STANCE_BEFORE: object = None


@contextmanager
def gradients_on() -> Iterator[None]:
    """Autograd on inside, whatever the caller's mode: a library call that trains or unlearns
    computes gradients of its own, and one made under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (an evaluation loop, a serving process) failed at its first
    step with torch's "element 0 of tensors does not require grad"."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextmanager
def ignoring_compile() -> Iterator[None]:
    """``torch.compile`` ignored inside (``torch.compiler.set_stance("force_eager")``): a
    compiled module runs as written. The stance is process-wide, so blocks overlapping in
    several threads share it: the first to enter sets it and the last to leave puts back the
    stance the first found (with ``set_stance`` nested per block, one run restored the default
    under another still running, and the other's exit left compile off for good)."""
    global _IGNORING, _STANCE_BEFORE
    with _COMPILE_LOCK:
        if _IGNORING == 0:
            _STANCE_BEFORE = torch.compiler.set_stance("force_eager")
        _IGNORING += 1
    try:
        yield
    finally:
        with _COMPILE_LOCK:
            _IGNORING -= 1
            if _IGNORING == 0:
                _restore_stance(_STANCE_BEFORE)


def _restore_stance(saved: object) -> None:
    # set_stance(...) called as a function returns a context object; leaving it restores the
    # stance that was current when it was made.
    exit_ = getattr(saved, "__exit__", None)
    if callable(exit_):
        exit_(None, None, None)

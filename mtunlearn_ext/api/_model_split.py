"""The split of a caller's module into a shared trunk and one head per task: named,
given as parameters or modules, by a predicate, or found by the tasks' names in the parameters'
dotted names (tied weights and modules held in two places counted under every name), and the
wrapper (:class:`SplitModel`) through which the library's methods call the caller's module."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext.api._entry import entry
from mtunlearn_ext.api._types import ParameterSpec, SharedSpec
from mtunlearn_ext.data.inputs import Inputs, call_with
from mtunlearn_ext.models.base import ParameterSplit
from mtunlearn_ext.unlearning.base import ModelOutputError


class SplitModel(nn.Module):
    """A user's module with an explicit shared/heads split (what the unlearners read), whose
    forward returns a plain ``dict`` of task outputs. The user's module is held as ``module``,
    so the unlearned module is ``wrapper.module``. A namedtuple's or a dataclass's fields name
    the outputs as a dict's keys do. The library passes a batch's inputs along
    as one object; here, at the user's module, several inputs are unpacked (``module(*x)``
    for a tuple, ``module(**x)`` for a dict).

    The wrapper has no mode of its own: its ``training`` is the user's module's (setting it
    sets that module's flag, as ``train()`` / ``eval()`` do on every module below), so code
    that saves and restores ``wrapper.training`` restores what the user's module had."""

    #: What the wrapper puts before the user's names; messages drop it (the user's module has
    #: no `module.` in its names).
    wrapped_prefix = "module."
    #: The split comes from `unlearn`'s arguments (names, modules, a predicate): the problem's
    #: validation checks it against the model's graph
    #: (:meth:`~mtunlearn_ext.unlearning.UnlearningProblem.check_heads_feed_their_tasks`).
    split_from_arguments = True

    def __init__(self, module: nn.Module, shared: Sequence[str],
                 heads: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.module = module
        self._split = ParameterSplit(tuple(f"module.{n}" for n in shared),
                                     {t: tuple(f"module.{n}" for n in names)
                                      for t, names in heads.items()})

    @property
    def training(self) -> bool:
        module = self.__dict__.get("_modules", {}).get("module")
        if module is None:  # inside nn.Module.__init__, before the user's module is held
            return bool(self.__dict__.get("_training", True))
        return bool(module.training)

    @training.setter
    def training(self, mode: bool) -> None:
        module = self.__dict__.get("_modules", {}).get("module")
        if module is None:
            self.__dict__["_training"] = mode
        else:
            module.training = mode

    def forward(self, x: Inputs, tasks: Sequence[str] | None = None
                ) -> dict[str, torch.Tensor]:
        # ``tasks`` (the evaluation's task subset) is a hint a plain module cannot take: every
        # output is returned and callers pick theirs.
        out = call_with(self.module, x)
        as_dict = getattr(out, "_asdict", None) if isinstance(out, tuple) else None
        if callable(as_dict):
            return dict(as_dict())  # a namedtuple's fields name its outputs
        if dataclasses.is_dataclass(out) and not isinstance(out, type):
            # A dataclass's fields name its outputs as a namedtuple's do. A field left None (a
            # loss computed only when labels are passed) is no output: every output is read
            # as a tensor, as Hugging Face's ModelOutput drops its None fields.
            fields = ((f.name, getattr(out, f.name)) for f in dataclasses.fields(out))
            return {name: value for name, value in fields if value is not None}
        if not isinstance(out, Mapping):
            raise ModelOutputError(type(out).__name__)
        return dict(out)

    if TYPE_CHECKING:  # ``wrapper(x)`` typed as :meth:`forward` (``nn.Module.__call__``
        # returns ``Any``); for checkers only, the call runs as nn.Module runs it
        def __call__(self, x: Inputs, tasks: Sequence[str] | None = None
                     ) -> dict[str, torch.Tensor]: ...

    def parameter_split(self) -> ParameterSplit:
        """The shared / per-head parameter names given to :func:`~mtunlearn_ext.unlearn`."""
        return self._split

    def __getattr__(self, name: str) -> Any:
        # A method's code sees this wrapper as ``ctx.model``: what it reaches for on the
        # user's module (``model.heads[t]``, ``model.trunk``) is that module's own attribute.
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("__"):
                raise
            try:
                return getattr(module, name)
            except AttributeError:
                raise AttributeError(
                    f"neither the unlearning wrapper nor the wrapped {type(module).__name__} "
                    f"has an attribute {name!r}; a method reads the parameter split from "
                    "`ctx.groups` (`shared`, `heads[task]`: (name, parameter) pairs) or "
                    "`model.parameter_split()` (names)") from None


def _owners(model: nn.Module) -> dict[str, list[list[str]]]:
    """Each parameter's name in ``named_parameters()`` (the first it is reachable under) -> the
    modules that hold it, each as every name it is reachable under through that module. One
    module held in two places (a head also listed in a ``ModuleList``) is one owner with two
    names; a weight tied between two modules (``head.weight = embed.weight``) has two owners."""
    first = {id(p): n for n, p in model.named_parameters()}
    owners: dict[str, dict[int, list[str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is not None:
                full = f"{module_name}.{name}" if module_name else name
                owners.setdefault(first[id(p)], {}).setdefault(id(module), []).append(full)
    return {n: list(by_module.values()) for n, by_module in owners.items()}


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's first name -> every name it is reachable under (:func:`_owners`)."""
    return {n: [alias for names in owners for alias in names]
            for n, owners in _owners(model).items()}


def _names_of(model: nn.Module, items: ParameterSpec, what: str,
              wrapper_prefix: str = "") -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    canonical = {alias: n for n, names in _aliases(model).items() for alias in names}
    names: list[str] = []  # in the order given, each once (a list may name one twice)
    if isinstance(items, (nn.Module, nn.Parameter)):
        # One module or one parameter (a head that is a bare nn.Parameter): iterating a
        # tensor would give its rows, none of them a parameter.
        items = [items]
    if isinstance(items, str):
        raise TypeError(_one_name_error(model, what, items))
    if callable(items) and what != "shared_parameters":
        raise TypeError(f"{entry()}: `{what}` must be names, parameters or modules, got "
                        f"{type(items).__name__} (only `shared_parameters` takes a predicate): "
                        f"pass the names it takes, [n for n, _ in model.named_parameters() "
                        f"if ...]")
    for given in items:
        # A (name, parameter) pair of `named_parameters()`, of the model or a submodule (whose
        # names are its own): the parameter is meant.
        item: object = (given[1] if isinstance(given, tuple) and len(given) == 2
                        and isinstance(given[0], str) and isinstance(given[1], torch.Tensor)
                        else given)
        if isinstance(item, nn.Module):  # a submodule stands for every parameter it holds
            outside = [n for n, p in item.named_parameters() if id(p) not in by_id]
            if outside:
                raise UnknownNameError(f"{entry()}: a module in `{what}` ({type(item).__name__}) "
                                       f"holds parameters that are not the model's: {outside[:3]}; "
                                       f"pass a submodule of the model")
            names.extend(by_id[id(p)] for p in item.parameters())
        elif isinstance(item, str):
            # A name read off the wrapper the caller passed (`dp.named_parameters()`) names the
            # same parameter as the module inside does, which is what the split is made of.
            if (item not in canonical and wrapper_prefix and item.startswith(wrapper_prefix)
                    and item[len(wrapper_prefix):] in canonical):
                item = item[len(wrapper_prefix):]
            if item not in canonical:
                module = (f" but a module: {_module_ways(item, what == 'shared_parameters')}"
                          if _is_module_name(model, item) else "")
                raise UnknownNameError(f"{entry()}: `{what}` names {item!r}, which is not a "
                                       f"parameter of the model{module}")
            names.append(canonical[item])
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise UnknownNameError(f"{entry()}: a tensor in `{what}` is not a parameter of the "
                                       f"model")
            names.append(by_id[id(item)])
        else:
            raise TypeError(f"{entry()}: `{what}` must hold names, parameters or modules, got "
                            f"{type(item).__name__}")
    return list(dict.fromkeys(names))


def _one_name_error(model: nn.Module, what: str, name: str) -> str:
    takes_predicate = what == "shared_parameters"  # head_parameters takes none
    said = (f"{entry()}: `{what}` must be names, parameters"
            + (", modules or a predicate on names" if takes_predicate else " or modules")
            + f", got the string {name!r}")
    if _is_module_name(model, name):
        return f"{said}, which names a module: {_module_ways(name, takes_predicate)}"
    return (f"{said}: put names in a list ([{name!r}])"
            + (f", or pass a predicate (lambda n: n.startswith({name!r}))"
               if takes_predicate else ""))


def _is_module_name(model: nn.Module, name: str) -> bool:
    return bool(name) and name in dict(model.named_modules(remove_duplicate=False))


def _module_ways(name: str, takes_predicate: bool = True) -> str:
    """How to name a module's parameters: the parameter names of a list are matched whole."""
    if not takes_predicate:
        return f"pass the module itself (model.get_submodule({name!r}))"
    return (f"pass the module itself (model.get_submodule({name!r})) or a predicate "
            f"(lambda n: n.startswith({name + '.'!r}))")


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's own module inside ``torch.compile``'s and (Distributed)DataParallel's
    wrappers: per-sample gradients (torch.func) and parameter names ("trunk.0.weight", not
    "_orig_mod.trunk.0.weight" or "module.trunk.0.weight") are its own, so a request runs, and
    a saved model is compared, through it (a DataParallel request runs in this one process)."""
    return unwrapped_with_prefix(model)[0]


def unwrapped_with_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """:func:`unwrapped`, and what the wrappers put before its parameter names in their own
    ``named_parameters()`` ("module._orig_mod." for a DataParallel around a compiled module,
    "" for a module not wrapped): names the caller read off the wrapper carry it."""
    prefix = ""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(
                orig := getattr(model, "_orig_mod", None), nn.Module):
            model, prefix = orig, prefix + "_orig_mod."
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
        else:
            return model, prefix


def has_own_split(model: nn.Module, shared: SharedSpec | None,
                   heads: Mapping[str, ParameterSpec] | None) -> bool:
    """The model is used as it is (no :class:`SplitModel` around it, so it receives a
    batch's inputs as one object): it has ``parameter_split()`` and no split is given."""
    return shared is None and heads is None and callable(getattr(model, "parameter_split", None))


def split_model(model: nn.Module, task_names: Sequence[str], shared: SharedSpec | None,
                 heads: Mapping[str, ParameterSpec] | None,
                 wrapper_prefix: str = "") -> nn.Module:
    """The model itself when it already exposes ``parameter_split()`` and no split is given,
    else a :class:`SplitModel` around it. ``model`` is the caller's module unwrapped
    (:func:`unwrapped_with_prefix`) and ``wrapper_prefix`` what its wrappers put before its
    names: names given with it are taken, and a predicate is called with the module's own."""
    if has_own_split(model, shared, heads):
        return model
    if shared is None and heads is None:
        raise ValueError(f"{entry()}: say which parameters are shared: pass `shared_parameters` "
                         "(names, parameters, modules, or a predicate on names), or use a model "
                         "with `parameter_split()` (a mtunlearn_ext MultiTaskModel)")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(shared, nn.Module):  # callable, but its parameters are meant, not a predicate
        shared = [shared]
    if isinstance(shared, str):
        raise TypeError(_one_name_error(model, "shared_parameters", shared))
    if shared is not None and not callable(shared) and (
            isinstance(shared, bytes) or not isinstance(shared, Iterable)):
        raise TypeError(f"{entry()}: `shared_parameters` must be names, parameters, modules or a "
                        f"predicate on names, got {type(shared).__name__}")
    owners = _owners(model)
    aliases = {n: [a for names in held for a in names] for n, held in owners.items()}
    if shared is None:
        shared_names: list[str] = []
    elif callable(shared):
        # A weight that the trunk and a head both hold (two modules, tied) is shared when the
        # predicate takes either module's name: every task reaches it through the trunk. A
        # module merely held in two places is judged by its first name (a head also kept in a
        # list stays its task's head), unless its names put it in several tasks' heads: then
        # it must be shared, and any of its names may say so (`proj.` for a `proj` that
        # `heads.a` and `heads.b` both hold).
        predicate = shared
        shared_names = [n for n in trainable if any(
            predicate(names[0]) or (_in_several_heads(names, task_names)
                                    and any(predicate(a) for a in names))
            for names in owners[n])]
    else:
        shared_names = _names_of(model, shared, "shared_parameters", wrapper_prefix)
    if heads is not None:
        if not isinstance(heads, Mapping):
            raise TypeError(f"{entry()}: `head_parameters` must be a mapping task -> names or "
                            f"parameters, got {type(heads).__name__}")
        unknown = [t for t in heads if t not in task_names]
        if unknown:
            raise ValueError(f"{entry()}: `head_parameters` has key(s) {unknown} that are not "
                             f"tasks; its keys must be tasks of `tasks`: {list(task_names)}")
        head_names = {t: _names_of(model, heads[t], f"head_parameters[{t!r}]", wrapper_prefix)
                      for t in task_names if t in heads}
        _check_in_one_head(head_names, aliases)
    else:
        head_names = {}
    # The tasks `head_parameters` leaves out keep the default split's heads (found by name),
    # among the parameters neither shared nor given: naming one oddly-named head does not
    # ask the others to be named too.
    by_name = [t for t in task_names if t not in head_names]
    given = set(shared_names) | {n for names in head_names.values() for n in names}
    found = _heads_by_name(model, by_name, [n for n in trainable if n not in given],
                           shared_names)
    head_names.update(found)
    assigned = given | {n for names in found.values() for n in names}
    stray = [n for n in trainable if n not in assigned]
    if stray:
        raise ValueError(f"{entry()}: parameters neither shared nor in a head: {stray}; pass "
                         f"`head_parameters` (task -> names) or widen `shared_parameters`, or, "
                         f"if no task of `tasks` uses them (an auxiliary head), freeze them "
                         f"(`requires_grad_(False)`): frozen parameters stay as they are"
                         + _wrapper_names_hint(shared, stray, wrapper_prefix)
                         + (_head_names_hint(stray, by_name, found) if by_name else ""))
    overlap = set(shared_names) & {n for names in head_names.values() for n in names}
    if overlap:
        tied = {n: aliases[n] for n in sorted(overlap) if len(aliases[n]) > 1}
        raise ValueError(f"{entry()}: parameters both shared and in a head: {sorted(overlap)}"
                         + (f" (tied: one parameter under the names {tied}; a parameter the "
                            "trunk uses is shared, so leave it out of `head_parameters`)"
                            if tied else ""))
    # Frozen parameters belong to no group (they never move); the split lists trainable ones.
    return SplitModel(model, shared_names, head_names)


def _check_in_one_head(head_names: Mapping[str, Sequence[str]],
                       aliases: Mapping[str, Sequence[str]]) -> None:
    """A parameter given in two tasks' heads (one module listed for both, or a weight tied
    between them) is refused here, in the caller's names: the groups' own check would name it
    as the wrapper holds it (`module.heads.a.weight`)."""
    head_of: dict[str, str] = {}
    for task, names in head_names.items():
        for n in names:
            first = head_of.setdefault(n, task)
            if first != task:
                tied = (f" (one parameter under the names {list(aliases[n])})"
                        if len(aliases.get(n, [])) > 1 else "")
                raise ValueError(
                    f"{entry()}: `head_parameters` puts parameter {n!r}{tied} in the heads of "
                    f"both {first!r} and {task!r}: both tasks use it, so it is shared: list it "
                    f"in `shared_parameters`, not in a head")


def _wrapper_names_hint(shared: SharedSpec | None, stray: Sequence[str],
                        wrapper_prefix: str) -> str:
    """Why a predicate written for the wrapper's names ("module.trunk.") took none of the
    module's own, if that is what happened."""
    if not (wrapper_prefix and callable(shared) and not isinstance(shared, nn.Module)):
        return ""
    meant = [n for n in stray if shared(wrapper_prefix + n)]
    if not meant:
        return ""
    return (f". `shared_parameters` is called with the names of the module inside the "
            f"wrapper ({meant[0]!r}, not {wrapper_prefix + meant[0]!r}): the model is unlearned "
            f"through that module; drop {wrapper_prefix!r} from what it matches")


def _head_names_hint(stray: Sequence[str], task_names: Sequence[str],
                     found_heads: Mapping[str, Sequence[str]]) -> str:
    """How the default split finds heads, for parameters it found in none; when each of them
    sits in a module whose name holds one task's name as a ``_``-separated word (``kind_head``,
    ``fc_kind``: a torchvision-style model's heads), the ``head_parameters`` that says so. The
    split does not guess them itself: a trunk layer named after a task (``kind_embed``) would
    be taken as that task's head. Where the split already found a head of that task by name
    (``found_heads``), the module is a second one or a left-over: the hint lists both modules
    and says to freeze it if nothing uses it (a task given in ``head_parameters`` is not looked
    up by name, so naming the new module alone would leave the found head unassigned)."""
    suggested: dict[str, list[str]] = {}
    for name in stray:
        *path, _ = name.split(".")
        module = None
        for depth, component in enumerate(path):
            words = component.split("_")
            found = [t for t in task_names if _holds_words(words, t.split("_"))]
            if len(found) == 1:
                module = (found[0], ".".join(path[:depth + 1]))
                break
        if module is None:
            return (f". A head is found by a dotted component of its name equal to its task's "
                    f"({'heads.' + task_names[0] + '.weight' if task_names else ''}), which "
                    f"{stray[0]!r} has not")
        task, prefix = module
        if prefix not in suggested.setdefault(task, []):
            suggested[task].append(prefix)
    second = [t for t in suggested if found_heads.get(t)]
    for t in second:
        suggested[t] = list(dict.fromkeys(_head_modules(found_heads[t], t))) + suggested[t]
    modules = ", ".join(
        f"{t!r}: " + (f"model.get_submodule({p[0]!r})" if len(p) == 1 else
                      "[" + ", ".join(f"model.get_submodule({m!r})" for m in p) + "]")
        for t, p in suggested.items())
    if second:
        return (f". A head is found by a dotted component of its name equal to its task's, which "
                f"these have not, and it found a head of {second} that way already: if those "
                f"tasks use these modules too, pass head_parameters={{{modules}}} (a task given "
                f"there is not looked up by name); if nothing uses them (a left-over module), "
                f"freeze them")
    return (f". A head is found by a dotted component of its name equal to its task's, which "
            f"these have not; if they are the heads their module names suggest, pass "
            f"head_parameters={{{modules}}}")


def _head_modules(names: Sequence[str], task: str) -> list[str]:
    """The modules the default split took as ``task``'s head: each parameter name's path up
    to its component equal to ``task`` (``heads.cls`` for ``heads.cls.0.weight``), or the
    parameter's own module where only its attribute name is the task's."""
    modules = []
    for name in names:
        *path, _ = name.split(".")
        modules.append(".".join(path[:path.index(task) + 1]) if task in path else ".".join(path))
    return modules


def _holds_words(words: Sequence[str], wanted: Sequence[str]) -> bool:
    """Whether ``wanted`` occurs as consecutive items of ``words``."""
    return any(list(words[i:i + len(wanted)]) == list(wanted)
               for i in range(len(words) - len(wanted) + 1))


def _tasks_named_in(name: str, task_names: Sequence[str]) -> list[str]:
    """The tasks whose name is a component of the parameter name ``name``: of its modules'
    path first, its own attribute name only where no module is named after a task. A task
    called ``weight`` or ``bias`` would otherwise also claim ``heads.age.weight``, which then
    sat in two heads and in none."""
    *path, own = name.split(".")
    return ([t for t in task_names if t in path]
            or [t for t in task_names if t == own])


def _in_several_heads(names: Sequence[str], task_names: Sequence[str]) -> bool:
    """Whether the names one module is reachable under place it in the heads of two or
    more tasks (:func:`_tasks_named_in`)."""
    return len({t for alias in names for t in _tasks_named_in(alias, task_names)}) > 1


def _heads_by_name(model: nn.Module, task_names: Sequence[str], trainable: Sequence[str],
                   shared_names: Sequence[str]) -> dict[str, list[str]]:
    """The default split's heads: a parameter belongs to the head of task t when one component
    of its dotted name is t (``heads.depth.0.weight``, ``depth.weight``).

    A parameter reachable under several names (a module held in two places, a tied weight)
    counts under every name: one in the heads of two tasks is refused unless it is shared (in
    a single head, the other task's forget gradient would never reach it and nothing would
    protect it as shared), and so is one also reachable outside every head (a head's weight
    tied to the trunk's embedding: every task uses it, so it is shared)."""
    held_by = _owners(model)
    shared = set(shared_names)
    head_names: dict[str, list[str]] = {t: [] for t in task_names}
    for n in trainable:
        if n in shared:
            continue
        owners: dict[str, str] = {}  # task -> the first name placing the parameter in its head
        outside: list[str] = []  # the first name of each holding module outside every head
        for names in held_by.get(n, [[n]]):
            in_head = False
            for alias in names:
                found = _tasks_named_in(alias, task_names)
                if len(found) == 1:
                    owners.setdefault(found[0], alias)
                in_head = in_head or bool(found)
            if not in_head:
                outside.append(names[0])
        if len(owners) > 1:
            (task, name), (other, other_name) = list(owners.items())[:2]
            raise ValueError(
                f"{entry()}: parameter {n!r} is in the heads of both {task!r} (as {name!r}) and "
                f"{other!r} (as {other_name!r}): "
                + ("one module serves both heads" if len(held_by.get(n, [])) < 2
                   else "a weight tied between both heads")
                + f", so both tasks use it; a parameter several tasks use is shared: list it "
                f"in `shared_parameters` (a predicate may take any of its names: "
                f"{_aliases_of(held_by, n)})")
        if owners and outside:
            (task, name), = owners.items()
            raise ValueError(
                f"{entry()}: parameter {n!r} is tied between the head of {task!r} (as {name!r}) "
                f"and {outside[0]!r}, outside every head: every task that uses {outside[0]!r} "
                f"reaches it, so it is shared: list {outside[0]!r} in `shared_parameters`")
        if owners:
            head_names[next(iter(owners))].append(n)
    return head_names


def _aliases_of(held_by: Mapping[str, list[list[str]]], name: str) -> list[str]:
    return [alias for names in held_by.get(name, [[name]]) for alias in names]


def fresh_split_model(fresh_model: Callable[[], nn.Module], wrapped: nn.Module,
                       names: Sequence[str]) -> Callable[[], nn.Module]:
    """A factory of fresh models split like ``wrapped`` (by parameter name: the split may have
    been given as the original model's parameter objects)."""
    split = wrapped.parameter_split() if isinstance(wrapped, SplitModel) else None

    def make() -> nn.Module:
        fresh = fresh_model()
        if not isinstance(fresh, nn.Module):
            raise TypeError(f"{entry()}: `fresh_model` must return an nn.Module, got "
                            f"{type(fresh).__name__}")
        if split is None:  # the model splits itself (parameter_split())
            return split_model(fresh, names, None, None)
        strip = len("module.")
        return split_model(fresh, names, [n[strip:] for n in split.shared],
                            {t: [n[strip:] for n in ns] for t, ns in split.heads.items()})

    return make

"""A second request on a model that ``mtunlearn_ext.unlearn`` already removed data from: the
pairs removed earlier stay out of the retain set (a review found them trained on again, with
the full ``train_data`` passed as the docs show, and no word said)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec

TASKS = {"a": "classification", "b": "regression"}


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Linear(32, 3), "b": nn.Linear(32, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _data(n: int = 40) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, {"a": torch.randint(0, 3, (n,), generator=g), "b": torch.randn(n, 1, generator=g)}


def _kwargs(method: str = "finetune", steps: int = 5) -> dict[str, object]:
    return {"tasks": TASKS, "train_data": _data(), "method": method,
            "config": {"steps": steps, "lr": 1e-2},
            "shared_parameters": lambda name: name.startswith("trunk.")}


def _loss_a(model: nn.Module, rows: list[int]) -> float:
    x, y = _data()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x[rows])["a"], y["a"][rows]))


def test_a_returned_model_keeps_its_removals_out_of_the_next_retain_set() -> None:
    first = ForgetRequest.create(range(5))
    m1, r1 = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=first, **_kwargs())
    assert r1.request["earlier_requests"] == [] and r1.request["num_retain_pairs"] == 70
    m2, r2 = mtunlearn_ext.unlearn(m1, forget_request=ForgetRequest.create([20]), **_kwargs())
    # 80 pairs, less the first request's 10 and this one's 2.
    assert r2.request["num_retain_pairs"] == 68 and r2.request["earlier_pairs_excluded"] == 10
    assert r2.request["earlier_requests"] == [
        {"ids_sha256": first.ids_hash(), "num_instances": 5, "target_tasks": None}]
    # The third in the chain carries both.
    _, r3 = mtunlearn_ext.unlearn(m2, forget_request=ForgetRequest.create([21], ["a"]),
                                  **_kwargs())
    assert [e["num_instances"] for e in r3.request["earlier_requests"]] == [5, 1]
    assert r3.request["earlier_pairs_excluded"] == 12


def test_retraining_on_the_removed_pairs_is_what_the_chain_prevents() -> None:
    """Fine-tuning for a while on the retain set: with the first request's rows in it (an
    explicit empty ``earlier_requests``, what unlearn did before) their loss falls back toward
    the original's; kept out, it does not."""
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs(steps=1))
    second = ForgetRequest.create([20])
    chained, _ = mtunlearn_ext.unlearn(m1, forget_request=second, **_kwargs(steps=150))
    with pytest.warns(UserWarning, match=r"replaces the 1 request\(s\) `model` carries"):
        relearned, _ = mtunlearn_ext.unlearn(m1, forget_request=second, earlier_requests=[],
                                             **_kwargs(steps=150))
    removed = list(range(5))
    assert _loss_a(relearned, removed) < 0.8 * _loss_a(chained, removed)


def test_a_loaded_model_is_given_its_earlier_requests() -> None:
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs())
    loaded = _TwoHeads()
    loaded.load_state_dict(m1.state_dict())  # a new object: it carries nothing
    _, plain = mtunlearn_ext.unlearn(loaded, forget_request=ForgetRequest.create([20]),
                                     **_kwargs())
    assert plain.request["num_retain_pairs"] == 78
    _, told = mtunlearn_ext.unlearn(loaded, forget_request=ForgetRequest.create([20]),
                                    earlier_requests=[ForgetRequest.create(range(5))],
                                    **_kwargs())
    assert told.request["num_retain_pairs"] == 68


def test_a_partial_removal_then_a_full_one_forgets_what_is_left() -> None:
    with pytest.warns(UserWarning, match=r"1 of the 4 pairs `forget_request` names \(1 "
                                         r"instance: 3\) were removed already by "
                                         r"`earlier_requests`; only the other 3 are forgotten"):
        problem = build_problem(_TwoHeads(), tasks=TASKS, train_data=_data(),
                                forget_request=ForgetRequest.create([3, 4]),
                                earlier_requests=[ForgetRequest.create([3], ["a"])],
                                shared_parameters=lambda name: name.startswith("trunk."))
    forget = problem.forget
    a, b = forget.task_index("a"), forget.task_index("b")
    rows = {int(i): p for p, i in enumerate(forget.ids.tolist())}
    assert not bool(forget.supervision[rows[3], a]) and bool(forget.supervision[rows[3], b])
    assert bool(forget.supervision[rows[4], a]) and bool(forget.supervision[rows[4], b])
    assert 3 not in problem.retain.ids.tolist() and 4 not in problem.retain.ids.tolist()


def test_a_request_naming_some_removed_pairs_forgets_the_rest_and_says_so() -> None:
    """Audit: the API narrowed such a request without a word (the CLI says so on stderr); the
    warning points at the caller's line, and a request of pairs not removed yet says nothing."""
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(3)),
                                  **_kwargs())
    with pytest.warns(UserWarning, match=r"unlearn: 2 of the 4 pairs `forget_request` names "
                                         r"\(1 instance: 0\) were removed already by the "
                                         r"requests `model` carries; only the other 2 are "
                                         r"forgotten") as seen:
        _, report = mtunlearn_ext.unlearn(m1, forget_request=ForgetRequest.create([0, 5]),
                                          **_kwargs())
    assert [w.filename for w in seen] == [__file__]
    assert report.request["num_forget_instances"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtunlearn_ext.unlearn(m1, forget_request=ForgetRequest.create([5, 6]), **_kwargs())


def test_a_request_for_pairs_already_removed_is_refused() -> None:
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs())
    with pytest.raises(ValueError, match=r"removed already by the requests `model` carries "
                                         r"\(from the unlearn\(\) that returned it\)"):
        mtunlearn_ext.unlearn(m1, forget_request=ForgetRequest.create([3]), **_kwargs())
    with pytest.raises(ValueError, match="removed already by `earlier_requests`: there is nothing"):
        build_problem(_TwoHeads(), tasks=TASKS, train_data=_data(),
                      forget_request=ForgetRequest.create([3], ["a"]),
                      earlier_requests=[ForgetRequest.create([3, 9])],
                      shared_parameters=lambda name: name.startswith("trunk."))


@pytest.mark.parametrize("earlier, error, message", [
    ([ForgetRequest.create([99])], KeyError, r"`earlier_requests\[0\]` names instance ids that "
                                             r"are not in `train_data`: \[99\]"),
    ([ForgetRequest.create([1], ["nope"])], KeyError, r"`earlier_requests\[0\]`: .*unknown "
                                                      r"task names \['nope'\]"),
    (ForgetRequest.create([1]), TypeError, "must be a list of ForgetRequests"),
    ([[1, 2]], TypeError, r"`earlier_requests\[0\]` must be a ForgetRequest, got list"),
])
def test_bad_earlier_requests_are_named(earlier: object, error: type[Exception],
                                        message: str) -> None:
    with pytest.raises(error, match=message):
        build_problem(_TwoHeads(), tasks=TASKS, train_data=_data(),
                      forget_request=ForgetRequest.create([20]),
                      earlier_requests=earlier,  # type: ignore[arg-type]
                      shared_parameters=lambda name: name.startswith("trunk."))


def test_the_other_way_in_says_what_it_cannot_check() -> None:
    x, y = _data()
    forget = (x[:5], {t: v[:5] for t, v in y.items()})
    retain = (x[5:], {t: v[5:] for t, v in y.items()})
    common = {"tasks": TASKS, "shared_parameters": lambda name: name.startswith("trunk."),
              "method": "finetune", "config": {"steps": 2}}
    with pytest.raises(ValueError, match="leave the pairs removed earlier out of `retain_data`"):
        mtunlearn_ext.unlearn(_TwoHeads(), forget_data=forget, retain_data=retain,
                              earlier_requests=[ForgetRequest.create([1])], **common)
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs())
    with pytest.warns(UserWarning, match="leave the pairs they removed out of `retain_data`"):
        mtunlearn_ext.unlearn(m1, forget_data=(x[30:], {t: v[30:] for t, v in y.items()}),
                              retain_data=(x[5:30], {t: v[5:30] for t, v in y.items()}),
                              **common)
    # A model from a forget_data run: its removals cannot be named by train_data's ids.
    m_tuple, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_data=forget, retain_data=retain,
                                       **common)
    with pytest.warns(UserWarning, match="pass them as `earlier_requests`"):
        mtunlearn_ext.unlearn(m_tuple, forget_request=ForgetRequest.create([20]), **_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # told explicitly: no warning
        mtunlearn_ext.unlearn(m_tuple, forget_request=ForgetRequest.create([20]),
                              earlier_requests=[ForgetRequest.create(range(5))], **_kwargs())


def test_a_copy_of_a_returned_model_keeps_its_removals() -> None:
    """Review: the removals were kept beside the object (a weak mapping), so a deepcopy, the
    natural way to keep a snapshot, trained on them again without a word."""
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs())
    _, report = mtunlearn_ext.unlearn(copy.deepcopy(m1),
                                      forget_request=ForgetRequest.create([20]), **_kwargs())
    assert report.request["earlier_pairs_excluded"] == 10
    assert "_mtunlearn_lineage" not in m1.state_dict()  # weights only in a state_dict


def _pickled_under_the_old_name(obj: object, cls: type) -> bytes:
    """``obj`` pickled as before the API became a package: ``cls`` named
    ``mtunlearn_ext.api._<name>``."""
    import pickle

    module, name = cls.__module__, cls.__qualname__
    cls.__module__, cls.__qualname__ = "mtunlearn_ext.api", f"_{name}"
    try:
        return pickle.dumps(obj)
    finally:
        cls.__module__, cls.__qualname__ = module, name


def test_a_model_pickled_when_the_api_was_one_module_still_loads() -> None:
    """Review of the API's split into a package: a returned module pickled before it names its
    removals' class as `mtunlearn_ext.api._Lineage`, which no longer existed there (unpickling
    raised AttributeError); the old names stay as aliases."""
    import pickle

    from mtunlearn_ext.api._lineage import Lineage

    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs())
    old = _pickled_under_the_old_name(m1, Lineage)
    assert b"_Lineage" in old
    _, report = mtunlearn_ext.unlearn(pickle.loads(old),
                                      forget_request=ForgetRequest.create([20]), **_kwargs())
    assert report.request["earlier_pairs_excluded"] == 10


def test_a_split_model_pickled_when_the_api_was_one_module_still_loads() -> None:
    """Mutation audit: as for `_Lineage`, a problem's model pickled before the split names its
    class `mtunlearn_ext.api._SplitModel`; the alias keeps it loadable."""
    import pickle

    from mtunlearn_ext.api._model_split import SplitModel

    split = SplitModel(_TwoHeads(), ["trunk.0.weight", "trunk.0.bias"],
                       {"a": ["heads.a.weight", "heads.a.bias"],
                        "b": ["heads.b.weight", "heads.b.bias"]})
    old = _pickled_under_the_old_name(split, SplitModel)
    assert b"_SplitModel" in old
    loaded = pickle.loads(old)
    assert isinstance(loaded, SplitModel)
    assert torch.equal(loaded.module.heads["a"].weight, split.module.heads["a"].weight)


def test_earlier_requests_that_leave_out_carried_ones_warn() -> None:
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs())
    with pytest.warns(UserWarning, match=r"1 of them are not in it, so their pairs are in the "
                                         r"retain set again"):
        _, report = mtunlearn_ext.unlearn(m1, forget_request=ForgetRequest.create([20]),
                                          earlier_requests=[ForgetRequest.create([7])],
                                          **_kwargs())
    assert report.request["earlier_pairs_excluded"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the carried request among those given: no warning
        _, report = mtunlearn_ext.unlearn(
            m1, forget_request=ForgetRequest.create([20]),
            earlier_requests=[ForgetRequest.create([4, 3, 2, 1, 0]), ForgetRequest.create([7])],
            **_kwargs())
    assert report.request["earlier_pairs_excluded"] == 12


def test_rows_dropped_since_are_refused_by_position_and_skipped_by_id() -> None:
    """Review: after dropping the forgotten rows (their data erased), a tuple's positions
    named other instances (rows 5..9 kept out instead of 0..4, silently); a data set's ids
    still name the same instances, and ids no longer there have nothing left to keep out."""
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs())
    x, y = _data()
    dropped = (x[5:], {t: v[5:] for t, v in y.items()})
    with pytest.raises(ValueError, match=r"carries 1 earlier request\(s\) naming instances by "
                                         r"row positions of a `train_data` of 40 rows, and this "
                                         r"`train_data` has 35 rows"):
        mtunlearn_ext.unlearn(m1, forget_request=ForgetRequest.create([20]),
                              **{**_kwargs(), "train_data": dropped})
    data = MultiTaskDataset(x, y, [TaskSpec("a", "classification", num_classes=3),
                                   TaskSpec("b", "regression")])
    kwargs = {**_kwargs(), "train_data": data}
    d1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create([0, 1, 2]),
                                  **kwargs)
    kept = data.subset(torch.arange(2, 40))  # rows 0 and 1 erased, row 2 still there
    _, report = mtunlearn_ext.unlearn(d1, forget_request=ForgetRequest.create([20]),
                                      **{**kwargs, "train_data": kept})
    assert report.request["earlier_pairs_excluded"] == 2  # instance 2's two pairs
    assert report.request["num_retain_pairs"] == 2 * 38 - 2 - 2



def test_a_request_naming_an_id_whose_rows_were_dropped_says_it_was_removed() -> None:
    """Long-run review: asking again for an id an earlier request removed, once its rows were
    dropped (its data erased, as the docs say), said only that the id is not in `train_data`,
    as for a typing error; it now says which ids the chain removed (as the CLI's 'erased ids')."""
    x, y = _data()
    data = MultiTaskDataset(x, y, [TaskSpec("a", "classification", num_classes=3),
                                   TaskSpec("b", "regression")])
    kwargs = {**_kwargs(), "train_data": data.subset(torch.arange(0, 40))}
    first = ForgetRequest.create([0, 1])
    d1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=first, **kwargs)
    erased = {**kwargs, "train_data": data.subset(torch.arange(2, 40))}
    again = ForgetRequest.create([1, 7, 99])
    with pytest.raises(ValueError, match=r"not in `train_data`: \[1, 99\] \(2 in all\); .*; 1 "
                       r"of them \(\[1\]\) were removed by the requests `model` carries \(from "
                       r"the unlearn\(\) that returned it\) and their rows dropped since"):
        mtunlearn_ext.unlearn(d1, forget_request=again, **erased)
    with pytest.raises(ValueError, match=r"were removed by `earlier_requests` and their rows"):
        mtunlearn_ext.unlearn(_TwoHeads(), forget_request=again, earlier_requests=[first],
                              **erased)
    with pytest.raises(ValueError, match=r"\(2 in all\); [^;]*$"):  # 99 alone: no such word
        mtunlearn_ext.unlearn(_TwoHeads(), forget_request=again, **erased)


def test_a_run_that_changed_no_weight_adds_no_removal_to_the_chain() -> None:
    """Long-run review: a run of 0 steps (warned: nothing was unlearned) still added its
    request to what the returned model carries, so the same request on that model was
    refused as 'removed already', and every later record listed a removal that never
    happened. As the CLI's checkpoints do, the returned model now carries its input's."""
    request = ForgetRequest.create([3, 4])
    first = ForgetRequest.create([0])
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=first, **_kwargs())
    with pytest.warns(UserWarning, match="nothing was unlearned"):
        idle, report = mtunlearn_ext.unlearn(m1, forget_request=request, **_kwargs(steps=0))
    assert report.extra["weights_changed"] is False
    _, again = mtunlearn_ext.unlearn(idle, forget_request=request, **_kwargs())
    assert again.request["earlier_requests"] == [
        {"ids_sha256": first.ids_hash(), "num_instances": 1, "target_tasks": None}]
    assert again.request["num_forget_pairs"] == 4

def test_a_forget_data_run_inside_a_chain_keeps_the_earlier_removals() -> None:
    """Review: a run given forget_data dropped what the model carried, so the first
    request's pairs went back into the next retain set."""
    x, y = _data()
    m1, _ = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  **_kwargs())
    common = {"tasks": TASKS, "method": "finetune", "config": {"steps": 2},
              "shared_parameters": lambda name: name.startswith("trunk.")}
    with pytest.warns(UserWarning, match="cannot be checked"):
        m2, _ = mtunlearn_ext.unlearn(
            m1, forget_data=(x[30:32], {t: v[30:32] for t, v in y.items()}),
            retain_data=(x[5:30], {t: v[5:30] for t, v in y.items()}), **common)
    with pytest.warns(UserWarning, match=r"the 1 request\(s\) on `train_data` before it are "
                                         r"kept out"):
        _, report = mtunlearn_ext.unlearn(m2, forget_request=ForgetRequest.create([20]),
                                          **_kwargs())
    assert report.request["earlier_pairs_excluded"] == 10


def test_an_input_removed_by_an_earlier_request_may_hold_nan() -> None:
    """A row whose every pair an earlier request removed is in neither set, as a row with no
    supervised pair is, so its inputs may hold anything (NaN for data the owner erased); it was
    refused ("the inputs hold NaN or Inf in 1 rows (first: row 3, id 3)") because the check
    read the rows supervised before the earlier removals. A NaN in a row still read is
    refused as before."""
    x, y = _data()
    x[3] = float("nan")
    kwargs = {**_kwargs(), "train_data": (x, y)}
    new, report = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create([20]),
                                        earlier_requests=[ForgetRequest.create(range(5))],
                                        **kwargs)  # type: ignore[arg-type]
    assert all(bool(torch.isfinite(p).all()) for p in new.parameters())
    assert report.request["num_retain_pairs"] == 68
    with pytest.raises(ValueError, match=r"the inputs hold NaN or Inf in 1 rows \(first: row 3"):
        mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create([20]),
                              earlier_requests=[ForgetRequest.create([4], ["a"])],
                              **kwargs)  # type: ignore[arg-type]

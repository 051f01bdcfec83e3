"""The CLI's workflow layer (``mtunlearn_ext.workflow``, ``records``): cases a review found that
failed with a traceback, after the whole run, or from another folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mtunlearn_ext.api import build_problem
from mtunlearn_ext.records import recorded_path
from mtunlearn_ext.workflow import (
    NonFiniteError,
    OutputTransaction,
    UserInputError,
    parse_ids,
    run_unlearning,
)


def test_a_long_id_list_is_ids_not_a_file_name() -> None:
    """Text past the system's file-name limit made Path.is_file() raise OSError (Errno 36):
    about 80 ids on the command line crashed."""
    ids = list(range(3, 400, 4))
    text = ",".join(map(str, ids))
    assert len(text) > 255
    assert parse_ids(text, "--forget-ids") == ids
    with pytest.raises(UserInputError, match="--forget-ids: expected integer instance ids"):
        parse_ids("x" * 300, "--forget-ids")


def test_outputs_are_refused_before_the_run_when_they_cannot_be_written(tmp_path: Path) -> None:
    """A dangling symbolic link passed (exists() follows it) and so did a path under a file;
    both failed only after the whole run, naming no option."""
    dangling = tmp_path / "out.pt"
    dangling.symlink_to(tmp_path / "nowhere" / "target.pt")
    a_file = tmp_path / "afile"
    a_file.write_text("")
    with OutputTransaction() as tx:
        with pytest.raises(UserInputError, match="--output: expected a path that does not "
                                                 "exist yet"):
            tx.reserve("--output", dangling)
        with pytest.raises(UserInputError, match=r"--record: expected a path in a folder, got "
                                                 r".*afile/x.json.* is a file, not a folder"):
            tx.reserve("--record", a_file / "x.json")
        assert tx.reserve("--output", tmp_path / "new" / "deeper" / "x.pt").name == "x.pt"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(12, 3), "b": nn.Linear(12, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _request():  # type: ignore[no-untyped-def]
    from mtunlearn_ext import ForgetRequest

    return ForgetRequest.create(range(5))


def test_nan_inside_the_default_methods_step_is_the_nonfinite_error() -> None:
    """The interference-aware method's ops refuse NaN/Inf gradients inside a step, before the
    guard's callback: a FloatingPointError traceback (exit 1) instead of the NaN/Inf policy's
    NonFiniteError with the step (exit 3)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = {"a": torch.randint(0, 3, (40,), generator=g), "b": torch.randn(40, 1, generator=g)}
    problem = build_problem(_Net(), tasks={"a": "classification", "b": "regression"},
                            train_data=(x, y), forget_request=_request(),
                            shared_parameters=lambda n: n.startswith("trunk."))
    with pytest.raises(NonFiniteError, match=r"at step \d+: .*NaN or Inf") as caught:
        run_unlearning(problem, "interference_aware", {"steps": 5, "lr": 1e30})
    assert isinstance(caught.value.step, int) and caught.value.step >= 1


def test_verify_finds_the_checkpoint_beside_the_record_from_any_folder(tmp_path: Path,
                                                                        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Records named their checkpoint relative to the folder `unlearn` ran in; `verify` from
    another folder failed with "does not exist"."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "out.pt").write_bytes(b"x")
    record = run / "out.pt.record.json"
    record.write_text(json.dumps({"output": {"checkpoint": "out.pt"}}))
    monkeypatch.chdir(tmp_path)
    assert not Path("out.pt").exists()
    assert recorded_path("out.pt", record) == run / "out.pt"
    # A path that exists as recorded (absolute, or relative from here) is taken as it is.
    assert recorded_path(str(run / "out.pt"), record) == run / "out.pt"
    assert recorded_path(os.path.join("run", "out.pt"), record) == Path("run/out.pt")
    assert recorded_path("gone.pt", record) == Path("gone.pt")


def test_cleanup_removes_every_output_past_one_it_cannot_remove(tmp_path: Path) -> None:
    """__exit__ caught only FileNotFoundError: unlinking a path whose name the file system
    refuses (ENAMETOOLONG) raised, and the checkpoint written before it stayed. The write's
    own OSError is a UserInputError naming the argument."""
    from mtunlearn_ext._io import write_text_new

    written = tmp_path / "u.pt"
    too_long = tmp_path / ("r" * 300 + ".json")
    with pytest.raises(UserInputError, match=r"^--record: expected a path that can be "
                                             r"written, got .*File name too long"):
        with OutputTransaction() as tx:
            tx.outputs["--output"], tx.outputs["--record"] = written, too_long  # not reserved
            tx.write(written, lambda p: write_text_new(p, "checkpoint"))
            assert written.is_file()
            tx.write(too_long, lambda p: write_text_new(p, "record"))
    assert list(tmp_path.iterdir()) == []


def test_reserve_refuses_paths_that_cannot_be_created(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mtunlearn_ext._io import name_max

    limit = name_max(tmp_path)
    with OutputTransaction() as tx:
        for path in (tmp_path / ("r" * (limit + 1)), tmp_path / ("d" * (limit + 1)) / "x.pt"):
            with pytest.raises(UserInputError, match=rf"^--record: expected file and folder "
                                                     rf"names of at most {limit} bytes"):
                tx.reserve("--record", path)
        # Bytes, not characters: 128 two-byte characters are 256 bytes.
        with pytest.raises(UserInputError, match="has 256 bytes"):
            tx.reserve("--record", tmp_path / ("é" * 128))
        with pytest.raises(UserInputError, match="--output: expected a file path, got .*NUL"):
            tx.reserve("--output", str(tmp_path / "a\0b.pt"))
        assert tx.reserve("--output", tmp_path / ("o" * limit)).name == "o" * limit
        monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
        with pytest.raises(UserInputError, match="--record: expected a path in a folder you can "
                                                 "write to, got .* is not writable"):
            tx.reserve("--record", tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_verify_rebuilds_the_request_from_type_and_target_tasks() -> None:
    """Without `target_tasks_arg` a partial record was rebuilt as a full request."""
    from mtunlearn_ext.records import _request_from_record

    partial = {"type": "partial", "instance_ids": [1, 2], "target_tasks": ["a"]}
    assert _request_from_record(partial) == ([1, 2], ["a"])
    assert _request_from_record({**partial, "type": "full", "target_tasks": ["a", "b"]}) == (
        [1, 2], None)
    assert _request_from_record({**partial, "target_tasks_arg": ["b"]}) == ([1, 2], ["b"])
    with pytest.raises(ValueError, match="request.type is 'odd'"):
        _request_from_record({**partial, "type": "odd"})


def test_recorded_relative_paths_are_tried_from_the_record_folder(tmp_path: Path,
                                                                  monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    (run / "ck").mkdir(parents=True)
    (run / "ck" / "m.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert recorded_path("ck/m.pt", run / "m.json") == run / "ck" / "m.pt"

"""``mtunlearn``'s settings from files and inline text: a ``--config`` file's null value keeps the
default and a flag's value must be a boolean, ``benchmark``'s pass-through arguments given in a
YAML or TOML config, and inline JSON (``--train``) or a ``--config`` name too long to be a file
name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import _err
from test_cli import _listing, ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import cli


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only, restored
    after it; never set at import, which would leave the whole `pytest tests` run on one thread)."""


# -- a null config value means "not given" --------------------------------------------------------


def test_config_null_keeps_the_default(trained: Path, tmp_path: Path,  # noqa: F811
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # a checkpoint named "None" would land here
    ckpt = tmp_path / "orig.pt"
    shutil.copy(trained, ckpt)
    config = tmp_path / "c.yaml"
    config.write_text(f"checkpoint: {ckpt}\nforget_ids: [{ids(1, 2)}]\n"
                      "method_config: {steps: 2}\noutput: null\nrecord: ~\nseed: null\n"
                      "target_tasks: null\nrequest: null\nquiet: true\n")
    assert cli.main(["unlearn", "--config", str(config)]) == 0
    assert _listing(tmp_path) == {"orig.pt", "c.yaml", "orig.interference_aware.pt",
                                  "orig.interference_aware.record.json"}
    record = json.loads((tmp_path / "orig.interference_aware.record.json").read_text())
    assert record["seed"] == 0 and record["request"]["type"] == "full"  # the defaults
    config.write_text(f"checkpoint: {ckpt}\nforget_ids: [{ids(1, 2)}]\ntarget_tasks: null\n")
    assert cli.main(["evaluate", "--config", str(config), "--quiet"]) == 0
    config.write_text(f"output: {tmp_path / 't.pt'}\nseed: null\nepochs: 1\nquiet: true\n")
    assert cli.main(["train", "--config", str(config)]) == 0
    meta = torch.load(tmp_path / "t.pt", weights_only=True)["meta"]
    assert meta["seed"] == 0
    capsys.readouterr()
    # A flag's value must be a boolean: the string "false" is not silently true.
    config.write_text(f"checkpoint: {ckpt}\nquiet: \"false\"\n")
    assert cli.main(["evaluate", "--config", str(config)]) == 2
    err = _err(capsys)
    assert "--config: expected a valid value for 'quiet', got 'false'" in err, err


# -- benchmark's positional `extra` from a config -------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [("c.yaml", 'extra: ["--repeats", "3"]\n'),
                                            ("c.toml", 'extra = "--repeats 3"\n')])
def test_benchmark_extra_from_config_is_words(tmp_path: Path, name: str, text: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / name
    config.write_text(text)
    assert cli.main(["benchmark", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(" --repeats 3"), out  # as `mtunlearn benchmark -- --repeats 3`
    assert cli.main(["benchmark", "--config", str(config), "--dry-run", "--", "--other"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(" --other") and "--repeats" not in out, out  # the command line wins


# -- text too long to be a file name is the literal value -----------------------------------------


def test_long_json_and_config_are_not_file_names(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    long_json = '{"epochs": 1' + " " * 300 + "}"
    assert cli.main(["train", "--benchmark", "digits", "--size", "tiny", "--train", long_json,
                     "--output", str(tmp_path / "t.pt"), "--quiet", "--threads", "1"]) == 0
    assert torch.load(tmp_path / "t.pt", weights_only=True)["meta"]["recipe"]["epochs"] == 1
    capsys.readouterr()
    long_name = str(tmp_path / ("c" * 300 + ".yaml"))
    assert cli.main(["train", "--config", long_name]) == 2
    assert "--config: expected an existing .yaml/.yml/.toml file" in _err(capsys)

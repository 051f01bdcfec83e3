"""Task losses and their masking, the seeded trainer, and atomic checkpoints."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtunlearn_ext.data import ForgetRequest, TaskSpec, load_benchmark
from mtunlearn_ext import training
from mtunlearn_ext.losses import masked_multitask_loss, task_loss
from mtunlearn_ext.models import build_model
from mtunlearn_ext.training import (
    CheckpointError,
    TrainConfig,
    load_checkpoint,
    save_checkpoint,
    state_dict_sha256,
    train,
)

SEG = TaskSpec("seg", "segmentation", num_classes=3)
DEPTH = TaskSpec("depth", "depth")
NORMALS = TaskSpec("normals", "normals")
CLS = TaskSpec("cls", "classification", num_classes=4)
REG = TaskSpec("reg", "regression")


# -- losses --------------------------------------------------------------------------------------

def test_segmentation_loss_averages_over_labelled_pixels_only() -> None:
    logits = torch.randn(2, 3, 2, 2)
    target = torch.tensor([[[0, 1], [-1, 2]], [[-1, -1], [-1, -1]]])
    loss = task_loss(SEG, logits, target)
    pixel_ce = [F.cross_entropy(logits[0, :, i, j][None], target[0, i, j][None])
                for i, j in [(0, 0), (0, 1), (1, 1)]]
    assert torch.allclose(loss[0], torch.stack(pixel_ce).mean())
    assert loss[1] == 0  # no labelled pixel: zero, not NaN


def test_depth_and_normals_losses_use_valid_pixels_only() -> None:
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 100.0]]]])
    target = torch.tensor([[[[2.0, 2.0], [1.0, 0.0]]]])  # last pixel unknown
    assert torch.allclose(task_loss(DEPTH, pred, target), torch.tensor([(1.0 + 0.0 + 2.0) / 3]))
    n_pred = torch.zeros(1, 3, 1, 3)
    n_pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, 2.0])      # same direction, not unit length
    n_pred[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])      # 90 degrees off
    n_pred[0, :, 0, 2] = torch.tensor([0.0, 1.0, 0.0])      # target unknown
    n_target = torch.zeros(1, 3, 1, 3)
    n_target[0, 2, 0, 0] = 1.0
    n_target[0, 2, 0, 1] = 1.0
    assert torch.allclose(task_loss(NORMALS, n_pred, n_target), torch.tensor([(0.0 + 1.0) / 2]))


def test_classification_and_regression_losses() -> None:
    logits = torch.randn(3, 4)
    y = torch.tensor([0, 3, -1])
    loss = task_loss(CLS, logits, y)
    assert torch.allclose(loss[:2], F.cross_entropy(logits[:2], y[:2], reduction="none"))
    assert loss[2] == 0
    assert torch.allclose(task_loss(REG, torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])),
                          torch.tensor([2.5]))
    with pytest.raises(ValueError, match="classification"):
        task_loss(CLS, logits, y[:, None])


def test_masked_multitask_loss_ignores_unsupervised_pairs() -> None:
    tasks = [CLS, DEPTH]
    logits = torch.randn(4, 4, requires_grad=True)
    depth = torch.rand(4, 1, 2, 2, requires_grad=True)
    y = torch.tensor([1, 2, 3, 0])
    d_target = torch.rand(4, 1, 2, 2) + 0.5
    d_target[2] = float("nan")  # an unsupervised pair's target may be anything
    supervision = torch.tensor([[True, True], [False, True], [True, False], [False, False]])
    batch = {"targets": {"cls": y, "depth": d_target}, "supervision": supervision}
    total, per_task = masked_multitask_loss({"cls": logits, "depth": depth}, batch, tasks)
    expected_cls = F.cross_entropy(logits[[0, 2]], y[[0, 2]])
    expected_depth = task_loss(DEPTH, depth[[0, 1]], d_target[[0, 1]]).mean()
    assert torch.allclose(per_task["cls"], expected_cls)
    assert torch.allclose(per_task["depth"], expected_depth)
    assert torch.allclose(total, expected_cls + expected_depth)
    total.backward()
    assert torch.isfinite(depth.grad).all()
    assert (depth.grad[2:] == 0).all() and (logits.grad[[1, 3]] == 0).all()
    # A task without a supervised sample contributes an exact zero and still backpropagates.
    none = {"targets": batch["targets"], "supervision": torch.zeros(4, 2, dtype=torch.bool)}
    zero, parts = masked_multitask_loss({"cls": logits, "depth": depth}, none, tasks)
    assert zero.item() == 0 and parts["cls"].item() == 0
    zero.backward()
    # Weights and explicit column selection.
    weighted, _ = masked_multitask_loss({"cls": logits, "depth": depth}, batch, tasks,
                                        task_weights={"depth": 0.0})
    assert torch.allclose(weighted, expected_cls)
    with pytest.raises(ValueError, match="one column per task"):
        masked_multitask_loss({"cls": logits}, batch, [CLS])


def test_masked_multitask_loss_gradient_ignores_nan_and_out_of_range_targets() -> None:
    # Where a depth NaN reads as an unlabelled pixel, a regression NaN or a class index out of
    # range would reach the kernel: the loss neutralises unsupervised targets first.
    tasks = [CLS, REG]
    logits = torch.randn(3, 4, requires_grad=True)
    values = torch.randn(3, 2, requires_grad=True)
    supervision = torch.tensor([[True, False], [False, True], [True, True]])
    clean = {"cls": torch.tensor([1, 0, 2]), "reg": torch.tensor([[0., 0.], [1., 2.], [3., 4.]])}
    dirty = {"cls": torch.tensor([1, 99, 2]),
             "reg": torch.tensor([[float("nan"), 1.], [1., 2.], [3., 4.]])}
    grads = []
    for targets in (clean, dirty):
        total, _ = masked_multitask_loss({"cls": logits, "reg": values},
                                         {"targets": targets, "supervision": supervision}, tasks)
        grads.append(torch.autograd.grad(total, [logits, values]))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all() and torch.equal(a, b)


@pytest.mark.parametrize("kind, channels", [("depth", 1), ("normals", 3)])
def test_dense_losses_read_nan_pixels_as_unlabelled_also_in_the_gradient(kind: str,
                                                                          channels: int) -> None:
    spec = TaskSpec(kind, kind)  # type: ignore[arg-type]
    pred = torch.rand(2, channels, 3, 3, requires_grad=True)
    zeros = torch.rand(2, channels, 3, 3) + 0.5
    zeros[0, :, 1, 1] = 0.0  # unlabelled the usual way
    nans = zeros.clone()
    nans[0, :, 1, 1] = float("nan")  # and as it often arrives
    results = []
    for target in (zeros, nans):
        loss = task_loss(spec, pred, target)
        results.append((loss, torch.autograd.grad(loss.sum(), pred)[0]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.isfinite(results[1][1]).all() and torch.equal(results[0][1], results[1][1])


# -- training ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_benchmark("digits", size="tiny")


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_short_training_lowers_the_loss_and_learns(digits) -> None:
    model = build_model(digits, seed=0)
    config = TrainConfig(epochs=6, batch_size=32, lr=3e-3, num_threads=1)
    result = train(model, digits.train, None, config, progress=False)
    assert result.steps == 6 * math.ceil(300 / 32)
    assert result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
    for task, losses in result.task_epoch_losses.items():
        assert losses[-1] < losses[0], task
    with torch.no_grad():
        out = model(digits.test.inputs)
    accuracy = (out["digit"].argmax(1) == digits.test.targets["digit"]).float().mean()
    assert accuracy > 0.7


def test_dense_training_lowers_the_loss() -> None:
    bench = load_benchmark("indoor", size="tiny", use_cache=False)
    model = build_model(bench, seed=0, widths=(8, 16, 16, 24))
    small = bench.train.subset(range(24))
    config = TrainConfig(epochs=4, batch_size=8, lr=3e-3, num_threads=1)
    result = train(model, small, None, config, progress=False)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert all(math.isfinite(v) for v in result.epoch_losses)


def test_training_is_deterministic_and_seeded(digits) -> None:
    config = TrainConfig(epochs=2, batch_size=64, seed=7, num_threads=1)
    runs = []
    for _ in range(2):
        model = build_model(digits, seed=1)
        train(model, digits.train, None, config, progress=False)
        runs.append(_params(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    other = build_model(digits, seed=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    other_config = TrainConfig(epochs=2, batch_size=64, seed=8, num_threads=1)
    train(other, digits.train, None, other_config, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG restored
    assert torch.get_num_threads() == threads  # thread count restored
    assert any(not torch.equal(runs[0][n], p) for n, p in _params(other).items())


def test_training_respects_the_supervision_mask(digits) -> None:
    data = digits.train
    # Partial-task retain set: the parity labels of 100 instances are removed.
    request = ForgetRequest.create(data.ids[:100], ["parity"])
    forget, retain = request.split(data)
    assert len(retain) == len(data)
    # No instance has a magnitude label: its head must not move; rows without any label are
    # never batched.
    sup = retain.supervision.clone()
    sup[:, data.task_index("magnitude")] = False
    sup[200:, :] = False
    masked = retain.with_supervision(sup)
    model = build_model(digits, seed=0)
    before = _params(model)
    result = train(model, masked, None, TrainConfig(epochs=1, batch_size=50, num_threads=1),
                   progress=False)
    assert result.num_rows == 200 and result.steps == 4
    after = _params(model)
    for name, _ in model.task_parameters("magnitude"):
        assert torch.equal(before[name], after[name]), name
    for name, _ in model.task_parameters("parity"):
        assert not torch.equal(before[name], after[name]), name
    # The same run restricted to one task by name trains only that head.
    model2 = build_model(digits, seed=0)
    train(model2, data, ["digit"], TrainConfig(epochs=1, batch_size=100, num_threads=1),
          progress=False)
    moved = _params(model2)
    assert all(torch.equal(before[n], moved[n]) for n, _ in model2.task_parameters("parity"))
    with pytest.raises(ValueError, match="no supervised pair"):
        train(model, masked.subset(range(200, 210)), None, TrainConfig(epochs=1),
              progress=False)


def test_training_shows_no_bar_unless_asked(digits, capsys) -> None:
    """train() drew a tqdm bar on stderr by default: a library call inside someone's script
    or job log printed what it was not asked to."""
    config = TrainConfig(epochs=1, batch_size=100, num_threads=1)
    train(build_model(digits, seed=0), digits.train, None, config)
    assert capsys.readouterr() == ("", "")
    train(build_model(digits, seed=0), digits.train, None, config, progress=True)
    shown = capsys.readouterr()
    assert shown.out == "" and "train" in shown.err  # asked for: on stderr


def test_train_config_validation() -> None:
    for bad in ({"epochs": -1}, {"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": float("nan")},
                {"optimizer": "lbfgs"}, {"schedule": "step"}, {"grad_clip": 0.0},
                {"weight_decay": -1.0}, {"num_threads": 0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    assert TrainConfig(task_weights={"a": 2.0}).to_dict()["task_weights"] == {"a": 2.0}


# -- checkpoints ---------------------------------------------------------------------------------

def _tiny_model():
    return build_model([CLS], input_shape=(6,), seed=0, hidden=(8,))


def test_checkpoint_roundtrip_and_hash(tmp_path: Path) -> None:
    model = _tiny_model()
    path = tmp_path / "ckpt" / "model.pt"
    sha = save_checkpoint(path, model, {"epochs": 3, "note": "x"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left
    fresh = build_model([CLS], input_shape=(6,), seed=5, hidden=(8,))
    loaded = load_checkpoint(path, expected_sha256=sha, model=fresh)
    assert loaded.meta == {"epochs": 3, "note": "x"} and loaded.sha256 == sha
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    sha = save_checkpoint(path, _tiny_model())
    other = build_model([CLS], input_shape=(6,), seed=9, hidden=(8,))
    with pytest.raises(FileExistsError):
        save_checkpoint(path, other)
    assert load_checkpoint(path).sha256 == sha  # untouched
    assert save_checkpoint(path, other, overwrite=True) != sha
    assert len(list(tmp_path.iterdir())) == 1


def test_truncated_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    sha = save_checkpoint(path, _tiny_model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="expected"):
        load_checkpoint(path, expected_sha256=sha)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an mtunlearn_ext checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    # An empty file said `EOFError:` and nothing more.
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt is empty \(0 bytes"):
        load_checkpoint(tmp_path / "empty.pt")


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.pt"

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _tiny_model())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 1.5, "`epochs` must be an integer, got 1.5"),
    ("lr", "1e-3", "`lr` must be a number, got '1e-3'"),
    ("seed", True, "`seed` must be an integer, got True"),
    ("grad_clip", "x", "`grad_clip` must be a number or None, got 'x'"),
    ("task_weights", [1.0, 2.0], "`task_weights` must be a mapping or None"),
    ("optimizer", "rmsprop", "`optimizer` must be one of 'adamw', 'adam', 'sgd'"),
])
def test_train_config_names_a_setting_of_the_wrong_type(field: str, value: object,
                                                        message: str) -> None:
    with pytest.raises(ValueError, match="TrainConfig: " + message.replace("(", r"\(")):
        TrainConfig(**{field: value})  # type: ignore[arg-type]
    assert TrainConfig(lr=1).lr == 1  # an integer is a number


# -- review fixes: weights hash, one read, plain metadata, recipe checks ------------------------

def _flip_first_weight(path: Path) -> None:
    """Flip the top exponent bit of every float of the first tensor record in the archive:
    the zip still reads (torch.load checks no CRC), the weights are wrong."""
    import struct
    import zipfile

    raw = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("/data/0"))
    n, e = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + n + e
    for j in range(0, info.file_size, 4):
        raw[start + j + 3] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_a_weight_is_refused_not_loaded(tmp_path: Path) -> None:
    """torch.load does not check the archive's CRCs: a bit flipped in a weight loaded silently
    (and a cached model was used with it). The checkpoint holds the hash of its weights."""
    from mtunlearn_ext.training import state_dict_sha256

    model = _tiny_model()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"a": 1})
    loaded = load_checkpoint(path)
    assert loaded.state_sha256 == state_dict_sha256(model)
    _flip_first_weight(path)
    with pytest.raises(CheckpointError, match="is corrupt: its weights hash to"):
        load_checkpoint(path)
    # A file of an older version (no hash) still loads.
    torch.save({"format": "mtunlearn_ext.checkpoint/1", "meta": {},
                "state_dict": dict(model.state_dict())}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").state_sha256 is None


# torch's loader of a sparse tensor warns about its invariant checks: 2.14 that it validates
# them, 2.11 (the oldest-torch leg) that they are disabled.
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants:UserWarning")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning")
def test_changed_metadata_is_refused_not_loaded(tmp_path: Path) -> None:
    """Failure injection: only the weights were hashed, so one byte changed in the metadata
    loaded silently: a removal's ids [3, 7] read as [3, 13] (instance 7 back in the retain
    set of the next request, and `verify` passed it), or the seed the data are regenerated
    from moved 0 -> 1 (another data set, whose ids named instances the model never saw)."""
    from mtunlearn_ext.training import meta_sha256

    model = _tiny_model()
    path = tmp_path / "model.pt"
    meta = {"seed": 0, "removals": [{"instance_ids": [3, 7], "target_tasks": None}],
            "scale": 0.5, "shape": (2, 3), "mask": torch.tensor([True, False])}
    save_checkpoint(path, model, meta)
    loaded = load_checkpoint(path).meta
    assert {k: v for k, v in loaded.items() if k != "mask"} == {
        k: v for k, v in meta.items() if k != "mask"}
    payload = torch.load(path, weights_only=True)
    for change in ({"seed": 1}, {"removals": [{"instance_ids": [3, 13], "target_tasks": None}]},
                   {"scale": 0.5000001}, {"shape": [2, 3]}, {"seed": False},
                   {"mask": torch.tensor([True, True])}, {"extra": None}):
        tampered = tmp_path / f"t{len(list(tmp_path.iterdir()))}.pt"
        torch.save({**payload, "meta": {**payload["meta"], **change}}, tampered)
        with pytest.raises(CheckpointError, match=r"is corrupt: its metadata \(the benchmark, "
                                                  r"seed and removals it names\) hashes to "
                                                  r"[0-9a-f]{64}, the file recorded "):
            load_checkpoint(tampered)
    # Key order is no change; a file of an older version (no metadata hash) still loads.
    assert meta_sha256({"a": 1, "b": 2}) == meta_sha256({"b": 2, "a": 1})
    # Diff review: a conjugate view or a sparse tensor failed inside torch at save.
    odd = {"conj": torch.tensor([1 + 2j]).conj(), "sparse": torch.eye(3).to_sparse()}
    save_checkpoint(tmp_path / "odd.pt", model, odd)
    assert load_checkpoint(tmp_path / "odd.pt").meta["conj"].resolve_conj().imag.item() == -2
    older = tmp_path / "older.pt"
    torch.save({k: v for k, v in payload.items() if k != "meta_sha256"}, older)
    assert load_checkpoint(older).meta["seed"] == 0


def test_state_dict_sha256_is_the_api_one() -> None:
    """Checkpoints record the same weights hash that api records carry."""
    from mtunlearn_ext.api import state_dict_sha256 as api_sha
    from mtunlearn_ext.training import state_dict_sha256

    model = build_model([SEG, DEPTH], input_shape=(3, 8, 8), seed=0, widths=(4, 4, 4, 4))
    model.backbone.add_module("bn", torch.nn.BatchNorm2d(4))  # a 0-d buffer too
    assert state_dict_sha256(model) == state_dict_sha256(model.state_dict()) == api_sha(model)


def test_load_checkpoint_hashes_the_bytes_it_loads(tmp_path: Path, monkeypatch) -> None:
    """The file was hashed in one read and loaded in another: replaced in between (another
    process rewriting it), B's weights came back under A's verified SHA-256."""
    import shutil

    a, b = _tiny_model(), build_model([CLS], input_shape=(6,), seed=7, hidden=(8,))
    sha_a = save_checkpoint(tmp_path / "a.pt", a)
    save_checkpoint(tmp_path / "b.pt", b)
    target = tmp_path / "target.pt"
    shutil.copyfile(tmp_path / "a.pt", target)
    real_load = torch.load

    def load_after_a_swap(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        shutil.copyfile(tmp_path / "b.pt", target)  # the file changes after it was hashed
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load_after_a_swap)
    loaded = load_checkpoint(target, expected_sha256=sha_a)
    for name, value in a.state_dict().items():
        assert torch.equal(loaded.state_dict[name], value), name


@pytest.mark.parametrize(("meta", "where"), [
    ({"data_root": Path("/x")}, "meta['data_root'] is a pathlib.PosixPath"),
    ({"loss": __import__("numpy").float64(0.5)}, "meta['loss'] is a numpy.float64"),
    ({"s": {1, 2}}, "meta['s'] is a builtins.set"),
    ({"nested": {"list": [1, Path("/y")]}}, "meta['nested']['list'][1] is a pathlib"),
    ({1.5j: 1}, "meta has a key 1.5j of type complex"),
])
def test_save_checkpoint_refuses_metadata_it_could_not_read_back(tmp_path: Path, meta: dict,
                                                                  where: str) -> None:
    """Such metadata was written, and load_checkpoint (weights_only) then failed on it,
    blaming a truncated or corrupt file."""
    with pytest.raises(TypeError, match=r"save_checkpoint: " + where.replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.")):
        save_checkpoint(tmp_path / "m.pt", _tiny_model(), meta)
    assert not (tmp_path / "m.pt").exists()


def test_plain_metadata_round_trips(tmp_path: Path) -> None:
    import collections

    meta = {"t": (1, 2.5), "l": [None, True, "x"], "d": collections.OrderedDict(a=1),
            "tensor": torch.arange(3), 3: "int key"}
    sha = save_checkpoint(tmp_path / "m.pt", _tiny_model(), meta)
    loaded = load_checkpoint(tmp_path / "m.pt", sha).meta
    assert loaded["t"] == (1, 2.5) and loaded["l"] == [None, True, "x"] and loaded[3] == "int key"
    assert torch.equal(loaded["tensor"], torch.arange(3)) and loaded["d"] == {"a": 1}


@pytest.mark.parametrize(("bad", "message"), [
    ({"optimizer": "sgd", "momentum": -1.0}, r"`momentum` must be in \[0, 1\), got -1.0"),
    ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\), got 1.0"),
    ({"momentum": float("nan")}, r"`momentum` must be in \[0, 1\), got nan"),
    ({"weight_decay": float("nan")}, "`weight_decay` must be a finite number >= 0, got nan"),
    ({"weight_decay": float("inf")}, "`weight_decay` must be a finite number >= 0, got inf"),
    # Past float32's largest torch's SGD failed inside the step ("value cannot be converted to
    # type float without overflow"): a traceback and exit 1 from the CLI.
    ({"lr": 1e39}, r"`lr` must be a positive number at most 3\.403e\+38 \(float32's largest\), "
                   r"got 1e\+39"),
    ({"weight_decay": 1e39}, r"`weight_decay` must be a finite number >= 0, got 1e\+39 \(at "
                             r"most 3\.403e\+38, float32's largest\)"),
    ({"task_weights": {"a": float("nan")}}, r"`task_weights\['a'\]` must be a finite number"),
    ({"task_weights": {"a": -1.0}}, r"`task_weights\['a'\]` must be a finite number >= 0"),
    ({"task_weights": {"a": float("inf")}}, r"`task_weights\['a'\]` must be a finite number"),
    ({"task_weights": {"a": "2"}}, r"`task_weights\['a'\]` must be a finite number"),
    ({"task_weights": {"a": True}}, r"`task_weights\['a'\]` must be a finite number"),
    ({"task_weights": {1: 1.0}}, "`task_weights` keys must be task names, got 1"),
])
def test_train_config_refuses_what_the_optimizer_or_loss_would_fail_on(bad: dict,
                                                                       message: str) -> None:
    """These were accepted and failed (or diverged) inside a run: SGD refuses a negative
    momentum only when built, NaN weight decay or task weights give NaN weights."""
    with pytest.raises(ValueError, match="TrainConfig: " + message):
        TrainConfig(**bad)


def test_train_config_to_dict_holds_plain_numbers() -> None:
    """NumPy numbers pass the type checks; the recipe goes into checkpoint metadata, which
    takes plain types only."""
    import numpy as np

    out = TrainConfig(lr=np.float64(0.01), epochs=2, task_weights={"a": np.float32(2.0)}
                      ).to_dict()
    assert type(out["lr"]) is float and type(out["task_weights"]["a"]) is float
    assert TrainConfig(task_weights={"a": 2}).to_dict()["task_weights"] == {"a": 2}


def test_train_refuses_task_weights_of_unknown_tasks(digits) -> None:  # type: ignore[no-untyped-def]
    """A weight for a task the data set does not have was silently ignored (a typo'd name
    trained with weight 1)."""
    model = build_model(digits, seed=0)
    with pytest.raises(ValueError, match=r"train: `task_weights` names unknown tasks \['dgit'\]"):
        train(model, digits.train, None, TrainConfig(epochs=1, task_weights={"dgit": 2.0}),
              progress=False)


def test_train_and_evaluate_name_the_model_contract_for_a_plain_forward() -> None:
    """A model with forward(x) (the guide's own example for unlearn, which wraps it) failed in
    train/evaluate with torch's bare "takes 2 positional arguments but 3 were given"."""
    from torch import nn

    from mtunlearn_ext.data import MultiTaskDataset, TaskSpec
    from mtunlearn_ext.metrics import evaluate

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(4, 8)
            self.heads = nn.ModuleDict({"kind": nn.Linear(8, 3), "size": nn.Linear(8, 1)})

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            z = self.trunk(x)
            return {t: h(z) for t, h in self.heads.items()}

    class WithTasks(Plain):
        def forward(self, x: torch.Tensor, tasks: object = None  # type: ignore[override]
                    ) -> dict[str, torch.Tensor]:
            return super().forward(x)

    tasks = [TaskSpec("kind", "classification", num_classes=3), TaskSpec("size", "regression")]
    data = MultiTaskDataset(torch.randn(20, 4), {"kind": torch.randint(0, 3, (20,)),
                                                 "size": torch.randn(20, 1)}, tasks)
    for op, call in [("evaluate", lambda m: evaluate(m, data)),
                     ("train", lambda m: train(m, data, config=TrainConfig(epochs=1),
                                               progress=False))]:
        with pytest.raises(TypeError, match=rf"{op}: `model` must take \(inputs, task names\).*"
                                            r"Plain.forward\(x"):
            call(Plain())
        call(WithTasks())  # a second parameter is all it takes


# -- crafted checkpoints: what reading them may cost ---------------------------------------------

def _crafted(path: Path, meta_ops: bytes = b"N", state: dict | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
    """A checkpoint whose metadata value ``meta['x']`` is the raw pickle ops ``meta_ops`` (the
    memo sharing and nesting a hand-made file can hold), its hashes recorded as they are."""
    state = _tiny_model().state_dict() if state is None else state
    marker = "MARKER-" * 3
    payload = {"format": training._CHECKPOINT_FORMAT, "state_dict": state, "meta": {"x": marker},
               "state_sha256": state_dict_sha256(state), "meta_sha256": "0" * 64}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for entry in source.infolist():
            data = source.read(entry.filename)
            if entry.filename.endswith("data.pkl"):
                op = b"X" + struct.pack("<I", len(marker)) + marker.encode()
                data = data.replace(op, meta_ops)
            archive.writestr(entry.filename, data)
    return path


def _memo_put(i: int) -> bytes:
    return b"r" + struct.pack("<I", 100000 + i)  # LONG_BINPUT, clear of torch's own entries


def _memo_get(i: int) -> bytes:
    return b"j" + struct.pack("<I", 100000 + i)  # LONG_BINGET


def test_metadata_shared_through_the_memo_is_refused_before_it_is_hashed(tmp_path: Path
                                                                         ) -> None:
    """A list of two copies of a list of two copies ... (the pickle's memo), a few bytes a
    level: its hash walked 2**levels values (60 levels: for ever). 21 levels here, which the
    hash still walks in a few seconds without the check."""
    ops = b"(](K\x01K\x01e" + _memo_put(0)
    for level in range(1, 21):
        ops += b"](" + _memo_get(level - 1) + _memo_get(level - 1) + b"e" + _memo_put(level)
    path = _crafted(tmp_path / "laughs.pt", ops + b"t")
    with pytest.raises(CheckpointError, match=r"shared through the pickle's memo expand it to "
                                              r"8,388,\d+ values from \d+ written"):
        load_checkpoint(path)


@pytest.mark.parametrize(("ops", "message"), [
    (b"]" * 200000 + b"a" * 199999, "its metadata is nested too deeply to read"),
    (b"]" + _memo_put(0) + _memo_get(0) + b"a", "a part of it contains itself")],
    ids=["nested", "self-containing"])
def test_metadata_too_deep_or_holding_itself_is_one_error(tmp_path: Path, ops: bytes,
                                                          message: str) -> None:
    """Both ended the commands in a RecursionError traceback (exit 1) from the metadata hash."""
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_crafted(tmp_path / "m.pt", ops))


def test_a_tensor_larger_than_its_file_is_refused_before_it_is_made(tmp_path: Path) -> None:
    """A stride-0 view of one value (or a sparse tensor's size) claims any shape: hashing it
    made it contiguous, 4 GiB from a 4-byte storage at (32768, 32768). Small here, so that the
    file loads whole without the check."""
    path = _crafted(tmp_path / "wide.pt", state={"w": torch.zeros(1).expand(2000, 2000)})
    with pytest.raises(CheckpointError, match=r"a tensor of shape \(2000, 2000\) holds "
                                              r"16,000,000 bytes of values, more than the "
                                              r"file's"):
        load_checkpoint(path)


def test_compressed_archive_entries_are_refused_before_they_are_inflated(tmp_path: Path
                                                                         ) -> None:
    """torch.load inflates deflated entries, which torch.save never writes: a 0.7 MB file
    took 512 MiB of zeros to read."""
    path = _crafted(tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"its archive holds compressed entries "
                                              r"\(.*data.pkl\), which torch.save never writes"):
        load_checkpoint(path)
    stored = _crafted(tmp_path / "stored.pt")  # the same file stored: its hash mismatch alone
    with pytest.raises(CheckpointError, match="its metadata .* hashes to"):
        load_checkpoint(stored)

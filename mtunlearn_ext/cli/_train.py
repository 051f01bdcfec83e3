"""``mtunlearn train``: train a benchmark's default model with its recipe and write a new
checkpoint, with the checks of ``--data-root`` and the NaN/Inf policy for training."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mtunlearn_ext._errors import NonFiniteError, UserInputError
from mtunlearn_ext.cli._checks import _check_seed, _json_arg
from mtunlearn_ext.cli._console import _say, _table


def _cmd_train(args: argparse.Namespace) -> int:
    from mtunlearn_ext.data.registry import load_benchmark
    from mtunlearn_ext.data.fingerprint import dataset_fingerprint
    from mtunlearn_ext.experiment import default_recipe
    from mtunlearn_ext.models import build_model
    from mtunlearn_ext.training import save_checkpoint, train
    from mtunlearn_ext.workflow import (
        CLI_META_FORMAT,
        TEST_FILES_KEY,
        TRAIN_FILES_KEY,
        OutputTransaction,
        check_device,
    )

    from mtunlearn_ext.records import code_version, run_environment

    code = code_version()  # the code this run imported and trains with: read before the work
    device = check_device(args.device)
    _check_seed(args.seed)
    _check_data_root(args.benchmark, args.data_root)
    given = _json_arg(args.train, "--train")
    overrides = dict(given)
    if args.epochs is not None:
        overrides["epochs"] = int(args.epochs)
    with OutputTransaction() as tx:
        output = tx.reserve("--output", args.output)
        try:
            bench = load_benchmark(args.benchmark, seed=args.seed, size=args.size,
                                   data_root=args.data_root)
        except OSError as error:  # a real data set's root: missing, or not LibMTL's layout
            raise UserInputError("--data-root", f"a folder holding {args.benchmark!r} in "
                                 "LibMTL's layout", args.data_root, str(error)) from error
        except ValueError as error:
            raise UserInputError("--benchmark", "a loadable benchmark", args.benchmark,
                                 str(error)) from error
        try:
            recipe = default_recipe(bench, args.seed, overrides)
        except (TypeError, ValueError) as error:
            raise UserInputError("--train", "fields of TrainConfig", given,
                                 str(error)) from error
        model = build_model(bench, seed=args.seed).to(device)
        try:
            result = train(model, bench.train, None, recipe, progress=not args.quiet)
        except NonFiniteError:
            raise
        except FloatingPointError as error:  # train's non-finite loss: the NaN/Inf policy
            raise _training_nonfinite(error) from error
        # The absolute root: unlearn, evaluate and verify reload the data from it, from any
        # folder (a relative --data-root only resolved from the folder train ran in).
        data_root = (None if args.data_root is None
                     else str(Path(args.data_root).expanduser().resolve()))
        meta = {"format": CLI_META_FORMAT, "kind": "original", "benchmark": bench.name,
                "size": args.size, "seed": args.seed, "data_root": data_root,
                # The device trained on: it decides the weights' last bits too.
                "device": str(device),
                "recipe": recipe.to_dict(), "data_sha256": dataset_fingerprint(bench.train),
                # The test split too (hashed in memory, as the training split): unlearn,
                # evaluate and verify measure the test metrics and the attack's AUC on it.
                "test_data_sha256": dataset_fingerprint(bench.test),
                # Every file's SHA-256: what the later commands check the data by (the tensors'
                # last bits follow the thread count); once a removal was honoured, the
                # person's files may be erased and the rest still be checked file by file.
                **{key: bench.info[key] for key in (TRAIN_FILES_KEY, TEST_FILES_KEY)
                   if data_root is not None and key in bench.info},
                "train_steps": result.steps, "final_loss": result.final_loss,
                # The weights' last bits depend on the thread count (torch's default: the
                # core count) and the torch build: the same command reproduces the file with
                # the same ones.
                "environment": run_environment(recipe.num_threads or torch.get_num_threads()),
                # Which code trained it (the same command at another commit may not give
                # these weights; reproducibility audit).
                "code": code}
        # No wall time in the checkpoint: the same command must give the same file (SHA-256),
        # so a pipeline rerun from its command lines reproduces the records' hashes. The
        # seconds are printed in the summary below instead.
        sha = tx.write(output, lambda p: save_checkpoint(p, model, meta))
    _say(_table([[bench.name, args.size, args.seed, result.steps, result.final_loss,
                  round(result.seconds, 2), str(output), sha[:16]]],
                ["benchmark", "size", "seed", "steps", "final_loss", "seconds", "checkpoint",
                 "sha256"]))
    return 0


#: The benchmarks ``load_benchmark`` reads from ``data_root`` (LibMTL's preprocessed real data
#: sets); the others are generated or bundled (digits) and ignore it.
_DATA_ROOT_BENCHMARKS = ("nyuv2", "cityscapes")


def _check_data_root(benchmark: str, data_root: str | None) -> None:
    """Refuse ``--data-root`` for a benchmark that reads none: it would be ignored, yet stored in
    the checkpoint's metadata (changing its SHA-256) as if the data came from there. Like
    ``evaluate``'s request options without a request, an option without effect is refused.
    An unknown benchmark is left to ``load_benchmark``'s error, which names ``--benchmark``."""
    from mtunlearn_ext.data import BENCHMARKS

    if data_root is not None and benchmark in BENCHMARKS \
            and benchmark not in _DATA_ROOT_BENCHMARKS:
        raise UserInputError("--data-root", "no value unless --benchmark is one of "
                             f"{list(_DATA_ROOT_BENCHMARKS)} (the real data sets it locates)",
                             data_root, f"{benchmark!r} reads no data root; drop --data-root")


def _training_nonfinite(error: FloatingPointError) -> Exception:
    """``training.train``'s non-finite loss as the :class:`~mtunlearn_ext.workflow.NonFiniteError`
    of the NaN/Inf policy (exit 3, one line with the step)."""
    from mtunlearn_ext.training import NonFiniteLoss

    if not isinstance(error, NonFiniteLoss):
        return NonFiniteError(None, f"training: {error}")
    return NonFiniteError(error.step,
                          f"training loss {error.value} (per task: {error.per_task})")

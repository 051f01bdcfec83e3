"""A long chain of removal requests through the command line, with per-round figures.

    nice python benchmarks/removal_chain.py --rounds 40 --folder /tmp/chain
    nice python benchmarks/removal_chain.py --rounds 40 --folder /tmp/chain --json chain.json

A team honouring data-removal requests runs ``mtunlearn unlearn`` on the previous output for
months. This trains ``digits`` at its smallest size and chains ``--rounds`` small requests on
it (full ones, a partial one every fourth round, an instance asked again: partial then full,
and full twice), each followed by ``verify``, ``evaluate`` with the round's request and
``report`` of its record, all in this process with one thread, the outputs named by default
(``unlearn`` without ``--output``). Per round it prints the wall time of each command, the
length of the output's name, the sizes of the checkpoint, of its metadata and of the record,
and the process's resident memory; a figure growing faster than the lineage (one entry a
round) shows work redone over the whole history. It also checks what the chain must keep
true: the retain set of every round is the training pairs less those removed by any earlier
round and by the round's own request (computed here by hand), each round's ``verify`` passes
and its ``report.md`` counts the earlier requests, the 1st and 10th records still verify at
the end, and a request for ids the chain removed entirely is refused. Exit 1 when a check
fails. Erased data are not covered: ``digits`` is generated, never read from files. Timings
are this machine's, under its load: compare the growth across rounds, not the figures across
runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mtunlearn_ext import cli, workflow  # noqa: E402
from mtunlearn_ext.data import load_benchmark  # noqa: E402

STEPS = '{"steps": 1}'


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _timed(argv: list[str]) -> tuple[int, float]:
    sink = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        code = cli.main(argv)
    return code, time.perf_counter() - start


def _plan(train_ids: list[int], tasks: list[str], rounds: int
          ) -> list[tuple[list[int], str | None, int]]:
    """Each round's (ids, partial task or None, expected exit code)."""
    fresh = iter(train_ids)
    plan: list[tuple[list[int], str | None, int]] = []
    partial_earlier: list[int] = []
    full_earlier: list[int] = []
    for r in range(rounds):
        if r % 4 == 3:  # a partial request of one new instance
            one = next(fresh)
            partial_earlier.append(one)
            plan.append(([one], tasks[-1], 0))
        elif r % 10 == 5 and partial_earlier:  # the instance of a partial request, now in full
            plan.append(([partial_earlier.pop(0), next(fresh)], None, 0))
        elif r % 10 == 9 and full_earlier:  # an instance removed in full, asked again
            plan.append(([full_earlier[0], next(fresh)], None, 0))
        else:
            pair = [next(fresh), next(fresh)]
            full_earlier.extend(pair)
            plan.append((pair, None, 0))
    return plan


def _retain_pairs(retain: Any) -> set[tuple[int, str]]:
    supervision = retain.supervision
    return {(int(i), task) for row, i in enumerate(retain.ids.tolist())
            for t, task in enumerate(retain.task_names) if bool(supervision[row, t])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.folder.mkdir(parents=True, exist_ok=True)
    bench = load_benchmark("digits", size="tiny")
    train_ids = bench.train.ids.tolist()
    tasks = list(bench.train.task_names)
    all_pairs = _retain_pairs(bench.train)

    seen: list[Any] = []
    real = workflow.run_unlearning

    def spy(problem: Any, method: str, settings: Any) -> Any:
        seen.append(problem.retain)
        return real(problem, method, settings)

    workflow.run_unlearning = spy  # type: ignore[assignment]
    current = args.folder / "r00.pt"
    code, seconds = _timed(["train", "--benchmark", "digits", "--size", "tiny", "--epochs", "1",
                            "--output", str(current), "--quiet", "--threads", "1"])
    assert code == 0, "train failed"
    removed: set[tuple[int, str]] = set()
    records: list[Path] = []
    failures: list[str] = []
    rows: list[dict[str, Any]] = []
    print("round  ids  type     unlearn  verify  evaluate  report  name_B  ckpt_KiB  meta_KiB  "
          "record_KiB  rss_MiB")
    for r, (ids, task, _) in enumerate(_plan(train_ids, tasks, args.rounds), start=1):
        request = ["--forget-ids", ",".join(map(str, ids))]
        if task is not None:
            request += ["--target-tasks", task]
        row: dict[str, Any] = {"round": r, "ids": ids, "task": task}
        before = set(args.folder.glob("*.pt"))
        # No --output: the default names, as the documented chain command gives them.
        code, row["unlearn_s"] = _timed(["unlearn", "--checkpoint", str(current),
                                         "--method-config", STEPS, "--quiet",
                                         "--threads", "1", *request])
        if code != 0:
            failures.append(f"round {r}: unlearn exit {code}")
            break
        (out,) = set(args.folder.glob("*.pt")) - before
        records.append(Path(str(out.with_suffix("")) + ".record.json"))
        mine = {(i, t) for i in ids for t in ([task] if task else tasks)}
        expected = all_pairs - removed - mine
        got = _retain_pairs(seen[-1])
        if got != expected:
            failures.append(f"round {r}: retain set differs from the hand-computed one: "
                            f"{len(got - expected)} extra, {len(expected - got)} missing")
        removed |= mine
        record = records[-1]
        code, row["verify_s"] = _timed(["verify", "--record", str(record), "--quiet"])
        if code != 0:
            failures.append(f"round {r}: verify exit {code}")
        code, row["evaluate_s"] = _timed(["evaluate", "--checkpoint", str(out), "--output",
                                          str(args.folder / f"r{r:02d}.eval.json"),
                                          "--quiet", "--threads", "1", *request])
        if code != 0:
            failures.append(f"round {r}: evaluate exit {code}")
        report = args.folder / f"rep{r:02d}"
        code, row["report_s"] = _timed(["report", "--results", str(record), "--output-dir",
                                        str(report), "--quiet"])
        if code != 0:
            failures.append(f"round {r}: report exit {code}")
        elif r > 1 and f"that {r - 1} earlier request(s)" not in (
                report / "report.md").read_text():
            failures.append(f"round {r}: report.md does not name the {r - 1} earlier requests")
        meta = torch.load(out, weights_only=True)["meta"]
        row["name_bytes"] = len(out.name.encode())
        row["ckpt_kib"] = out.stat().st_size / 1024
        row["meta_kib"] = len(json.dumps(meta)) / 1024
        row["record_kib"] = record.stat().st_size / 1024
        row["rss_mib"] = _rss_mib()
        rows.append(row)
        print(f"{r:5d}  {len(ids):3d}  {'partial' if task else 'full':7s}  "
              f"{row['unlearn_s']:7.2f}  {row['verify_s']:6.2f}  {row['evaluate_s']:8.2f}  "
              f"{row['report_s']:6.2f}  {row['name_bytes']:6d}  {row['ckpt_kib']:8.1f}  "
              f"{row['meta_kib']:8.1f}  "
              f"{row['record_kib']:10.1f}  {row['rss_mib']:7.0f}", flush=True)
        current = out
    for earlier in records[:1] + records[9:10]:
        code, _ = _timed(["verify", "--record", str(earlier), "--quiet"])
        if code != 0:
            failures.append(f"{earlier.name} no longer verifies at the end (exit {code})")
    # Ids whose every pair the chain removed: refused (exit 2), nothing left to forget.
    code, _ = _timed(["unlearn", "--checkpoint", str(current), "--method-config", STEPS,
                      "--quiet", "--forget-ids", ",".join(map(str, rows[0]["ids"]))])
    if code != 2:
        failures.append(f"a request for the first round's ids again: exit {code}, not 2")
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rows, "failures": failures}, indent=1))
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/held_out_caps.py, whose output docs/unlearning.md quotes ("What the defaults
do"): the defaults leave a memorised MLP's forget set where it was, held-out caps with a step
size that suits the model bring it toward unseen data, and the retained members stay members."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_documented_forgetting_on_a_memorised_mlp() -> None:
    out = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" /
                                                              "held_out_caps.py")],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(.+?)\s+(\d\.\d\d) -> (\d\.\d\d)\s+(\S+) -> (\S+)\s+(\S+) -> (\S+)\s+"
                     r"(\d\.\d\d)$", line)
        if m:
            rows[m.group(1).strip()] = [float(v) for v in m.groups()[1:]]
    assert set(rows) == {"defaults", 'cap_reference="held_out"', "memorising preset",
                         "preset, lr 1e-2", "preset, lr 1e-2, 100 steps"}, out
    auc_before, auc_after = rows["defaults"][0], rows["defaults"][1]
    assert auc_before >= 0.99 and auc_after >= 0.99  # memorised, and the defaults leave it so
    faster = rows["preset, lr 1e-2"]
    assert faster[1] < 0.7                       # toward 0.5, the unseen instances' AUC
    assert faster[3] > 100 * faster[2]           # forget loss raised far past its memorised level
    assert faster[5] < 0.1 and faster[6] >= 0.95  # retain loss low, members still members

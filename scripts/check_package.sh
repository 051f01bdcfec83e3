#!/usr/bin/env bash
# What a user gets from `pip install`: an sdist, a wheel built from that sdist alone (so a file
# it lacks fails the build), installed into an empty folder and imported from another directory
# with the compiled extension required. CPU-only build (the CUDA sources are compiled by
# ./test.sh already); about 3 minutes on 2 cores. CI runs it after the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"   # absolute, the venv's link kept
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
"$PY" setup.py -q sdist -d "$work/dist" > "$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
tar xzf "$work"/dist/mtunlearn_ext-*.tar.gz -C "$work"
echo "[package] sdist: $(tar tzf "$work"/dist/mtunlearn_ext-*.tar.gz | wc -l) files"
# The sdist's own tree, with nothing of the checkout beside it.
MTUNLEARN_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -q --no-build-isolation --no-deps \
    -w "$work/wheel" "$work"/mtunlearn_ext-*/ > "$work/wheel.log" 2>&1 \
    || { tail -40 "$work/wheel.log"; exit 1; }
"$PY" -m pip install -q --no-deps --target "$work/site" "$work"/wheel/*.whl
echo "[package] wheel $(basename "$work"/wheel/*.whl) built from the sdist and installed" \
     "($(( $(date +%s) - t0 )) s)"
cd "$work"
PYTHONPATH="$work/site" MTUNLEARN_REQUIRE_EXTENSION=1 "$PY" - "$work/site" <<'PYEOF'
import importlib.metadata
import sys
from pathlib import Path

import torch

import mtunlearn_ext
from mtunlearn_ext import ops

site = Path(sys.argv[1])
where = Path(mtunlearn_ext.__file__).resolve()
assert where.is_relative_to(site.resolve()), f"imported {where}, not the installed package"
info = mtunlearn_ext.build_info()
assert info["extension"], info
versions = {importlib.metadata.version("mtunlearn_ext"), mtunlearn_ext.__version__,
            info["package_version"]}
assert len(versions) == 1, f"metadata, __version__ and build_info disagree: {versions}"
x = torch.randn(3, 1000, dtype=torch.float64)
assert torch.allclose(ops.gram(x), x @ x.T, rtol=1e-12, atol=1e-12)
assert (where.parent / "py.typed").is_file(), "py.typed missing from the wheel"
needs = {r.split(">")[0].split("=")[0].strip().lower()
         for r in importlib.metadata.requires("mtunlearn_ext") or []}
missing = {"torch", "numpy", "scipy", "scikit-learn", "tqdm", "matplotlib", "pyyaml"} - needs
assert not missing, f"run-time requirements not declared: {sorted(missing)}"
library = next(where.parent.glob("_C*.so"))
print(f"[package] installed package ok: extension loaded ({library.stat().st_size / 1e6:.1f} MB),"
      f" gram right, py.typed present, version {mtunlearn_ext.__version__} everywhere,"
      f" requirements {sorted(needs)}")
PYEOF

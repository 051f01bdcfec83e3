"""The CUDA backend's tensor-core Gram tile (include/mtunlearn/mma_gram.h: Grams and inner
products of float16 / bfloat16, and of float32 split into tf32 parts, with
``MTUNLEARN_CUDA_TENSOR_CORES=1``), run on CPU threads with its tensor-core products done in
plain C++ (their sums cut toward zero, the worst a tensor core may do), against float64 sums:
tests/cpp/mma_gram_emulation.cpp, built with the machine's C++ compiler (the one that builds the
extension). Its CUDA runs (the op tests with the variable set, and the timings) are in
benchmarks/gpu_check.py."""

from __future__ import annotations

from pathlib import Path

from emulation_helpers import run_emulation


def test_tensor_core_gram_tile_matches_float64_sums(tmp_path: Path) -> None:
    out = run_emulation("mma_gram_emulation", tmp_path, timeout=300)
    # Every case ran, for bfloat16 and for float32 (3xTF32): Grams on 64- and 32-wide tiles,
    # the stacked Gram, three inner products.
    assert out.count("tile=64") == 14 and out.count("tile=32") == 8
    assert out.count(" bf16 ") == 11 and out.count(" fp32 (3xtf32) ") == 11
    assert sum(line.startswith("ok   ") for line in out.splitlines()) == 22

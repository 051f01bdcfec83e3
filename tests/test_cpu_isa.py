"""The CPU kernels' instruction-set variants (baseline x86-64, AVX2, AVX-512), each forced with
``ops.cpu_isa_limit``: every variant this CPU runs against float64 references, and the AVX-512
register blocks against the AVX2 ones bit for bit (they make the same per-lane operations in the
same order), down to a whole interference-aware unlearning run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mtunlearn_ext import ops
from mtunlearn_ext.ops import _reference as ref

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
GRAM_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
RUNNABLE = ops.CPU_ISAS[:ops.CPU_ISAS.index(ops.cpu_isa()["detected"]) + 1]
NEEDS_AVX512 = pytest.mark.skipif(
    ops.cpu_isa()["detected"] != "avx512",
    reason="compares the AVX-512 kernels with the AVX2 ones: needs a CPU with AVX-512 and a "
           "build with those kernels (a compiler with __builtin_shufflevector)")
# m x k inner products around the AVX-512 grids (two 3-row blocks of A by two 4-row blocks of
# B): partial blocks, one block of A, odd B rows, many rows (the sweep), few rows (transposed).
INNER_SHAPES = [(6, 8), (7, 24), (9, 17), (6, 17), (10, 9), (13, 26), (12, 8), (11, 20),
                (32, 192), (33, 7), (3, 100), (2, 200), (300, 9), (40, 33)]
GRAM_ROWS = [17, 18, 19, 23, 24, 25, 33, 64]
WIDTHS = [1, 7, 100, 4096 + 37]  # per-tensor columns: ragged tails, several items


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _rows(rows: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    return [_rand(rows, n, dtype=dtype, seed=seed + n) for n in WIDTHS]


def _scaled_error(result: torch.Tensor, expected: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor) -> float:
    scale = a.double().norm(dim=-1).unsqueeze(-1) * b.double().norm(dim=-1).unsqueeze(-2)
    return float(((result.double() - expected) / (scale + 1e-300)).abs().max())


def test_cpu_isa_reports_and_restores_the_limit() -> None:
    info = ops.cpu_isa()
    assert info["detected"] in ops.CPU_ISAS and info["limit"] in ops.CPU_ISAS
    with ops.cpu_isa_limit("baseline"):
        assert ops.cpu_isa()["active"] == "baseline"
        with ops.cpu_isa_limit("avx512"):  # a cap above the CPU's leaves the CPU's best
            assert ops.cpu_isa()["active"] == info["detected"]
        assert ops.cpu_isa()["active"] == "baseline"
    assert ops.cpu_isa() == info


def test_cpu_isa_limit_blocks_of_two_threads_closing_out_of_order_restore_the_cap() -> None:
    # The interleaving forced: A enters, B enters, A leaves, B leaves. Each block restoring the
    # cap it found left the process capped at A's "baseline" for good.
    found = ops.cpu_isa()["limit"]
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def block_a() -> None:
        with ops.cpu_isa_limit("baseline"):
            a_entered.set()
            b_entered.wait(timeout=30)
        a_left.set()

    def block_b() -> None:
        a_entered.wait(timeout=30)
        with ops.cpu_isa_limit("avx2"):
            b_entered.set()
            a_left.wait(timeout=30)
            seen["after A left"] = ops.cpu_isa()["limit"]

    threads = [threading.Thread(target=block_a), threading.Thread(target=block_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"after A left": "avx2"}  # B's block keeps its cap until B leaves
    assert ops.cpu_isa()["limit"] == found


@pytest.mark.skipif("avx2" not in RUNNABLE, reason="compares the baseline and AVX2 kernels")
def test_a_call_runs_one_variant_while_another_thread_changes_the_cap() -> None:
    """The Gram kernel read the cap at every wave of work items and every output block: a
    1024-row Gram (10 blocks) made while another thread toggled the cap between baseline and
    avx2 was part one variant, part the other, the bits of neither (10 calls of 10). It reads
    the cap once per call now."""
    x = _rand(1024, 3000, dtype=torch.float32, seed=5)
    variants = []
    for isa in ("baseline", "avx2"):
        with ops.cpu_isa_limit(isa):
            variants.append(ops.gram(x))
    assert not torch.equal(*variants)  # else this test could not tell them apart
    toggled_enough = threading.Event()
    stop = threading.Event()

    def toggle_the_cap() -> None:
        toggles = 0
        while not stop.is_set():
            ops.set_cpu_isa("baseline")
            ops.set_cpu_isa("avx2")
            toggles += 1
            if toggles == 1000:
                toggled_enough.set()

    mixed = 0
    with ops.cpu_isa_limit("avx2"):  # restores the cap the toggling leaves
        toggler = threading.Thread(target=toggle_the_cap)
        toggler.start()
        try:
            toggled_enough.wait(timeout=30)
            for _ in range(4):
                result = ops.gram(x)
                mixed += not any(torch.equal(result, v) for v in variants)
        finally:
            stop.set()
            toggler.join()
    assert mixed == 0


def test_cpu_isa_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`isa` must be one of baseline, avx2, avx512"):
        ops.set_cpu_isa("sse4")
    env = {**os.environ, "MTUNLEARN_CPU_ISA": "avx1024"}
    run = subprocess.run([sys.executable, "-c", "import mtunlearn_ext"], env=env,
                         capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert "MTUNLEARN_CPU_ISA must be one of baseline, avx2, avx512" in run.stderr


def test_cpu_isa_environment_sets_the_first_limit() -> None:
    env = {**os.environ, "MTUNLEARN_CPU_ISA": "baseline"}
    code = "from mtunlearn_ext import ops; print(ops.cpu_isa()['active'])"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert run.stdout.strip() == "baseline"


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_variant_matches_float64_references(isa: str, dtype: torch.dtype) -> None:
    with ops.cpu_isa_limit(isa):
        for m, k in INNER_SHAPES:
            a, b = _rows(m, dtype, m), _rows(k, dtype, 1000 + k)
            flat_a, flat_b = torch.cat(a, 1), torch.cat(b, 1)
            expected = ref.inner(flat_a.double(), flat_b.double())
            for result in (ops.inner_list(a, b), ops.inner(flat_a, flat_b)):
                assert not torch.isnan(result).any(), (isa, m, k)
                assert _scaled_error(result, expected, flat_a, flat_b) <= GRAM_TOL[dtype], (m, k)
        for m in GRAM_ROWS:
            xs = _rows(m, dtype, 7 * m)
            flat = torch.cat(xs, 1)
            result = ops.gram_list(xs)
            assert torch.equal(result, result.T), (isa, m)
            assert _scaled_error(result, ref.gram(flat.double()), flat, flat) <= GRAM_TOL[dtype]


COMBINE_TOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-3,
               torch.bfloat16: 8e-3}


def _combine_variants() -> tuple[str, ...]:
    """The instruction sets the combine kernel has its own variant for, read from its source:
    the extension reports the CPU's instruction set and the cap, not which variants each kernel
    was built with. Each SIMD variant is defined by an ``MTU_DEFINE_<ISA>_RANGE`` macro (the
    Gram/inner kernel defines AVX2 and AVX-512 ones; the combine kernel only AVX2, so a cap at
    AVX-512 runs its AVX2 variant)."""
    source = (Path(__file__).resolve().parents[1] / "csrc" / "ops" / "combine" / "cpu"
              / "combine_kernel.cpp").read_text()
    simd = [isa for isa in ops.CPU_ISAS[1:] if f"MTU_DEFINE_{isa.upper()}_RANGE(F64)" in source]
    assert "avx2" in simd, "the combine kernel's variants could not be read from its source"
    return ("baseline", *simd)


COMBINE_VARIANTS = _combine_variants()


@pytest.mark.parametrize("isa", [isa for isa in RUNNABLE if isa in COMBINE_VARIANTS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_combine_variant_matches_float64_references(isa: str, dtype: torch.dtype) -> None:
    """The combine kernel (``C @ X``, and ``beta * base + C @ X`` in place over a list) has a
    baseline and an AVX2 variant too (parametrised over the variants it has, see
    _combine_variants: a cap without a variant of its own would only repeat the one below)."""
    with ops.cpu_isa_limit(isa):
        for m, k in [(1, 1), (1, 8), (3, 5), (4, 16), (2, 64)]:
            xs = _rows(k, dtype, 50 + k)
            coeffs = _rand(m, k, dtype=torch.float64, seed=m * k)
            for x in xs:
                expected = ref.combine(coeffs, x.double())
                result = ops.combine(coeffs, x)
                bound = coeffs.abs() @ x.double().abs() + 1e-300
                assert not torch.isnan(result).any(), (isa, m, k)
                assert float(((result.double() - expected) / bound).abs().max()) <= \
                    COMBINE_TOL[dtype], (isa, m, k, x.shape)
            bases = [_rand(m, x.shape[1], dtype=dtype, seed=3) for x in xs]
            outs = [torch.empty_like(b) for b in bases]
            ops.combine_list(coeffs, xs, outs, beta=-0.5, bases=bases)
            for x, base, out in zip(xs, bases, outs):
                expected = coeffs @ x.double() - 0.5 * base.double()
                bound = coeffs.abs() @ x.double().abs() + 0.5 * base.double().abs() + 1e-300
                assert float(((out.double() - expected) / bound).abs().max()) <= \
                    COMBINE_TOL[dtype], (isa, m, k, x.shape)


@pytest.mark.skipif("avx512" in COMBINE_VARIANTS or "avx512" not in RUNNABLE,
                    reason="needs an AVX-512 CPU, and a combine kernel without an AVX-512 variant")
def test_combine_capped_at_avx512_runs_its_avx2_variant() -> None:
    """No AVX-512 combine variant: an AVX-512 cap runs the AVX2 one (same bits), not the
    baseline (no FMA: other bits)."""
    x = _rand(16, 4096 + 37, dtype=torch.float32, seed=1)
    coeffs = _rand(3, 16, dtype=torch.float32, seed=2)
    results = {}
    for isa in ("baseline", "avx2", "avx512"):
        with ops.cpu_isa_limit(isa):
            results[isa] = ops.combine(coeffs, x)
    assert torch.equal(results["avx512"], results["avx2"])
    assert not torch.equal(results["avx2"], results["baseline"])


@NEEDS_AVX512
@pytest.mark.parametrize("dtype", DTYPES)
def test_avx512_kernels_give_the_avx2_bits(dtype: torch.dtype) -> None:
    def outputs() -> list[torch.Tensor]:
        out = []
        for m, k in INNER_SHAPES:
            a, b = _rows(m, dtype, m), _rows(k, dtype, 1000 + k)
            out += [ops.inner_list(a, b), ops.inner(torch.cat(a, 1), torch.cat(b, 1))]
            strided = _rand(m, 2 * 3000, dtype=dtype, seed=m)[:, ::2]
            out.append(ops.inner(strided, _rand(k, 3000, dtype=dtype, seed=k)))
        for m in GRAM_ROWS:
            xs = _rows(m, dtype, 7 * m)
            out += [ops.gram_list(xs), ops.gram_list(xs, per_tensor=True),
                    ops.gram_list_stacked(xs, _rows(3, dtype, m))]
            out.append(ops.gram(torch.stack([torch.cat(xs, 1)] * 2)))
        return out

    with ops.cpu_isa_limit("avx2"):
        avx2 = outputs()
    with ops.cpu_isa_limit("avx512"):
        avx512 = outputs()
    for index, (x, y) in enumerate(zip(avx2, avx512)):
        assert torch.equal(x, y), index


@NEEDS_AVX512
@pytest.mark.parametrize("partial", [False, True])
def test_avx512_unlearning_run_equals_avx2_bit_for_bit(indoor_tiny, indoor_tiny_model,  # type: ignore[no-untyped-def]
                                                       partial: bool, one_thread) -> None:
    """A whole run whose instance memory makes many-row inner products (6 per-sample rows
    against up to 36 remembered ones) and whose task projection makes Grams."""
    from mtunlearn_ext.data.request import ForgetRequest
    from mtunlearn_ext.unlearning import UnlearningProblem, get_unlearner

    ids = indoor_tiny.train.ids[:8]
    request = ForgetRequest.create(ids, ["segmentation"] if partial else None)
    settings = {"steps": 6, "lr": 3e-3, "forget_batch_size": 6, "retain_batch_size": 12,
                "num_per_sample": 6, "instance_memory": 5, "refresh_every": 2,
                "num_snapshots": 8}
    states = []
    for isa in ("avx2", "avx512"):
        problem = UnlearningProblem.from_request(indoor_tiny_model, indoor_tiny.train, request,
                                                 seed=0)
        with ops.cpu_isa_limit(isa):
            model = get_unlearner("interference_aware", settings).unlearn(problem).model
        states.append(model.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name

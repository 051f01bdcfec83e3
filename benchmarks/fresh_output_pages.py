"""What the first write of a fresh CPU output costs, with 4 KiB pages and with huge pages.

Every op that returns a new tensor (``ops.pcgrad(x)``, ``ops.combine`` without ``out``) writes
memory that was never touched in this mapping, so each page faults once. This times writing a
fresh ``--mib`` MiB float32 tensor, call after call with a pause between calls, three ways:

- ``4 KiB pages``: as torch allocates by default;
- ``huge pages (madvise)``: ``madvise(MADV_HUGEPAGE)`` on the tensor before its first write (what
  the combine ops did until 2026-11-30; torch's ``THP_MEM_ALLOC_ENABLE=1`` does the same for
  every large allocation);
- ``existing tensor``: the same write into one tensor kept between calls (no faults).

On a virtual machine with free page reporting (``page_reporting.page_reporting_order`` on the
kernel command line, printed below) freed 2 MiB pages go back to the host, and faulting them
in again is slow; so huge pages can be much faster or much slower than 4 KiB pages, depending on
how long ago the last large block was freed. That is why the ops no longer ask for them.

    python benchmarks/fresh_output_pages.py                 # 40 MiB, pauses 0 / 0.5 / 2 s
    python benchmarks/fresh_output_pages.py --mib 400 --calls 8
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def _madvise_huge(t: torch.Tensor) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    start = t.data_ptr()
    begin = (start + HUGE - 1) & ~(HUGE - 1)
    end = (start + t.nbytes) & ~(HUGE - 1)
    if end > begin and libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin),
                                    MADV_HUGEPAGE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")


def _writers(numel: int) -> dict[str, Callable[[], None]]:
    kept = torch.empty(numel)
    kept.fill_(0.0)

    def fresh() -> None:
        torch.empty(numel).fill_(1.0)

    def fresh_huge() -> None:
        out = torch.empty(numel)
        _madvise_huge(out)
        out.fill_(1.0)

    def existing() -> None:
        kept.fill_(1.0)

    return {"4 KiB pages": fresh, "huge pages (madvise)": fresh_huge, "existing tensor": existing}


def _machine() -> str:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    cmdline = Path("/proc/cmdline")
    reporting = [w for w in (cmdline.read_text().split() if cmdline.exists() else [])
                 if w.startswith("page_reporting")]
    return (f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"THP: {thp.read_text().strip() if thp.exists() else 'n/a'}, free page reporting: "
            f"{' '.join(reporting) or 'not on the kernel command line'}, "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=40.0, help="output size in MiB (float32)")
    parser.add_argument("--calls", type=int, default=14, help="timed calls per way and pause")
    parser.add_argument("--pauses", type=float, nargs="+", default=[0.0, 0.5, 2.0],
                        help="seconds between calls")
    args = parser.parse_args()
    if args.mib <= 0 or args.calls < 1 or any(p < 0 for p in args.pauses):
        parser.error("--mib must be > 0, --calls >= 1 and every pause >= 0")
    numel = int(args.mib * 2**20 / 4)
    print(f"# fresh_output_pages.py: {args.mib:g} MiB float32 outputs; {_machine()}")
    print("| way | pause s | min ms | median ms | max ms | every call, ms |")
    print("|---|---|---|---|---|---|")
    for pause in args.pauses:
        for name, write in _writers(numel).items():
            times = []
            try:
                for _ in range(args.calls):
                    time.sleep(pause)
                    start = time.perf_counter()
                    write()
                    times.append((time.perf_counter() - start) * 1e3)
            except OSError as error:  # a kernel without transparent huge pages
                print(f"| {name} | {pause:g} | - | - | - | unavailable: {error} |", flush=True)
                continue
            print(f"| {name} | {pause:g} | {min(times):.1f} | {statistics.median(times):.1f} | "
                  f"{max(times):.1f} | {' '.join(f'{t:.0f}' for t in times)} |", flush=True)


if __name__ == "__main__":
    main()

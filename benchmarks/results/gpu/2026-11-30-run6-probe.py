"""Which C++ exceptions survive on this machine: run each probe in its own process."""
import os
import subprocess
import sys

PROBES = {
    "torch_native_cpu": "torch.zeros(2) @ torch.zeros(3)",
    "ours_single_cpu": "torch.ops.mtunlearn.inner(torch.zeros(2, 3), torch.zeros(2, 4))",
    "ours_list_cpu": "torch.ops.mtunlearn.combine_list_([torch.zeros(2, 3)], torch.zeros(2, 2, 5), "
                     "[torch.zeros(5, 3)], 0.0, True)",
    "ours_list_cuda": "torch.ops.mtunlearn.combine_list_([torch.zeros(2, 3, device='cuda')], "
                      "torch.zeros(2, 2, 5, device='cuda'), [torch.zeros(5, 3, device='cuda')], "
                      "0.0, True)",
    "ours_single_cuda": "torch.ops.mtunlearn.inner(torch.zeros(2, 3, device='cuda'), "
                        "torch.zeros(2, 4, device='cuda'))",
}
tree = sys.argv[1]
procs = {}
for name, stmt in PROBES.items():
    code = ("import torch, mtunlearn_ext\nassert mtunlearn_ext.has_extension()\ntry:\n    "
            + stmt + "\n    print('NO ERROR')\nexcept Exception as e:\n    print('ok', type(e).__name__, str(e)[:70].replace(chr(10), ' '))\n")
    procs[name] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONPATH": tree}, cwd="/tmp")
bad = 0
for name, p in procs.items():
    out, _ = p.communicate(timeout=120)
    last = [l for l in out.splitlines() if l.strip()][-1:] or [""]
    print(f"  {name:18s} rc={p.returncode:4d} {last[0][:110]}")
    bad += name.startswith("ours") and p.returncode != 0
sys.exit(1 if bad else 0)

#!/usr/bin/env bash
# The grids behind the "memorising" presets (mtunlearn_ext/unlearning/presets.py), in the order
# they were run on 2026-11-29 (seed 0, training data only; ~1.5 h on 2 cores). Each run adds its
# records to runs/unlearning_eval_memorising/tuning/; the last command picks, per request and
# method, the setting with the lowest score averaged over indoor and street. Every score is in
# memorising_grid.csv, the selection in memorising_selection.json.
set -euo pipefail
cd "$(dirname "$0")/../../.."
EVAL=(.venv/bin/python benchmarks/unlearning_eval.py --tune --seeds 0 --recipe memorising)

# 1. every method (indoor and street, full and partial): learning rates x step budgets; the
#    interference-aware method also alpha (its library defaults otherwise, update clip 1).
for benchmark in indoor street; do
  "${EVAL[@]}" --benchmarks "$benchmark" --checkpoints 10,15,20,25,30,40,60 --method-max-steps 30 \
    --grid '{"gradient_ascent": {"lr": [3e-4, 1e-3, 3e-3]}, "pcgrad": {"lr": [3e-4, 1e-3, 3e-3]},
             "random_labels": {"lr": [3e-4, 1e-3]}, "salun": {"lr": [3e-4, 1e-3]},
             "interference_aware": {"lr": [6e-3, 1e-2, 2e-2], "alpha": [1, 3, 5]}}'
done
# 2, 3. the interference-aware method on full requests: forget objective and cap, update clip,
#    subspace size k, up to 40 steps.
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 10,15,20,25,30 \
  --method-max-steps 30 --grid '{"interference_aware": {"lr": [6e-3, 1e-2], "alpha": [1],
    "grad_clip": [1, 5], "forget_objective": ["ascent", "capped_ascent"]}}'
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 10,15,20,25,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [1e-2, 2e-2], "alpha": [1],
    "grad_clip": [5], "forget_objective": ["capped_ascent"], "cap_quantile": [null, 0.99],
    "num_snapshots": [8, 24]}}'
# 4. the interference-aware method on partial requests.
"${EVAL[@]}" --requests partial --methods interference_aware --checkpoints 10,15,20,25,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [3e-3, 1e-2], "alpha": [1, 3],
    "grad_clip": [5], "cap_quantile": [null, 0.9]}}'
# 5. full requests again: clip 1 / 2 without the retain-quantile cap.
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 10,15,20,25,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [1e-2, 2e-2], "alpha": [1],
    "grad_clip": [1, 2], "forget_objective": ["capped_ascent"], "cap_quantile": [null]}}'

# 6. (after the evaluation) full requests with protect="others": each target task's forget
#    gradient projected off the *other* tasks' subspaces only. Not selected (mean 4.09 at 40
#    steps vs 3.99 for the preset).
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 10,15,20,25,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [1e-2], "alpha": [1],
    "grad_clip": [1, 2], "forget_objective": ["capped_ascent"], "cap_quantile": [null],
    "protect": ["others"]}}'

.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select

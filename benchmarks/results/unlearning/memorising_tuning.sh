#!/usr/bin/env bash
# The grids behind the "memorising" presets (mtunlearn_ext/unlearning/presets.py), in the order
# they were run on 2026-11-29 (seed 0, training data only; ~1.5 h, ~45 min, then ~1 h on 2 cores).
# Each run adds its records to runs/unlearning_eval_memorising/tuning/; the last command picks,
# per request and method, the setting with the lowest score averaged over indoor and street.
# Every score is in memorising_grid.csv, the selection in memorising_selection.json.
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

# --- Second session (2026-11-29, ~45 min on 2 cores): the optimizer as a grid axis. Rounds 1-6
# tried SGD (momentum 0.9) only, for every method. Adam changes the ranking, so every step-based
# method got Adam learning rates, and the interference-aware method Adam with its components
# and the held-out forget cap (a validation split; see cap_reference).
# 7. the interference-aware method with Adam (full requests), then its components.
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 10,20,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [3e-4, 1e-3, 3e-3],
    "optimizer": ["adam"]}}'
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 20,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [3e-4], "optimizer": ["adam"],
    "instance_projection": ["orthogonal", "nonconflicting"], "num_per_sample": [32],
    "task_projection": [true, false], "grad_clip": [5]}}'
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 20,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [5e-4], "optimizer": ["adam"],
    "instance_projection": ["orthogonal", "nonconflicting"], "num_per_sample": [32],
    "task_projection": [false], "grad_clip": [5]}}'
# 8. forget caps at a quantile of the original model's losses on the validation split.
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 20,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [3e-4, 5e-4, 1e-3],
    "optimizer": ["adam"], "cap_reference": ["held_out"], "cap_quantile": [0.5, 0.75],
    "task_projection": [true, false]}}'
"${EVAL[@]}" --requests partial --methods interference_aware --checkpoints 10,20,30,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [1e-4, 3e-4, 1e-3],
    "optimizer": ["adam"]}}'
"${EVAL[@]}" --requests partial --methods interference_aware --checkpoints 10,20,30,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [1e-4, 3e-4], "optimizer": ["adam"],
    "alpha": [1, 3], "cap_reference": ["held_out"], "cap_quantile": [0.5, 0.75]}}'
# 9. every step-based baseline with Adam.
"${EVAL[@]}" --requests full --methods orthograd,neggrad_plus,pcgrad --checkpoints 20,40,60 \
  --grid '{"orthograd": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]},
    "neggrad_plus": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]},
    "pcgrad": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]}}'
"${EVAL[@]}" --requests partial --methods orthograd,neggrad_plus,pcgrad \
  --checkpoints 10,20,30,40,60 \
  --grid '{"orthograd": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]},
    "neggrad_plus": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]},
    "pcgrad": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]}}'
"${EVAL[@]}" --methods finetune,gradient_ascent,random_labels,salun --checkpoints 10,20,30,40,60 \
  --grid '{"finetune": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]},
    "gradient_ascent": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]},
    "random_labels": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]},
    "salun": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"]}}'

# 10. (after a first evaluation with round 1-9's selection) held-out forget caps on the selected
#     full-request setting (Adam, orthogonal over 32 per-sample gradients, no task projection).
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 20,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [3e-4, 5e-4],
    "cap_reference": ["held_out"], "cap_quantile": [0.5, 0.75, 0.9]}}'

# 11. (after the evaluation) the partial-request preset's task-level parts, one at a time:
#     none scored better than the preset (0.350): no task projection 0.366, no coupled
#     protection 0.381, labelled snapshots 0.394, k = 8 0.372.
for point in '"task_projection": [false]' '"coupled": [false]' '"snapshot_targets": ["labels"]' \
             '"num_snapshots": [8]'; do
  "${EVAL[@]}" --requests partial --methods interference_aware --checkpoints 20,30,40 \
    --method-max-steps 40 --grid "{\"interference_aware\": {\"lr\": [3e-4], $point}}"
done

# --- Fifth session: remembered instance constraints (`instance_memory`: the per-sample
# gradients of the last m steps' retain batches stay in the instance projection).
# 12. full requests: memory x learning rate (the larger constraint set keeps a larger step
#     safe: without memory lr 5e-4 diverges on indoor, 5.33), then the same for partial ones.
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 20,30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [3e-4], "instance_memory": [1, 3]}}'
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [5e-4], "instance_memory": [0, 1, 3]}}'
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [5e-4, 7e-4], "instance_memory": [5]}}'
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [7e-4], "instance_memory": [3]}}'
#     fewer fresh per-sample gradients per step, more remembered ones (cheaper): worse.
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [5e-4], "num_per_sample": [16],
    "retain_batch_size": [16], "instance_memory": [3, 7]}}'
"${EVAL[@]}" --requests partial --methods interference_aware --checkpoints 20,30,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [3e-4, 5e-4], "instance_memory": [3]}}'
"${EVAL[@]}" --requests partial --methods interference_aware --checkpoints 30,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [5e-4], "instance_memory": [0, 5]}}'

.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv

# --- Sixth session: rank-matched forget caps and a selection aligned with UIS (~1 h).
# Round 12's test-split evaluation showed the proxy score and UIS disagreeing (the selected
# settings pushed the forget pairs below the original's unseen-data level). From here tuning
# runs also score the validation split (never trained on, never evaluated), and the final
# selection ranks by the mean of the proxy score and UIS on the validation split
# (`--select-score aligned`), for *every* method alike: each method's three best learning rate
# x optimizer pairs by the proxy score (over rounds 1-12) are re-run with validation metrics at
# budgets 10-60, and only such runs compete.
# 13. `cap_quantile="rank"`: each forget pair's own cap, the held-out loss quantile at its rank
#     among the forget pairs (the forget losses move toward the unseen-data *distribution*).
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [5e-4], "cap_quantile": [0.9, "rank"]}}'
"${EVAL[@]}" --requests partial --methods interference_aware --checkpoints 30,40 \
  --method-max-steps 40 --grid '{"interference_aware": {"lr": [5e-4], "cap_quantile": [0.75, "rank"]}}'
# 14. the shortlists: every method's three best (lr, optimizer) pairs by the proxy score of
#     rounds 1-12 (optimizer spelled out), plus the method's other top settings and
#     rank-matched variants.
# One grid on both selection seeds, the two benchmarks in parallel:
#   two_seed_round REQUEST GRID [SCRIPT METHOD OUTPUT_PREFIX]
# (defaults: the evaluation script, the interference-aware method, and each seed's own tuning
# directory; an OUTPUT_PREFIX gives seed s the directory OUTPUT_PREFIX<s> instead). The step
# budgets scored are CHECKPOINTS (default 20,30,40; the largest is the run's length);
# SCRIPT_ARGS, if set, go to the script first (e.g. an experiment's --validation-rows odd).
two_seed_round() {
  local request=$1 grid=$2 script=${3:-benchmarks/unlearning_eval.py}
  local method=${4:-interference_aware} prefix=${5:-}
  local checkpoints=${CHECKPOINTS:-20,30,40}
  for benchmark in indoor street; do
    ( for seed in 0 1; do
        if [ -n "$prefix" ]; then out="$prefix$seed"
        else out=runs/unlearning_eval_memorising; [ "$seed" = 1 ] && out=runs/unlearning_eval_memorising_seed1
        fi
        # shellcheck disable=SC2086  # SCRIPT_ARGS is a list of words
        .venv/bin/python "$script" ${SCRIPT_ARGS:-} --tune --seeds "$seed" --recipe memorising \
          --output-dir "$out" --benchmarks "$benchmark" --requests "$request" \
          --methods "$method" --checkpoints "$checkpoints" \
          --method-max-steps "${checkpoints##*,}" --grid "$grid"
      done ) &
  done
  wait
}
# The two-seed grid CSV of runs kept outside the selection (OUTPUT_PREFIX<s> of two_seed_round):
#   out_of_selection_csv OUTPUT_PREFIX CSV [REQUESTS]
out_of_selection_csv() {
  local prefix=$1 csv=$2 requests=${3:-full,partial}
  mkdir -p "${prefix}two_seeds/tuning"
  cp "${prefix}seed0"/tuning/*.json "${prefix}seed1"/tuning/*.json "${prefix}two_seeds/tuning/"
  .venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
    --requests "$requests" --output-dir "${prefix}two_seeds" --grid-csv "$csv"
}
ALL=finetune,gradient_ascent,neggrad_plus,random_labels,salun,orthograd,pcgrad,interference_aware
"${EVAL[@]}" --requests full --methods "$ALL" --checkpoints 10,20,30,40,60 --method-max-steps 40 \
  --grid '{"finetune": [{"lr": [0.001], "optimizer": ["adam"]}, {"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.0001], "optimizer": ["adam"]}], "gradient_ascent": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.001], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}], "neggrad_plus": [{"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.01], "optimizer": ["sgd"]}], "random_labels": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "salun": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "orthograd": [{"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}], "pcgrad": [{"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "interference_aware": [{"lr": [0.0005], "instance_memory": [3]}, {"lr": [0.0005], "instance_memory": [7], "num_per_sample": [16], "retain_batch_size": [16]}, {"lr": [0.0007], "cap_quantile": ["rank"]}]}'
"${EVAL[@]}" --requests partial --methods "$ALL" --checkpoints 10,20,30,40,60 --method-max-steps 40 \
  --grid '{"finetune": [{"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["adam"]}], "gradient_ascent": [{"lr": [0.003], "optimizer": ["sgd"]}, {"lr": [0.001], "optimizer": ["sgd"]}, {"lr": [0.0003], "optimizer": ["sgd"]}], "neggrad_plus": [{"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.01], "optimizer": ["sgd"]}], "random_labels": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "salun": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "orthograd": [{"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.003], "optimizer": ["sgd"]}], "pcgrad": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.001], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}], "interference_aware": [{"lr": [0.0005], "instance_memory": [5]}, {"lr": [0.0005], "refresh_every": [20]}, {"lr": [0.0005], "cap_quantile": ["rank"], "instance_memory": [5]}, {"lr": [0.0007], "cap_quantile": ["rank"]}]}'
# 15. rank-matched caps at larger learning rates (full requests): 1e-3 is best on both scores
#     (proxy 2.01, validation UIS 1.11); 1.5e-3 and 2e-3 overshoot.
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": [{"lr": [1e-3], "cap_quantile": ["rank"]},
    {"lr": [7e-4], "cap_quantile": ["rank"], "instance_memory": [3]}]}'
"${EVAL[@]}" --requests full --methods interference_aware --checkpoints 30,35,40 \
  --method-max-steps 40 --grid '{"interference_aware": [{"lr": [1.5e-3, 2e-3], "cap_quantile": ["rank"]}]}'

.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv

# --- Seventh session: the partial-request step shares its per-sample pass with the retain
# gradient (the constrained rows are differentiated once; constraints are each row's term of
# the retain objective, task-scaled). That freed ~4 s of its 21 s, so more per-sample rows fit
# the wall-time budget: with num_per_sample = 32 the whole retain batch is constrained at about
# the same cost (no batched retain pass left).
# 16. partial requests, on the current code (the preset re-run): per-sample rows x memory.
for benchmark in indoor street; do
  "${EVAL[@]}" --benchmarks "$benchmark" --requests partial --methods interference_aware \
    --checkpoints 10,20,30,40 --method-max-steps 40 --grid '{"interference_aware": [
      {"lr": [5e-4], "instance_memory": [3, 5], "num_per_sample": [16, 32]},
      {"lr": [7e-4], "instance_memory": [5], "num_per_sample": [32]}]}' &
done
wait
# 17. partial requests: the cheaper step leaves room for 45-50 steps within the wall-time
#     target; more steps scored worse (indoor proxy 0.497 / 0.509 / 0.593 at 40 / 45 / 50
#     steps, street 0.129 / 0.217 / 0.167).
for benchmark in indoor street; do
  "${EVAL[@]}" --benchmarks "$benchmark" --requests partial --methods interference_aware \
    --checkpoints 40,45,50 --method-max-steps 50 --grid '{"interference_aware": [
      {"lr": [5e-4], "instance_memory": [3, 5], "num_per_sample": [16]}]}' &
done
wait

.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv

# 18. a second selection seed, for every method alike: the round-14 shortlists (the method: its
#     two presets' settings) re-run on seed 1's training data and validation split, then the
#     aligned selection over both seeds (only settings scored on all four files compete; their
#     scores are in memorising_two_seed_grid.csv, the picks in memorising_selection.json). It
#     changed four baseline picks (full: NegGrad+ 3e-4 -> 1e-4, which had diverged on seeds 1
#     and 2 of the test evaluation, PCGrad 40 -> 30 steps; partial: fine-tune 40 -> 20 steps,
#     gradient ascent 30 -> 10 steps) and kept the method's and OrthoGrad's.
# The aligned selection over both seeds' tuning files (only settings scored on all of them
# compete): the two-seed grid CSV and the selection file the presets follow.
select_over_two_seeds() {  # extra arguments go to --select (from round 39: --incumbent-rule)
  mkdir -p runs/unlearning_eval_memorising_two_seeds/tuning
  cp runs/unlearning_eval_memorising/tuning/*-seed0.json \
    runs/unlearning_eval_memorising_seed1/tuning/*-seed1.json \
    runs/unlearning_eval_memorising_two_seeds/tuning/
  .venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned "$@" \
    --output-dir runs/unlearning_eval_memorising_two_seeds \
    --grid-csv benchmarks/results/unlearning/memorising_two_seed_grid.csv
  cp runs/unlearning_eval_memorising_two_seeds/tuning/selected-aligned.json \
    benchmarks/results/unlearning/memorising_selection.json
}
ALL=finetune,gradient_ascent,neggrad_plus,random_labels,salun,orthograd,pcgrad,interference_aware
SEED1=(.venv/bin/python benchmarks/unlearning_eval.py --tune --seeds 1 --recipe memorising
       --output-dir runs/unlearning_eval_memorising_seed1 --methods "$ALL"
       --checkpoints 10,20,30,40,60 --method-max-steps 40)
for benchmark in indoor street; do
  ( "${SEED1[@]}" --benchmarks "$benchmark" --requests full --grid '{"finetune": [{"lr": [0.001], "optimizer": ["adam"]}, {"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.0001], "optimizer": ["adam"]}], "gradient_ascent": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.001], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}], "neggrad_plus": [{"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.01], "optimizer": ["sgd"]}], "random_labels": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "salun": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "orthograd": [{"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}], "pcgrad": [{"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "interference_aware": [{"lr": [0.001], "cap_quantile": ["rank"]}]}'
    "${SEED1[@]}" --benchmarks "$benchmark" --requests partial --grid '{"finetune": [{"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["adam"]}], "gradient_ascent": [{"lr": [0.003], "optimizer": ["sgd"]}, {"lr": [0.001], "optimizer": ["sgd"]}, {"lr": [0.0003], "optimizer": ["sgd"]}], "neggrad_plus": [{"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.01], "optimizer": ["sgd"]}], "random_labels": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "salun": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.001], "optimizer": ["sgd"]}], "orthograd": [{"lr": [0.0001], "optimizer": ["adam"]}, {"lr": [0.0003], "optimizer": ["adam"]}, {"lr": [0.003], "optimizer": ["sgd"]}], "pcgrad": [{"lr": [0.0003], "optimizer": ["sgd"]}, {"lr": [0.001], "optimizer": ["sgd"]}, {"lr": [0.0001], "optimizer": ["adam"]}], "interference_aware": [{"lr": [0.0005], "instance_memory": [3, 5], "num_per_sample": [16]}]}' ) &
done
wait
select_over_two_seeds

# 19. partial requests on both seeds: the test split and seed 1's selection data both showed the
#     method's forget pairs ending *below* the unseen-data level (seed 1 indoor: forget mIoU
#     0.827 vs 0.839 retrained, 0.834 original on validation), so a gentler step, half the
#     forget weight, and a single cap at the 0.75 quantile. Two-seed aligned scores: lr 3e-4
#     0.270 (proxy 0.360, validation UIS 0.180; selected), alpha 0.5 0.339, cap 0.75 0.452,
#     against 0.342 for the round-16 preset (OrthoGrad 0.316, NegGrad+ 0.322).
G19='{"interference_aware": [{"lr": [3e-4], "instance_memory": [3], "num_per_sample": [16]},
  {"lr": [5e-4], "alpha": [0.5], "instance_memory": [3], "num_per_sample": [16]},
  {"lr": [5e-4], "cap_quantile": [0.75], "instance_memory": [3], "num_per_sample": [16]}]}'
two_seed_round partial "$G19"
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record

# --- Eighth session: six more attempts at the full-request step, each on both selection
# seeds (training data and validation splits of seeds 0 and 1; aligned score, mean over indoor
# and street of both seeds; the preset scores 1.745 at 40 steps). None was selected: the
# presets and memorising_selection.json are unchanged.
# 20. depth forgetting on the depth-weighted absolute error (capped_depth_weighted_ascent; the
#     test split's street seed 2 had shown the forget pairs' relative depth error overshooting):
#     aligned 2.42 (Adam 1e-3) / 2.60 (1.5e-3). On street seed 0 the forget pairs' relative
#     error stays 6% below the original's validation level (preset: 5% above) and the validation
#     depth error rises 4.5% (preset 2.4%).
two_seed_round full '{"interference_aware": [{"lr": [1e-3, 1.5e-3], "cap_quantile": ["rank"],
  "forget_objective": [{"depth": "capped_depth_weighted_ascent"}]}]}'
# 21. a linear learning-rate warm-up (a fresh Adam state moves every coordinate by ~lr at
#     first; retain descent alone at Adam 1e-3 raised the street validation depth error by 3.6%
#     after 10 steps, 0.7% after 40): aligned 1.93 (10 steps of warm-up) / 1.97 (20).
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "cap_quantile": ["rank"],
  "warmup_steps": [10, 20]}]}'
# 22-23. the task projection in full requests with the current step (rank-matched caps,
#     memory 5): every task's subspace protected ("all") 1.98, each target task's forget
#     gradient off the other tasks' subspaces ("others") 2.04 at 1e-3, 2.45 / 2.65 at 1.5e-3 /
#     2e-3: it still removes forget signal faster than it removes interference.
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "cap_quantile": ["rank"],
  "task_projection": [true], "protect": ["all", "others"]}]}'
two_seed_round full '{"interference_aware": [{"lr": [1.5e-3, 2e-3], "cap_quantile": ["rank"],
  "task_projection": [true], "protect": ["others"]}]}'
# 24. the sign-aware instance projection with the current step: 3.04; a smaller forget weight,
#     alpha 0.75: 1.87 (lower validation UIS on street, 0.81 / 0.74 against 1.21 / 0.98, but a
#     higher proxy score on both benchmarks).
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "cap_quantile": ["rank"],
  "instance_projection": ["nonconflicting"]}, {"lr": [1e-3], "cap_quantile": ["rank"],
  "alpha": [0.75]}]}'
# 25. a weaker retain descent: retain_weight 0.5 scores 2.79, and 0 wrecks the model (aligned
#     90-109): with Adam the retain term is what keeps the step's scale sane once most forget
#     pairs sit at their caps (Adam rescales the few remaining forget gradients to full-size
#     steps). More instance memory does not fit: (memory + 1) x (32 + 8) rows must stay within
#     the solver's 256 constraints, so 5 is the most with 32 per-sample rows.
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "cap_quantile": ["rank"],
  "retain_weight": [0.0, 0.5]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# 26. the forget direction also projected off each task's loss gradient on a held-out batch
#     (unseen_constraints.py, an experiment outside the library; its own output directories,
#     so it stays out of the selection). Aligned at 40 steps, mean of indoor and street of both
#     seeds: 1.755 against the preset's 1.745, although its validation UIS is optimistic (the
#     constraints come from the validation instances): the validation depth error still rises
#     2.5% / 3.3% on street (preset 2.4% / 3.5%).
two_seed_round full '{"_unseen_constrained": [{"lr": [1e-3], "optimizer": ["adam"],
  "alpha": [1.0], "grad_clip": [5.0], "cap_quantile": ["rank"], "cap_reference": ["held_out"],
  "task_projection": [false], "instance_projection": ["orthogonal"], "num_per_sample": [32],
  "instance_memory": [5], "unseen_every": [5]}]}' \
  benchmarks/results/unlearning/unseen_constraints.py _unseen_constrained runs/unseen_constraints_seed

# --- Ninth session.
# 27. the model's outputs on held-out *inputs* anchored to the original's (held_out_anchor.py,
#     an experiment outside the library: anchor_weight x each task's distance between current
#     and original outputs on 16 of the even-position held-out rows, added to the update).
#     Seed 0 only: it slows forgetting more than it keeps the unseen-data scores (street
#     validation depth error +1.9% at weight 1, with the forget pairs' depth error still 12%
#     below the unseen level); aligned at 40 steps 1.72 (weight 0.1), 1.89 (0.3), 3.0+ (1, 3)
#     against the preset's 1.56 on seed 0, so it was not run on seed 1.
for benchmark in indoor street; do
  .venv/bin/python benchmarks/results/unlearning/held_out_anchor.py --tune --seeds 0 \
    --recipe memorising --output-dir runs/held_out_anchor_seed0 --benchmarks "$benchmark" \
    --requests full --methods _held_out_anchor --checkpoints 20,30,40 --method-max-steps 40 \
    --grid '{"_held_out_anchor": [{"lr": [1e-3], "optimizer": ["adam"], "alpha": [1.0],
      "grad_clip": [5.0], "cap_quantile": ["rank"], "cap_reference": ["held_out"],
      "task_projection": [false], "instance_projection": ["orthogonal"], "num_per_sample": [32],
      "instance_memory": [5], "anchor_weight": [0.1, 0.3, 1.0, 3.0]}]}'
done
# 28. Adam's eps and beta2 (the grid without "lr" also crossed the default --lrs 1e-3, 3e-3,
#     1e-2; 1e-3 is the preset's). Seed 0, full: eps 1e-6 / 1e-5 / 1e-4 aligned 1.55 / 1.53 /
#     1.61, beta2 0.99 / 0.9 1.56 / 1.88 (preset 1.56). eps 1e-5 and 1e-6 on seed 1 as well:
#     eps 1e-5 is lower than the preset on all four runs, two-seed aligned 1.703 against 1.745,
#     and is selected (presets.py). Partial requests at the preset's 3e-4: eps 1e-5 0.345 / 0.208
#     against 0.334 / 0.206 (seeds 0 / 1): not taken. (As run, the seed-1 grids also left out
#     "lr", so they too crossed 1e-3, 3e-3 and 1e-2, and a first partial attempt without "lr"
#     ran eps 1e-6 / 1e-5 at those rates only; every such run is in the grid CSVs and none comes
#     near the selected ones.)
.venv/bin/python benchmarks/unlearning_eval.py --tune --seeds 0 --recipe memorising \
  --requests full --methods interference_aware --checkpoints 20,30,40 --method-max-steps 40 \
  --grid '{"interference_aware": [{"adam_eps": [1e-6, 1e-5, 1e-4]}, {"adam_beta2": [0.99, 0.9]}]}'
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "adam_eps": [1e-6, 1e-5]}]}'
two_seed_round partial '{"interference_aware": [{"lr": [3e-4], "adam_eps": [1e-5]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# 29. partial requests, two settings never tried there: the orthogonal instance projection (the
#     full-request preset's) 0.349 / 0.208 and a heads' learning rate 3x / 0.3x the trunk's
#     (head_lr_scale) 0.301 / 0.323 and 0.395 / 0.304, against the preset's 0.334 / 0.206
#     (aligned, seeds 0 / 1; two-seed means 0.279, 0.312, 0.350 vs 0.270): none taken.
two_seed_round partial '{"interference_aware": [{"lr": [3e-4], "instance_projection": ["orthogonal"]},
  {"lr": [3e-4], "head_lr_scale": [0.3, 3.0]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# 30. full requests with the round-28 preset: a forget batch of 32 instead of 16 (1.96 / 1.89)
#     and a heads' learning rate 0.3x / 3x the trunk's (1.82 / 1.64 and 2.13 / 2.21), against the
#     preset's 1.53 / 1.87 (aligned, seeds 0 / 1; two-seed means 1.92, 1.73, 2.17 vs 1.70):
#     none taken.
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "forget_batch_size": [32]},
  {"lr": [1e-3], "head_lr_scale": [0.3, 3.0]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# 31. the neighbours of the selected eps: 3e-6 1.55 / 1.91, 3e-5 1.54 / 1.93 (seeds 0 / 1;
#     two-seed 1.73 / 1.74 against 1.70 for 1e-5 and 1.745 for PyTorch's 1e-8): eps 1e-5 stays
#     selected, but its margin (0.04) is of the size of the differences between neighbouring
#     values, i.e. within the selection's noise.
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "adam_eps": [3e-6, 3e-5]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# 32. partial requests with the unbounded segmentation objectives instead of the capped ascent:
#     mean_target 4.55 / 3.79, uniform 3.69 / 4.09 (aligned, seeds 0 / 1; the preset 0.334 /
#     0.206): without a cap 40 steps push the forget pairs far past the unseen-data level.
two_seed_round partial '{"interference_aware": [{"lr": [3e-4],
  "forget_objective": ["mean_target", "uniform"]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record

# --- Tenth session.
# 33-34. one instance constraint per retained (instance, task) pair (instance_rows=
#     "instance_task": no retained *pair*'s loss rises to first order; per-instance rows only
#     bound each instance's sum over tasks, and on the test split the partial step still
#     lowers the target task's test mIoU by ~0.6%). T times the rows, so less memory fits the
#     solver's 256 constraints. Aligned, seeds 0 / 1, two-seed mean; the partial preset 0.334 /
#     0.206, 0.270:
#       partial, memory 2                        0.347 / 0.182, 0.264 (indoor 40 steps 34.4 s)
#       partial, memory 3, 4 coupled rows        0.338 / 0.191, 0.264 (30.2 s)
#       partial, memory 3, 8 + 4 rows            0.370 / 0.181, 0.276 (26.2 s)
#       control: per-instance rows, memory 2     0.340 / 0.201, 0.270 (19.6 s, same load)
#       full, memory 3, 16 rows (x 3 tasks)      1.935 / 1.826, 1.880 (preset 1.53 / 1.87, 1.70)
#     Not taken: on partial requests the best is 0.006 below the preset, the size of the
#     differences between neighbouring settings, and costs 1.25-1.75x the step's wall time
#     (one forward and T backward passes per instance), which at the preset's back-to-back
#     ratio (0.124 / 0.122) leaves no room under the 15% target; on full requests the finer
#     orthogonal projection removes more forget signal than interference. The instance_task
#     runs write to their own directories (runs/instance_rows_seed<s>; their scores in
#     instance_rows_grid.csv), outside the selection, as the time budget excludes them; the
#     control is an ordinary setting and joins the selection grids. (In the tenth session they
#     ran in one grid with the control, into the selection's directories, and their records
#     were then moved to runs/instance_rows_seed<s>; the commands below give that layout.)
two_seed_round partial '{"interference_aware": [{"lr": [3e-4], "instance_memory": [2]}]}'
two_seed_round partial '{"interference_aware": [{"lr": [3e-4], "instance_rows": ["instance_task"],
  "instance_memory": [2]}, {"lr": [3e-4], "instance_rows": ["instance_task"], "instance_memory": [3],
  "num_coupled_per_sample": [4]}, {"lr": [3e-4], "instance_rows": ["instance_task"],
  "num_per_sample": [8], "num_coupled_per_sample": [4]}]}' \
  benchmarks/unlearning_eval.py interference_aware runs/instance_rows_seed
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "instance_rows": ["instance_task"],
  "instance_memory": [3], "num_per_sample": [16]}]}' \
  benchmarks/unlearning_eval.py interference_aware runs/instance_rows_seed
out_of_selection_csv runs/instance_rows_ benchmarks/results/unlearning/instance_rows_grid.csv
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# 35. the retain side of the partial step (on the test split it still lowers the target task's
#     test mIoU by ~0.6%; on the selection data the preset lowers the validation mIoU by 0.2%
#     while fine-tuning alone at the same Adam 3e-4 leaves it within +-0.2%, so the loss comes
#     from the forget step, not from a fresh Adam state): retain_weight 1.5 / 2 (0.308 / 0.351:
#     less damage, -0.08% / -0.10% on indoor seed 0, but less forgetting) and a retain batch of
#     64 instead of 32 (30 steps 0.263, 40 steps 0.285; two-seed aligned, the preset 0.270):
#     selected, the new partial preset (64 rows at 30 steps cost about what 32 at 40 did:
#     19-25 s per run against 20-24 s for the same load). Its margin, 0.007, is within the
#     selection's noise, as round 31 showed for eps. Full requests: retain_weight 1.5 / 2
#     1.88 / 2.33 (the preset 1.70).
two_seed_round partial '{"interference_aware": [{"lr": [3e-4], "retain_weight": [1.5, 2.0]},
  {"lr": [3e-4], "retain_batch_size": [64]}]}'
two_seed_round full '{"interference_aware": [{"lr": [1e-3], "retain_weight": [1.5, 2.0]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# 36. full requests with retain batches of 64 (the round-35 change of the partial step), at 20
#     and 30 steps only (40 would not fit the time target with the extra batched rows): 30
#     steps 2.185 (2.222 / 3.196 indoor, 1.649 / 1.674 street; the preset 1.70). Not taken.
CHECKPOINTS=20,30 two_seed_round full '{"interference_aware": [{"lr": [1e-3],
  "retain_batch_size": [64]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# 37. larger retain batches for the partial step, at 20 / 30 steps: 96 rows 0.306 / 0.245, 128
#     rows 0.299 / 0.260 (two-seed aligned; the preset, 64 rows at 30 steps, 0.263; the tenth
#     session's note had the two 20-step scores swapped). 96 rows at
#     30 steps scored lowest but do not fit the time target: back to back (the command below,
#     seed 0, 1 thread, load 0.81 -> 1.00) the variant took 23.3 / 28.9 s against the preset's
#     18.7 / 21.1 s, 0.168 / 0.174 of retraining (139.1 / 165.6 s). Not taken; these runs write
#     to their own directories (runs/retain_batch_seed<s>; scores in retain_batch_grid.csv),
#     outside the selection, as the time budget excludes them. (In the tenth session they ran
#     into the selection's directories and their records were moved there afterwards.)
CHECKPOINTS=20,30 two_seed_round partial '{"interference_aware": [{"lr": [3e-4],
  "retain_batch_size": [96, 128]}]}' benchmarks/unlearning_eval.py interference_aware \
  runs/retain_batch_seed
out_of_selection_csv runs/retain_batch_ benchmarks/results/unlearning/retain_batch_grid.csv partial
.venv/bin/python benchmarks/unlearning_time.py --recipe memorising --repeats 2 --requests partial \
  --variant '{"retain_batch_size": 96}'
# Per-benchmark selection, a forecast on the selection data (no tuning run): every method's
# setting picked on each benchmark alone. The method against the best baseline (two-seed
# aligned): indoor full 0.70x, street full 0.79x, indoor partial 0.91x, street partial 1.41x;
# with the joint picks 0.69x / 0.80x / 0.88x / 1.43x. Not pursued.
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --per-benchmark --output-dir runs/unlearning_eval_memorising_two_seeds
# --- Eleventh session.
# 38. 96 retain rows at 25 steps (between round 37's 20 and 30): 0.258 two-seed aligned
#     (0.404 / 0.251 indoor, 0.246 / 0.130 street) against the round-35 preset's 0.263, a margin
#     within the selection's noise. Timed back to back first (seed 0, 1 thread, load
#     0.17 -> 1.00): 20.3 / 24.0 s against retraining's 149.9 / 169.2 s, 0.136 / 0.142 (the
#     preset in the same run 19.8 / 21.5 s, 0.132 / 0.127): inside the 15% target, so by the
#     selection rule the new partial preset. (Run first into runs/retain_batch_seed<s>, outside
#     the selection, until its time was known; then into the selection's directories with the
#     same results.)
.venv/bin/python benchmarks/unlearning_time.py --recipe memorising --repeats 2 --requests partial \
  --variant '{"retain_batch_size": 96, "steps": 25}'
CHECKPOINTS=25 two_seed_round partial '{"interference_aware": [{"lr": [3e-4],
  "retain_batch_size": [96]}]}'
select_over_two_seeds
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --grid-csv benchmarks/results/unlearning/memorising_grid.csv   # the seed-0 record
# --- Twelfth session: the incumbent rule, decided before any further round (no round run yet).
# From round 39 on a setting replaces a preset only if its aligned score is lower on every one
# of the four selection runs (two benchmarks x two seeds): `--incumbent-rule`. On the past
# rounds' selection data it takes round 28 (4 of 4 runs lower) and refuses rounds 35 and 38
# (2 of 4 each); the presets stay as they are (the rule came after their test results).
# Every round from 39 on selects with: select_over_two_seeds --incumbent-rule
# --- Thirteenth session.
# 39. partial requests: the model's outputs on held-out *inputs* anchored to the original's
#     (round 27's held_out_anchor.py, tried then on full requests only). Why on partial
#     requests: what is left of the partial UIS is mostly the target task's change on unseen
#     data (round 35: the preset lowers the validation mIoU by ~0.2%, fine-tuning alone does
#     not), while the forget pairs already reach, or pass, the unseen level; a restoring term on
#     unseen inputs acts on that change directly, and the slower forgetting that made it lose on
#     full requests has slack here. Decided before any result: two candidates (weights 0.3 and
#     1; 16 anchors per step from the even-position held-out rows) against a control at weight 0
#     in the same script, every other setting the partial preset's, 25 steps; the validation UIS
#     of all three scored on the odd-position rows only (--validation-rows odd), so no candidate
#     is scored on instances it anchored. The incumbent rule decides (lower aligned score than
#     the control on all four selection runs); with two candidates the chance that one passes by
#     luck is about 12%, which the note reports. Own output directories, outside the selection.
#     Result (thirteenth session; models retrained on this machine, so the control's scores
#     differ from the preset's records above): aligned, indoor s0 / s1, street s0 / s1 --
#       control (weight 0)  0.579 / 0.218 / 0.178 / 0.198   mean 0.294
#       weight 0.3          0.661 / 0.242 / 0.142 / 0.193   lower on 2 of 4: refused
#       weight 1            0.863 / 0.512 / 0.308 / 0.212   lower on 0 of 4: refused
#     On indoor the anchor worsens even the validation UIS it targets (seed 0: 0.467 -> 0.546
#     -> 0.679): the forget pairs stay above the unseen level longer than the test change
#     shrinks, as on full requests (round 27). 15.1-17.0 s per run, +0.7-1.2 s for the anchor.
ANCHOR_PARTIAL='{"_held_out_anchor": [{"lr": [3e-4], "optimizer": ["adam"], "alpha": [1.0],
  "grad_clip": [1.0], "cap_quantile": ["rank"], "cap_reference": ["held_out"],
  "instance_memory": [3], "refresh_every": [10], "retain_batch_size": [96],
  "anchor_weight": [0.0, 0.3, 1.0]}]}'
SCRIPT_ARGS="--validation-rows odd" CHECKPOINTS=25 two_seed_round partial "$ANCHOR_PARTIAL" \
  benchmarks/results/unlearning/held_out_anchor.py _held_out_anchor runs/anchor_partial_seed
out_of_selection_csv runs/anchor_partial_ benchmarks/results/unlearning/anchor_partial_grid.csv partial
# 40. partial requests: the update confined to forget-specific weights (forget_specific_mask.py,
#     an experiment outside the library: only entries where the forget pairs' loss gradient is
#     large against the retain data's move; SalUn-style whole-update mask, but scored by that
#     ratio, not by the forget gradient alone). Why: rounds 26, 27 and 39 tried to keep the
#     unseen-data change down with held-out gradients or outputs and lost forgetting with it; a
#     mask acts on where the step moves instead. Decided before any result: two candidates
#     (mask_fraction 0.1 and 0.3) against a control at 1 (same set-up passes, no mask) in the
#     same script, every other setting the partial preset's, 25 steps, all validation rows (no
#     run uses held-out data beyond the preset's caps); the incumbent rule decides.
#     Result (thirteenth session): aligned, indoor s0 / s1, street s0 / s1 --
#       control (fraction 1)  0.437 / 0.190 / 0.195 / 0.110   mean 0.233
#       fraction 0.3          0.359 / 0.196 / 0.127 / 0.116   lower on 2 of 4: refused
#       fraction 0.1          0.470 / 0.311 / 0.158 / 0.107   lower on 2 of 4: refused
#     The 0.3 mask has the lower mean (0.200, -14%), which the rule before round 39 would have
#     taken; it loses on both seed-1 runs, and its retrain gap on the selection data rises on
#     seed 0 (indoor 1.42 -> 1.77, street 0.24 -> 0.37). Runs take 14-17 s (the control 16-19).
#     The control reproduces round 39's control exactly (the same single set-up draw).
MASK_PARTIAL='{"_forget_specific_mask": [{"lr": [3e-4], "optimizer": ["adam"], "alpha": [1.0],
  "grad_clip": [1.0], "cap_quantile": ["rank"], "cap_reference": ["held_out"],
  "instance_memory": [3], "refresh_every": [10], "retain_batch_size": [96],
  "mask_fraction": [1.0, 0.3, 0.1]}]}'
CHECKPOINTS=25 two_seed_round partial "$MASK_PARTIAL" \
  benchmarks/results/unlearning/forget_specific_mask.py _forget_specific_mask runs/forget_mask_seed
out_of_selection_csv runs/forget_mask_ benchmarks/results/unlearning/forget_mask_grid.csv partial
# 41. full requests: the heads refitted on retain data after the forget steps (head_refit.py,
#     an experiment outside the library first; now `head_refit_steps` of every step-based
#     method). Why: on full requests what is left of the street UIS is mostly the test split's
#     change, which the forget steps cause by moving the trunk (item 8); constraints and anchors
#     on held-out data (rounds 26, 27) slowed forgetting more than they kept the unseen scores.
#     Refit steps move the heads alone, by retain descent, the trunk's learning rate 0, the
#     optimizer and its state continuing; no refit step sees a forget pair. Decided before any
#     result: two candidates, 5 and 10 refit steps after the preset's 40 (checkpoints 45 and 50
#     of one 50-step run with refit_from 40), against the control in the same run (checkpoint
#     40: the preset itself, the same draws); the incumbent rule decides, and among candidates
#     that pass it, the lower two-seed mean (decided after the results showed both passing: a
#     tie-break the rule did not fix in advance).
#     Result (twenty-sixth session; models retrained on this session's machine): aligned,
#     indoor s0 / s1, street s0 / s1 --
#       control (40 steps)   2.129 / 2.456 / 1.697 / 1.684   mean 1.992
#       5 refit steps        1.627 / 2.054 / 1.411 / 1.453   mean 1.636   lower on 4 of 4
#       10 refit steps       1.559 / 2.054 / 1.517 / 1.333   mean 1.616   lower on 4 of 4: taken
#     The selection data's retrain gap fell on all four runs (2.99 / 3.28 / 1.78 / 1.11 ->
#     2.58 / 2.49 / 1.61 / 0.61 with 10 steps). The library's head_refit_steps = 10 after 40
#     steps gives the experiment's 50-step model bit for bit (checked on street seed 0, 12 + 4
#     steps). With two candidates the chance that one passes the rule by luck is about 12%.
REFIT_FULL='{"_head_refit": [{"lr": [1e-3], "optimizer": ["adam"], "adam_eps": [1e-5],
  "alpha": [1.0], "grad_clip": [5.0], "cap_quantile": ["rank"], "cap_reference": ["held_out"],
  "task_projection": [false], "instance_projection": ["orthogonal"], "num_per_sample": [32],
  "instance_memory": [5], "refit_from": [40]}]}'
CHECKPOINTS=40,45,50 two_seed_round full "$REFIT_FULL" \
  benchmarks/results/unlearning/head_refit.py _head_refit runs/head_refit_seed
out_of_selection_csv runs/head_refit_ benchmarks/results/unlearning/head_refit_grid.csv full
# --- Twenty-seventh session.
# 42. full requests: the refit steps moving the trunk too (head_refit.py's refit_trunk_lr_scale:
#     plain retain descent on the whole model, the trunk at that fraction of its learning rate),
#     and a longer heads-only refit. Why: on the test split after round 41 the street full UIS
#     is still 0.80x OrthoGrad's, and what is left of it is mostly the test split's change,
#     which the forget steps cause by moving the trunk; the heads alone can follow the moved
#     features but not move them back, and retain descent on the trunk can (it sees no forget
#     pair, so the forget pairs come back only as far as unseen data would). Decided before any
#     result: three candidates against the control in the same runs (refit scale 0, checkpoint
#     50: the round-41 preset itself, the same draws): heads alone for 20 refit steps (scale 0,
#     checkpoint 60), the trunk at 0.3 of its rate for 10 refit steps (checkpoint 50) and for
#     20 (checkpoint 60). The incumbent rule decides (lower aligned score than the control on
#     all four selection runs); among candidates that pass, the lower two-seed mean. With three
#     candidates the chance that one passes by luck is about 18%.
TRUNK_REFIT_FULL='{"_head_refit": [{"lr": [1e-3], "optimizer": ["adam"], "adam_eps": [1e-5],
  "alpha": [1.0], "grad_clip": [5.0], "cap_quantile": ["rank"], "cap_reference": ["held_out"],
  "task_projection": [false], "instance_projection": ["orthogonal"], "num_per_sample": [32],
  "instance_memory": [5], "refit_from": [40], "refit_trunk_lr_scale": [0.0, 0.3]}]}'
CHECKPOINTS=50,60 two_seed_round full "$TRUNK_REFIT_FULL" \
  benchmarks/results/unlearning/head_refit.py _head_refit runs/trunk_refit_seed
out_of_selection_csv runs/trunk_refit_ benchmarks/results/unlearning/trunk_refit_grid.csv full
#     Result (twenty-seventh session; this machine's models, as round 41's): aligned, indoor
#     s0 / s1, street s0 / s1 --
#       control (10 refit steps, the preset)  1.559 / 2.054 / 1.517 / 1.333   mean 1.616
#       heads alone, 20 refit steps           1.572 / 1.921 / 1.344 / 1.298   mean 1.534   lower on 3 of 4: refused
#       trunk at 0.3, 10 refit steps          1.594 / 1.923 / 1.211 / 1.338   mean 1.516   lower on 2 of 4: refused
#       trunk at 0.3, 20 refit steps          1.290 / 1.701 / 1.133 / 1.493   mean 1.405   lower on 3 of 4: refused
#     The control reproduces round 41's 10-step scores exactly. None passes the rule: each loses
#     on at least one run (street seed 1 for the trunk, indoor seed 0 for the longer heads-alone
#     refit), though every mean is lower (the 20-step trunk refit by 13%, which the rule before
#     round 39 would have taken). Retrain gap on the selection data, control -> trunk 0.3 x 20:
#     2.58 / 2.49 / 1.61 / 0.61 -> 2.18 / 2.49 / 1.38 / 1.35. The preset stays. 132 s in all.
# 43. partial requests: the heads refitted after the forget steps, as round 41 did for full
#     requests (head_refit.py, refit_trunk_lr_scale 0). Why: what is left of the partial UIS
#     is mostly the target task's change on unseen data (round 35), which the trunk's move
#     causes; on full requests the refit took back part of that change (round 41). Decided
#     before any result: two candidates, 5 and 10 refit steps after the partial preset's 25
#     (checkpoints 30 and 35 of one 35-step run with refit_from 25), against the control in the
#     same run (checkpoint 25: the preset itself, the same draws); the incumbent rule decides,
#     among candidates that pass it the lower two-seed mean; a candidate that passes must then
#     also keep the time target back to back (its refit steps run 96-row retain batches).
REFIT_PARTIAL='{"_head_refit": [{"lr": [3e-4], "optimizer": ["adam"], "alpha": [1.0],
  "grad_clip": [1.0], "cap_quantile": ["rank"], "cap_reference": ["held_out"],
  "instance_memory": [3], "refresh_every": [10], "retain_batch_size": [96],
  "refit_from": [25]}]}'
CHECKPOINTS=25,30,35 two_seed_round partial "$REFIT_PARTIAL" \
  benchmarks/results/unlearning/head_refit.py _head_refit runs/refit_partial_seed
out_of_selection_csv runs/refit_partial_ benchmarks/results/unlearning/refit_partial_grid.csv partial
#     Result (twenty-seventh session; this machine's models): aligned, indoor s0 / s1, street
#     s0 / s1 --
#       control (the preset, 25 steps)  0.531 / 0.354 / 0.169 / 0.176   mean 0.307
#       5 refit steps                   0.468 / 0.295 / 0.153 / 0.187   mean 0.276   lower on 3 of 4: refused
#       10 refit steps                  0.565 / 0.387 / 0.191 / 0.180   mean 0.331   lower on 0 of 4: refused
#     Retrain gap on the selection data: 1.26 / 1.43 / 0.58 / 1.63 (control), 1.42 / 1.18 /
#     0.57 / 1.65 (5 steps), 1.61 / 1.39 / 0.64 / 1.64 (10 steps). Five refit steps cost about
#     2.4 s per run here (two runs side by side), about 10% of the run: over the time target's
#     slack had one passed. The preset stays. 73 s in all.

# --- Thirty-sixth session (~1 h on 2 cores, AMD EPYC): the new `scrub` baseline, selected as
# every baseline was (raw output: scrub_rounds44-45.log; the shortlist's scores on both seeds:
# scrub_grid.csv).
# 44. seed 0: Adam learning rates x forget (max) steps; then lower rates with fewer forget steps
#     (the first grid's lowest rate already sat at the untouched model's score or above it).
"${EVAL[@]}" --methods scrub --checkpoints 10,20,30,40,60 \
  --grid '{"scrub": {"lr": [1e-4, 3e-4, 1e-3], "optimizer": ["adam"], "forget_steps": [5, 10, 20]}}'
"${EVAL[@]}" --methods scrub --checkpoints 5,10,20,30,40 \
  --grid '{"scrub": {"lr": [1e-5, 3e-5], "optimizer": ["adam"], "forget_steps": [2, 5]}}'
# 45. the shortlist on seed 1, then the final pick by the aligned score over both seeds.
.venv/bin/python benchmarks/unlearning_eval.py --tune --seeds 1 --recipe memorising \
  --methods scrub --checkpoints 10,20,30,40,60 \
  --grid '{"scrub": {"lr": [1e-4, 3e-4], "optimizer": ["adam"], "forget_steps": [5, 10]}}'
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select \
  --select-score aligned --methods scrub --grid-csv benchmarks/results/unlearning/scrub_grid.csv

# --- Round 46 (the Intel Xeon machine of rounds 41-43; its models): a fair round for the two
# strongest baselines. Until here NegGrad+'s and OrthoGrad's grids were learning rate x step
# budget x optimizer only, their other settings at their defaults, while the method was tuned
# over many knobs; this round searches their own remaining knobs under the same protocol
# (training data and validation splits of seeds 0 and 1 only; the test split untouched).
# Decided before any result: every knob at the preset's learning rate with Adam (the presets'
# optimizer), budgets 10-60 steps scored in one run; NegGrad+ forget_weight 0.25 / 0.5 (its
# default) / 1 crossed with retain_batch_size 32 / 96, OrthoGrad forget_weight 0.5 / 1 / 2 and
# num_per_sample 16 / 32 / 64 one at a time (64 with retain batches of 64: the rows are the
# first num_per_sample of the retain batch, so 64 of a batch of 32 would be 32), grad_clip 1
# (default 5) for both, and head_refit_steps 10 after the preset's own budget only (60 / 40
# steps: a refit run is not a prefix of a longer one, so each budget costs a run of its own).
# Cut for time: no crossing of OrthoGrad's knobs, no learning rate around the new knobs, no
# budget past 60. Seed 0's grid ranked by the proxy score (mean of indoor and street, each
# setting at its best budget); each method's three best settings per request plus its preset
# then ran on seed 1; the pick by the aligned score over both seeds and the incumbent rule.
# The method's presets ran in the same tuning files, beside (not selected: its presets are
# the incumbents of their own rounds), so the comparison is on the same models.
# Cost (2 cores shared with other work, 1 thread per process, the two benchmarks side by
# side): ~48 min wall, ~79 min of process time, of which ~17 for the nine models seed 0 street
# and seed 1 needed. One scored run (5 budgets, unloaded): NegGrad+ 60 steps 15-17 s, 30-36 s
# with retain batches of 96; OrthoGrad 40 steps 19-27 s, 33-37 s with 64 rows of 64.
# Result, aligned, indoor s0 / s1, street s0 / s1 (the method in the same runs: full 1.559 /
# 2.054 / 1.517 / 1.333, mean 1.616; partial 0.531 / 0.353 / 0.169 / 0.176, mean 0.307) --
#   full, orthograd preset (3e-4, 40 steps)    3.662 / 3.181 / 1.640 / 2.056   mean 2.635
#     64 rows of retain batches of 64, 40       1.663 / 2.139 / 1.412 / 2.003   mean 1.804
#                                               lower on 4 of 4: taken (presets.py)
#   full, neggrad_plus preset (1e-4, 60 steps) 2.812 / 2.406 / 2.773 / 3.697   mean 2.922
#     retain batches of 96, 60                  2.310 / 2.447 / 2.363 / 3.179   mean 2.575
#                                               lower on 3 of 4: refused
#   partial, neggrad_plus preset (1e-4, 60)    0.508 / 0.432 / 0.137 / 0.226   mean 0.326
#     retain batches of 96, 60                  0.505 / 0.298 / 0.170 / 0.301   mean 0.318
#                                               lower on 2 of 4: refused
#   partial, orthograd preset (1e-4, 40)       0.516 / 0.343 / 0.134 / 0.439   mean 0.358
#     64 rows of retain batches of 64, 40       0.475 / 0.361 / 0.154 / 0.367   mean 0.339
#                                               lower on 2 of 4: refused
#     (the best mean of each; every other shortlisted setting and budget is in
#     baseline_knobs_two_seed_grid.csv, proxy scores, and none else passes the rule either.)
#     Three settings x five budgets per method and request reached seed 1, so the chance that
#     one passes the rule by luck is well above the one-candidate 6%; the winner's margins are
#     large on three runs (2.0, 1.0, 0.23) and small on street seed 1 (0.05).
BASELINE_KNOBS_FULL='{"neggrad_plus": [{"lr": [1e-4], "optimizer": ["adam"]},
  {"lr": [1e-4], "optimizer": ["adam"], "forget_weight": [0.25, 1.0]},
  {"lr": [1e-4], "optimizer": ["adam"], "retain_batch_size": [96]},
  {"lr": [1e-4], "optimizer": ["adam"], "forget_weight": [0.25, 1.0], "retain_batch_size": [96]},
  {"lr": [1e-4], "optimizer": ["adam"], "grad_clip": [1.0]}],
  "orthograd": [{"lr": [3e-4], "optimizer": ["adam"]},
  {"lr": [3e-4], "optimizer": ["adam"], "forget_weight": [0.5, 2.0]},
  {"lr": [3e-4], "optimizer": ["adam"], "num_per_sample": [16]},
  {"lr": [3e-4], "optimizer": ["adam"], "num_per_sample": [64], "retain_batch_size": [64]},
  {"lr": [3e-4], "optimizer": ["adam"], "grad_clip": [1.0]}]}'
BASELINE_KNOBS_PARTIAL=${BASELINE_KNOBS_FULL//3e-4/1e-4}  # OrthoGrad's partial preset: 1e-4
K46=(.venv/bin/python benchmarks/unlearning_eval.py --tune --recipe memorising --jobs 1
     --threads 1)
for benchmark in indoor street; do
  ( S0=("${K46[@]}" --seeds 0 --output-dir runs/baseline_knobs_seed0 --benchmarks "$benchmark")
    "${S0[@]}" --requests full --methods neggrad_plus,orthograd --checkpoints 10,20,30,40,60 \
      --grid "$BASELINE_KNOBS_FULL"
    "${S0[@]}" --requests partial --methods neggrad_plus,orthograd --checkpoints 10,20,30,40,60 \
      --grid "$BASELINE_KNOBS_PARTIAL"
    "${S0[@]}" --requests full,partial --methods neggrad_plus --checkpoints 60 \
      --grid '{"neggrad_plus": [{"lr": [1e-4], "optimizer": ["adam"], "head_refit_steps": [10]}]}'
    "${S0[@]}" --requests full --methods orthograd --checkpoints 40 \
      --grid '{"orthograd": [{"lr": [3e-4], "optimizer": ["adam"], "head_refit_steps": [10]}]}'
    "${S0[@]}" --requests partial --methods orthograd --checkpoints 40 \
      --grid '{"orthograd": [{"lr": [1e-4], "optimizer": ["adam"], "head_refit_steps": [10]}]}'
  ) &
done
wait
# The shortlist on seed 1 (seed 0's three best settings of each method and request, by the
# proxy score; the presets first, which also trains seed 1's models).
for benchmark in indoor street; do
  ( S1=("${K46[@]}" --seeds 1 --output-dir runs/baseline_knobs_seed1 --benchmarks "$benchmark"
        --checkpoints 10,20,30,40,60)
    "${S1[@]}" --requests full --methods neggrad_plus,orthograd --grid '{"neggrad_plus": [{"lr":
      [1e-4], "optimizer": ["adam"]}], "orthograd": [{"lr": [3e-4], "optimizer": ["adam"]}]}'
    "${S1[@]}" --requests partial --methods neggrad_plus,orthograd --grid '{"neggrad_plus": [{"lr":
      [1e-4], "optimizer": ["adam"]}], "orthograd": [{"lr": [1e-4], "optimizer": ["adam"]}]}'
    "${S1[@]}" --requests full --methods orthograd --grid '{"orthograd": [
      {"lr": [3e-4], "optimizer": ["adam"], "num_per_sample": [64], "retain_batch_size": [64]},
      {"lr": [3e-4], "optimizer": ["adam"], "forget_weight": [0.5]},
      {"lr": [3e-4], "optimizer": ["adam"], "grad_clip": [1.0]}]}'
    "${S1[@]}" --requests full --methods neggrad_plus --grid '{"neggrad_plus": [
      {"lr": [1e-4], "optimizer": ["adam"], "retain_batch_size": [96]},
      {"lr": [1e-4], "optimizer": ["adam"], "grad_clip": [1.0]}]}'
    "${S1[@]}" --requests full --methods neggrad_plus --checkpoints 60 --grid '{"neggrad_plus": [
      {"lr": [1e-4], "optimizer": ["adam"], "head_refit_steps": [10]}]}'
    "${S1[@]}" --requests partial --methods neggrad_plus,orthograd --grid '{"neggrad_plus": [
      {"lr": [1e-4], "optimizer": ["adam"], "grad_clip": [1.0]},
      {"lr": [1e-4], "optimizer": ["adam"], "retain_batch_size": [96]},
      {"lr": [1e-4], "optimizer": ["adam"], "forget_weight": [1.0]}], "orthograd": [
      {"lr": [1e-4], "optimizer": ["adam"], "num_per_sample": [16]},
      {"lr": [1e-4], "optimizer": ["adam"], "grad_clip": [1.0]},
      {"lr": [1e-4], "optimizer": ["adam"], "num_per_sample": [64], "retain_batch_size": [64]}]}'
  ) &
done
wait
# The method's presets in the same tuning files, beside the baselines.
for seed in 0 1; do
  for benchmark in indoor street; do
    M46=("${K46[@]}" --seeds "$seed" --output-dir "runs/baseline_knobs_seed$seed"
         --benchmarks "$benchmark" --methods interference_aware --method-max-steps 40)
    "${M46[@]}" --requests full --checkpoints 40 --grid '{"interference_aware": [{"lr": [1e-3]}]}'
    "${M46[@]}" --requests partial --checkpoints 25 \
      --grid '{"interference_aware": [{"lr": [3e-4]}]}'
  done
done
# The pick over both seeds (only settings scored on all four files compete), the incumbent rule;
# then the seed-0 record.
mkdir -p runs/baseline_knobs_two_seeds/tuning
cp runs/baseline_knobs_seed0/tuning/*-seed0.json runs/baseline_knobs_seed1/tuning/*-seed1.json \
  runs/baseline_knobs_two_seeds/tuning/
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --incumbent-rule --methods neggrad_plus,orthograd,interference_aware \
  --output-dir runs/baseline_knobs_two_seeds \
  --grid-csv benchmarks/results/unlearning/baseline_knobs_two_seed_grid.csv
cp runs/baseline_knobs_two_seeds/tuning/selected-aligned.json \
  benchmarks/results/unlearning/baseline_knobs_selection.json
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select \
  --methods neggrad_plus,orthograd --output-dir runs/baseline_knobs_seed0 \
  --grid-csv benchmarks/results/unlearning/baseline_knobs_grid.csv   # the seed-0 record

# --- Round 47 (sixty-second session, the same Intel Xeon machine and models as round 46): the
# method given the knob that helped OrthoGrad in round 46. Decided before any result: the
# full-request preset with 64 per-sample rows of retain batches of 64 and instance memory 2
# (3 x 64 = 192 constraint rows, the preset's (5 + 1) x 32), at the preset's 40 steps and, step
# cost matched to the time target, at 25 (each with the preset's 10 refit steps, so one run per
# budget); the preset re-run beside them in the same files as the control (it reproduced round
# 46's aligned scores to every digit); the aligned score over indoor and street, seeds 0 and 1,
# and the incumbent rule. Cost: ~4 min wall, the two benchmarks side by side, models cached.
# Result, aligned, indoor s0 / s1, street s0 / s1, seconds per run --
#   preset (32 rows of 32, memory 5, 40 steps)   1.559 / 2.054 / 1.517 / 1.333   mean 1.616, 18-20 s
#   64 rows of 64, memory 2, 40 steps            1.697 / 1.993 / 1.041 / 1.030   mean 1.440, 28-32 s
#                                                lower on 3 of 4 (not indoor s0): refused; it
#                                                would also take 1.6x the preset's time, about
#                                                0.23 of retraining against the 15% target
#   64 rows of 64, memory 2, 25 steps            1.743 / 2.515 / 1.636 / 1.663   mean 1.889, 19-21 s
#                                                lower on 0 of 4: refused
# (every score and time: method_rows_round47.csv)
GRID_47='{"interference_aware": [{"lr": [1e-3]}, {"lr": [1e-3], "num_per_sample": [64],
  "retain_batch_size": [64], "instance_memory": [2]}]}'
GRID_47_SHORT='{"interference_aware": [{"lr": [1e-3], "num_per_sample": [64],
  "retain_batch_size": [64], "instance_memory": [2]}]}'
for benchmark in indoor street; do
  ( K47=(.venv/bin/python benchmarks/unlearning_eval.py --tune --recipe memorising --jobs 1
         --threads 1 --output-dir runs/method_rows_round47 --benchmarks "$benchmark"
         --requests full --methods interference_aware --method-max-steps 40)
    for seed in 0 1; do
      "${K47[@]}" --seeds "$seed" --checkpoints 40 --grid "$GRID_47"
      "${K47[@]}" --seeds "$seed" --checkpoints 25 --grid "$GRID_47_SHORT"
    done ) &
done
wait
.venv/bin/python benchmarks/unlearning_eval.py --recipe memorising --select --select-score aligned \
  --incumbent-rule --methods interference_aware --requests full \
  --output-dir runs/method_rows_round47

#!/usr/bin/env bash
# ExpCTR end to end: data -> ID-CTR models -> scorer -> PPO (LC) -> ExpCTR-Aug -> PPO (IC) -> eval.
#
#   ./run.sh [--preset smoke|quick|planted|planted-cause|planted12|paper] [--runs-dir DIR] [--rounds N] [--nproc N] [--seed N]
#
# --seed N: the seed of the LLM training draw (stage1_sft, stage2_reward, stage3_rl: the scorer's
# LoRA init, dropout masks, sample order and which samples show their explanation, an echo or no
# text, the rollout prompts' order, every sampled token, PPO's fresh LoRA and minibatch order);
# default 0. The world, its subsets and the ID-CTR models keep
# seed 0, and evaluate.py's bootstrap too, so two seeds are two replicates of the same training on
# the same data, compared on the same test samples [ours].
#
# --nproc N: the training stages (train_ctr, stage1_sft, stage2_reward, stage3_rl) run as
# `torchrun --standalone --nproc-per-node N` (parallel.py: data-parallel training, chunked
# rollouts and explanations with the same files as one process; NCCL on GPUs, gloo on CPU).
#
# Presets are files, presets/<name>.toml (all sizes are [ours]; `python presets.py NAME shell`
# prints what this script reads from one):
#   smoke  tiny random model, synthetic world, a few samples; every step in ~1-2 min -> DIR/smoke/
#   quick  (default) ID-CTR benchmark on FULL MovieLens-100K -> DIR/ml100k-ctr/ (popularity,
#          logreg, deepfm, dcnv2, din), then the LLM pipeline with SmolLM2-135M-Instruct on a seeded
#          MovieLens-100K subset -> DIR/quick/; ~34 min on a 2-core AVX-512 BF16 CPU (bf16;
#          109 on a 2-core AVX2 CPU in fp32)
#   planted  the mechanism on the synthetic planted world (known click causes): ID-CTR models on
#          its full data -> DIR/planted-ctr/, the LLM pipeline on subsets -> DIR/planted/
#          (docs/results-planted.md is one such run)
#   planted-cause  planted with --echo-subsets 0.5 and 16-token explanations (docs/reward-templates.md;
#          one run: docs/results-planted-cause.md, a negative result) -> DIR/planted-cause/
#   planted12  a 12-genre planted world, where naming the cause alone carries nearly all of the
#          click (issue 9, target 5); the scorer reads target-genre echoes -> DIR/planted12/
#          (docs/results-planted12.md)
#   paper  one GPU: larger splits and iteration counts; every option = the scripts' defaults -> DIR/paper/
#
# The schedule (docs/PAPER_NOTES.md §5; file layout in common.py); every line is a command a reader can type,
# and every command skips work that is already finished, so ./run.sh resumes after a kill:
#   0. python data_prep.py   --run-dir R --dataset D [--max-samples split=N ...]
#   1. python train_ctr.py   --run-dir R --model din                       (ID-only backbone)
#   2. python stage2_reward.py --run-dir R --split train,valid,test --tag base   (untuned explainer)
#   3. python stage1_sft.py  --run-dir R                                   (LLM-CTR scorer, LoRA)
#      python stage2_reward.py --run-dir R --probe base                    (reward probe, base policy)
#   4. Phase 1, LC alignment, k = 1..N1:
#        python stage2_reward.py --run-dir R --iter k --lambda-ic 0        (rollouts + r_LC, rl prompts)
#        python stage3_rl.py     --run-dir R --iter k                      (PPO -> policy/iter_k)
#        python stage2_reward.py --run-dir R --probe iter_k                (reward probe, same prompts)
#   5. Phase 2: python stage2_reward.py --run-dir R --split train,valid,test --tag iter_N1
#              python train_ctr.py --run-dir R --model din --text-emb 'R/explanations/iter_N1/{split}.npy'
#                     --init-from R/ctr/din --out-name aug_din_iter_N1      (ExpCTR-Aug)
#   6. Phase 3, IC alignment, k = N1+1..N1+N3:
#        python stage2_reward.py --run-dir R --iter k --lambda-ic L --aug R/ctr/aug_din_iter_N1
#        python stage3_rl.py     --run-dir R --iter k
#      (--rounds N repeats 5-6, each round starting from the latest iteration)
#   7. python stage2_reward.py --run-dir R --split valid,test --tag iter_FINAL
#      python train_ctr.py --run-dir R --model din --epochs 0 --init-from R/ctr/aug_din_iter_N1
#             --text-emb 'R/explanations/iter_FINAL/{split}.npy' --out-name aug_din_iter_N1_on_iter_FINAL
#   8. python stage1_sft.py  --run-dir R --predict none,base,iter_FINAL --split test
#   9. python evaluate.py    --run-dir R
# Per-step wall times go to R/timings.jsonl and are printed.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=quick; RUNS_DIR=runs; ROUNDS=1; NPROC=1; SEED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --runs-dir) RUNS_DIR="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --nproc) NPROC="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see ./run.sh --help)" >&2; exit 2 ;;
  esac
done
source scripts/ensure_venv.sh   # sets $PY and PYTHONPATH
case "$NPROC" in ''|*[!0-9]*|0) echo "error: --nproc $NPROC: expected a whole number >= 1" >&2; exit 2 ;; esac
case "$SEED" in ''|*[!0-9]*|??????????*) echo "error: --seed $SEED: expected a whole number from 0 to 999999999" >&2; exit 2 ;; esac
SEED=$((10#$SEED))   # 007 -> 7: one spelling per seed in run.json
if [ "$NPROC" = 1 ]; then TR=("$PY"); else  # the training stages under torchrun (parallel.py)
  TR=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
fi
# [ours] on a shared CPU, spinning OpenMP threads slow torch down many-fold; sleeping ones do not
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# ---- presets: presets/<name>.toml, one [section] per kind of step (presets.py) ---------------
if [ ! -f "presets/$PRESET.toml" ]; then
  echo "error: --preset $PRESET: no presets/$PRESET.toml (presets: $(cd presets && ls *.toml | sed 's/\.toml$//' | tr '\n' ' '))" >&2
  exit 2
fi
PRESET_SH=$("$PY" presets.py "$PRESET" shell)   # prints the variables below; a bad file stops here
eval "$PRESET_SH"
R="$RUNS_DIR/$RUN_NAME"
DATA=("${WORLD[@]}" "${DATA_ONLY[@]}")   # the LLM run's data; the ID benchmark uses WORLD alone
if [ -f "$R/run.json" ]; then  # resuming: every finished step is skipped, so the seed must match
  OLD_SEED=$("$PY" -c 'import common, sys; print(common.read_json(sys.argv[1]).get("seed", 0))' "$R/run.json")
  if [ "$OLD_SEED" != "$SEED" ]; then  # (a folder made before this option ran seed 0)
    echo "error: --seed $SEED: $R/run.json was run with seed $OLD_SEED (its finished steps would be kept); use another --runs-dir or delete $R" >&2
    exit 2
  fi
fi

# ---- plumbing: timed steps -------------------------------------------------------------------
T_ALL=$(date +%s)
step() {  # step NAME CMD...: run, time, log to $R/timings.jsonl
  local name="$1"; shift
  echo "[run.sh] $name: $*"
  local t0; t0=$(date +%s%N)
  "$@"
  local dt; dt=$(( ($(date +%s%N) - t0) / 1000000 )); dt="$((dt / 1000)).$(( (dt % 1000) / 100 ))"
  mkdir -p "$R"
  printf '{"stage": "run.sh", "step": "%s", "seconds": %s, "time": %s}\n' "$name" "$dt" "$(date +%s)" >> "$R/timings.jsonl"
  printf '[run.sh] %s done in %ss\n' "$name" "$dt"
}
run_json() {  # run_json KEY=VALUE ...: merge into $R/run.json
  "$PY" - "$R/run.json" "$@" <<'EOF'
import json, sys, os, common
path, kv = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
d = common.read_json(path) if os.path.exists(path) else {}
for k, v in kv.items():
    try: d[k] = json.loads(v)
    except ValueError: d[k] = v
common.write_json(path, d)
EOF
}

# ---- 0. ID-CTR benchmark on full MovieLens-100K (quick preset) --------------------------------
if [ "$ID_BENCH" = 1 ]; then
  B="$RUNS_DIR/$BENCH"
  R="$B" step "bench data_prep" "$PY" data_prep.py --run-dir "$B" "${WORLD[@]}"
  for m in "${CTR_MODELS[@]}"; do
    R="$B" step "bench train_ctr $m" "${TR[@]}" train_ctr.py --run-dir "$B" --model "$m"
  done
  "$PY" - "$B" "${CTR_MODELS[@]}" <<'EOF'
import sys, common
B = sys.argv[1]
print(f"\nID-CTR benchmark, full data ({B}):\n| model | test AUC | test LogLoss | train s |\n|---|---|---|---|")
for m in sys.argv[2:]:
    d = common.read_json(f"{B}/ctr/{m}/metrics.json")
    print(f"| {m} | {d['test']['auc']:.4f} | {d['test']['logloss']:.4f} | {d['train_seconds']:.1f} |")
print()
EOF
fi

# ---- 1-3. data, ID backbone, base explanations, scorer -----------------------------------------
mkdir -p "$R"
cp "presets/$PRESET.toml" "$R/preset.toml"   # the settings this run used, beside its outputs
run_json preset="$PRESET" model="$MODEL" n1="$N1" n3="$N3" rounds="$ROUNDS" lambda_ic="$LAMBDA" seed="$SEED"
A=(--run-dir "$R" --model "$MODEL" "${LLM[@]}" --seed "$SEED")   # the LLM stages' options
step "data_prep" "$PY" data_prep.py --run-dir "$R" "${DATA[@]}"
for m in "${CTR_MODELS[@]}"; do
  if [ "$ID_BENCH" = 1 ]; then  # score the full-data model on this run's splits, no training
    step "train_ctr $m (full-data model)" "${TR[@]}" train_ctr.py --run-dir "$R" --model "$m" \
         --epochs 0 --init-from "$RUNS_DIR/$BENCH/ctr/$m"
  else
    step "train_ctr $m" "${TR[@]}" train_ctr.py --run-dir "$R" --model "$m"
  fi
done
step "explanations base" "${TR[@]}" stage2_reward.py "${A[@]}" "${GEN[@]}" --split train,valid,test --tag base
step "scorer sft" "${TR[@]}" stage1_sft.py "${A[@]}" "${SFT[@]}"
# the reward probe: fixed held-out prompts, same K and seed for every policy (the learning curve)
probe() { step "probe $1" "${TR[@]}" stage2_reward.py "${A[@]}" "${GEN[@]}" "${ROLL[@]}" --probe "$1"; }
probe base

ppo_iter() {  # ppo_iter K LAMBDA [AUG]
  local k="$1" lam="$2" aug=(); [ -n "${3:-}" ] && aug=(--aug "$3")
  step "rollouts iter $k" "${TR[@]}" stage2_reward.py "${A[@]}" "${GEN[@]}" "${ROLL[@]}" --iter "$k" \
       --lambda-ic "$lam" "${aug[@]}"
  step "ppo iter $k" "${TR[@]}" stage3_rl.py "${A[@]}" "${PPO[@]}" --iter "$k"
  # the probe after every PROBE_EVERY-th iteration (preset [run] probe_every, default 1), and
  # always after the last LC iteration and the last iteration
  if [ $((k % ${PROBE_EVERY:-1})) = 0 ] || [ "$k" = "$N1" ] || [ "$k" = $((N1 + N3 * ROUNDS)) ]; then
    probe "iter_$k"
  fi
}

# ---- 4. phase 1: LC alignment -------------------------------------------------------------------
for k in $(seq 1 "$N1"); do ppo_iter "$k" 0; done
K=$N1
# ---- 5-6. phase 2 (ExpCTR-Aug) and phase 3 (IC alignment), repeated --rounds times -----------------
AUG=""
for r in $(seq 1 "$ROUNDS"); do
  [ "$N3" -gt 0 ] || break
  step "explanations iter_$K" "${TR[@]}" stage2_reward.py "${A[@]}" "${GEN[@]}" --split train,valid,test --tag "iter_$K"
  AUG="aug_din_iter_$K"
  step "train_ctr $AUG" "${TR[@]}" train_ctr.py --run-dir "$R" --model din \
       --text-emb "$R/explanations/iter_$K/{split}.npy" --init-from "$R/ctr/din" --out-name "$AUG"
  for j in $(seq 1 "$N3"); do ppo_iter $((K + j)) "$LAMBDA" "$R/ctr/$AUG"; done
  K=$((K + N3))
done
# ---- 7-8. final explanations and scorer predictions ------------------------------------------------
step "explanations iter_$K" "${TR[@]}" stage2_reward.py "${A[@]}" "${GEN[@]}" --split valid,test --tag "iter_$K"
AUG_FINAL=""
if [ -n "$AUG" ] && [ "$AUG" != "aug_din_iter_$K" ]; then
  # the ExpCTR-Aug model reading the final (IC-aligned) policy's explanations: what r_IC scored
  AUG_FINAL="${AUG}_on_iter_$K"
  step "train_ctr $AUG_FINAL" "${TR[@]}" train_ctr.py --run-dir "$R" --model din --epochs 0 \
       --init-from "$R/ctr/$AUG" --text-emb "$R/explanations/iter_$K/{split}.npy" --out-name "$AUG_FINAL"
fi
step "scorer predictions" "${TR[@]}" stage1_sft.py "${A[@]}" --predict "none,base,iter_$K" --split "$PRED_SPLITS"
run_json final_tag="iter_$K" aug="${AUG:-null}" aug_final="${AUG_FINAL:-null}"
# ---- 9. evaluation ------------------------------------------------------------------------------
step "evaluate" "$PY" evaluate.py --run-dir "$R"
echo "[run.sh] preset $PRESET finished in $(( $(date +%s) - T_ALL ))s -> $R"

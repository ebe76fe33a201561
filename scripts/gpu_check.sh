#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine (a user's, or ours when one is lent). It installs
# nothing beyond ./test.sh's .venv and stops at the first failure with a one-line reason.
#   1. tests/test_kernels.py without the interpreter: the Triton kernels on CUDA, fp32 and bf16,
#      against the float64 reference and the torch twin (plus every CPU kernel test)
#   2. python -m kernels.bench --device cuda (fp32, bf16): naive vs row loop vs ours, peak
#      torch.cuda.max_memory_allocated and time
#   3. a torchrun smoke: with 2+ GPUs, ./run.sh --preset smoke --nproc 2 (NCCL, one GPU per
#      process); with one GPU it says so and goes on; the dry run launches train_ctr.py on 2 CPU
#      processes (gloo) on the smoke run's data
#   4. ./run.sh --preset gpu-check: the paper preset cut to ~10 minutes (presets/gpu-check.toml)
# and writes every figure, with the GPU's name, to docs/results-gpu.md.
#
#   scripts/gpu_check.sh                  # on a CUDA machine
#   scripts/gpu_check.sh --cpu-dry-run    # every part that can run on a CPU: kernel tests, a
#                                         # minimal benchmark, the smoke preset; report to --out
#   options: --out FILE (default docs/results-gpu.md; dry run: runs/gpu-check-dry.md)
#            --runs-dir DIR (run folders, default runs)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0; OUT=""; RUNS_DIR=runs
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --runs-dir) RUNS_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see scripts/gpu_check.sh --help)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { [ "$DRY" = 1 ] && OUT="$RUNS_DIR/gpu-check-dry.md" || OUT=docs/results-gpu.md; }
source scripts/ensure_venv.sh   # sets $PY and PYTHONPATH
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
LOG=$(mktemp -d)
fail() { echo "[gpu_check] FAILED at $1 (log: $2)" >&2; tail -n 20 "$2" >&2; exit 1; }
part() {  # part NAME LOGFILE CMD...: run, keep the output, stop at the first failure
  local name="$1" log="$2"; shift 2
  echo "[gpu_check] $name: $*"
  local t0; t0=$(date +%s)
  "$@" > "$log" 2>&1 || fail "$name" "$log"
  echo "[gpu_check] $name done in $(( $(date +%s) - t0 ))s"
}

# ---- 0. the machine ------------------------------------------------------------------------------
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu_check] FAILED at device: torch sees no CUDA device (on a CPU machine: --cpu-dry-run)" >&2
  exit 1
fi
read -r DEVICE NGPU < <("$PY" -c "import torch; n = torch.cuda.device_count()
print((torch.cuda.get_device_name(0).replace(' ', '_') if n else 'cpu'), n)")
DEV=$([ "$DRY" = 1 ] && echo cpu || echo cuda)

# ---- 1. kernel tests -------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then  # the CPU half: torch twin, dispatch, the CUDA tests' skip
  part "kernel tests" "$LOG/tests.txt" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py \
       -k "twin or cuda or dispatch or reference"
else
  part "kernel tests" "$LOG/tests.txt" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py
fi
# ---- 2. kernel benchmark ---------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  part "kernel bench" "$LOG/bench.txt" "$PY" -m kernels.bench --quick --device cpu --repeats 1 --max-tflop 0.1
else
  part "kernel bench fp32" "$LOG/bench.txt" "$PY" -m kernels.bench --device cuda --dtype float32
  part "kernel bench bf16" "$LOG/bench_bf16.txt" "$PY" -m kernels.bench --device cuda --dtype bfloat16
fi
# ---- 3. torchrun smoke -----------------------------------------------------------------------
TR=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)
if [ "$DRY" = 1 ]; then  # gloo: needs the smoke run's data (made by part 4 on a fresh folder)
  [ -f "$RUNS_DIR/smoke/data/meta.json" ] || ./run.sh --preset smoke --runs-dir "$RUNS_DIR" > "$LOG/run.txt" 2>&1 \
    || fail "run.sh --preset smoke" "$LOG/run.txt"
  part "torchrun smoke" "$LOG/torchrun.txt" "${TR[@]}" train_ctr.py --run-dir "$RUNS_DIR/smoke" \
       --model din --epochs 1 --out-name torchrun_check --force
  rm -rf "$RUNS_DIR/smoke/ctr/torchrun_check"   # a check, not part of the run
  TORCHRUN="passed: 2 CPU processes (gloo), train_ctr.py on the smoke run's data ($(grep -c 'epoch 1' "$LOG/torchrun.txt" || true) epoch line logged, by rank 0)"
elif [ "$NGPU" -ge 2 ]; then
  part "torchrun smoke" "$LOG/torchrun.txt" ./run.sh --preset smoke --nproc 2 --runs-dir "$RUNS_DIR/torchrun"
  TORCHRUN="passed: ./run.sh --preset smoke --nproc 2 on 2 GPUs (NCCL), $(tail -n 1 "$LOG/torchrun.txt")"
else
  TORCHRUN="not run: one GPU (./run.sh --nproc 2 needs 2; tests/test_parallel.py covers gloo on CPU)"
fi
echo "[gpu_check] torchrun smoke: $TORCHRUN"
# ---- 4. the paper preset, cut ------------------------------------------------------------------
PRESET=$([ "$DRY" = 1 ] && echo smoke || echo gpu-check)
part "run.sh --preset $PRESET" "$LOG/run.txt" ./run.sh --preset "$PRESET" --runs-dir "$RUNS_DIR"

# ---- report ----------------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
"$PY" - "$OUT" "$DEVICE" "$NGPU" "$DRY" "$PRESET" "$RUNS_DIR" "$TORCHRUN" "$LOG" <<'PY'
import sys, platform, torch, common
from pathlib import Path
out, device, ngpu, dry, preset, runs, torchrun, log = sys.argv[1:]
log = Path(log)
tail = lambda f, n: (log / f).read_text().strip().splitlines()[-n:] if (log / f).exists() else []
R = Path(runs) / preset
L = [f"# GPU check{' (CPU dry run)' if dry == '1' else ''}", "",
     f"Produced by `scripts/gpu_check.sh{' --cpu-dry-run' if dry == '1' else ''}`. Device: "
     f"**{device.replace('_', ' ')}** x {ngpu}; torch {torch.__version__}, CUDA "
     f"{torch.version.cuda}, Python {platform.python_version()}.", "",
     "## 1. Kernel tests (`tests/test_kernels.py`)", "", "```", *tail("tests.txt", 8), "```", "",
     "## 2. Kernel benchmark (`python -m kernels.bench`)", ""]
for f in ("bench.txt", "bench_bf16.txt"):
    if (log / f).exists():
        L += ["```", *[l for l in (log / f).read_text().splitlines() if l.strip()][-60:], "```", ""]
L += ["## 3. torchrun smoke", "", torchrun, "", f"## 4. `./run.sh --preset {preset}`", ""]
report = R / "eval" / "report.md"
timings = common.read_jsonl(R / "timings.jsonl") if (R / "timings.jsonl").exists() else []
L += ["| step | seconds |", "|---|---|"] + [f"| {t['step']} | {t['seconds']} |" for t in timings]
L += ["", f"Total {sum(t['seconds'] for t in timings):.0f} s. The run's report "
      f"(`{report}`) follows.", ""]
L += [report.read_text() if report.exists() else "(no report)"]
with common.atomic_path(out) as tmp:
    Path(tmp).write_text("\n".join(L) + "\n")
print(f"[gpu_check] report -> {out}")
PY
rm -rf "$LOG"
echo "[gpu_check] all parts passed on $DEVICE"

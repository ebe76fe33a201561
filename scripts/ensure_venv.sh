# Sourced by run.sh and test.sh: make .venv if missing, (re)install when requirements.txt changed.
# Uses python3.11+ from PATH; set PYTHON=/path/to/python to choose another interpreter.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv"
_stamp="$_venv/.requirements.sha256"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[setup] creating $_venv"
  "${PYTHON:-python3}" -m venv "$_venv"
fi
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[setup] installing requirements.txt into .venv (first time: a few minutes)"
  "$_venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$_venv/bin/python" -m pip install -q -r "$_root/requirements.txt" 2>&1 | grep -v "is ignored" || true
  "$_venv/bin/python" -c "import torch, transformers, peft, triton, gguf, sklearn, tqdm, numba" \
    || { echo "[setup] error: packages failed to install; see pip output above" >&2; exit 1; }
  echo "$_want" > "$_stamp"
fi
PY="$_venv/bin/python"
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"

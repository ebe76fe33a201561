"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's every CPU-runnable part works and writes its
report (on a reused, finished smoke run, so run.sh only re-checks it)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_dry_run_writes_the_report(smoke_run_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(smoke_run_dir, runs / "smoke")
    out = tmp_path / "gpu.md"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run",
                        "--runs-dir", str(runs), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# GPU check (CPU dry run)") and "Device: **cpu**" in text
    for part in ("## 1. Kernel tests", "passed", "## 2. Kernel benchmark", "## 3. torchrun smoke",
                 "passed: 2 CPU processes (gloo)", "## 4. `./run.sh --preset smoke`", "| evaluate |"):
        assert part in text, part
    assert "[gpu_check] all parts passed" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_gpu_check_without_cuda_is_a_one_line_error(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "x.md")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "torch sees no CUDA device" in r.stderr
    assert not (tmp_path / "x.md").exists()

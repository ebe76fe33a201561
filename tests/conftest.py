"""Shared pytest fixtures. `smoke_run_dir` runs `./run.sh --preset smoke` once per session (tiny
random model, synthetic world; ~1-2 min on 2 CPU cores) and returns the run folder."""
import os
import subprocess
import sys
from pathlib import Path

import shutil

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smoke_run_dir(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run(["bash", str(ROOT / "run.sh"), "--preset", "smoke", "--runs-dir", str(runs)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if res.returncode != 0:
        pytest.fail(f"./run.sh --preset smoke failed (rc {res.returncode}):\n"
                    f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return runs / "smoke"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny synthetic run folder (train/valid/test/rl/probe) with a random non-trivial scorer
    adapter of the tiny model; tests copy it before changing anything."""
    import torch

    import data_prep
    import llm
    from common import RunPaths
    root = tmp_path_factory.mktemp("tiny") / "run"
    data_prep.main(["--run-dir", str(root), "--dataset", "synthetic", "--n-users", "60",
                    "--n-items", "40", "--n-interactions", "1500", "--history-len", "4",
                    "--max-samples", "train=12", "--max-samples", "valid=8",
                    "--max-samples", "test=8", "--max-samples", "rl=8",
                    "--max-samples", "probe=3"])
    bundle = llm.LLM("tiny", "float32")
    bundle.attach({"scorer": None})
    torch.manual_seed(0)
    with torch.no_grad():  # a scorer with non-trivial outputs (fresh LoRA has B=0)
        for n, p in bundle.model.named_parameters():
            if "lora_B.scorer" in n:
                p.normal_(0, 0.5)
    bundle.save_adapter("scorer", RunPaths(root).scorer)
    return root

"""Shared pytest fixtures. `smoke_run_dir` runs `./run.sh --preset smoke` once per session (tiny
random model, synthetic world; ~1-2 min on 2 CPU cores) and returns the run folder."""
import os
import subprocess
import sys
from pathlib import Path

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

"""A stage killed with SIGKILL and run again finishes with the same outputs as an uninterrupted
run, and never leaves a half-written output. The kill is real (a separate process, no `finally`
runs): common._failpoint() SIGKILLs the process when its N-th atomic write sits complete in its
temp folder but is not yet renamed into place."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import common
from common import RunPaths
from conftest import ROOT, copy_run

LLM = ["--model", "tiny", "--dtype", "float32"]
ROLL = [*LLM, "--max-new-tokens", "6", "--prompts-per-iter", "3", "--k-samples", "2",
        "--gen-batch", "4", "--fwd-batch", "4"]


def run(script, *args, kill_at=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("EXPCTR_KILL_AT_WRITE", None)
    if kill_at is not None:
        env["EXPCTR_KILL_AT_WRITE"] = str(kill_at)
    res = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    if kill_at is not None:
        assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    else:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def outputs(root: Path, rel: list[str]) -> dict:
    """Bytes of each named output file (folders: every file inside, by relative path)."""
    out = {}
    for r in rel:
        p = root / r
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            out[str(q.relative_to(root))] = q.read_bytes()
    return out


def kill_then_rerun(ref: Path, cut: Path, script: str, args: list, kill_at: int, rel: list[str]):
    """Reference: an uninterrupted run. Then a process killed at its `kill_at`-th atomic write,
    and a rerun of it. All three are fresh processes: a reference run inside pytest's own process
    inherited state from earlier tests and once differed from the rerun in the last bits of every
    PPO LoRA tensor (CI on 0598527), which lr 0.05 made visible."""
    run(script, "--run-dir", ref, *args)
    run(script, "--run-dir", cut, *args, kill_at=kill_at)
    for r in rel:  # nothing half-written in place
        assert not (cut / r).exists() or outputs(cut, [r]) == outputs(ref, [r]), r
    run(script, "--run-dir", cut, *args)
    assert outputs(cut, rel) == outputs(ref, rel)


DATA = ["--dataset", "synthetic", "--n-users", "60", "--n-items", "40", "--n-interactions", "1500",
        "--history-len", "4", "--max-samples", "train=12", "--max-samples", "valid=8",
        "--max-samples", "test=8", "--max-samples", "rl=8", "--max-samples", "probe=3"]


def test_data_prep_killed_midway(tmp_path):
    # write 1 = train.jsonl inside the data folder's temp copy; killed while writing valid.jsonl
    kill_then_rerun(tmp_path / "ref", tmp_path / "cut", "data_prep.py", DATA, 2, ["data"])


def test_train_ctr_killed_midway(tiny_run, tmp_path):
    ref, cut = copy_run(tiny_run, tmp_path / "ref"), copy_run(tiny_run, tmp_path / "cut")
    args = ["--model", "din", "--epochs", "2"]
    kill_then_rerun(ref, cut, "train_ctr.py", args, 2,
                    ["ctr/din/model.pt", "ctr/din/preds_valid.jsonl", "ctr/din/preds_test.jsonl"])


def test_stage2_explanations_killed_midway(tiny_run, tmp_path):
    ref, cut = copy_run(tiny_run, tmp_path / "ref"), copy_run(tiny_run, tmp_path / "cut")
    args = ["--split", "train", "--tag", "base", *LLM, "--max-new-tokens", "5", "--gen-batch", "3",
            "--save-every", "1"]
    # writes 1-2: partial checkpoints after generate batches 1 and 2; killed writing the 3rd
    kill_then_rerun(ref, cut, "stage2_reward.py", args, 3,
                    ["explanations/base/train.jsonl", "explanations/base/train.npy"])
    assert not (cut / "explanations" / "base" / ".train.partial.jsonl").exists()


@pytest.mark.parametrize("mode", [["--iter", "1"], ["--probe", "base"]])
def test_stage2_rollouts_and_probe_killed_midway(tiny_run, tmp_path, mode):
    ref, cut = copy_run(tiny_run, tmp_path / "ref"), copy_run(tiny_run, tmp_path / "cut")
    rel = ["rollouts/iter_1.jsonl"] if mode[0] == "--iter" else ["probe/base.jsonl"]
    kill_then_rerun(ref, cut, "stage2_reward.py", [*mode, *ROLL], 1, rel)


def test_stage1_sft_killed_midway(tiny_run, tmp_path):
    import shutil
    ref, cut = copy_run(tiny_run, tmp_path / "ref"), copy_run(tiny_run, tmp_path / "cut")
    for d in (ref, cut):
        shutil.rmtree(RunPaths(d).scorer)
        for s in ("train", "valid"):  # cheap stand-in explanations (stage2's own tests cover those)
            rows = common.load_split(RunPaths(d), s)
            common.write_jsonl(RunPaths(d).explanations("base", s),
                               ({"uid": r["uid"], "iid": r["iid"], "label": r["label"],
                                 "explanation": "they like it"} for r in rows))
    args = [*LLM, "--epochs", "1", "--batch-size", "4", "--lr", "1e-3"]
    kill_then_rerun(ref, cut, "stage1_sft.py", args, 1, ["scorer/adapter_model.safetensors"])


def test_stage3_rl_killed_midway(tiny_run, tmp_path):
    ref = copy_run(tiny_run, tmp_path / "ref")
    run("stage2_reward.py", "--run-dir", ref, "--iter", "1", *ROLL)
    cut = copy_run(ref, tmp_path / "cut")
    args = ["--iter", "1", *LLM, "--minibatch", "3", "--ppo-epochs", "1", "--lr", "0.05"]
    kill_then_rerun(ref, cut, "stage3_rl.py", args, 1, ["policy/iter_1/adapter_model.safetensors"])

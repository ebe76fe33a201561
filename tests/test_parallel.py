"""More than one process (parallel.py): every training stage under torchrun with gloo on CPU,
2 processes spawned by the test, against the same command run as one plain process.
- rollouts and explanations (with their embeddings): the files of 2 processes are identical to one process's;
- SFT, PPO and CTR training: 2 processes with half of each batch make the same update as one
  process with the whole batch (float tolerance);
- a rank killed midway takes the job down (no hang) and leaves no partial output; the rerun
  finishes with the same files as an uninterrupted run."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import data_prep
from common import RunPaths
from conftest import ROOT, copy_run

LLM = ["--model", "tiny", "--dtype", "float32", "--threads", "1"]
GEN = ["--max-new-tokens", "6", "--gen-batch", "4", "--fwd-batch", "4"]
ROLL = ["--prompts-per-iter", "3", "--k-samples", "2"]


def launch(nproc: int, script: str, *args, env=None, timeout=300):
    """nproc processes under torchrun (--standalone, gloo on CPU), spawned; or, for nproc = 1,
    the stage's main() in this process (the plain one-process path, no torchrun)."""
    if nproc == 1:
        import importlib
        threads = torch.get_num_threads()
        try:
            importlib.import_module(script[:-3]).main([str(a) for a in args])
        finally:
            torch.set_num_threads(threads)
        return subprocess.CompletedProcess(script, 0, "", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    e = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
             **(env or {}))
    return subprocess.run(cmd + [str(ROOT / script), *map(str, args)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"rc {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def pipeline(run: Path, nproc: int) -> None:
    """Explanations (train, valid), rollouts and one PPO step of iteration 1 (the probe shares
    the rollouts' code, sample_and_score)."""
    ok(launch(nproc, "stage2_reward.py", "--run-dir", run, *LLM, *GEN, "--split", "train,valid",
              "--tag", "base", "--save-every", "1"))
    ok(launch(nproc, "stage2_reward.py", "--run-dir", run, *LLM, *GEN, *ROLL, "--iter", "1"))
    ok(launch(nproc, "stage3_rl.py", "--run-dir", run, *LLM, "--iter", "1", "--minibatch", "4",
              "--ppo-epochs", "1"))


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """The same pipeline from the same run folder, once with 1 process and once with 2."""
    d = tmp_path_factory.mktemp("par")
    one, two = copy_run(tiny_run, d / "one"), copy_run(tiny_run, d / "two")
    pipeline(one, 1)
    pipeline(two, 2)
    return one, two


def outputs(run: Path) -> dict[str, bytes]:
    P = RunPaths(run)
    files = [P.explanations("base", s) for s in ("train", "valid")] + \
        [P.embeddings("base", s) for s in ("train", "valid")] + [P.rollouts(1)]
    return {f.name + f.parent.name: f.read_bytes() for f in files}


def test_rollouts_and_explanations_are_identical_with_two_processes(runs):
    one, two = outputs(runs[0]), outputs(runs[1])
    assert one.keys() == two.keys()
    for k in one:
        assert one[k] == two[k], f"{k} differs between 1 and 2 processes"
    # two ranks really took part (and only rank 0 logged): one row per step, nproc 2
    for run, n in zip(runs, (1, 2)):
        rows = [r for r in common.read_jsonl(RunPaths(run).metrics)
                if r["stage"] in ("stage2_reward", "probe")]
        assert len(rows) == 3 and all(r["nproc"] == n for r in rows)


def test_ppo_step_is_the_same_update_with_two_processes(runs):
    a, b = (load_file(RunPaths(r).policy(1) / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys()
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
        moved = max(moved, float(a[k].abs().max()))
    assert moved > 0  # the update did something (lora_B left zero)
    rows = [r for r in common.read_jsonl(RunPaths(runs[1]).metrics) if r["stage"] == "stage3_rl"]
    assert len(rows) == 1 and rows[0]["nproc"] == 2  # rank 0 logs, once


def test_sft_is_the_same_update_with_two_processes(tiny_run, tmp_path):
    """Three steps of batch 4 (the last one of 0 + 4 -> ranks 2/2, 12 rows): full-depth LoRA and
    top-layer LoRA on chunked frozen lower states."""
    for extra in ([], ["--lora-layers", "1"]):
        out = []
        for n in (1, 2):
            r = copy_run(tiny_run, tmp_path / f"sft{n}{len(extra)}")
            ok(launch(n, "stage1_sft.py", "--run-dir", r, *LLM, "--expl-tag", "none", "--epochs", "1",
                      "--batch-size", "4", "--lr", "1e-2", "--lora-dropout", "0", "--eval-batch", "4",
                      *extra))
            out.append(load_file(RunPaths(r).scorer / "adapter_model.safetensors"))
            m = common.read_json(RunPaths(r).scorer / "metrics.json")
            out.append(m["valid_auc_no_expl"])
        (a, auc1), (b, auc2) = out[:2], out[2:]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
        assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
        assert abs(auc1 - auc2) < 1e-9  # valid scored in chunks, gathered: the same AUC


def test_ctr_training_is_the_same_update_with_two_processes(tmp_path):
    r1 = tmp_path / "c1"
    data_prep.main(["--run-dir", str(r1), "--dataset", "synthetic", "--n-users", "60", "--n-items",
                    "40", "--n-interactions", "3000", "--history-len", "5"])
    r2 = copy_run(r1, tmp_path / "c2")
    args = ["--model", "din", "--epochs", "2", "--batch-size", "63", "--dropout", "0", "--threads", "1"]
    for n, r in ((1, r1), (2, r2)):
        ok(launch(n, "train_ctr.py", "--run-dir", r, *args))
    a, b = (torch.load(r / "ctr" / "din" / "model.pt", weights_only=False)["state_dict"]
            for r in (r1, r2))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    m1, m2 = (common.read_json(r / "ctr" / "din" / "metrics.json") for r in (r1, r2))
    assert abs(m1["test"]["auc"] - m2["test"]["auc"]) < 1e-3 and m2["nproc"] == 2


def test_a_killed_rank_stops_the_job_and_leaves_no_partial_output(runs, tiny_run, tmp_path):
    r = copy_run(tiny_run, tmp_path / "k")
    P = RunPaths(r)
    t0 = time.time()
    res = launch(2, "stage2_reward.py", "--run-dir", r, *LLM, *GEN, "--split", "train",
                 "--tag", "base", "--save-every", "1", env={"EXPCTR_KILL_RANK_AT_ROUND": "1:1"})
    assert res.returncode != 0 and time.time() - t0 < 120  # taken down, not hung
    assert not P.explanations("base", "train").exists() and not P.embeddings("base", "train").exists()
    left = [p for p in (r / "explanations").rglob("*") if p.name.endswith(".tmp")]
    assert not left, left
    part = r / "explanations" / "base" / ".train.partial.jsonl"
    assert part.exists() and len(common.read_jsonl(part)) == 8  # round 0: two chunks of 4, saved
    ok(launch(2, "stage2_reward.py", "--run-dir", r, *LLM, *GEN, "--split", "train", "--tag", "base"))
    for f in (P.explanations("base", "train"), P.embeddings("base", "train")):
        assert f.read_bytes() == (RunPaths(runs[0]).root / f.relative_to(r)).read_bytes()

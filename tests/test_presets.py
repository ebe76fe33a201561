"""Presets (presets/*.toml): every option is one its script accepts, the paper preset is the
scripts' argparse defaults, and run.sh reads the files (no second copy of a setting)."""
import subprocess
from pathlib import Path

import pytest

import data_prep
import presets
import stage1_sft
import stage2_reward
import stage3_rl
from common import ExpCTRError

ROOT = Path(__file__).resolve().parents[1]


def step_args(cfg: dict) -> dict:
    """Each step as run.sh builds it: (script, the preset's options, the step's own mode options)."""
    a, llm = presets.to_argv, presets.to_argv(cfg["llm"])
    return {"data_prep": (data_prep, a(cfg["world"]) + a(cfg["data"]), []),
            "explanations": (stage2_reward, llm + a(cfg["generation"]), ["--split", "train", "--tag", "base"]),
            "rollouts": (stage2_reward, llm + a(cfg["generation"]) + a(cfg["rollouts"]), ["--iter", "1"]),
            "scorer": (stage1_sft, llm + a(cfg["scorer"]), []),
            "ppo": (stage3_rl, llm + a(cfg["ppo"]), ["--iter", "1"])}


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_option_is_accepted_by_its_script(name):
    assert set(presets.names()) >= {"smoke", "quick", "planted", "paper"}
    for step, (mod, opts, mode) in step_args(presets.load(name)).items():
        mod.parse_args(["--run-dir", "x"] + opts + mode)  # a bad option exits: the test fails


def test_paper_preset_equals_the_argparse_defaults():
    """Typing a step without options gives the paper preset's setting (the [data] subsets and
    [run] schedule exist in the preset alone)."""
    for step, (mod, opts, mode) in step_args(presets.load("paper")).items():
        got = vars(mod.parse_args(["--run-dir", "x"] + opts + mode))
        default = vars(mod.parse_args(["--run-dir", "x"] + mode))
        skip = {"max_samples"}  # the LLM subsets: a preset choice, the script's default is all data
        diff = {k: (got[k], default[k]) for k in got if k not in skip and got[k] != default[k]}
        assert not diff, f"{step}: paper preset differs from the argparse defaults: {diff}"


def test_preset_files_drive_run_sh(tmp_path):
    sh, cfg = presets.shell("planted"), presets.load("planted")
    assert "SFT=(" + " ".join(presets.to_argv(cfg["scorer"])) + ")" in sh.splitlines()
    assert "WORLD=(--dataset synthetic " in sh and f"N1={cfg['run']['n1']}" in sh
    text = (ROOT / "run.sh").read_text()
    assert "presets.py \"$PRESET\" shell" in text and "--lora-layers" not in text  # no second copy
    bad = tmp_path / "presets"
    bad.mkdir()
    (bad / "x.toml").write_text("[run]\nfolder = 'x'\n[sampler]\nk = 1\n")
    old, presets.PRESET_DIR = presets.PRESET_DIR, bad
    try:
        with pytest.raises(ExpCTRError, match=r"section \[sampler\]"):
            presets.load("x")
        (bad / "x.toml").write_text("[run]\nfolder = 'x'\n")
        with pytest.raises(ExpCTRError, match=r"\[run\] needs model"):
            presets.shell("x")
    finally:
        presets.PRESET_DIR = old
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--preset", "nope", "--runs-dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "presets/nope.toml" in r.stderr


def test_run_sh_nproc_launches_the_training_stages_under_torchrun(tmp_path):
    """--nproc N: each of the four training stages is started by torchrun (TR), data_prep and
    evaluate as one process; a bad N is a one-line error before any work."""
    text = (ROOT / "run.sh").read_text()
    assert 'TR=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")' in text
    for script in ("train_ctr", "stage1_sft", "stage2_reward", "stage3_rl"):
        calls = [l for l in text.splitlines() if f" {script}.py " in l and not l.startswith("#")]
        assert calls and all('"${TR[@]}" ' + script in l for l in calls), (script, calls)
    for script in ("data_prep", "evaluate"):
        assert f'"$PY" {script}.py' in text
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--preset", "smoke", "--nproc", "two",
                        "--runs-dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == ("error: --nproc two: expected a whole "
                                                      "number >= 1")
    assert not any(tmp_path.iterdir())


def test_run_sh_seed_reaches_every_llm_stage_and_guards_a_resumed_folder(tmp_path):
    """--seed N is the LLM training draw: every stage1_sft/stage2_reward/stage3_rl call gets it
    (through A), nothing else does; a bad N, or resuming a folder run with another seed (whose
    finished steps would be kept), is a one-line error before any work; a folder from before
    --seed existed counts as seed 0, and 007 is seed 7."""
    text = (ROOT / "run.sh").read_text()
    assert 'A=(--run-dir "$R" --model "$MODEL" "${LLM[@]}" --seed "$SEED")' in text
    for script in ("stage1_sft", "stage2_reward", "stage3_rl"):
        calls = [l for l in text.splitlines() if f" {script}.py " in l and not l.startswith("#")]
        assert calls and all(f'{script}.py "${{A[@]}}"' in l for l in calls), (script, calls)
    code = [l for l in text.splitlines() if not l.startswith("#")]
    assert [l.split("--seed")[0] for l in code if "--seed" in l] == [  # no other step gets a seed
        "    ", 'case "$SEED" in \'\'|*[!0-9]*|??????????*) echo "error: ', '    echo "error: ',
        'A=(--run-dir "$R" --model "$MODEL" "${LLM[@]}" ']
    assert code.index(next(l for l in code if "OLD_SEED=" in l)) < code.index(
        next(l for l in code if l.startswith("if [ \"$ID_BENCH\" = 1 ]"))), "guard after the ID benchmark"
    run = lambda *a: subprocess.run(["bash", str(ROOT / "run.sh"), "--preset", "smoke",
                                     "--runs-dir", str(tmp_path), *a], capture_output=True, text=True)
    for bad in ("-1", "x", "1234567890"):
        r = run("--seed", bad)
        assert r.returncode == 2 and r.stderr.strip() == (f"error: --seed {bad}: expected a whole "
                                                          "number from 0 to 999999999"), r.stderr
    assert not any(tmp_path.iterdir())
    d = tmp_path / "smoke"
    d.mkdir()
    (d / "run.json").write_text('{"preset": "smoke", "seed": 7}')
    r = run("--seed", "1")
    assert r.returncode == 2 and "run.json was run with seed 7" in r.stderr, r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["run.json"]
    # past the guard: a directory where run.sh copies preset.toml stops it at that cp (rc 1)
    (d / "preset.toml" / "smoke.toml").mkdir(parents=True)
    for json_text, seed in (('{"preset": "smoke", "seed": 7}', "007"), ('{"preset": "smoke"}', "0")):
        (d / "run.json").write_text(json_text)
        r = run("--seed", seed)
        assert r.returncode == 1 and "was run with seed" not in r.stderr and "preset.toml" in r.stderr, r.stderr


def test_run_sh_help_names_every_preset_and_the_whole_schedule():
    """./run.sh --help is the header comment up to the code: each presets/*.toml (but the GPU
    check's) is listed in the usage line and described, and the schedule's last step is there."""
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(l.startswith("#") for l in r.stdout.splitlines())
    usage = next(l for l in r.stdout.splitlines() if "./run.sh [--preset " in l)
    listed = usage.split("[--preset ")[1].split("]")[0].split("|")
    assert listed == [n for n in listed if n in presets.names()]
    for name in set(presets.names()) - {"gpu-check"}:  # gpu-check: scripts/gpu_check.sh runs it
        assert name in listed and f"#   {name}  " in r.stdout, name
    assert "python evaluate.py" in r.stdout and "Per-step wall times" in r.stdout

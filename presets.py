"""Presets: the settings of one whole run, as files a person and run.sh both read (presets/*.toml).

A preset file has one [section] per kind of step; each key of a step section is one option of
that step's script, written without its leading dashes:
  [run]         the schedule: run folder, model, ID-CTR models, iteration counts (run.sh only)
  [world]       data_prep.py options shared by the LLM run and its full-data ID benchmark
  [data]        data_prep.py options of the LLM run only (prompt style, seeded subsets)
  [llm]         options of every LLM step (stage1_sft.py, stage2_reward.py, stage3_rl.py)
  [generation]  stage2_reward.py: explanations, rollouts and probes
  [rollouts]    stage2_reward.py --iter / --probe only
  [scorer]      stage1_sft.py
  [ppo]         stage3_rl.py
Values: a string or number is `--key value`; true is the flag `--key`; a list repeats the option
(`max-samples = ["train=8", "valid=4"]` -> `--max-samples train=8 --max-samples valid=4`).
The paper preset equals the scripts' argparse defaults (tests/test_presets.py).

    python presets.py planted shell           # the bash variables run.sh evaluates
    python presets.py planted args scorer     # one section as command-line tokens, one per line
    python presets.py planted get run.n1      # one value of [run] (a list: space-separated)
    python presets.py --list
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from common import ExpCTRError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
SECTIONS = ("run", "world", "data", "llm", "generation", "rollouts", "scorer", "ppo")


def names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load(name: str) -> dict:
    """The preset as {section: {key: value}}; unknown sections are a one-line error."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ExpCTRError(f"preset {name!r}: no {path} (presets: {', '.join(names())})")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ExpCTRError(f"{path}: {e}") from None
    for sec in cfg:
        if sec not in SECTIONS:
            raise ExpCTRError(f"{path}: section [{sec}]: expected one of {', '.join(SECTIONS)}")
    return {sec: cfg.get(sec, {}) for sec in SECTIONS}


def to_argv(section: dict) -> list[str]:
    """{key: value} -> command-line tokens, in file order."""
    out = []
    for key, val in section.items():
        for v in (val if isinstance(val, list) else [val]):
            if v is True:
                out.append(f"--{key}")
            elif v is False:
                continue  # an absent flag
            else:
                out += [f"--{key}", str(v)]
    return out


# run.sh's variable <- the preset's [section] (arrays) or [run] key (scalars)
SHELL_ARRAYS = {"WORLD": "world", "DATA_ONLY": "data", "LLM": "llm", "GEN": "generation",
                "ROLL": "rollouts", "SFT": "scorer", "PPO": "ppo"}
SHELL_SCALARS = {"RUN_NAME": "folder", "MODEL": "model", "CTR_MODELS": "ctr_models",
                 "ID_BENCH": "id_bench", "BENCH": "bench", "N1": "n1", "N3": "n3",
                 "LAMBDA": "lambda_ic", "PRED_SPLITS": "pred_splits", "PROBE_EVERY": "probe_every"}
RUN_REQUIRED = ("folder", "model", "ctr_models", "id_bench", "n1", "n3", "lambda_ic", "pred_splits")


def shell(name: str) -> str:
    """The preset as bash assignments (shlex-quoted), for run.sh to evaluate."""
    import shlex
    cfg = load(name)
    missing = [k for k in RUN_REQUIRED if k not in cfg["run"]] + (
        ["bench"] if cfg["run"].get("id_bench") and "bench" not in cfg["run"] else [])
    if missing:
        raise ExpCTRError(f"{PRESET_DIR / name}.toml: [run] needs {', '.join(missing)}")
    lines = []
    for var, key in SHELL_SCALARS.items():
        v = cfg["run"].get(key, "")
        if isinstance(v, list):
            lines.append(f"{var}=(" + " ".join(shlex.quote(str(x)) for x in v) + ")")
        else:
            lines.append(f"{var}=" + shlex.quote(("1" if v else "0") if isinstance(v, bool) else str(v)))
    for var, sec in SHELL_ARRAYS.items():
        lines.append(f"{var}=(" + " ".join(shlex.quote(t) for t in to_argv(cfg[sec])) + ")")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = list(sys.argv[1:] if argv is None else argv)
    if a == ["--list"]:
        print("\n".join(names()))
        return
    if len(a) == 2 and a[1] == "shell":
        print(shell(a[0]))
        return
    if len(a) != 3 or a[1] not in ("args", "get"):
        raise ExpCTRError("usage: python presets.py NAME shell | NAME args SECTION | "
                          "NAME get run.KEY | --list")
    cfg = load(a[0])
    if a[1] == "args":
        if a[2] not in SECTIONS:
            raise ExpCTRError(f"section {a[2]!r}: expected one of {', '.join(SECTIONS)}")
        print("\n".join(to_argv(cfg[a[2]])))
        return
    sec, _, key = a[2].partition(".")
    if sec not in SECTIONS or key not in cfg[sec]:
        raise ExpCTRError(f"preset {a[0]}: no key {a[2]!r}")
    v = cfg[sec][key]
    print(" ".join(map(str, v)) if isinstance(v, list) else
          ("1" if v is True else "0") if isinstance(v, bool) else v)


if __name__ == "__main__":
    import common
    common.cli(main)

"""Write docs/results-<preset>.md from a finished run: the machine, the preset's settings, the
ID-CTR benchmark table (when the preset has one), the wall time of every step, a reading written
by a person (--reading FILE, the only hand-written part), and the run's eval/report.md verbatim
(plots copied beside the document). So the committed tables are the output of the committed code.

    python scripts/results_doc.py --run-dir runs/quick --bench runs/ml100k-ctr \\
        --reading notes.md --out docs/results-quick.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import evaluate  # noqa: E402

BENCH_MODELS = ("popularity", "logreg", "deepfm", "dcnv2", "din")  # those the bench ran


def machine() -> str:
    import torch
    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({', '.join(simd) or 'no AVX info'}), "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def bench_table(bench: Path) -> list[str]:
    L = [f"## ID-CTR benchmark (`{bench}`)", "",
         "| model | valid AUC | test AUC | test LogLoss | test gAUC | best epoch | train s |",
         "|---|---|---|---|---|---|---|"]
    for m in BENCH_MODELS:
        f = bench / "ctr" / m / "metrics.json"
        if f.exists():
            d = common.read_json(f)
            L.append(f"| {m} | {d['valid']['auc']:.4f} | {d['test']['auc']:.4f} | "
                     f"{d['test']['logloss']:.4f} | {d['test']['gauc']:.4f} | {d['best_epoch']} | "
                     f"{d['train_seconds']} |")
    meta = common.read_json(bench / "data" / "meta.json")
    L += ["", "Samples: " + ", ".join(f"{k} {v:,}" for k, v in meta["counts"].items()) +
          f"; {meta['label_rule']}." + (f" Oracle test AUC (the true click probabilities): "
                                        f"{meta['oracle_test_auc']}." if "oracle_test_auc" in meta else ""), ""]
    rows = evaluate.step_timings(common.RunPaths(bench))
    if rows:
        L += ["Wall time per step of the benchmark (whole process):", "", "| step | seconds |",
              "|---|---|"] + [f"| {r['step']} | {r['seconds']} |" for r in rows] + [""]
    return L


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--bench", default=None, help="the ID-CTR benchmark run folder, if any")
    p.add_argument("--reading", default=None, help="markdown file: the person's reading of the run")
    p.add_argument("--origin", default="from a clean `runs/`",
                   help="how the run folder came to be, if not from a clean runs/ (e.g. which "
                        "steps were reused from an earlier run)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    R, out = Path(a.run_dir), Path(a.out)
    info = common.read_json(R / "run.json")
    total = sum(float(r["seconds"] or 0) for r in evaluate.step_timings(common.RunPaths(R)))
    if a.bench:
        total += sum(float(r["seconds"] or 0) for r in evaluate.step_timings(common.RunPaths(a.bench)))
    L = [f"# Results of one real `./run.sh --preset {info['preset']}`", "",
         f"Produced by `./run.sh --preset {info['preset']}` {a.origin}, then "
         f"`python scripts/results_doc.py` (this file; nothing below was edited by hand except the "
         f"reading). Machine: **{machine()}**. Sum of the steps' wall times: **{total:.0f} s "
         f"({total / 60:.1f} min)**. Settings: `run.sh` preset `{info['preset']}`, model "
         f"`{info['model']}`, {info['n1']} LC + {info['n3']} IC PPO iterations, lambda_IC "
         f"{info['lambda_ic']}, LLM seed {info.get('seed', 0)}, final policy `{info.get('final_tag')}`.", ""]
    if a.reading:
        L += ["## Our reading", "", Path(a.reading).read_text().strip(), ""]
    if (R / "preset.toml").exists():  # run.sh copies the preset file into the run folder
        L += [f"## Settings (`presets/{info['preset']}.toml` as the run used it)", "", "```toml",
              (R / "preset.toml").read_text().strip(), "```", ""]
    if a.bench:
        L += bench_table(Path(a.bench))
    logged = common.read_jsonl(R / "metrics.jsonl")
    sc = R / "scorer" / "metrics.json"
    if sc.exists():  # the scorer's learning curve on valid (where its settings were chosen)
        d = common.read_json(sc)
        L += ["## LLM-CTR scorer training (`scorer/metrics.json`, valid split)", "",
              f"{d['n_train']} train / {d['n_valid']} valid samples, lr {d['lr']}, LoRA "
              f"{d.get('lora', 'q_proj,v_proj')}, explanation dropout {d['expl_dropout']}, "
              f"scorer view {d.get('scorer_view', 'full')}, profile echo {d.get('profile_echo', 0)}; "
              f"kept epoch {d['best_epoch']}.", "",
              "| epoch | train loss | valid AUC with explanation | valid AUC without | train tokens/s |",
              "|---|---|---|---|---|"]
        L += [f"| {h['epoch']} | {h['loss']:.4f} | {h['valid_auc_with_expl']:.4f} | "
              f"{h['valid_auc_no_expl']:.4f} | {h['tokens_per_s']} |" for h in d["history"]] + [""]
        if "answer_head" in d:
            L += [f"Answer head: {d['answer_head']} (lr {d['head_lr']}); the frozen lower layers "
                  f"ran once in {d['lower_layers_seconds']} s.", ""]
        rows = [r for r in logged if r["stage"] in
                ("stage1_sft_curve", "stage1_sft") and "samples" in r]
        if rows:  # the learning curve: valid AUC against training samples seen
            echo = any("valid_auc_profile_echo" in r for r in rows)
            L += ["Learning curve (valid):", "", "| samples seen | train loss (epoch so far) | "
                  "valid AUC with explanation | valid AUC without |" +
                  (" valid AUC, history lines as explanation |" if echo else ""),
                  "|---|---|---|---|" + ("---|" if echo else "")]
            L += [f"| {r['samples']} | {r.get('train_loss', r.get('loss')):.4f} | "
                  f"{r['valid_auc_with_expl']:.4f} | {r['valid_auc_no_expl']:.4f} |" +
                  (f" {r.get('valid_auc_profile_echo', float('nan')):.4f} |" if echo else "")
                  for r in rows] + [""]
    ppo = [r for r in logged if r["stage"] == "stage3_rl"]
    if ppo and "reward_std_within_group" in ppo[-1]:  # the size of PPO's learning signal
        last = {r["iter"]: r for r in ppo}
        L += ["## PPO's learning signal (`metrics.jsonl`, stage3_rl rows; training rollouts)", "",
              "| iter | phase | mean reward | reward std within a prompt's K samples | reward std, all |"
              " mean abs advantage (raw) | KL to reference | clip frac |", "|---|---|---|---|---|---|---|---|"]
        L += [f"| {k} | {r['phase']} | {r['reward']:.4f} | {r['reward_std_within_group']:.4f} | "
              f"{r['reward_std_all']:.4f} | {r['adv_abs_mean_raw']:.4f} | {r['kl']:.4f} | "
              f"{r['clip_frac']:.3f} |" for k, r in sorted(last.items())] + [""]
    report = (R / "eval" / "report.md").read_text()
    img_dir = out.with_suffix("")
    img_dir.mkdir(parents=True, exist_ok=True)
    for png in (R / "eval").glob("*.png"):
        shutil.copy(png, img_dir / png.name)
        report = report.replace(f"]({png.name})", f"]({img_dir.name}/{png.name})")
    L += [f"## Evaluation report of `{R}` (`eval/report.md`, verbatim but for the image paths)", ""]
    L += ["##" + line if line.startswith("#") else line for line in report.splitlines()]
    with common.atomic_path(out) as tmp:
        tmp.write_text("\n".join(L) + "\n", encoding="utf-8")
    print(f"wrote {out} and {img_dir}/")


if __name__ == "__main__":
    main()

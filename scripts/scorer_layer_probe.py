"""Where does a frozen LLM hold the click signal? A diagnostic for choosing the scorer's prompt
and which layers its LoRA trains (docs/planted-experiments.md).

For n train and n valid samples of a run folder, one frozen forward pass of the scorer's input
(no explanation) with the hidden states of every 3rd layer at two positions:
  answer = the last token (where the scorer reads Yes/No),
  target = the last token of the target's description in the prompt ("... (Crime)").
A logistic regression per (position, layer), fit on train, gives the valid AUC: a linear read-out
of what the frozen model already computed. Run it with the scorer question naming the target
(the default, common.build_scorer_prompt) and without (--generic-question). Also prints the AUC of
a history-matching rule (liked minus disliked history items sharing a target genre), the ceiling
of what the prompt's history says about the click.

    python scripts/scorer_layer_probe.py --run-dir runs/planted --n-train 512 --n-valid 256
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import llm  # noqa: E402


def history_match(sample, items) -> int:
    """liked minus disliked history items that share a genre with the target, weighted by overlap."""
    tg = set(items[sample["iid"]]["genres"])
    return sum((1 if lab == 1 else -1) * len(tg & set(items[i]["genres"])) for i, lab in sample["hist"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder with data/ (data_prep.py)")
    p.add_argument("--model", default=None)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-valid", type=int, default=256)
    p.add_argument("--every", type=int, default=3, help="probe every N-th layer")
    p.add_argument("--generic-question", action="store_true",
                   help="ask 'Will the user click?' without naming the target")
    p.add_argument("--out", default=None, help="write the AUCs as JSON here")
    a = p.parse_args()
    paths = common.RunPaths(a.run_dir)
    items, popt = common.load_items(paths), common.prompt_options(paths)
    rng = np.random.default_rng(0)
    pick = lambda rows, n: [rows[i] for i in np.sort(rng.choice(len(rows), min(n, len(rows)), replace=False))]
    tr, va = pick(common.load_split(paths, "train"), a.n_train), pick(common.load_split(paths, "valid"), a.n_valid)
    b = llm.LLM(llm.run_model(paths, a.model), "float32")
    dec, _ = b._parts()

    def encode(s):
        prompt = common.build_prompt(s, items, **popt)
        target = None if a.generic_question else common.target_text(s, items)
        text = b._chat(common.build_scorer_prompt(prompt, None, target), llm.ANSWER_PREFIX)
        enc = b.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        t = text.index("Target item:")
        end = text.index(".\n", t)  # end of the target line
        tpos = max(i for i, (s0, _) in enumerate(enc["offset_mapping"]) if s0 < end)
        return enc["input_ids"], tpos

    def features(rows, desc):
        enc = [encode(s) for s in rows]
        X = {}
        for idx in tqdm(llm.length_batches([len(e[0]) for e in enc], 16), desc=desc, unit=" batch"):
            ids, mask = b.pad_left([enc[i][0] for i in idx])
            with torch.inference_mode():
                hs = dec(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=False, output_hidden_states=True).hidden_states
            for L in range(0, len(hs), a.every):
                for j, i in enumerate(idx):
                    off = ids.shape[1] - len(enc[i][0])
                    for pos, col in (("answer", -1), ("target", off + enc[i][1])):
                        X.setdefault((pos, L), np.zeros((len(rows), hs[L].shape[-1]), np.float32))[i] = \
                            hs[L][j, col].float().numpy()
        return X, float(np.mean([len(e[0]) for e in enc]))

    t0 = time.time()
    Xtr, mean_len = features(tr, "train")
    Xva, _ = features(va, "valid")
    ytr, yva = np.array([s["label"] for s in tr]), np.array([s["label"] for s in va])
    res = {"n_train": len(tr), "n_valid": len(va), "mean_tokens": mean_len,
           "question": "generic" if a.generic_question else "names the target",
           "history_match_valid_auc": roc_auc_score(yva, [history_match(s, items) for s in va]),
           "forward_seconds": time.time() - t0, "auc": {}}
    for key in sorted(Xtr):
        m = LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1], cv=3, max_iter=3000, scoring="roc_auc")
        m.fit(Xtr[key], ytr)
        res["auc"][f"{key[0]}@{key[1]}"] = round(float(roc_auc_score(yva, m.predict_proba(Xva[key])[:, 1])), 4)
    layers = sorted({k[1] for k in Xtr})
    print(f"\nlinear probe valid AUC, frozen {b.name}, {len(tr)} train / {len(va)} valid samples, "
          f"{mean_len:.0f} tokens, question {res['question']}; history-match rule "
          f"{res['history_match_valid_auc']:.3f}")
    print("| position | " + " | ".join(f"layer {L}" for L in layers) + " |")
    print("|---|" + "---|" * len(layers))
    for pos in ("answer", "target"):
        print(f"| {pos} | " + " | ".join(f"{res['auc'][f'{pos}@{L}']:.3f}" for L in layers) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

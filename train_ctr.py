"""Training of the ID-based CTR models (DeepFM, DCNv2, DIN, popularity, logistic regression) and ExpCTR-Aug.

Paper part: the "traditional ID-based CTR model" of IC alignment and Phase 2 (paper Stage 2), "CTR
model training with textual features" (PAPER_NOTES.md §3, §5): with --text-emb the explanation embedding of each
sample is projected (LayerNorm + Linear to emb_dim) and concatenated with the ID feature
embeddings before the MLP / cross layers (ExpCTR-Aug); --init-from warm-starts it from the
ID-only checkpoint. The backbones themselves, one class each, are in ctr_models.py;
stage2_reward.py uses `ctr_models.load_checkpoint(...).predict` for the IC reward.

Reads   runs/X/data/{train,valid,test}.jsonl or the columnar store data/store/ (large splits,
        memory-mapped; batches gathered by ctr_features.py with numpy), items.jsonl, meta.json;
        optional text embeddings --text-emb 'runs/X/explanations/<tag>/{split}.npy' (row-aligned
        with data/<split>.jsonl) or '.../{split}.jsonl' with uid/iid/emb keys.
Writes  runs/X/ctr/<out-name>/{model.pt, metrics.json, preds_valid.jsonl, preds_test.jsonl}
        (one atomic folder); appends one line per epoch to runs/X/metrics.jsonl.
Under torchrun (parallel.py, gloo): each batch shared by the ranks, gradients averaged (the
update of one process with the whole batch); every rank scores valid, rank 0 writes.

    python train_ctr.py --run-dir runs/ml100k --model din
    python train_ctr.py --run-dir runs/ml100k --model din --out-name din_aug \
        --text-emb 'runs/ml100k/explanations/iter_3/{split}.npy' --init-from runs/ml100k/ctr/din

Python API: main(argv) trains one model; evaluate_predictions(labels, probs, uids) -> dict;
loading a checkpoint: ctr_models.load_checkpoint(path).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import common
import ctr_features
import metrics
import parallel
import sample_store
from common import ExpCTRError, RunPaths
from ctr_features import Features
from ctr_models import (TORCH_MODELS, CTRModel, CTRPredictor, build_net, load_checkpoint, predict_net,
                        vocab_sizes)
from sample_store import SplitArrays

POP_SMOOTHING = 20.0  # [ours] pseudo-samples at the global rate added to every item's count

MODELS = ("deepfm", "dcnv2", "din", "popularity", "logreg")
# [ours] per-backbone defaults (FuxiCTR-style model configs), chosen on ML-100K valid AUC, mean
# of 3 seeds, over emb-reg {0, 1e-3, 1e-2} x dropout {0.1, 0.3} (scripts/ctr_table.py; README)
MODEL_DEFAULTS = {"deepfm": {"emb_reg": 1e-2, "dropout": 0.3},
                  "dcnv2": {"emb_reg": 1e-3, "dropout": 0.3},
                  "din": {"emb_reg": 1e-2, "dropout": 0.1}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder made by data_prep.py")
    p.add_argument("--model", required=True, choices=MODELS, help="which CTR model")
    p.add_argument("--out-name", default=None, help="output folder ctr/<out-name> (default: model)")
    p.add_argument("--text-emb", default=None, help="path pattern with {split}: .npy row-aligned "
                   "with data/<split>.jsonl, or .jsonl with uid/iid/emb keys (ExpCTR-Aug)")
    p.add_argument("--init-from", default=None, help="warm-start from this ID-only checkpoint "
                   "folder (matching parameters are loaded; the text projection starts at zero "
                   "output, so the Aug model starts out predicting exactly what the ID model did)")
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs; 0 with --init-from "
                   "trains nothing and evaluates that checkpoint on this run's valid/test splits "
                   "(e.g. a model trained on the full data, scored on a subset run; an ExpCTR-Aug "
                   "checkpoint reads --text-emb, e.g. another policy's explanations)")
    p.add_argument("--batch-size", type=int, default=1024, help="training batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay (all parameters)")
    p.add_argument("--emb-reg", type=float, default=None,
                   help="L2 penalty on the embedding tables, added to the loss as emb_reg/2 * "
                        "||W||^2 per table (FuxiCTR's embedding_regularizer; default: "
                        "MODEL_DEFAULTS of the model)")
    p.add_argument("--emb-dim", type=int, default=16, help="embedding size of every field")
    p.add_argument("--mlp", default="128,64", help="hidden sizes of the MLP tower")
    p.add_argument("--tower-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the MLP tower's matrix products (weights, Adam and everything "
                        "else stay float32; bfloat16 can pay only on CPUs with native bf16, e.g. "
                        "AVX512_BF16 or AMX: a DIN step 1.01-1.08x on the README's EPYC, within its noise)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout in the MLP tower (default: MODEL_DEFAULTS of the model)")
    p.add_argument("--patience", type=int, default=3,
                   help="stop after this many epochs in a row without a better valid AUC")
    p.add_argument("--smoothing", type=float, default=POP_SMOOTHING,
                   help="popularity: pseudo-count pulling an item's rate to the global rate")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--force", action="store_true", help="retrain even if metrics.json exists")
    a = p.parse_args(argv)
    for k, v in MODEL_DEFAULTS.get(a.model, {"emb_reg": 0.0, "dropout": 0.1}).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


# ---- plumbing: metrics ----------------------------------------------------------------------
def evaluate_predictions(labels, probs, uids) -> dict:
    """AUC, LogLoss, gAUC and n of one split (metrics.ctr_metrics; AUC NaN with one label)."""
    return metrics.ctr_metrics(labels, probs, uids)


# ---- plumbing: features (ctr_features.py: vocabulary from train, batches gathered by numpy) ---
def load_split_arrays(paths: RunPaths, split: str) -> SplitArrays:
    """A split as columns: from the columnar store (large splits) or from its JSONL."""
    if common.in_store(paths, split):
        return sample_store.SampleStore(paths.data / "store").arrays(split)
    return SplitArrays.from_rows(common.load_split(paths, split))


def load_text_emb(pattern: str, split: str, samples: SplitArrays) -> np.ndarray:
    """Text embeddings of one split, row-aligned with data/<split>.jsonl (or its store rows)."""
    path = Path(pattern.format(split=split))
    if not path.exists():
        raise ExpCTRError(f"{path}: file not found (--text-emb {pattern})")
    if path.suffix == ".npy":
        arr = np.load(path)
        if arr.ndim != 2 or arr.shape[0] != len(samples):
            raise ExpCTRError(f"{path}: expected {len(samples)} rows (one per line of "
                              f"data/{split}.jsonl) of a 2-D array, got shape {arr.shape}")
        return arr.astype(np.float32)
    rows = common.read_jsonl(path, {"uid": str, "iid": str, "emb": list})
    by_key = {(r["uid"], r["iid"], r.get("ts")): r["emb"] for r in rows}
    by_pair = {(r["uid"], r["iid"]): r["emb"] for r in rows}
    out = []
    for u, i, t in zip(samples.users[samples.uid].tolist(), samples.items[samples.iid].tolist(),
                       samples.ts.tolist()):
        e = by_key.get((u, i, t), by_pair.get((u, i)))
        if e is None:
            raise ExpCTRError(f"{path}: no 'emb' for uid={u} iid={i} "
                              f"(expected one row per sample of data/{split}.jsonl)")
        out.append(e)
    return np.asarray(out, dtype=np.float32)


# ---- algorithm: popularity and logistic regression baselines ------------------------------
item_click_rates = ctr_features.item_click_rates  # the popularity baseline (evaluate.py too)


def fit_baseline(args, data, vocab, cfg):
    train = data["train"]
    if args.model == "popularity":
        rates, cfg["prior"] = item_click_rates(train, args.smoothing)
        return {"rate": rates}
    from sklearn.linear_model import LogisticRegression
    X, y = ctr_features.onehot(train, vocab), np.asarray(train.label, np.int64)
    Xv, yv = ctr_features.onehot(data["valid"], vocab), np.asarray(data["valid"].label, np.int64)
    best = None  # [ours] C chosen on valid AUC from a small grid
    for C in tqdm([0.01, 0.1, 1.0], desc="logreg C", disable=None):
        clf = LogisticRegression(C=C, max_iter=2000).fit(X, y)
        a = metrics.auc(yv, clf.predict_proba(Xv)[:, 1])
        if best is None or a > best[0]:
            best = (a, C, clf)
    cfg["C"] = best[1]
    return {"coef": torch.from_numpy(best[2].coef_[0].astype(np.float64)),
            "intercept": torch.tensor(float(best[2].intercept_[0]))}


def warm_start(net: CTRModel, old: dict, cfg: dict) -> int:
    """Load an ID-only state into a text-augmented net. [ours] The text projection's output
    layer starts at zero (like LoRA's B), so the text field is exactly 0 and the Aug model starts
    out predicting exactly what the ID model did, for every backbone (DeepFM's FM term included);
    layers that grew because the text field was appended (last emb_dim inputs) get the old
    weights in their ID block and their fresh random init in the text block, so the gradient
    reaching the projection is not zero."""
    own, d = net.state_dict(), cfg["emb_dim"]
    w_new = own["deep.0.weight"].shape[1]
    w_old = w_new - (d if cfg["text_dim"] else 0)
    n = 0
    if cfg["text_dim"]:
        own["text_proj.1.weight"].zero_()
        own["text_proj.1.bias"].zero_()
    for k, v in old.items():
        if k not in own:
            continue
        t = own[k].clone()
        if t.shape == v.shape:
            t = v.clone()
        elif k == "deep.0.weight":
            t[:v.shape[0], :v.shape[1]] = v
        elif k.startswith("cross.") and k.endswith("weight"):
            t.zero_()
            t[:v.shape[0], :v.shape[1]] = v
        elif k.startswith("cross.") and k.endswith("bias"):
            t.zero_()
            t[:v.shape[0]] = v
        elif k == "out.weight" and cfg["model"] == "dcnv2":  # inputs: [cross out | deep out]
            t.zero_()
            t[:, :w_old] = v[:, :w_old]
            t[:, w_new:] = v[:, w_old:]
        else:
            continue
        own[k] = t
        n += 1
    net.load_state_dict(own)
    return n


# ---- algorithm: training loop (Adam, early stopping on valid AUC, best checkpoint kept) ----
def embedding_penalty(net: nn.Module, emb_reg: float) -> torch.Tensor:
    """emb_reg / 2 * sum of squared embedding weights (every nn.Embedding table): FuxiCTR's
    embedding regulariser. Its gradient, emb_reg * W, is what Adam's weight_decay adds to the
    gradient of those tables (L2 coupled to the gradient, not AdamW's decoupled decay), so
    train_net applies it there (make_optimizer) instead of through the loss: the same update,
    without a full pass over every table in the forward and backward of each step."""
    return emb_reg / 2 * sum(m.weight.pow(2).sum() for m in net.modules()
                             if isinstance(m, nn.Embedding))


def make_optimizer(net: nn.Module, args) -> torch.optim.Adam:
    """Adam (fused CPU kernel); the embedding tables' weight decay carries --emb-reg, i.e. the
    gradient of embedding_penalty, on top of --weight-decay."""
    emb = [m.weight for m in net.modules() if isinstance(m, nn.Embedding)]
    ids = {id(p) for p in emb}
    rest = [p for p in net.parameters() if id(p) not in ids]
    return torch.optim.Adam([{"params": emb, "weight_decay": args.weight_decay + args.emb_reg},
                             {"params": rest, "weight_decay": args.weight_decay}],
                            lr=args.lr, fused=True)


def train_net(args, data, vocab, cfg, text, paths, out_name, world):
    torch.manual_seed(args.seed)
    net = build_net(cfg)
    if args.init_from:
        init = torch.load(Path(args.init_from) / "model.pt", map_location="cpu", weights_only=True)
        n = warm_start(net, init["state_dict"], cfg)
        print(f"[train_ctr] warm start: {n}/{len(net.state_dict())} tensors from {args.init_from}")
    world.broadcast_params(net.parameters())  # torchrun: every rank starts from rank 0's values
    if world.rank:  # its own dropout masks (rank 0 keeps the one-process stream)
        torch.manual_seed(args.seed * 1000 + world.rank)
    feats = {s: Features(data[s], vocab) for s in ("train", "valid")}
    y = torch.from_numpy(feats["train"].labels)
    yv, uv = data["valid"].label, data["valid"].uid
    opt = make_optimizer(net, args)  # --emb-reg as the embedding tables' weight decay
    gen = torch.Generator().manual_seed(args.seed)  # seeded batch order
    n = len(y)
    stopper, best_state, epoch, best_epoch = common.EarlyStopping(args.patience), None, 0, 0
    speed = []  # training samples per second of each epoch (the loop only, not the valid pass)
    if args.init_from:  # [ours] the warm start itself is a candidate: fine-tuning on a small
        pv = predict_net(net, feats["valid"], text["valid"])  # split may only make it worse
        stopper.step(evaluate_predictions(yv, pv, uv)["auc"])
        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        world.main and print(f"[train_ctr] {out_name} epoch 0 (warm start): valid AUC {stopper.best:.4f}")
    for epoch in range(1, args.epochs + 1):
        net.train()
        perm, total, t_epoch = torch.randperm(n, generator=gen), 0.0, time.time()
        bar = tqdm(range(0, n, args.batch_size), desc=f"{out_name} epoch {epoch}", leave=False,
                   disable=None)
        for a in bar:
            idx = world.share(perm[a:a + args.batch_size])  # torchrun: this rank's part
            opt.zero_grad()
            if len(idx):
                b = feats["train"].batch(idx.numpy())
                logit = net(b, None if text["train"] is None else text["train"][idx])
                loss = nn.functional.binary_cross_entropy_with_logits(logit, y[idx])
                loss.backward()  # (--emb-reg: its gradient is added by the optimizer)
                total += loss.item() * len(idx)
            world.average_gradients(net.parameters(), len(idx))  # = the whole batch's gradient
            opt.step()
        speed.append(n / (time.time() - t_epoch))
        total = sum(world.gather(total))
        pv = predict_net(net, feats["valid"], text["valid"])  # every rank: the same decision
        m = evaluate_predictions(yv, pv, uv)
        if world.main:  # train_loss: the log loss alone; emb_penalty: the L2 term at epoch end
            with torch.no_grad():
                pen = float(embedding_penalty(net, args.emb_reg)) if args.emb_reg else 0.0
            common.log_metrics(paths.metrics, stage="train_ctr", model=out_name, epoch=epoch,
                               train_loss=round(total / n, 6), emb_penalty=round(pen, 6),
                               valid_auc=round(m["auc"], 6), valid_logloss=round(m["logloss"], 6))
            print(f"[train_ctr] {out_name} epoch {epoch}: train loss {total / n:.4f}, "
                  f"valid AUC {m['auc']:.4f} logloss {m['logloss']:.4f}")
        if stopper.step(m["auc"]):  # NaN AUC (one-class valid): keeps the first epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            best_epoch = epoch
        elif stopper.stop:
            break
    net.load_state_dict(best_state)
    return net, best_state, best_epoch, epoch, float(np.median(speed)) if speed else None


# ---- plumbing: main ------------------------------------------------------------------------
def main(argv=None):
    t_start = time.time()
    args = parse_args(argv)
    world = parallel.init("cpu")  # torchrun: data-parallel training (gloo), rank 0 writes
    torch.set_num_threads(max(1, world.threads(args.threads)))
    paths = RunPaths(args.run_dir)
    out_name = args.out_name or args.model
    out = paths.ctr(out_name)
    if (out / "metrics.json").exists() and not args.force:
        print(f"skip: {out / 'metrics.json'} exists (use --force to retrain)")
        return
    eval_only = args.epochs == 0 and args.init_from is not None
    if args.text_emb and args.model not in TORCH_MODELS or (
            args.init_from and not eval_only and args.model not in TORCH_MODELS):
        raise ExpCTRError(f"--text-emb/--init-from (with training) need one of "
                          f"{', '.join(TORCH_MODELS)}, not {args.model}")
    if args.epochs < 1 and not eval_only:
        raise ExpCTRError(f"--epochs {args.epochs}: expected at least 1 (0 only with --init-from)")
    common.set_seed(args.seed)
    meta = common.read_json(paths.require(paths.meta, "python data_prep.py"))
    items = common.load_items(paths)
    data = {s: load_split_arrays(paths, s) for s in common.SPLITS}
    text = {s: None for s in common.SPLITS}
    if args.text_emb:  # eval-only reads valid/test only (e.g. the final policy's explanations)
        text.update({s: torch.from_numpy(load_text_emb(args.text_emb, s, data[s]))
                     for s in (("valid", "test") if eval_only else common.SPLITS)})
        dims = {t.shape[1] for t in text.values() if t is not None}
        if len(dims) != 1:
            raise ExpCTRError(f"--text-emb {args.text_emb}: splits disagree on the width {dims}")
    text_dim = next((int(t.shape[1]) for t in text.values() if t is not None), 0)
    cfg = {"model": args.model, "emb_dim": args.emb_dim, "mlp": args.mlp, "dropout": args.dropout,
           "text_dim": text_dim, "tower_dtype": args.tower_dtype}
    if args.init_from:
        init = load_checkpoint(args.init_from)
        if eval_only and (init.model_name != args.model or init.text_dim != text_dim):
            raise ExpCTRError(f"{args.init_from}: is a {init.model_name} model with text_dim "
                              f"{init.text_dim}; --epochs 0 scores it as it is: pass --model "
                              f"{init.model_name}" + (f" and --text-emb of width {init.text_dim}"
                                                      if init.text_dim else " without --text-emb")
                              + (f" (got width {text_dim})" if text_dim else ""))
        if not eval_only and (init.model_name != args.model or init.text_dim):
            raise ExpCTRError(f"{args.init_from}: is a {init.model_name} model with text_dim "
                              f"{init.text_dim}; --init-from needs an ID-only {args.model}")
        vocab = init.vocab  # same rows for the same ids
        if eval_only:
            cfg = init.cfg
        else:
            cfg.update({k: init.cfg[k] for k in ("emb_dim", "mlp", "dropout")})
    else:
        vocab = ctr_features.build_vocab(data["train"], items, meta.get("user_fields", []))
    cfg.update(vocab_sizes(vocab))

    t0 = time.time()
    load_seconds, sps = t0 - t_start, None
    best_epoch = epochs_run = 0
    if eval_only:
        state = init.ckpt["state_dict"]
        print(f"[train_ctr] --epochs 0: evaluating {args.init_from} as trained, no training")
    elif args.model in TORCH_MODELS:
        net, state, best_epoch, epochs_run, sps = train_net(args, data, vocab, cfg, text, paths,
                                                            out_name, world)
    else:
        state = fit_baseline(args, data, vocab, cfg)
    train_seconds = time.time() - t0
    if not world.main:  # torchrun: rank 0 evaluates and writes
        parallel.close()
        return
    ckpt = {"config": cfg, "vocab": vocab, "state_dict": state}
    pred = CTRPredictor(ckpt)
    metrics = {"model": args.model, "out_name": out_name}
    preds = {}
    for split in ("valid", "test"):
        emb = None if text[split] is None else text[split].numpy()
        p = pred.predict(data[split], emb)
        preds[split] = p
        metrics[split] = evaluate_predictions(data[split].label, p, data[split].uid)
    metrics.update(train_seconds=round(train_seconds, 2), load_seconds=round(load_seconds, 2),
                   train_samples_per_s=None if sps is None else round(sps, 1), best_epoch=best_epoch,
                   epochs_run=epochs_run, text_emb=args.text_emb, init_from=args.init_from,
                   seed=args.seed, config=cfg, nproc=world.size,
                   training={k: getattr(args, k) for k in ("lr", "batch_size", "emb_reg",
                                                            "weight_decay", "patience", "threads")})
    with common.atomic_path(out) as tmp:  # the whole folder appears at once
        tmp.mkdir()
        torch.save(ckpt, tmp / "model.pt")
        for split in ("valid", "test"):
            d = data[split]
            common.write_jsonl(tmp / f"preds_{split}.jsonl", (
                {"uid": u, "iid": i, "label": y, "p": p} for u, i, y, p in zip(
                    d.users[d.uid].tolist(), d.items[d.iid].tolist(), d.label.tolist(),
                    preds[split].tolist())))
        common.write_json(tmp / "metrics.json", metrics)
    common.log_metrics(paths.metrics, stage="train_ctr", model=out_name, final=True,
                       test_auc=metrics["test"]["auc"], test_logloss=metrics["test"]["logloss"],
                       train_seconds=metrics["train_seconds"])
    print(f"[train_ctr] {out_name}: valid AUC {metrics['valid']['auc']:.4f}, test AUC "
          f"{metrics['test']['auc']:.4f} logloss {metrics['test']['logloss']:.4f} gAUC "
          f"{metrics['test']['gauc']:.4f} ({train_seconds:.1f}s) -> {out}")
    parallel.close()


if __name__ == "__main__":
    common.cli(main)

"""The ID-based CTR backbones (DeepFM, DCNv2, DIN) and a loaded checkpoint, one class per model.

Paper part: the "traditional ID-based CTR model" of IC alignment and its ExpCTR-Aug form
(PAPER_NOTES.md §3): with cfg["text_dim"] > 0 the explanation embedding of each sample is
projected (LayerNorm + Linear to emb_dim) and concatenated with the ID field embeddings before the
MLP / cross layers. FuxiCTR-style: a base class holds the fields every backbone shares, each
backbone adds its history encoding and interaction layers.

Used by train_ctr.py (which trains them and writes runs/X/ctr/<name>/model.pt) and by
stage2_reward.py (the IC reward: `load_checkpoint(path).predict(samples, text_emb)`).
Reads    a checkpoint folder runs/X/ctr/<name>/ (model.pt: config, vocabulary, weights).
Writes   nothing.

Python API: load_checkpoint(path) -> CTRPredictor (.predict(samples, text_emb=None) -> float64
probabilities, .text_dim, .model_name); build_net(cfg) -> a fresh backbone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import ctr_features
from common import ExpCTRError
from ctr_features import Features
from ctr_ops import bag_mean, din_attention, lookup, relu_dropout

EVAL_BATCH = 4096  # samples per forward pass when predicting (no gradients)
DIN_ATT_WIDTH = 36  # hidden units of DIN's attention MLP (the DIN paper's activation unit: 36)


# ---- algorithm: the models --------------------------------------------------------------
class MLP(nn.Sequential):
    """Linear -> ReLU -> Dropout blocks (nn.Sequential's layout and state_dict keys), each block's
    ReLU and dropout computed as one ctr_ops.relu_dropout (the same function, faster on CPU).
    matmul_dtype bfloat16 (train_ctr --tower-dtype): each Linear's product in bf16 (MKL sums in
    fp32), its output cast back to fp32; the weights, their gradients and Adam stay fp32, so
    small updates are not rounded away."""

    def __init__(self, sizes: list[int], dropout: float, matmul_dtype: str = "float32"):
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        super().__init__(*layers)
        self.matmul_dtype = getattr(torch, matmul_dtype)

    def forward(self, x):
        for i in range(0, len(self), 3):
            lin, dt = self[i], self.matmul_dtype
            h = lin(x) if dt == x.dtype else \
                nn.functional.linear(x.to(dt), lin.weight.to(dt), lin.bias.to(dt)).to(x.dtype)
            x = relu_dropout(h, self[i + 2].p, self.training)
        return x


class Embedding(nn.Embedding):
    """nn.Embedding with its lookup as an index_select: the same values and gradients (the
    padding row gets none, as in nn.Embedding), but the backward is an index_add instead of
    embedding_dense_backward, which sorts the indices: ~2.3x faster alone on CPU, a DIN step at
    2M ratings 1.03x (scripts/bench_ctr_train.py). Same parameters and state_dict keys."""

    def forward(self, idx):
        return lookup(self.weight, idx, self.padding_idx)


class CTRModel(nn.Module):
    """What every ID backbone shares (FuxiCTR-style base class): one emb_dim-wide embedding per
    field - user, item, target genres (mean), each user-profile field - the history items
    (item + genre mean, with a liked/disliked sign), and ExpCTR-Aug's text field. A backbone adds
    its history encoding (HIST_FIELDS fields) and its interaction layers. Genre means are computed
    once per distinct item of the batch (ctr_features: ugen, tpos, hpos), not per history slot."""
    HIST_FIELDS = 2

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = c = cfg
        d = c["emb_dim"]
        self.user = Embedding(c["n_uid"] + 1, d)
        self.item = Embedding(c["n_iid"] + 1, d)
        self.genre = Embedding(c["n_genre"] + 1, d, padding_idx=0)
        self.fields = nn.ModuleList(Embedding(n + 1, d) for n in c["n_field"])
        self.sign = Embedding(3, d, padding_idx=0)  # pad / disliked / liked
        for emb in [self.user, self.item, self.genre, self.sign, *self.fields]:
            nn.init.normal_(emb.weight, std=0.05)  # [ours] small init keeps the FM term tame
            if emb.padding_idx is not None:
                nn.init.zeros_(emb.weight[emb.padding_idx])
        if c["text_dim"]:  # [paper] ExpCTR-Aug: the explanation embedding, projected to a field
            self.text_proj = nn.Sequential(nn.LayerNorm(c["text_dim"]), nn.Linear(c["text_dim"], d))
        self.width = (3 + len(c["n_field"]) + self.HIST_FIELDS + (1 if c["text_dim"] else 0)) * d
        self.hidden = [int(h) for h in c["mlp"].split(",") if h]
        self.tower_dtype = c.get("tower_dtype", "float32")  # (checkpoints before it: float32)

    def genre_means(self, b):  # [U, d]: the genre mean of each distinct item of the batch
        return bag_mean(self.genre.weight, b["ugen"])  # (0 = no genre: padding)

    def history_items(self, b, gm):  # [B, K, d]: each history item as item + its genre mean
        return self.item(b["hid"]) + lookup(gm, b["hpos"])

    def pooled_history(self, b, gm):  # [ours] DeepFM/DCNv2: mean of the liked items, mean of
        # the disliked ones, and the history-label field (the sum of the liked / disliked sign
        # embeddings: how many recent items were liked; DIN pools the signs by attention)
        hk = self.history_items(b, gm)
        pool = lambda m: (hk * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        return [pool((b["hlab"] == 2).float()), pool((b["hlab"] == 1).float()),
                self.sign(b["hlab"]).sum(1)]

    def id_fields(self, b, gm, ie=None) -> list:  # user, item, target genres, profile fields:
        # [B, d] each; ie: the distinct items' embeddings (rows of b["uitem"]) if already looked up
        item = self.item(b["iid"]) if ie is None else lookup(ie, b["tpos"])
        return ([self.user(b["uid"]), item, lookup(gm, b["tpos"])] +
                [emb(b["prof"][:, f]) for f, emb in enumerate(self.fields)])

    def all_fields(self, ids: list, hist: list, text) -> list:  # [B, d] each, in a fixed order
        out = ids + hist
        if self.cfg["text_dim"]:
            out.append(self.text_proj(text))  # [paper] ExpCTR-Aug: the explanation is one more field
        return out


class DeepFM(CTRModel):
    """DeepFM (Guo et al. 2017): first-order terms + FM second order over the fields + an MLP."""
    HIST_FIELDS = 3  # liked mean, disliked mean, history labels (pooled_history)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lin_user = Embedding(cfg["n_uid"] + 1, 1)
        self.lin_item = Embedding(cfg["n_iid"] + 1, 1)
        self.lin_genre = Embedding(cfg["n_genre"] + 1, 1, padding_idx=0)
        nn.init.zeros_(self.lin_user.weight)
        nn.init.zeros_(self.lin_item.weight)
        self.deep = MLP([self.width] + self.hidden, cfg["dropout"], self.tower_dtype)
        self.out = nn.Linear(self.hidden[-1], 1)

    def forward(self, b: dict, text: torch.Tensor | None = None) -> torch.Tensor:
        gm = self.genre_means(b)
        fields = self.all_fields(self.id_fields(b, gm), self.pooled_history(b, gm), text)
        e = torch.stack(fields, 1)
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(-1)
        tmask = (b["tgen"] > 0).float()
        first = self.lin_user(b["uid"]) + self.lin_item(b["iid"]) + \
            ((self.lin_genre(b["tgen"]).squeeze(-1) * tmask).sum(-1, keepdim=True))
        return self.out(self.deep(torch.cat(fields, -1))).squeeze(-1) + fm + first.squeeze(-1)


class DCNv2(CTRModel):
    """DCN-V2 (Wang et al. 2021), parallel form: full-rank cross layers beside the deep tower.
    [ours] 3 cross layers."""
    HIST_FIELDS = 3  # liked mean, disliked mean, history labels (pooled_history)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cross = nn.ModuleList(nn.Linear(self.width, self.width) for _ in range(3))
        self.deep = MLP([self.width] + self.hidden, cfg["dropout"], self.tower_dtype)
        self.out = nn.Linear(self.hidden[-1] + self.width, 1)

    def forward(self, b: dict, text: torch.Tensor | None = None) -> torch.Tensor:
        gm = self.genre_means(b)
        x = torch.cat(self.all_fields(self.id_fields(b, gm), self.pooled_history(b, gm), text), -1)
        xl = x
        for layer in self.cross:
            xl = x * layer(xl) + xl
        return self.out(torch.cat([xl, self.deep(x)], -1)).squeeze(-1)


class DIN(CTRModel):
    """DIN (Zhou et al. 2018): the history pooled with weights from an attention unit on the
    target (no softmax). [ours] unit input [q, k, q-k, q*k, sign], query/key = item + genre mean;
    the signs are pooled with the same weights (the second history field)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg["emb_dim"]
        self.att = nn.Sequential(nn.Linear(5 * d, DIN_ATT_WIDTH), nn.PReLU(),
                                 nn.Linear(DIN_ATT_WIDTH, 1))
        self.deep = MLP([self.width] + self.hidden, cfg["dropout"], self.tower_dtype)
        self.out = nn.Linear(self.hidden[-1], 1)

    def forward(self, b: dict, text: torch.Tensor | None = None) -> torch.Tensor:
        gm = self.genre_means(b)
        ie = self.item(b["uitem"])  # [U, d]: the batch's distinct items, embedded once
        ids = self.id_fields(b, gm, ie)
        ke = ie + gm  # query / key of each distinct item: item + genre mean
        q = lookup(ke, b["tpos"])
        # att([q, k, q-k, q*k, sign]) by parts: the first layer's weight W = [Wq Wk Wd Wp Ws]
        # gives W.x = (Wq+Wd).q + (Wk-Wd).k + Wp.(q*k) + Ws.sign, so the query part runs once per
        # sample, not once per history slot, and the sign part is two input columns (the
        # disliked / liked rows of the sign table). The same function and parameters as the
        # concatenated input (tests/test_train_ctr.py holds them equal).
        first, act, last = self.att
        wq, wk, wd, wp, ws = first.weight.split(self.cfg["emb_dim"], 1)
        S = self.sign.weight[1:]  # [2, d]: disliked, liked
        per_sample = nn.functional.linear(q, wq + wd, first.bias)
        per_slot = torch.cat([wk - wd, wp, ws @ S.T], 1)  # on [k, q*k, onehot(sign)]
        pooled, psign = din_attention(ke, b["hpos"], b["hsign"].to(ke.dtype), q, per_sample,
                                      per_slot, act.weight, last.weight, last.bias)
        hist = [pooled, psign @ S]  # sum_k w_k k, and sum_k w_k sign_k = (sum_k w_k onehot_k) S
        return self.out(self.deep(torch.cat(self.all_fields(ids, hist, text), -1))).squeeze(-1)


NETS = {"deepfm": DeepFM, "dcnv2": DCNv2, "din": DIN}
TORCH_MODELS = tuple(NETS)  # the neural backbones (the others: popularity, logreg)


def build_net(cfg: dict) -> CTRModel:
    return NETS[cfg["model"]](cfg)


def vocab_sizes(vocab: dict) -> dict:
    """The table sizes a model config needs from its vocabulary (ctr_features.build_vocab)."""
    return {"n_uid": len(vocab["uid"]), "n_iid": len(vocab["iid"]), "n_genre": len(vocab["genre"]),
            "n_field": [len(vocab["field"][f]) for f in vocab["user_fields"]]}


# ---- plumbing: predictor (the Python API) -----------------------------------------------
class CTRPredictor:
    """A loaded checkpoint: .predict(samples, text_emb=None) -> float64 probabilities."""

    def __init__(self, ckpt: dict):
        self.ckpt, self.vocab, self.cfg = ckpt, ckpt["vocab"], ckpt["config"]
        self.model_name = self.cfg["model"]
        self.text_dim = int(self.cfg.get("text_dim", 0))
        if self.model_name in NETS:
            self.net = build_net(self.cfg)
            self.net.load_state_dict(ckpt["state_dict"])
            self.net.eval()

    def predict(self, samples, text_emb: np.ndarray | None = None,
                batch_size: int = EVAL_BATCH) -> np.ndarray:
        """samples: a list of sample dicts or SplitArrays."""
        samples = ctr_features.as_arrays(samples)
        if self.text_dim and (text_emb is None or np.shape(text_emb) != (len(samples), self.text_dim)):
            raise ExpCTRError(f"{self.model_name}: expected text_emb of shape "
                              f"({len(samples)}, {self.text_dim}), got "
                              f"{None if text_emb is None else np.shape(text_emb)}")
        if not samples:
            return np.zeros(0, np.float64)
        if self.model_name == "popularity":
            rates, prior = self.ckpt["state_dict"]["rate"], self.cfg["prior"]
            return np.array([rates.get(i, prior) for i in samples.items.tolist()],
                            np.float64)[samples.iid]
        if self.model_name == "logreg":
            X = ctr_features.onehot(samples, self.vocab)
            w = self.ckpt["state_dict"]["coef"].double().numpy()
            z = X @ w + float(self.ckpt["state_dict"]["intercept"])
            return 1.0 / (1.0 + np.exp(-z))
        feats = Features(samples, self.vocab)
        text = torch.from_numpy(np.asarray(text_emb, np.float32)) if self.text_dim else None
        return predict_net(self.net, feats, text, batch_size)


@torch.no_grad()
def predict_net(net, feats: Features, text, batch_size: int = EVAL_BATCH) -> np.ndarray:
    net.eval()
    n, out = len(feats), []
    for a in range(0, n, batch_size):
        b = feats.batch(np.arange(a, min(n, a + batch_size)))
        out.append(torch.sigmoid(net(b, None if text is None else text[a:a + batch_size])))
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def load_checkpoint(path) -> CTRPredictor:
    """path: a ctr/<name> folder or its model.pt (torch.load with weights_only, no pickle)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise ExpCTRError(f"{path}: checkpoint not found (run train_ctr.py first)")
    return CTRPredictor(torch.load(path, map_location="cpu", weights_only=True))

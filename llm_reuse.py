"""Work computed once instead of many times: two speed-ups of llm.LLM, kept out of llm.py so
that the plain forward passes there read on their own (issue 9, "make it affordable").

  LowerLayers   [ours] the frozen lower decoder layers run once for all the epochs that train a
                LoRA in the top layers only (the scorer's SFT, the explainer's PPO epochs), and
                the top layers then run from those states;
  PrefixReuse   [ours] a prompt's forward runs once for all its continuations (the K samples of a
                rollout group, a scorer input with and without explanation): its KV cache is
                copied to the rows that continue it.

Both are mixins of llm.LLM: they use its model, tok, device, depth, active, n_layers and
share_prefix, and its methods _parts, pad_left, _yes_no, policy_bias, scorer_ids and use. Each has
a test against the plain forward of llm.py (tests/test_rl_loop.py, tests/test_llm_stages.py):
equal up to float rounding. Generation's shared prefill (LLM._shared_prefill) and the chunked
lower states for torchrun (llm.lower_states_chunked) stay in llm.py, beside their callers.
"""
from __future__ import annotations

from collections import Counter

import torch
from tqdm import tqdm

import kernels
from common import ExpCTRError


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (less padding); deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class LowerLayers:
    """The frozen lower layers computed once; the top n_top layers run from their states."""

    def _run_layers(self, h: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        """Run decoder `layers` over hidden states h [B,T,H] (left-padded, mask [B,T]); the same
        calls as the decoder's own forward (Llama-style: rotary embeddings, causal mask)."""
        from transformers.masking_utils import create_causal_mask
        decoder, _ = self._parts()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        causal = create_causal_mask(config=decoder.config, inputs_embeds=h, attention_mask=mask,
                                    cache=None, position_ids=pos)
        rotary = decoder.rotary_emb(h, position_ids=pos)
        for layer in layers:
            h = layer(h, attention_mask=causal, position_embeddings=rotary, position_ids=pos)
        return h

    def stack(self, n_top: int) -> tuple[int, int]:
        """(first, end): the top n_top of the decoder layers the active adapter runs."""
        decoder, _ = self._parts()
        end = self.depth.get(self.active, self.n_layers)
        if not hasattr(decoder, "rotary_emb") or not 0 < n_top <= end:
            raise ExpCTRError(f"--lora-layers {n_top}: needs a Llama-style decoder with at least "
                              f"that many layers below the answer layer ({end})")
        return end - n_top, end

    @torch.inference_mode()
    def lower_states(self, seqs: list[list[int]], n_top: int, batch_size: int,
                     desc: str = "lower layers") -> list[torch.Tensor]:
        """The input of the top n_top decoder layers for each sequence ([T_i, H], padding cut):
        the frozen lower layers run once, however many epochs train the top ones. Valid only
        while no adapter touches the lower layers (a scorer LoRA with top_layers = n_top); call
        it with that adapter active (its answer layer sets where the top layers end)."""
        decoder, _ = self._parts()
        cut, _ = self.stack(n_top)
        out: list = [None] * len(seqs)
        for idx in tqdm(length_batches([len(s) for s in seqs], batch_size), desc=desc,
                        unit=" batch", leave=False):
            ids, mask = self.pad_left([seqs[i] for i in idx])
            h = self._run_layers(decoder.embed_tokens(ids), mask, decoder.layers[:cut])
            for j, i in enumerate(idx):
                out[i] = h[j, mask[j].bool()].clone()
        return out

    def _upper(self, states: list[torch.Tensor], n_top: int) -> torch.Tensor:
        """The top n_top layers (active adapter, with autograd when it is on) and the final norm
        over lower_states() rows, left-padded again: [B,T,H] (a fresh tensor, so inference-mode
        states can feed a backward)."""
        decoder, _ = self._parts()
        T = max(len(x) for x in states)
        h = states[0].new_zeros((len(states), T, states[0].shape[1]))
        mask = torch.zeros((len(states), T), dtype=torch.long, device=self.device)
        for j, x in enumerate(states):
            h[j, T - len(x):] = x
            mask[j, T - len(x):] = 1
        first, end = self.stack(n_top)
        return decoder.norm(self._run_layers(h, mask, decoder.layers[first:end]))

    def upper_answer_logprobs(self, states: list[torch.Tensor], n_top: int) -> torch.Tensor:
        """answer_logprobs() from lower_states(): the top n_top layers, the final norm and the
        Yes/No read-out. [B,2]."""
        return self._yes_no(self._upper(states, n_top)[:, -1])

    def upper_completion_logprobs(self, states: list[torch.Tensor], completions: list[list[int]],
                                  n_top: int, entropy: bool = False, temperature: float = 1.0):
        """completion_logprobs() from lower_states() of the prompt + completion sequences [ours:
        an explainer LoRA in the top n_top layers only, so its PPO epochs run those layers
        alone]. Same returns as completion_logprobs()."""
        _, head = self._parts()
        h = self._upper(states, n_top)
        T = h.shape[1]
        rows = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(completions)])
        cols = torch.cat([torch.arange(T - len(c), T) for c in completions])
        tgt = torch.tensor([t for c in completions for t in c], dtype=torch.long, device=self.device)
        out = kernels.selected_logprobs(h[rows.to(self.device), cols.to(self.device) - 1], head.weight,
                                        tgt, bias=self.policy_bias(), temperature=temperature,
                                        return_entropy=entropy)
        lens = [len(c) for c in completions]
        if entropy:
            return list(out[0].split(lens)), list(out[1].split(lens))
        return list(out.split(lens))

    def top_lora_layers(self, name: str) -> int:
        """N when adapter `name` adapts exactly the top N decoder layers (peft
        layers_to_transform), else 0 (it adapts all, or a set lower_states() cannot skip)."""
        layers = getattr(self.model.peft_config[name], "layers_to_transform", None)
        if not layers:
            return 0
        layers = sorted([layers] if isinstance(layers, int) else layers)
        end = self.depth.get(name, self.n_layers)
        return len(layers) if layers == list(range(end - len(layers), end)) else 0


class PrefixReuse:
    """A shared prompt's forward once, its KV cache copied to every continuation."""

    def hidden_after_prefix(self, prefixes: list[list[int]], suffixes: list[list[int]],
                            owner: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states at the positions of suffixes[j], continuing prefixes[owner[j]]:
        the prefixes run once (left-padded, KV cached), their caches are copied to the rows that
        continue them and the suffixes (right-padded) attend to them. Equals self.hidden() of the
        concatenations up to float rounding. Returns h [M,S,H] and the suffix mask [M,S]."""
        decoder, _ = self._parts()
        cache, pmask = self._prefill(prefixes, owner)
        S = max(len(x) for x in suffixes)
        sids = torch.full((len(suffixes), S), self.tok.pad_token_id, dtype=torch.long)
        smask = torch.zeros((len(suffixes), S), dtype=torch.long)
        for j, x in enumerate(suffixes):
            sids[j, :len(x)] = torch.tensor(x)
            smask[j, :len(x)] = 1
        sids, smask = sids.to(self.device), smask.to(self.device)
        pos = pmask.sum(1)[:, None] + torch.arange(S, device=self.device)[None]
        h = decoder(input_ids=sids, attention_mask=torch.cat([pmask, smask], 1),
                    position_ids=pos, cache=cache, use_cache=True).last_hidden_state
        return h, smask

    def _prefill(self, prefixes: list[list[int]], owner: list[int]):
        """Run each prefix once (left-padded, active adapter) and copy its KV cache to the rows
        that continue it: returns the cache and the prefix mask, both [len(owner), ...]."""
        decoder, _ = self._parts()
        pids, pmask = self.pad_left(prefixes)
        out = decoder(input_ids=pids, attention_mask=pmask,
                      position_ids=(pmask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        own = torch.tensor(owner, dtype=torch.long, device=self.device)
        out.cache.reorder_cache(own)  # [G, ...] -> [M, ...]: row j holds the KV of its prefix
        return out.cache, pmask[own]

    @staticmethod
    def grouped_batches(seqs: list[list[int]], keys: list, batch_size: int,
                        cap: list[int] | None = None):
        """[ours] Split sequences that share a prompt (same key) into (prefix, suffixes) so that
        the prompt runs once: prefix = their longest common prefix, cut so that every suffix keeps
        >= 1 token (and at most cap[i] tokens long). Yields (indices, prefixes, suffixes, owner)
        batches of ~batch_size rows."""
        groups: dict = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        order = sorted(groups.values(), key=lambda g: (len(seqs[g[0]]), g[0]))
        batch = []
        for g in order:
            batch.append(g)
            if sum(map(len, batch)) >= batch_size or g is order[-1]:
                idx, prefixes, suffixes, owner = [], [], [], []
                for gi, members in enumerate(batch):
                    first = seqs[members[0]]
                    n = min(min(len(seqs[i]) - 1, cap[i] if cap else len(seqs[i])) for i in members)
                    for i in members[1:]:
                        n = next((t for t in range(n) if seqs[i][t] != first[t]), n)
                    prefixes.append(first[:n])
                    for i in members:
                        idx.append(i)
                        suffixes.append(seqs[i][n:])
                        owner.append(gi)
                yield idx, prefixes, suffixes, owner
                batch = []

    @torch.inference_mode()
    def answer_logprobs_grouped(self, seqs: list[list[int]], keys: list, batch_size: int,
                                desc: str = "score") -> torch.Tensor:
        """answer_logprobs() of every sequence, [n,2] fp32, computing each shared prompt once
        (keys: equal for sequences that continue the same prompt, e.g. K explanations of it)."""
        out = torch.zeros((len(seqs), 2), dtype=torch.float32)
        keys = keys if self.share_prefix else list(range(len(seqs)))
        batches = list(self.grouped_batches(seqs, keys, batch_size))
        for idx, pre, suf, own in tqdm(batches, desc=desc, unit=" batch", leave=False):
            h, smask = self.hidden_after_prefix(pre, suf, own)
            out[idx] = self._yes_no(h[torch.arange(len(suf)), smask.sum(1) - 1]).float().cpu()
        return out

    def scorer_logprobs(self, prompts: list[str], expls: list[str | None], targets: list[str | None],
                        batch_size: int, desc: str = "score") -> torch.Tensor:
        """The LLM-CTR scorer's one pass (PAPER_NOTES §2): [n,2] fp32 log p(' Yes'), log p(' No')
        for scorer input i = prompt i + explanation i (None: none) + the question naming target i,
        adapter `scorer` (and its answer head) active. Inputs that share a prompt share its
        forward (prefix KV reuse). p(click) and r_LC are one line each on top of it."""
        seqs = [self.scorer_ids(p, e, t) for p, e, t in zip(prompts, expls, targets)]
        with self.use("scorer"):
            return self.answer_logprobs_grouped(seqs, self.scorer_groups(prompts, expls),
                                                batch_size, desc)

    def scorer_groups(self, prompts: list[str], expls: list[str | None]) -> list:
        """Keys of the scorer inputs that start alike (PrefixReuse.grouped_batches). View "full":
        the prompt comes first, so the inputs of one prompt (no text, its explanation, shuffled
        ones) share it. View "target" [ours]: an explanation comes first and the target after
        it, so the inputs that read one explanation share it, whichever target follows: the
        shuffle baseline reads each explanation once per permutation, all of them from one
        forward of it. An explanation read once (a rollout's K samples, mostly) or none: the
        prompt, as in view "full" (the inputs then share the chat template's opening)."""
        if self.scorer_view != "target":
            return [("prompt", p) for p in prompts]
        uses = Counter(e.strip() for e in expls if e is not None)
        return [("explanation", e.strip()) if e is not None and uses[e.strip()] > 1
                else ("prompt", p) for p, e in zip(prompts, expls)]

    @torch.inference_mode()
    def completion_logprobs_grouped(self, prompts: list[list[int]], completions: list[list[int]],
                                    batch_size: int, temperature: float = 1.0,
                                    desc: str = "log-probs") -> list[torch.Tensor]:
        """completion_logprobs() (no grad) with each distinct prompt's forward computed once for
        all its completions (prefix KV reuse): the K samples of a rollout group share it."""
        _, head = self._parts()
        out: list = [None] * len(prompts)
        seqs = [p + c for p, c in zip(prompts, completions)]
        # the prefix is the prompt minus its last token: that position predicts completion[0]
        keys = [tuple(p) for p in prompts] if self.share_prefix else list(range(len(prompts)))
        cap = [len(p) - 1 for p in prompts]
        batches = list(self.grouped_batches(seqs, keys, batch_size, cap))
        for idx, pre, suf, own in tqdm(batches, desc=desc, unit=" batch", leave=False):
            h, _ = self.hidden_after_prefix(pre, suf, own)
            rows, cols, tgt, lens = [], [], [], []
            for j, i in enumerate(idx):
                c, start = completions[i], len(prompts[i]) - len(pre[own[j]])  # suffix offset
                rows += [j] * len(c)
                cols += list(range(start - 1, start - 1 + len(c)))
                tgt += c
                lens.append(len(c))
            if not tgt:
                for i in idx:
                    out[i] = torch.zeros(0)
                continue
            r = torch.tensor(rows, device=self.device)
            cidx = torch.tensor(cols, device=self.device)
            lp = kernels.selected_logprobs(h[r, cidx], head.weight,
                                           torch.tensor(tgt, device=self.device),
                                           bias=self.policy_bias(), temperature=temperature)
            for i, part in zip(idx, lp.float().cpu().split(lens)):
                out[i] = part
        return out

"""The LLM side of ExpCTR, shared by stage1_sft.py, stage2_reward.py and stage3_rl.py.

Paper part: the explainer (policy) and the LLM-CTR scorer of PAPER_NOTES.md §2-4. One base causal
LM is loaded once and carries two peft LoRA adapters: `explainer` (the PPO policy) and `scorer`
(the Yes/No click predictor); the reference policy is the base with adapters disabled.

Models (`--model`): `smollm2-135m` (default), `tiny` (tests, smoke preset) or any Hugging Face
causal-LM folder / hub id; where their files come from: assets.py.

Every token log-prob goes through `kernels.selected_logprobs` on the decoder's final hidden states
and the lm_head weight; full-vocabulary logits are never computed for all positions. Two speed-ups
that compute shared work once (frozen lower layers, prompt prefixes) are mixins of LLM in
llm_reuse.py.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

import common
import ctr_ops
import kernels
import parallel
from assets import DEFAULT_MODEL, model_folder
from common import ExpCTRError
from llm_reuse import LowerLayers, PrefixReuse, length_batches

# [ours] LoRA defaults from TALLRec / CoLLM (PAPER_NOTES §8).
LORA_R, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS = 8, 16, 0.05, ("q_proj", "v_proj")
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ANSWER_PREFIX = "Answer:"         # the scorer's assistant turn starts with it
ANSWERS = (" Yes", " No")         # the scorer's two classes: index 0 = click, 1 = no click
ANSWER_HEAD_FILE = "answer_head.safetensors"  # a scorer's trained answer head, beside its adapter


def run_model(paths: common.RunPaths, arg: str | None) -> str:
    """The model of a run: --model if given, else R/run.json's "model", else the default."""
    if arg:
        return arg
    run_json = paths.root / "run.json"
    if run_json.exists():
        model = common.read_json(run_json).get("model")
        if model:
            return model
    return DEFAULT_MODEL


def add_model_args(p) -> None:
    """The options every LLM stage shares (base model, dtype, device, CPU threads, attention)."""
    p.add_argument("--model", default=None, help="base LLM: smollm2-135m, tiny, or a HF folder/hub "
                   "id (default: R/run.json's model, else smollm2-135m); must match the run's "
                   "adapters and rollout files")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="base weights dtype (auto: bf16 on CUDA and on CPUs with native bf16, else fp32); "
                   "LoRA weights stay fp32 and are never merged into the base weights")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--attn", default="sdpa", choices=list(ATTENTION),
                   help="attention kernel of the forward passes over whole sequences (scoring, "
                   "log-probs, SFT and PPO updates); generation always runs sdpa. On a 2-core CPU "
                   "in bf16 eager made a PPO update 1.23x faster alone but the planted preset no "
                   "faster (README)")


ATTENTION = ("sdpa", "eager")  # transformers' attention implementations we offer (--attn)


def from_args(model: str, args, world) -> "LLM":
    """The bundle of the options add_model_args() defined (device and threads of this rank)."""
    return LLM(model, args.dtype, world.device(args.device), world.threads(args.threads),
               attn=args.attn)


def pick_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 on CUDA and on CPUs with fast bf16 kernels (oneDNN's check: AVX-512 BF16 /
    AMX or Arm bf16), else fp32. [ours] On an AVX2-only CPU bf16 is emulated: we measured
    generation 2.8x and a scoring forward 5x slower in bf16 than in fp32 (SmolLM2-135M)."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---- plumbing: the LLM bundle (base + tokenizer + adapters) ------------------------------
def _contiguous_input(module, args):  # forward pre-hook: the same input, laid out contiguously
    return (args[0].contiguous(), *args[1:])


class LLM(LowerLayers, PrefixReuse):
    """Base model + tokenizer; `attach()` adds the explainer / scorer LoRA adapters."""

    def __init__(self, name: str, dtype: str = "auto", device: str | None = None, threads: int = 2,
                 attn: str = "sdpa"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if attn not in ATTENTION:  # before the model loads
            raise ExpCTRError(f"--attn {attn}: expected one of {', '.join(ATTENTION)}")
        if threads:
            torch.set_num_threads(threads)
        self.name = name
        self.device = parallel.resolve(device)
        self.dtype = pick_dtype(dtype, self.device)
        folder = model_folder(name)
        try:
            self.tok = AutoTokenizer.from_pretrained(folder)
            self.base = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype)
        except OSError as e:
            raise ExpCTRError(f"--model {name}: cannot load ({str(e).splitlines()[0]})") from None
        self.base.to(self.device).eval()
        # [ours] the forwards over whole sequences run `attn`; generate() switches to sdpa. On
        # CPU, SDPA's flash-attention backward was 22.5% of a PPO step and eager's products are
        # faster there, while SDPA decodes one query faster (README, "the attention kernel"; in
        # the planted preset the two balanced out: the default stays sdpa)
        self.attn = attn
        self.base.set_attn_implementation(attn)
        # The last position's hidden state reaches lm_head as a strided [B, 1, H] view. For such an
        # input and a weight that does not require grad (frozen, as here), torch's matmul does not
        # fold the batch into one product: it expands the [V, H] weight to [B, H, V] and copies it
        # (scripts/bench_generation.py --lm-head; torch 2.13 CPU, bf16, B = 32: 1.5 s against
        # 8 ms for the contiguous input), once per generate() call over distinct prompts.
        self.lm_head_hook = self.base.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.eos_id = self.tok.eos_token_id
        # [ours] explanations are plain text: special tokens other than EOS are never sampled
        self.suppress = sorted(set(self.tok.all_special_ids) - {self.eos_id}) or None
        self._policy_bias = None
        self.share_prefix = True  # prefix KV reuse (False: every sequence runs alone; benchmarks)
        self.model = self.base  # becomes a PeftModel after attach()
        self.active: str | None = None  # the adapter use() made active
        self.heads: dict[str, torch.nn.Linear] = {}  # trained answer heads, by adapter (scorer)
        self.n_layers = self.base.config.num_hidden_layers
        self.depth: dict[str, int] = {}  # adapters that read their answer below the top layer
        self.scorer_view = "full"  # what the scorer reads beside an explanation (common.SCORER_VIEWS)
        self.yes_id, self.no_id = self.answer_ids()

    # -- prompts ---------------------------------------------------------------------------
    def _chat(self, user: str, assistant_prefix: str = "") -> str:
        if self.tok.chat_template:
            msgs = [{"role": "system", "content": common.SYSTEM_PROMPT},
                    {"role": "user", "content": user}]
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:  # [ours] plain-text fallback for tokenizers without a chat template
            text = f"{common.SYSTEM_PROMPT}\n\n{user}\n"
        return text + assistant_prefix

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def explainer_ids(self, prompt: str, prefix: str = "") -> list[int]:
        """Token ids of the explainer's input: system prompt + user message (no label in it);
        prefix: text the assistant turn starts with (scripts/explainer_form.py; the stages use none)."""
        return self.encode(self._chat(prompt, prefix))

    def scorer_ids(self, prompt: str, explanation: str | None, target: str | None = None) -> list[int]:
        """[ours] The scorer reads build_scorer_prompt() as the user turn; the assistant turn
        starts with 'Answer:' and the next token is ' Yes' or ' No'."""
        return self.encode(self._chat(common.build_scorer_prompt(prompt, explanation, target,
                                                                 self.scorer_view), ANSWER_PREFIX))

    def answer_ids(self) -> tuple[int, int]:
        ctx = self.scorer_ids("x", None)
        ctx_text = self.tok.decode(ctx)
        out = []
        for ans in ANSWERS:
            full = self.encode(self._chat(common.build_scorer_prompt("x", None), ANSWER_PREFIX) + ans)
            if len(full) != len(ctx) + 1 or full[: len(ctx)] != ctx:
                raise ExpCTRError(f"--model {self.name}: the tokenizer has no single token for "
                                  f"'{ans}' after 'Answer:' (got {full[len(ctx):]} after "
                                  f"{ctx_text[-20:]!r}); the scorer needs one: choose another --model")
            out.append(full[-1])
        return out[0], out[1]

    # -- adapters --------------------------------------------------------------------------
    def attach(self, adapters: dict[str, str | os.PathLike | None], lora_dropout: float = LORA_DROPOUT,
               r: int = LORA_R, targets=LORA_TARGETS, top_layers: int = 0, answer_layer: int = 0,
               scorer_view: str | None = None):
        """adapters: {name: adapter folder, or None for a fresh LoRA (B=0: equals the base)}.
        A fresh LoRA has rank r (alpha = 2r) on `targets`; top_layers > 0 puts it in the top N
        decoder layers only [ours: the scorer's option], so backward stops there (the lower
        layers run without autograd). answer_layer > 0 [ours: the scorer's option]: the adapter
        runs only decoder layers [0, answer_layer) and reads its answer there (final norm, then
        the answer head); its top_layers are the top of those. A saved adapter brings its own
        configuration (answer_layer, and for the scorer its view, from its expctr.json);
        scorer_view sets a fresh scorer's (common.build_scorer_prompt)."""
        from peft import LoraConfig, PeftModel, get_peft_model
        n_layers = answer_layer or self.n_layers
        if not 0 <= answer_layer <= self.n_layers:
            raise ExpCTRError(f"answer layer {answer_layer}: expected 0 (the top) .. {self.n_layers}")
        if not 0 <= top_layers <= n_layers:
            raise ExpCTRError(f"top LoRA layers {top_layers}: expected 0 (all) .. {n_layers}")
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout,
                         target_modules=list(targets), task_type="CAUSAL_LM",
                         layers_to_transform=(list(range(n_layers - top_layers, n_layers))
                                              if top_layers else None))
        for name, src in adapters.items():
            if src is not None:
                self.check_adapter(src)
            if self.model is self.base:
                self.model = (PeftModel.from_pretrained(self.base, str(src), adapter_name=name,
                                                        is_trainable=True)
                              if src is not None else get_peft_model(self.base, cfg, adapter_name=name))
            elif src is not None:
                self.model.load_adapter(str(src), adapter_name=name, is_trainable=True)
            else:
                self.model.add_adapter(name, cfg)
            meta = (common.read_json(Path(src) / "expctr.json")
                    if src is not None and (Path(src) / "expctr.json").exists() else None)
            depth = meta.get("answer_layer", 0) if meta is not None else answer_layer
            if depth and depth != self.n_layers:
                self.depth[name] = int(depth)
            if name == "scorer":
                saved = meta.get("scorer_view", "full") if meta is not None else None
                self.scorer_view = saved or scorer_view or "full"
                common.build_scorer_prompt("x", None, view=self.scorer_view)  # checks the name
            if src is not None and (Path(src) / ANSWER_HEAD_FILE).exists():
                self.add_answer_head(name, src)
        set_lora_dropouts(self.model)  # [ours] the LoRA dropouts draw their masks by ctr_ops
        self.model.to(self.device).eval()
        return self.model

    def add_answer_head(self, name: str, src: str | os.PathLike | None = None) -> torch.nn.Linear:
        """[ours] A trainable answer head for adapter `name` (the scorer): a [2, H] fp32 linear
        map from the answer-position state to the (Yes, No) logits, initialised to the lm_head's
        ' Yes' / ' No' rows (so a fresh head gives exactly the untuned model's answer), or loaded
        from `src`/answer_head.safetensors. The lm_head is tied to the input embeddings in small
        models, so its rows cannot train without changing every prompt token; this head can, and
        unlike a LoRA on the top layers it flips the sign of an inverted zero-shot read-out in a
        few steps (docs/planted-experiments.md)."""
        _, lm = self._parts()
        head = torch.nn.Linear(lm.weight.shape[1], 2, bias=True).to(self.device, torch.float32)
        with torch.no_grad():
            if src is not None:
                from safetensors.torch import load_file
                sd = load_file(str(Path(src) / ANSWER_HEAD_FILE))
                if tuple(sd["weight"].shape) != tuple(head.weight.shape):
                    raise ExpCTRError(f"{src}/{ANSWER_HEAD_FILE}: weight {tuple(sd['weight'].shape)}, "
                                      f"expected {tuple(head.weight.shape)} for --model {self.name}")
                head.load_state_dict(sd)
            else:
                head.weight.copy_(lm.weight[[self.yes_id, self.no_id]].float())
                lm_bias = getattr(lm, "bias", None)
                head.bias.copy_(lm_bias[[self.yes_id, self.no_id]].float() if lm_bias is not None
                                else torch.zeros(2))
        self.heads[name] = head
        return head

    def check_adapter(self, folder) -> None:
        meta = Path(folder) / "expctr.json"
        if not (Path(folder) / "adapter_config.json").exists():
            raise ExpCTRError(f"{folder}: not a peft adapter folder (no adapter_config.json)")
        if meta.exists():
            trained_on = common.read_json(meta).get("model")
            if trained_on != self.name:
                raise ExpCTRError(f"{folder} was trained on --model {trained_on}, not {self.name}: "
                                  f"pass --model {trained_on} or use a fresh run folder")

    @contextmanager
    def use(self, name: str | None):
        """Context: adapter `name` active (and its answer head, if it has one), or the bare base
        model (the reference) for None."""
        from peft import PeftModel
        if not isinstance(self.model, PeftModel):
            if name is not None:
                raise ExpCTRError(f"adapter '{name}' requested but none attached")
            ctx = nullcontext()
        elif name is None:
            ctx = self.model.disable_adapter()
        else:
            self.model.set_adapter(name)
            ctx = nullcontext()
        prev, self.active = self.active, name
        cfg = self._parts()[0].config
        depth = cfg.num_hidden_layers
        # the decoder's forward runs layers[:config.num_hidden_layers]: an adapter with an
        # answer layer runs only its part of the stack (every forward path, KV caches included)
        cfg.num_hidden_layers = self.depth.get(name, self.n_layers)
        try:
            with ctx:
                yield
        finally:
            self.active = prev
            cfg.num_hidden_layers = depth

    def activation_checkpointing(self, on: bool) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them
        (less memory, ~1 more forward of compute); SFT and PPO expose it as --grad-checkpoint."""
        if on:
            self.base.activation_checkpointing_enable({"use_reentrant": False})
            # transformers checkpoints a layer only when it is in training mode; PPO runs in eval
            # mode (no LoRA dropout), so mark the decoder layers themselves (not their
            # submodules) as training. Call this after model.eval().
            for layer in self._parts()[0].layers:
                layer.training = True
        else:
            self.base.activation_checkpointing_disable()

    def trainable(self, name: str) -> list[torch.nn.Parameter]:
        """Make only adapter `name` trainable; returns its parameters."""
        params = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(f".{name}." in n and "lora_" in n)
            if p.requires_grad:
                params.append(p)
        for p in (self.heads[name].parameters() if name in self.heads else ()):
            p.requires_grad_(True)
            params.append(p)
        return params

    def save_adapter(self, name: str, out_dir, files: dict | None = None, **meta) -> None:
        """Write adapter `name` in peft's own format (adapter_config.json + safetensors), atomically,
        plus expctr.json {model, adapter, ...} and `files` ({filename: JSON object}) in the same
        folder; loadable by PeftModel.from_pretrained."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
        cfg = self.model.peft_config[name]
        cfg.base_model_name_or_path = model_folder(self.name)
        sd = get_peft_model_state_dict(self.model, adapter_name=name)
        with common.atomic_path(out_dir) as tmp:
            tmp.mkdir()
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                      str(tmp / "adapter_model.safetensors"))
            cfg.save_pretrained(str(tmp))
            if name in self.depth:
                meta = {**meta, "answer_layer": self.depth[name]}
            if name == "scorer":
                meta = {**meta, "scorer_view": self.scorer_view}
            (tmp / "expctr.json").write_text(json.dumps({"model": self.name, "adapter": name, **meta},
                                                        indent=2) + "\n")
            if name in self.heads:
                save_file({k: v.detach().contiguous().cpu() for k, v in self.heads[name].state_dict().items()},
                          str(tmp / ANSWER_HEAD_FILE))
            for fname, obj in (files or {}).items():
                (tmp / fname).write_text(json.dumps(obj, indent=2) + "\n")

    # -- forward passes (all log-probs through kernels.selected_logprobs) -------------------
    def _parts(self):
        from peft import PeftModel
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        return base.get_decoder(), base.get_output_embeddings()

    def pad_left(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, T - len(s):] = torch.tensor(s)
                mask[i, T - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def hidden(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final hidden states [B,T,H] of the inner decoder (active adapter), left-padded."""
        decoder, _ = self._parts()
        ids, mask = self.pad_left(seqs)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state, ids, mask

    def policy_bias(self) -> torch.Tensor:
        """[V] fp32 bias that turns the lm_head logits into the explainer's *policy*: 0 for every
        token, -inf for the special tokens generation never samples (all but EOS), plus the
        lm_head's own bias if it has one. generate() and completion_logprobs() both use it, so
        the distribution that samples is the one whose log-probs PPO stores and trains."""
        if self._policy_bias is None:
            _, head = self._parts()
            b = torch.zeros(head.weight.shape[0], dtype=torch.float32, device=self.device)
            if getattr(head, "bias", None) is not None:
                b += head.bias.detach().float()
            if self.suppress:
                b[self.suppress] = float("-inf")
            self._policy_bias = b
        return self._policy_bias

    def completion_logprobs(self, prompts: list[list[int]], completions: list[list[int]],
                            entropy: bool = False, temperature: float = 1.0):
        """Per-token log pi(completion token | prefix) under the active adapter, where pi is the
        sampling distribution of generate(): softmax((logits + policy_bias) / temperature).
        List of [L_i] fp32 tensors (and entropies). Only completion positions reach the lm_head,
        via the kernel."""
        _, head = self._parts()
        h, ids, _ = self.hidden([p + c for p, c in zip(prompts, completions)])
        T = ids.shape[1]
        rows = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(completions)])
        cols = torch.cat([torch.arange(T - len(c), T) for c in completions]).to(self.device)
        rows = rows.to(self.device)
        out = kernels.selected_logprobs(h[rows, cols - 1], head.weight, ids[rows, cols],
                                        bias=self.policy_bias(), temperature=temperature,
                                        return_entropy=entropy)
        lens = [len(c) for c in completions]
        if entropy:
            return list(out[0].split(lens)), list(out[1].split(lens))
        return list(out.split(lens))

    def answer_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        """[B,2] log p(' Yes'), log p(' No') at the answer position: the kernel's log-softmax over
        V=2 rows of the lm_head (PAPER_NOTES §2: p(click) = softmax over the Yes/No logits)."""
        h, _, _ = self.hidden(seqs)
        return self._yes_no(h[:, -1])

    def _yes_no(self, last: torch.Tensor) -> torch.Tensor:
        """[B,H] answer-position states -> [B,2] log p(' Yes'), log p(' No') (2-row log-softmax):
        the lm_head's two rows, or the active adapter's trained answer head (add_answer_head)."""
        if self.active in self.heads:
            w, b = self.heads[self.active].weight, self.heads[self.active].bias
            last = last.to(w.dtype)
        else:
            _, head = self._parts()
            w = head.weight[[self.yes_id, self.no_id]]
            b = head.bias[[self.yes_id, self.no_id]] if getattr(head, "bias", None) is not None else None
        B = last.shape[0]
        tgt = torch.cat([torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)])
        lp = kernels.selected_logprobs(torch.cat([last, last]), w, tgt.to(self.device), bias=b)
        return torch.stack([lp[:B], lp[B:]], dim=1)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[ours] Mean-pooled last hidden state of the base model (adapters off) over the text."""
        out = []
        with self.use(None):
            for i in range(0, len(texts), batch_size):
                seqs = [self.encode(t) or [self.eos_id] for t in texts[i:i + batch_size]]
                h, _, mask = self.hidden(seqs)
                m = mask.unsqueeze(-1).to(h.dtype)
                out.append(((h * m).sum(1) / m.sum(1)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.base.config.hidden_size), np.float32)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], *, greedy: bool, temperature: float = 1.0,
                 max_new_tokens: int = 32, min_new_tokens: int | None = None, return_logprobs: bool = False):
        """Batched, left-padded generation with the active adapter, **unmerged**: the same
        modules, weights and dtype as the forward pass of completion_logprobs() and PPO (a LoRA
        merged into bf16 weights loses most of its update to rounding). Sampling draws from
        softmax((logits + policy_bias) / temperature) (no top-k/top-p truncation: PPO needs the
        log-probs of the distribution that sampled). Completions are cut after EOS (EOS kept, so
        the policy learns to stop). return_logprobs: also the per-token log-probs of the sampled
        tokens as generation computed them (KV-cached), for checks against completion_logprobs.
        min_new_tokens: EOS is suppressed until then (benchmarks that need equal work per row)."""
        from transformers import GenerationConfig, LogitsProcessorList
        ids, mask = self.pad_left(prompts)
        cache = self._shared_prefill(prompts)
        # sampling: greedy decoding over the scores of InverseCDFSampler, which draws the token
        sampler = None if greedy else InverseCDFSampler(temperature, keep_scores=return_logprobs)
        cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                               pad_token_id=self.tok.pad_token_id, eos_token_id=self.eos_id,
                               suppress_tokens=self.suppress,
                               output_scores=return_logprobs and greedy, return_dict_in_generate=True)
        with self.attention("sdpa"):  # (the shared prefill above ran self.attn, like scoring)
            gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                      logits_processor=LogitsProcessorList([sampler] if sampler else []),
                                      **({"cache": cache} if cache is not None else {}))
        scores = sampler.scores if sampler is not None else gen.scores
        new = gen.sequences[:, ids.shape[1]:]
        res, lps = [], []
        for b, row in enumerate(new.tolist()):
            if self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            res.append(row)
            if return_logprobs:  # scores = logits after suppression and temperature
                lps.append(torch.stack([torch.log_softmax(scores[t][b].float(), -1)[tok]
                                        for t, tok in enumerate(row)]) if row else torch.zeros(0))
        return (res, lps) if return_logprobs else res

    @contextmanager
    def attention(self, impl: str):
        """Context: the decoder runs attention implementation `impl`, then self.attn again."""
        if impl == self.attn:
            yield
            return
        self.base.set_attn_implementation(impl)
        try:
            yield
        finally:
            self.base.set_attn_implementation(self.attn)

    def _shared_prefill(self, prompts: list[list[int]]):
        """[ours] Prefix KV reuse for rollouts: when a batch holds K copies of a prompt, run each
        distinct prompt (all but its last token) once and copy its KV cache to the K rows; generate()
        then continues from it. None when every prompt in the batch is distinct."""
        uniq: dict = {}
        owner = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
        if not self.share_prefix or len(uniq) == len(prompts) or min(len(p) for p in prompts) < 2:
            return None
        # all but the last token, so that the cache is aligned with pad_left(prompts)
        return self._prefill([list(k)[:-1] for k in uniq], owner)[0]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def set_lora_dropouts(model: torch.nn.Module, cls: type = None) -> int:
    """[ours] Make every LoRA input dropout of `model` (peft's `lora_dropout` dicts) a `cls` of the
    same p: by default ctr_ops.Dropout, whose counter-based masks cost a fraction of torch's CPU
    bernoulli_ (README, "Making an iteration affordable"); torch.nn.Dropout gives peft's back.
    peft's nn.Identity (p = 0) and dropouts already of `cls` stay; a new one takes the training
    mode of the one it replaces. Returns how many were set."""
    cls = cls or ctr_ops.Dropout
    n = 0
    for m in model.modules():
        for k, d in getattr(m, "lora_dropout", {}).items():
            if isinstance(d, torch.nn.Dropout) and type(d) is not cls:
                m.lora_dropout[k] = cls(d.p).train(d.training)
                n += 1
    return n


class InverseCDFSampler:
    """[ours] A transformers logits processor that samples: it draws each row's next token from
    softmax(scores / temperature) by inverse CDF (one uniform per row from torch's generator,
    located in the cumulative probabilities) and returns scores whose argmax is that token, so
    greedy decoding emits it. The same distribution as do_sample's torch.multinomial, other
    draws: on CPU multinomial draws one exponential per vocabulary entry, 36-45 ms of each
    decoding step of 32 rows x 49,152 (README, "Making an iteration affordable"); this takes
    a few ms. keep_scores: the tempered scores of every step (what do_sample's output_scores
    held), for the log-probs of the sampled tokens."""

    def __init__(self, temperature: float, keep_scores: bool = False):
        if not temperature > 0:
            raise ExpCTRError(f"temperature {temperature}: expected > 0 for sampling")
        self.temperature, self.keep, self.scores = float(temperature), keep_scores, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = scores.float() / self.temperature
        if self.keep:
            self.scores.append(s)
        # float64: a float32 cumulative sum near 1 (and a 24-bit uniform) could not draw a token
        # of probability below ~6e-8 at its own rate
        cdf = torch.softmax(s.double(), -1).cumsum_(-1)
        if not torch.isfinite(cdf[:, -1]).all():
            raise ExpCTRError("sampling: the scores of a row are NaN or all -inf (a bf16 overflow?)")
        u = torch.rand((s.shape[0], 1), dtype=torch.float64, device=s.device) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True).clamp_(max=s.shape[1] - 1)
        return torch.full_like(s, -float("inf")).scatter_(1, tok, 0.0)


def policy_folder(paths: common.RunPaths, tag: str) -> Path | None:
    """The adapter folder of explainer policy `tag`: None for base (the reference itself, no
    adapter), R/policy/iter_k for iter_k (an error naming the command that makes it)."""
    if tag == "base":
        return None
    if not tag.startswith("iter_") or not tag[5:].isdigit():
        raise ExpCTRError(f"policy {tag}: expected base or iter_<k>")
    k = int(tag[5:])
    return paths.require(paths.policy(k), f"python stage3_rl.py --run-dir {paths.root} --iter {k}")


def lower_states_chunked(world, bundle: LLM, seqs, n_top: int, batch: int, desc: str):
    """bundle.lower_states in chunks (one length-sorted batch each; chunk c on rank c % N),
    gathered on every rank: each rank then trains the top layers on any sample of a batch."""
    chunks = length_batches([len(x) for x in seqs], batch)
    got = world.map_chunks(len(chunks), lambda c: [h.cpu() for h in bundle.lower_states(
        [seqs[i] for i in chunks[c]], n_top, batch, desc)], desc)
    out: list = [None] * len(seqs)
    for c, states in got.items():
        for i, h in zip(chunks[c], states):
            out[i] = h.to(bundle.device)
    return out


def make_embedder(bundle: LLM, encoder: str | None, batch_size: int = 32):
    """texts -> float32 [n, d]. Default: the base LLM with adapters off (PAPER_NOTES §3 [ours]);
    `encoder`: any Hugging Face model folder / hub id, mean-pooled last hidden state."""
    if not encoder:
        return lambda texts: bundle.embed(texts, batch_size)
    from transformers import AutoModel, AutoTokenizer
    try:
        etok = AutoTokenizer.from_pretrained(model_folder(encoder))
        enc = AutoModel.from_pretrained(model_folder(encoder)).to(bundle.device).eval()
    except OSError as e:
        raise ExpCTRError(f"--encoder {encoder}: cannot load ({str(e).splitlines()[0]})") from None
    if etok.pad_token is None:
        etok.pad_token = etok.eos_token

    @torch.inference_mode()
    def embed(texts):
        out = []
        for i in range(0, len(texts), batch_size):
            b = etok([t or "." for t in texts[i:i + batch_size]], return_tensors="pt", padding=True,
                     truncation=True, max_length=256).to(bundle.device)
            h = enc(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1)).float().cpu().numpy())
        return np.concatenate(out)
    return embed

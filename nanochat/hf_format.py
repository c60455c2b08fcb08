"""Models in the Hugging Face `transformers` NanoChat format (`model_type: "nanochat"`): export and import.

`transformers` 5.x ships NanoChatForCausalLM for the architecture of nanochat/gpt.py (rotary then
QK norm, weightless RMSNorm, ReLU², soft-capped logits, untied embeddings, GQA, no biases), so a
model leaves the project as a plain directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline with no remote code. This module reads and writes
that directory with `safetensors` and `json` only: `transformers` is never imported here.

Directory written by `save_hf` (and read by `load_hf_model` / `Tokenizer.load`):
    config.json                     NanoChatConfig fields; rms_norm_eps is float32's epsilon unless
                                    GPTConfig.norm_eps says otherwise (our norm uses the dtype's)
    model.safetensors               weights under transformers' names, or above `max_shard_bytes`
    model-0000i-of-0000n.safetensors  shards plus model.safetensors.index.json (the weight map)
    generation_config.json          bos, the stop tokens (<|assistant_end|> and <|bos|> for chat models)
    tokenizer.json                  byte-level BPE with the 9 special tokens (Tokenizer.hf_json)
    tokenizer_config.json           tokenizer class, special tokens and the chat template
    chat_template.jinja             the chat template (our conversation rendering, see CHAT_TEMPLATE)
    README.md                       model card with the run's numbers

Import accepts a directory written by us or by `transformers` (`save_pretrained`), and checks
what our own checkpoints get checked for: the model type and architecture fields, every weight's
name, shape and dtype, and the tokenizer's vocabulary and special tokens against the config.
Weight names: transformer.wte <-> model.embed_tokens, h.i.attn.c_q/c_k/c_v/c_proj <->
layers.i.self_attn.q_proj/k_proj/v_proj/o_proj, h.i.mlp.c_fc/c_proj <-> layers.i.mlp.fc1/fc2,
lm_head <-> lm_head. Tests: `python -m pytest tests/test_hf_export.py`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanochat.common import atomic_write
from nanochat.errors import NanochatError
from nanochat.gpt import GPT, LOGIT_SOFTCAP, ROTARY_BASE, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

MODEL_TYPE = "nanochat"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CARD_FILE = "README.md"
FLOAT32_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm(eps=None) uses on float32
DEFAULT_SHARD_BYTES = 5 * 1000**3  # transformers' default max_shard_size ("5GB")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Our conversation rendering (Tokenizer.render_conversation / render_for_completion) as Jinja: a system
# message is merged into the first user message as "system\n\nuser"; assistant content is a string or a
# list of parts {"type": "text"|"python"|"python_output", "text": ...}. Output only through {{- -}} so
# the template's own whitespace never reaches the prompt.
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] ~ '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('messages must alternate user/assistant, starting with user "
    "(one system message may come first)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' ~ (prefix if loop.first else '') ~ message['content'] ~ '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}"
    "{{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown part type ' ~ part['type']) -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)

# (our state_dict key, transformers' weight name); {i} is the layer index. Both directions use it.
_WEIGHT_NAMES = (
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.h.{i}.attn.c_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("transformer.h.{i}.attn.c_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("transformer.h.{i}.attn.c_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("transformer.h.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("transformer.h.{i}.mlp.c_fc.weight", "model.layers.{i}.mlp.fc1.weight"),
    ("transformer.h.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.fc2.weight"),
    ("lm_head.weight", "lm_head.weight"),
)


class HFFormatError(NanochatError, ValueError):
    """A directory that is not a usable NanoChat model in the transformers format (the message says why)."""


def _rename(name: str, source: int, what: str) -> str:
    """`name` in column `source` of _WEIGHT_NAMES, written in the other column's layout."""
    for names in _WEIGHT_NAMES:
        pattern = re.escape(names[source]).replace(r"\{i\}", r"(\d+)")
        found = re.fullmatch(pattern, name)
        if found:
            return names[1 - source].format(i=found.group(1) if found.groups() else "")
    raise HFFormatError(f"weight {name!r} has no counterpart in the {what} layout")


def hf_name(ours: str) -> str:
    """transformers' name of one of our state_dict keys."""
    return _rename(ours, 0, "transformers NanoChat")


def our_name(hf: str) -> str:
    """Our state_dict key of one of transformers' weight names."""
    return _rename(hf, 1, "nanochat GPT")


# -- config -----------------------------------------------------------------------------------------


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}


def hf_config(config: GPTConfig, tokenizer: Tokenizer, *, chat: bool,
              dtype: str = "float32") -> dict[str, Any]:
    """config.json of NanoChatForCausalLM for `config` (ids from `tokenizer`; eos = <|assistant_end|>
    for a chat model, <|bos|> for a base model, which ends documents)."""
    if config.vocab_size != tokenizer.vocab_size:
        raise HFFormatError(f"the model has vocab_size {config.vocab_size} "
                            f"but the tokenizer {tokenizer.vocab_size}: "
                            "export the model with the tokenizer it was trained with")
    sp = special_ids(tokenizer)
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.n_embd // config.n_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "attention_dropout": 0.0,
        "attention_bias": False,
        "rms_norm_eps": FLOAT32_EPS if config.norm_eps is None else config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROTARY_BASE},
        "final_logit_softcapping": LOGIT_SOFTCAP,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": sp["<|bos|>"],
        "eos_token_id": sp["<|assistant_end|>"] if chat else sp["<|bos|>"],
        "pad_token_id": sp["<|bos|>"],
        "dtype": dtype,
    }


def gpt_config_from_hf(cfg: dict[str, Any], where: str) -> GPTConfig:
    """Our GPTConfig of a NanoChat config.json; HFFormatError naming each field we cannot run."""
    if cfg.get("model_type") != MODEL_TYPE:
        raise HFFormatError(f"{where} holds a {cfg.get('model_type')!r} model; "
                            f"only model_type {MODEL_TYPE!r} "
                            "(transformers' NanoChatForCausalLM) can be imported")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        layers, vocab = int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
        seq = int(cfg.get("max_position_embeddings", 2048))
    except (KeyError, TypeError, ValueError) as e:
        raise HFFormatError(f"{where}: config.json lacks a valid {e} field") from None
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", ROTARY_BASE))
    head_dim = cfg.get("head_dim") or (hidden // heads if heads else 0)
    checks = [
        (cfg.get("hidden_act", "relu2") == "relu2", f"hidden_act {cfg.get('hidden_act')!r} (need 'relu2')"),
        (not cfg.get("attention_bias", False), "attention_bias true (our layers have no biases)"),
        (not cfg.get("tie_word_embeddings", False), "tie_word_embeddings true (ours are untied)"),
        (int(cfg.get("intermediate_size", 4 * hidden)) == 4 * hidden,
         f"intermediate_size {cfg.get('intermediate_size')} (need 4 x hidden_size = {4 * hidden})"),
        (heads > 0 and hidden % heads == 0 and head_dim * heads == hidden,
         f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}"),
        (kv_heads > 0 and heads % kv_heads == 0,
         f"{heads} heads do not split into {kv_heads} key/value heads"),
        (rope.get("rope_type", "default") == "default",
         f"rope_type {rope.get('rope_type')!r} (need 'default')"),
        (float(theta) == ROTARY_BASE, f"rope_theta {theta} (our rotary base is {ROTARY_BASE:g})"),
        (cfg.get("final_logit_softcapping", LOGIT_SOFTCAP) == LOGIT_SOFTCAP,
         f"final_logit_softcapping {cfg.get('final_logit_softcapping')} (ours is {LOGIT_SOFTCAP:g})"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise HFFormatError(f"{where}: this NanoChat model differs from nanochat/gpt.py's architecture: "
                            + "; ".join(problems))
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    return GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=layers, n_head=heads, n_kv_head=kv_heads,
                     n_embd=hidden, norm_eps=None if eps == FLOAT32_EPS else eps)


def is_hf_dir(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a transformers-style config.json (it has a model_type)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return "model_type" in json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise HFFormatError(f"no {CONFIG_FILE} in {directory}: not a transformers model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path} is not valid JSON ({e})") from None


# -- weights ----------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names, contiguous CPU copies in `dtype`."""
    return {hf_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Write safetensors files (one, or shards + index above max_shard_bytes); returns the file names."""
    groups = _shards(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(groups) == 1:
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata=meta))
        return [WEIGHTS_FILE]
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {k: tensors[k] for k in group}
        atomic_write(directory / fname, lambda p, part=part: save_file(part, str(p), metadata=meta))
        weight_map.update(dict.fromkeys(group, fname))
        names.append(fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, INDEX_FILE]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors file or shards (by transformers' names)."""
    if (directory / INDEX_FILE).is_file():
        index = json.loads((directory / INDEX_FILE).read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
    elif (directory / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        bins = [p.name for p in directory.glob("*.bin")]
        extra = f" (it has {bins}: resave with safe_serialization)" if bins else ""
        raise HFFormatError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{extra}")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        if not (directory / fname).is_file():
            raise HFFormatError(f"{directory / fname} is named in {INDEX_FILE} but missing")
        with safe_open(str(directory / fname), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


# -- tokenizer and cards ----------------------------------------------------------------------------


def tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json: the fast tokenizer class, the special tokens and the chat template."""
    decoder = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for name, i in special_ids(tokenizer).items()}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|bos|>", "<|assistant_end|>")],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(tokenizer: Tokenizer, *, chat: bool) -> dict[str, Any]:
    """generation_config.json: our stop tokens (the chat engine stops on <|assistant_end|> and <|bos|>)."""
    sp = special_ids(tokenizer)
    stops = [sp["<|assistant_end|>"], sp["<|bos|>"]] if chat else [sp["<|bos|>"]]
    return {"bos_token_id": sp["<|bos|>"], "eos_token_id": stops, "pad_token_id": sp["<|bos|>"],
            "do_sample": False}


def model_card(config: GPTConfig, num_params: int, meta: dict[str, Any],
               numbers: list[tuple[str, str]]) -> str:
    """README.md: front matter for the Hub, what the model is, how to load it, the report card's
    numbers."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in numbers) or "| (no evaluation recorded) | - |"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- nanochat",
        "---", "",
        f"# nanochat d{config.n_layer} ({meta.get('stage', 'model')}, run `{meta.get('run', '?')}`)", "",
        f"A {num_params:,}-parameter nanochat model trained with nanochat on Ray, in the `transformers` "
        "NanoChat format (no remote code).", "",
        f"- layers {config.n_layer}, width {config.n_embd}, heads {config.n_head} (key/value heads "
        f"{config.n_kv_head}), vocabulary {config.vocab_size}, training context {config.sequence_len}",
        f"- stage {meta.get('stage', '?')}, step {meta.get('step', '?')}, "
        f"exported from {meta.get('source', '?')}",
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(DIR)",
        "model = AutoModelForCausalLM.from_pretrained(DIR)",
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,',
        '                              return_tensors="pt", return_dict=True)',
        "out = model.generate(**ids, max_new_tokens=64)", "```", "",
        "or `transformers serve` and an OpenAI-style client.", "",
        "## Numbers from the run's report card", "", "| metric | value |", "|---|---|", rows, "",
    ]
    return "\n".join(lines)


# -- the two directions -----------------------------------------------------------------------------


def save_hf(directory: str | os.PathLike, model: GPT, tokenizer: Tokenizer, *, chat: bool,
            meta: dict[str, Any] | None = None, numbers: list[tuple[str, str]] | None = None,
            dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write `model` + `tokenizer` as a transformers NanoChat directory; returns the files written.

    chat: the model answers conversations (stop on <|assistant_end|>) rather than continuing
    documents. meta: stage, step, run, source for the model card; numbers: (metric, value) rows."""
    if dtype not in DTYPES:
        raise HFFormatError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for stale in [*d.glob("model-*-of-*.safetensors"), d / WEIGHTS_FILE, d / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # an earlier export's shards or index would shadow the new weights
    files = save_weights(d, hf_state_dict(model, DTYPES[dtype]), max_shard_bytes)
    _write_json(d / CONFIG_FILE, hf_config(model.config, tokenizer, chat=chat, dtype=dtype))
    _write_json(d / GENERATION_FILE, generation_config(tokenizer, chat=chat))
    tokenizer.export_hf(d / TOKENIZER_FILE)
    _write_json(d / TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer))
    atomic_write(d / CHAT_TEMPLATE_FILE, lambda p: p.write_text(CHAT_TEMPLATE))
    card = model_card(model.config, model.num_params(), meta or {}, numbers or [])
    atomic_write(d / CARD_FILE, lambda p: p.write_text(card))
    written = [*files, CONFIG_FILE, GENERATION_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
               CHAT_TEMPLATE_FILE, CARD_FILE]
    for name in written:  # temporary files are created owner-only; a shared model is world-readable
        os.chmod(d / name, 0o644)
    return written


def load_hf_model(directory: str | os.PathLike, device: str | torch.device) -> tuple[GPT, dict[str, Any]]:
    """Our GPT (float32, eval mode) from a transformers NanoChat directory, after checking the config,
    every weight's name, shape and dtype, and the tokenizer beside it (when there is one).

    Returns (model, meta) shaped like checkpoint.load_model's: model_config, hf_config, source dtype,
    and "tokenizer_dir" (the directory itself when it holds tokenizer.json, else None)."""
    d = Path(directory)
    cfg = read_hf_config(d)
    config = gpt_config_from_hf(cfg, str(d))
    weights, dtypes = load_hf_state_dict(d, config)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also computes the rotary tables, which are not weights
    model.load_state_dict(weights)
    model.eval()
    tok_dir = str(d) if (d / TOKENIZER_FILE).is_file() else None
    if tok_dir is not None:
        check_tokenizer(Tokenizer.load(d), cfg, str(d))
    return model, {"format": "hf", "model_config": asdict(config), "hf_config": cfg,
                   "source_dtype": dtypes, "tokenizer_dir": tok_dir}


def load_hf_state_dict(directory: str | os.PathLike, config: GPTConfig | None = None
                       ) -> tuple[dict[str, torch.Tensor], str]:
    """Our float32 state_dict from a NanoChat directory's safetensors (config: from its config.json
    when None), after checking every weight's name, shape and dtype; also the stored dtype(s)."""
    d = Path(directory)
    config = config or gpt_config_from_hf(read_hf_config(d), str(d))
    with torch.device("meta"):
        shape = GPT(config)
    expected = {hf_name(k): tuple(v.shape) for k, v in shape.state_dict().items()}
    tensors = read_weights(d)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise HFFormatError(f"{d}: the weights do not match the config's NanoChat model (missing: "
                            f"{missing[:5] or 'none'}, unexpected: {unexpected[:5] or 'none'})")
    problems = [f"{k} is {tuple(t.shape)} but the config needs {expected[k]}" for k, t in tensors.items()
                if tuple(t.shape) != expected[k]]
    problems += [f"{k} has dtype {t.dtype} (weights must be floating point)" for k, t in tensors.items()
                 if not t.dtype.is_floating_point]
    if problems:
        raise HFFormatError(f"{d}: " + "; ".join(problems[:5]))
    dtypes = ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}))
    return {our_name(k): t.to(torch.float32) for k, t in tensors.items()}, dtypes


def check_tokenizer(tokenizer: Tokenizer, cfg: dict[str, Any], where: str) -> None:
    """The tokenizer fits the config's vocabulary size. (Its special tokens were checked when it was
    read; config.json's bos/eos ids are not: directories converted with transformers' defaults carry
    0/1, and nothing of ours reads them.)"""
    if tokenizer.vocab_size != int(cfg["vocab_size"]):
        raise HFFormatError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                            f"vocab_size is {cfg['vocab_size']}: the tokenizer belongs to another model")

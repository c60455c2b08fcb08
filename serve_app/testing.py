"""Random checkpoints for the serve tests and the load benchmark (no training, no downloads).

    write_random_checkpoint(dir, n_layer=2, n_embd=128, n_head=2, vocab_size=512, sequence_len=512)

writes an exported model the way the training stages do (`nanochat.checkpoint.save_model`) with
the tokenizer in its `tokenizer/` subdirectory: a BPE tokenizer trained on synthetic words to
exactly `vocab_size`, and a GPT with random weights. nanochat's init zeroes the output
projections and lm_head (uniform logits, the same token everywhere under greedy decoding), so
they get small random weights too: the next token then depends on the whole context.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "da", "fe", "gi", "ho", "ju",
             "be", "co", "wy", "xi", "an", "el", "in", "os", "um", "ar", "es", "ir", "or", "ur"]


def synthetic_texts(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of pseudo-words with punctuation and digits: enough distinct pairs for BPE to
    reach a vocabulary of several thousand tokens."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(40, 120))]
        for i in range(0, len(words), rng.randint(6, 12)):
            words[i] = words[i].capitalize()
            words[i - 1] += rng.choice([".", ",", "!", "?", f" {rng.randint(0, 999)}."])
        docs.append(" ".join(words))
    return docs


def write_random_checkpoint(directory: str | Path, *, n_layer: int = 2, n_embd: int = 128, n_head: int = 2,
                            vocab_size: int = 512, sequence_len: int = 512, seed: int = 0) -> Path:
    """An exported random model + tokenizer in `directory`; returns it."""
    from nanochat.checkpoint import TOKENIZER_DIR, save_model
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    d = Path(directory)
    n_docs = max(200, vocab_size // 4)  # ~20 pseudo-word types per merge to learn
    tokenizer = Tokenizer.train_from_iterator(synthetic_texts(n_docs, seed), vocab_size)
    if tokenizer.vocab_size != vocab_size:
        raise RuntimeError(
            f"synthetic corpus gave {tokenizer.vocab_size} tokens, not {vocab_size}; raise n_docs")
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, n_embd**-0.5)
            block.mlp.c_proj.weight.normal_(0, (4 * n_embd) ** -0.5)
        model.lm_head.weight.normal_(0, 2 * n_embd**-0.5)  # logits of std ~2: varied but not one-hot
    save_model(d, model, {"source": "serve_app.testing.write_random_checkpoint", "seed": seed})
    tokenizer.save(d / TOKENIZER_DIR)
    return d

"""The GPT model of nanochat (October 2025): a dense decoder-only Transformer.

Notable features:
- rotary embeddings (base 10000), no absolute positional embeddings
- QK norm (queries and keys RMS-normalised after rotary)
- RMSNorm without learnable parameters: after the token embedding, before each attention and
  MLP, and before the head (epsilon: the dtype's machine epsilon, or GPTConfig.norm_eps)
- untied token embedding and lm_head
- ReLU^2 MLP with 4x expansion; no biases anywhere
- group-query attention (n_kv_head <= n_head) for cheaper inference
- logits soft-capped at 15 * tanh(x / 15), returned in float32
- zero-initialised output projections (attention c_proj, MLP c_proj, lm_head)
- optional KV cache with rows at different positions (nanochat/kv_cache.py)
- CPU inference fast path (opt-in, `GPT.set_cpu_prepack`): linear layers multiply with a oneDNN
  copy of their weight packed once for the CPU's kernels, repacked when the weight changes

Build on the meta device and materialise to avoid double initialisation:
    with torch.device("meta"): model = GPT(config)
    model.to_empty(device=device); model.init_weights()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.adamw import AdamW
from nanochat.common import DistInfo
from nanochat.kv_cache import KVCache
from nanochat.muon import Muon
from nanochat.schedule import LearningRates

LOGIT_SOFTCAP = 15.0  # logits = 15 * tanh(logits / 15): bounded logits, steadier early training
ROTARY_BASE = 10000.0
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover 10x sequence_len so inference can run longer


PREPACK_BATCH_HINT = 16  # rows oneDNN tunes the packed layout for; any row count works


def _can_prepack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedWeight:
    """A oneDNN-prepacked copy of one weight, or of several stacked by rows (a fused QKV), for the
    CPU inference path. Remade whenever a source changes (storage or in-place version: optimizer
    steps, load_state_dict, copy_); pickles and deep-copies as empty (remade on use). Code that
    writes a weight's memory behind PyTorch's back (a collective's receive buffer, a raw pointer)
    must call torch.autograd.graph.increment_version on it, as cluster/rl.py's broadcast does."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """x (..., in) @ cat(weights).T -> (..., sum of out)."""
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if self._key != key:
            w = weights[0] if len(weights) == 1 else torch.cat(weights)
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PREPACK_BATCH_HINT)
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")

    def clear(self) -> None:
        self._key = self._packed = None

    def __getstate__(self) -> dict:
        return {"_key": None, "_packed": None}


class Linear(nn.Linear):
    """nn.Linear without bias, plus an opt-in CPU inference path (`cpu_prepack = True`).

    On CPU, small-batch float32 matmuls through F.linear (MKL sgemm with a transposed weight) run
    at a fraction of memory bandwidth: decode at batch 1-16 is dominated by them. oneDNN's
    prepacked weights (what torch.compile's freezing uses on CPU) ran the 37 matmuls of a 6 x 384
    decode step ~1.7x faster at batch 1 and ~2.2x at 16 on a 2-core AVX-512 EPYC (the engine's
    end-to-end gain is in benchmarks/engine.py and the README). The path is taken only under
    no-grad/inference mode, for float32 on CPU without autocast, outside torch.compile; everything
    else (training, CUDA, bf16, compiled code) takes F.linear. It costs one extra copy of the
    weights."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.cpu_prepack = False
        self.packed = PackedWeight()

    def prepacked(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes the CPU prepacked path."""
        return (self.cpu_prepack and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling())  # compiled code: inductor packs itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked(x):
            return self.packed.matmul(x, [self.weight])
        return F.linear(x, self.weight)


@dataclass
class GPTConfig:
    sequence_len: int = 1024  # training context length in tokens
    vocab_size: int = 50304  # number of token ids (embedding rows, logits per position)
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head; must divide n_head)
    n_embd: int = 768  # model width; head_dim = n_embd / n_head
    norm_eps: float | None = None  # RMSNorm epsilon; None: the input dtype's machine epsilon (F.rms_norm's)

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int, head_dim: int = 128) -> GPTConfig:
        """nanochat's single dial: width = 64 * depth, heads = width / head_dim (as many kv heads).

        head_dim 128 is the seed's; tiny CPU models may use less (depth 2: width 128, head_dim 64)."""
        model_dim = 64 * depth
        if depth < 1 or head_dim < 2 or head_dim % 2 or model_dim % head_dim:
            raise ValueError(
                f"depth {depth} gives width {model_dim}, which does not split into heads of "
                f"head_dim {head_dim} (need an even head_dim dividing 64 * depth); pick another "
                "depth or head_dim"
            )
        n_head = model_dim // head_dim
        return cls(sequence_len, vocab_size, depth, n_head, n_head, model_dim)


def norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dim without learnable scale (eps None: the dtype's machine epsilon)."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by angles given as cos/sin (B|1, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(
                f"n_embd {config.n_embd} must divide by n_head {config.n_head}, and n_head by "
                f"n_kv_head {config.n_kv_head}"
            )
        self.layer_idx = layer_idx
        self.eps = config.norm_eps
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.qkv_packed = PackedWeight()  # CPU inference: q, k, v in one matmul (see Linear)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        B, T, C = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        if self.c_q.prepacked(x):  # one fused matmul; rotary and norm over q and k heads at once
            qkv = self.qkv_packed.matmul(x, [self.c_q.weight, self.c_k.weight, self.c_v.weight])
            qk = norm(apply_rotary(qkv[..., : (H + H_kv) * D].view(B, T, H + H_kv, D), cos, sin), self.eps)
            q, k = qk.split([H, H_kv], dim=2)
            v = qkv[..., (H + H_kv) * D :].view(B, T, H_kv, D)
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, H_kv, D)
            v = self.c_v(x).view(B, T, H_kv, D)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            # QK norm; keep autocast's dtype
            q, k = norm(q, self.eps).to(v.dtype), norm(k, self.eps).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = kv_cache.attend(self.layer_idx, q, k, v, enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.eps = config.norm_eps

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        x = x + self.attn(norm(x, self.eps), cos, sin, kv_cache)
        return x + self.mlp(norm(x, self.eps))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        """Build the modules. Weights are PyTorch defaults until init_weights() is called."""
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.rotary_len = config.sequence_len * ROTARY_LENGTH_FACTOR
        cos, sin = self._rotary_tables(device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)  # (rotary_len, head_dim/2) float32
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.n_embd // self.config.n_head
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)  # (D/2,)
        inv_freq = 1.0 / (ROTARY_BASE ** (channels / head_dim))
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (rotary_len, D/2) radians
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat init: N(0, 1) embedding; linear std = fan_in^-0.5 * min(1, sqrt(fan_out/fan_in));
        zero output projections and lm_head; recompute the rotary tables (after to_empty)."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        for module in self.transformer.h.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = fan_in**-0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.zeros_(self.lm_head.weight)
        cos, sin = self._rotary_tables(device=self.lm_head.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def _rotary_for(self, idx: torch.Tensor, kv_cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the positions of idx (B, T): (1, T, 1, D/2), or (B, T, 1, D/2) with a cache."""
        T = idx.size(1)
        limit = T if kv_cache is None else kv_cache.seq_len
        if limit > self.rotary_len:
            raise ValueError(
                f"positions up to {limit} exceed the rotary tables ({self.rotary_len} = "
                f"{ROTARY_LENGTH_FACTOR} x sequence_len); use shorter inputs or a shorter KV cache"
            )
        if kv_cache is None:
            return self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        positions = kv_cache.token_positions(T)  # (B, T)
        return self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> float32 logits (B, T, V), or with targets (B, T) the
        cross-entropy loss (targets == -1 ignored): a scalar for "mean"/"sum", (B, T) for "none".
        With a kv_cache, idx continues the cache's active rows (see nanochat/kv_cache.py).
        logits_at (B, K) long: only the logits at these positions of each row, (B, K, V) (a
        prefill needs the last token's only; the output layer is a large share of its cost)."""
        cos, sin = self._rotary_for(idx, kv_cache)
        eps = self.config.norm_eps
        x = norm(self.transformer.wte(idx), eps)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if logits_at is not None:
            x = x[torch.arange(x.size(0), device=x.device)[:, None], logits_at]  # (B, K, C)
        x = norm(x, eps)
        logits = self.lm_head(x).float()  # (B, T, V)
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    def set_cpu_prepack(self, enabled: bool = True) -> bool:
        """Turn the CPU inference fast path of every linear layer on or off (see `Linear`);
        returns whether it is active (False where this torch build has no oneDNN)."""
        active = enabled and _can_prepack()
        for module in self.modules():
            if isinstance(module, Linear):
                module.cpu_prepack = active
            if not active and isinstance(module, (Linear, CausalSelfAttention)):
                (module.packed if isinstance(module, Linear) else module.qkv_packed).clear()
        return active

    def num_params(self) -> int:
        """All parameters, embedding and lm_head included (the seed's count for data ratios)."""
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 x (params without the embedding) + attention 12 L H D T
        (PaLM appendix B; the embedding lookup is not a matmul)."""
        cfg = self.config
        nparams = self.num_params() - self.transformer.wte.weight.numel()
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * nparams + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    def setup_optimizers(self, lrs: LearningRates | None = None, dist: DistInfo | None = None,
                         ns_dtype: torch.dtype | None = None) -> list[AdamW | Muon]:
        """[AdamW for lm_head + embedding, Muon for the block matrices], sharded over `dist`.

        `lrs` default to the seed's (LearningRates()); AdamW lrs scale by (n_embd / 768)^-0.5 and every
        group records its "initial_lr" for the schedule. Without `dist`: one process on the model's device.
        `ns_dtype`: Muon's Newton-Schulz dtype (None: nanochat/muon.py's ns_dtype)."""
        lrs = lrs or LearningRates()
        dist = dist or DistInfo(device=str(self.lm_head.weight.device))
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=list(self.lm_head.parameters()), lr=lrs.unembedding_lr * scale),
            dict(params=list(self.transformer.wte.parameters()), lr=lrs.embedding_lr * scale),
        ]
        adamw = AdamW(adam_groups, dist=dist, betas=(0.8, 0.95), eps=1e-10, weight_decay=lrs.weight_decay)
        muon = Muon(list(self.transformer.h.parameters()), dist=dist, lr=lrs.matrix_lr, momentum=0.95,
                    ns_dtype=ns_dtype)
        optimizers: list[AdamW | Muon] = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

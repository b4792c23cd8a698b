"""Built-in models, built from configs with random weights (nothing is downloaded).

Every model's forward takes (inputs, targets) and returns the scalar training loss, which is
what pcompile compiles. The GPT traces with torch.fx as written: its causal mask is built from
torch.arange so it depends on the traced sequence length only through shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 32
    hidden: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    tie_head: bool = True  # GPT-2 ties the LM head to the token embedding
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout

    def forward(self, x):
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        q = self.q(x).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        k = self.k(x).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        v = self.v(x).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, hidden: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(hidden, ratio * hidden)
        self.out = nn.Linear(ratio * hidden, hidden)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg.hidden, cfg.mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    block_class = Block  # MoEGPT's blocks differ, nothing else

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.blocks = nn.ModuleList([self.block_class(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """The per-module initialisation rule (Hugging Face's convention: pcompile.init_weights and
        cm.init_weights apply it to a model built on the meta device)."""
        _init(module)

    def forward(self, idx, targets):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.normal_(module.bias, std=0.02)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)



@dataclass(frozen=True)
class MoEGPTConfig(GPTConfig):
    """A GPT whose MLPs are mixtures of experts (Switch / Mixtral style): `num_experts` 2-Linear
    MLPs per block, each token routed to its `top_k` experts by a softmax router (gates
    renormalised over the chosen experts when top_k > 1), dropless; `aux_loss_coef` > 0 adds the
    load-balancing loss num_experts * sum_e(share of routed assignments to e * mean router
    probability of e) of every block, times the coefficient."""

    num_experts: int = 4
    top_k: int = 2
    aux_loss_coef: float = 0.0


class MoE(nn.Module):
    """Router Linear -> softmax -> top-k -> experts (a ModuleList of MLPs) combined by their gates.

    Written dense for capture: every expert runs on every token and its output is multiplied by
    the token's gate for it (zero unless the expert is among the token's top-k), which is the
    dropless top-k mixture's value and gradients exactly; expert parallelism
    (passes/expert_parallel.py) replaces the dense combine by the sparse dispatch."""

    def __init__(self, cfg: MoEGPTConfig):
        super().__init__()
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(f"top_k={cfg.top_k} must be between 1 and num_experts={cfg.num_experts}")
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = nn.Linear(cfg.hidden, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList([MLP(cfg.hidden, cfg.mlp_ratio) for _ in range(cfg.num_experts)])

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)  # (batch, seq, experts)
        gates, chosen = torch.topk(probs, self.top_k, dim=-1)  # (batch, seq, top_k)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, chosen, gates)  # each token's gate per expert
        out = weights[..., 0:1] * self.experts[0](x)
        for e in range(1, self.num_experts):
            out = out + weights[..., e:e + 1] * self.experts[e](x)
        share = F.one_hot(chosen, self.num_experts).float().mean(dim=(0, 1, 2))  # assignments per expert
        aux = self.num_experts * (share * probs.mean(dim=(0, 1))).sum()
        return out, aux


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEGPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.moe = MoE(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        out, aux = self.moe(self.ln2(x))
        return x + out, aux


class MoEGPT(GPT):
    """The built-in GPT with MoE blocks; forward(tokens, targets) -> cross-entropy (+ the
    coefficient times the blocks' summed load-balancing losses)."""

    block_class = MoEBlock

    def forward(self, idx, targets):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        aux = []
        for block in self.blocks:
            x, block_aux = block(x)
            aux.append(block_aux)
        logits = self.head(self.ln_f(x))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.cfg.aux_loss_coef:
            total = aux[0]
            for term in aux[1:]:
                total = total + term
            loss = loss + self.cfg.aux_loss_coef * total
        return loss


def moe_gpt_inputs(cfg: MoEGPTConfig, batch: int, seed: int = 0, part: int = 0,
                   parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (tokens, next tokens) for the MoE GPT, as gpt_inputs."""
    return gpt_inputs(cfg, batch, seed, part, parts)


@dataclass(frozen=True)
class MLPConfig:
    width: int = 64
    hidden: int = 256
    num_layers: int = 2
    num_classes: int = 8


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(F.relu(self.up(self.norm(x))))


class MLPModel(nn.Module):
    """An MLP only: residual up/down blocks and a classifier; regression-free cross-entropy loss."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([ResidualMLPBlock(cfg.width, cfg.hidden) for _ in range(cfg.num_layers)])
        self.classifier = nn.Linear(cfg.width, cfg.num_classes)

    def forward(self, x, targets):
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.classifier(x), targets)


def gpt_inputs(cfg: GPTConfig, batch: int, seed: int = 0, part: int = 0,
               parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (tokens, next tokens) of a global batch of `batch` sequences, or only part `part`
    of `parts` of it (what a rank loads: compiled.data_rank of compiled.data_world). Each sample
    is drawn from its own seed, so the parts concatenate to the global batch."""
    if batch % parts:
        raise ValueError(f"a batch of {batch} does not split into {parts} parts")
    size = batch // parts
    samples = []
    for index in range(part * size, (part + 1) * size):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        samples.append(torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=generator))
    stacked = torch.stack(samples)
    return stacked[:, 0].contiguous(), stacked[:, 1].contiguous()


def mlp_inputs(cfg: MLPConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.width, generator=generator),
            torch.randint(0, cfg.num_classes, (batch,), generator=generator))


# Named configs for the CLI and benchmarks (analysed on the meta device: no weights); each
# config's seq_len is its published context.
GPT_CONFIGS = {
    "gpt-tiny": GPTConfig(),
    "gpt-small": GPTConfig(vocab_size=50304, seq_len=1024, hidden=768, num_heads=12, num_layers=12),
    "gpt-1.3b": GPTConfig(vocab_size=50304, seq_len=2048, hidden=2048, num_heads=16, num_layers=24),
    "gpt-7b": GPTConfig(vocab_size=32000, seq_len=2048, hidden=4096, num_heads=32, num_layers=32, tie_head=False),
    "gpt3-175b": GPTConfig(vocab_size=50304, seq_len=2048, hidden=12288, num_heads=96, num_layers=96),
}


# The global batch (sequences of the config's seq_len) each named config was trained with:
# what `pcompile plan MODEL` plans for when no --batch is given.
GPT_BATCHES = {
    "gpt-tiny": 8,  # a toy: the batch the tests and the demo train
    "gpt-small": 512,  # GPT-2 124M: 512 x 1024 (Radford et al. 2019, section 2.3)
    "gpt-1.3b": 512,  # GPT-3 XL: 1M tokens = 512 x 2048 (Brown et al. 2020, table 2.1)
    "gpt-7b": 2048,  # LLaMA-7B: 4M tokens = 2048 x 2048 (Touvron et al. 2023, table 2)
    "gpt3-175b": 1536,  # GPT-3 175B: 3.2M tokens = 1536 x 2048 (Brown et al. 2020, table 2.1)
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

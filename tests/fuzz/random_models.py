"""Random transformer-ish models for fuzzing: depth, widths, heads, tied/untied head, norm
(LayerNorm or a hand-written RMSNorm), activation, MLP ratio. Every forward returns the loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class FuzzConfig:
    vocab_size: int = 32
    seq_len: int = 8
    hidden: int = 16
    num_heads: int = 2
    num_layers: int = 2
    mlp_ratio: int = 2
    tied: bool = True
    norm: str = "layernorm"  # or "rmsnorm"
    activation: str = "gelu"  # or "relu", "silu"
    attention: str = "sdpa"  # or "manual" (matmul + masked softmax)


class RMSNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _norm(cfg: FuzzConfig) -> nn.Module:
    return nn.LayerNorm(cfg.hidden) if cfg.norm == "layernorm" else RMSNorm(cfg.hidden)


class Attention(nn.Module):
    def __init__(self, cfg: FuzzConfig):
        super().__init__()
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.hidden, cfg.hidden) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        h = self.cfg.num_heads
        q = self.q(x).view(b, t, h, c // h).transpose(1, 2)
        k = self.k(x).view(b, t, h, c // h).transpose(1, 2)
        v = self.v(x).view(b, t, h, c // h).transpose(1, 2)
        if self.cfg.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) * (1.0 / (c // h) ** 0.5)
            positions = torch.arange(t, device=x.device)
            mask = positions.view(1, 1, t, 1) < positions.view(1, 1, 1, t)
            y = F.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
        return self.o(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: FuzzConfig):
        super().__init__()
        self.cfg = cfg
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg)
        self.up = nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[self.cfg.activation]
        return x + self.down(act(self.up(self.norm2(x))))


class FuzzModel(nn.Module):
    def __init__(self, cfg: FuzzConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = _norm(cfg)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.head.weight = self.embed.weight

    def forward(self, idx, targets):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.norm(x)).flatten(0, 1), targets.flatten())


def fuzz_inputs(cfg: FuzzConfig, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g),
            torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g))

"""Tiny hand-built models for the pass tests: small enough that every expected number is
worked out by hand in the test that uses it. Every forward takes (inputs, targets) and
returns the loss, as pcompile requires."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile


class OneLinear(nn.Module):
    """loss = mse(Linear(x), y): the smallest model with FLOPs, saved bytes and parameters."""

    def __init__(self, d_in: int = 8, d_out: int = 4, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x, y):
        return F.mse_loss(self.fc(x), y)


class TwoLinear(nn.Module):
    """up -> relu -> down: a Megatron column/row pair."""

    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x, y):
        return F.mse_loss(self.down(torch.relu(self.up(x))), y)


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v Linears and SDPA."""

    def __init__(self, width: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, y):
        b, t, w = x.shape
        q = self.q(x).view(b, t, self.heads, w // self.heads).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, w // self.heads).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, w // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.mse_loss(self.proj(out.transpose(1, 2).reshape(b, t, w)), y)


class Tied(nn.Module):
    """An embedding whose weight is also the output head (as in GPT-2)."""

    def __init__(self, vocab: int = 10, width: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx, targets):
        return F.cross_entropy(self.head(self.emb(idx)).flatten(0, 1), targets.flatten())


def analyse(model: nn.Module, inputs: tuple, stop_after: str = "layers", devices: int = 1,
            plan: pcompile.Plan | None = None) -> pcompile.IR:
    """The IR after `stop_after` for `model` on `devices` local ranks (no process group needed)."""
    return pcompile.compile(model, pcompile.Cluster.local(devices), inputs, plan=plan, stop_after=stop_after)


def node(ir: pcompile.IR, name: str):
    return next(n for n in ir.graph.nodes if n.name == name)


def rows(ir: pcompile.IR) -> dict[str, list[str]]:
    """IR.format() as {node name: its columns}, for comparing the text form cell by cell."""
    return {line.split()[0]: line.split() for line in ir.format().splitlines()[1:]}

"""Rank functions for the vocab-parallel tests (module-level so pcompile.launch can pickle them)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from tests.distributed.ranks import _max_diff, gap, train_side_by_side
from tests.models import zoo

WATCHED = ("emb", "head", "wte", "qkv", "c_attn")  # parameters whose sharding the tests look at
ODD = GPTConfig(vocab_size=250)  # 250 rows: tp=4 cannot split the vocabulary


class ClassDimGPT(GPT):
    """Loss through nn.CrossEntropyLoss on [b, V, s] logits (the class dim is 1), summed, with
    token 0 ignored: the parallel cross-entropy's module form, N-d input and other options.
    (A summed loss is not a mean over the batch, so it is compared without data parallelism.)"""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.loss = nn.CrossEntropyLoss(ignore_index=0, reduction="sum")

    def forward(self, idx, targets):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.loss(self.head(self.ln_f(x)).transpose(1, 2), targets) / 100


class FusedAttention(nn.Module):
    """One Linear for q, k and v, cut by split(width) or chunk(3); `peek` also reads the fused
    output directly (its contiguous layout would then be needed: the Linear must stay whole)."""

    def __init__(self, width: int = 16, heads: int = 4, cut: str = "split", peek: bool = False):
        super().__init__()
        self.heads, self.cut, self.peek = heads, cut, peek
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, w = x.shape
        fused = self.qkv(x)
        q, k, v = fused.split(w, dim=2) if self.cut == "split" else fused.chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w)
        return self.proj(out) + fused.mean() if self.peek else self.proj(out)


class OneBlock(nn.Module):
    """The attention as the model's one block (a ModuleList of one), then an MSE loss."""

    def __init__(self, **options):
        super().__init__()
        self.blocks = nn.ModuleList([FusedAttention(**options)])

    def forward(self, x, y):
        return F.mse_loss(self.blocks[0](x), y)


def fused_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, 16, generator=g), torch.randn(4, 6, 16, generator=g)


def _ignored(cfg: GPTConfig):
    """Batches whose targets are token 0 in about a tenth of the positions."""
    def batch(seed: int):
        idx, targets = gpt_inputs(cfg, 8, seed)
        return idx, targets.masked_fill(targets % 10 == 0, 0)
    return batch


MODELS = {
    "gpt": (lambda: GPT(GPTConfig()), lambda seed: gpt_inputs(GPTConfig(), 8, seed)),
    "gpt-untied": (lambda: GPT(GPTConfig(tie_head=False)), lambda seed: gpt_inputs(GPTConfig(), 8, seed)),
    "gpt-v250": (lambda: GPT(ODD), lambda seed: gpt_inputs(ODD, 8, seed)),
    "gpt-classdim": (lambda: ClassDimGPT(GPTConfig()), _ignored(GPTConfig())),
    "hf-gpt2": (zoo.gpt2, zoo.token_batch),
    "fused-split": (lambda: OneBlock(cut="split"), fused_inputs),
    "fused-chunk": (lambda: OneBlock(cut="chunk"), fused_inputs),
}


def compare(name: str, plan: pcompile.Plan, steps: int = 3, lr: float = 1e-2) -> dict:
    """`steps` AdamW steps in parallel and serially: worst differences, and what was split."""
    cm, serial, loss_diff, grad_diff, _ = train_side_by_side(*MODELS[name], plan, steps, lr)
    counts = {k.rsplit(".", 1)[-1]: v for k, v in cm.ir.op_counts().items() if "vocab_parallel" in k}
    module = cm.gm if cm.plan.pp == 1 else nn.Module()  # a pipeline holds one module per stage
    local = dict(module.named_parameters(remove_duplicate=False))
    return {"model": name, "plan": plan.default.describe(), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "param_diff": _max_diff(cm.full_state_dict(), serial.state_dict()), "vocab_ops": counts,
            "shardings": {n: s for n, s in cm.ir.param_shardings.items() if any(k in n for k in WATCHED)},
            "local_shapes": {n: tuple(p.shape) for n, p in local.items() if any(k in n for k in WATCHED)},
            "parameters": len(list(cm.parameters())), "serial_parameters": len(list(serial.parameters())),
            "report": [line for line in cm.report if "vocab" in line]}


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare(name, plan) for name, plan in cases]


def fused_checkpoint(directory: str) -> tuple[float, float]:
    """HF GPT-2 at tp=2 (c_attn split block-wise) after one step: a checkpoint read back whole
    (load_full) and into a fresh tp=2 model; worst differences from the saved model's full state."""
    from pcompile import checkpoint

    def compiled(seed: int):
        torch.manual_seed(seed)
        return pcompile.compile(zoo.gpt2(), pcompile.Cluster.local(dist.get_world_size()), zoo.token_batch(0),
                                plan=pcompile.Plan.uniform(tp=dist.get_world_size()))

    cm = compiled(0)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    cm.train_step(*zoo.token_batch(0))
    optimizer.step()
    path = checkpoint.save(cm, directory, optimizer, step=1)
    expected = cm.full_state_dict()
    whole = checkpoint.load_full(path)
    fresh = compiled(1)
    checkpoint.load(fresh, path)
    again = fresh.full_state_dict()
    return (max(gap(whole[k], v) for k, v in expected.items()), max(gap(again[k], v) for k, v in expected.items()))

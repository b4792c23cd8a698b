"""Rank functions for the sequence-parallel equivalence test (module-level so they pickle):
forced sp plans on the built-in GPT, a Hugging Face ViT (captured with torch.export) and a
token MLP, compared with the serial model step by step."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from tests.distributed.ranks import train_side_by_side

SP_OPS = ("sp_split", "sp_gather", "sp_reduce_scatter", "sp_unsplit")
GPT_CFG = GPTConfig(num_layers=3)


def vit() -> torch.nn.Module:
    """A 3x3-patch ViT: 9 patches + the class token = 10 tokens, which tp=2 divides."""
    from transformers import ViTConfig, ViTForImageClassification

    from tests.models.zoo import MaskedLM

    cfg = ViTConfig(image_size=12, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return MaskedLM(ViTForImageClassification(cfg))


def vit_inputs(seed: int):
    from tests.models.zoo import image_batch

    return image_batch(seed, batch=4, size=12)


class TokenBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TokenMLP(nn.Module):
    """Pre-norm residual MLP blocks on [batch, seq, width] tokens, each token's width-way
    cross-entropy as the loss: the sp region starts at the model's input and ends at the loss
    (no embedding, no head)."""

    def __init__(self, width: int = 16, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(TokenBlock(width, hidden) for _ in range(layers))

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(x.flatten(0, 1), y.flatten())


def token_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, 16, generator=g), torch.randint(0, 16, (4, 8), generator=g)


MODELS = {
    "gpt": (lambda: GPT(GPT_CFG), lambda seed: gpt_inputs(GPT_CFG, 8, seed)),
    "vit": (vit, vit_inputs),
    "tokens": (TokenMLP, token_batch),
}


def compare(model_name: str, plan: pcompile.Plan, steps: int = 3, lr: float = 1e-2) -> dict:
    """`steps` AdamW steps under `plan` and serially: worst loss and gradient differences, and
    how many sp collectives the compiled graph holds (so a plan that silently ran without sp fails)."""
    start = time.perf_counter()
    cm, serial, loss_diff, grad_diff, _ = train_side_by_side(*MODELS[model_name], plan, steps, lr)
    counts = cm.ir.op_counts()
    for module in cm.ir.gm.modules():  # checkpoint regions hold their layer's collectives
        if isinstance(module, torch.fx.GraphModule) and module is not cm.ir.gm:
            for node in module.graph.nodes:
                key = f"{node.op}:{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
                counts[key] = counts.get(key, 0) + 1
    sp = {op: counts.get(f"call_function:pcompile.runtime.collectives.{op}", 0) for op in SP_OPS}
    cm.close()
    return {"model": model_name, "plan": str(plan).splitlines()[0], "loss_diff": loss_diff, "grad_diff": grad_diff,
            "sp_ops": sp, "seconds": time.perf_counter() - start}


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare(name, plan) for name, plan in cases]

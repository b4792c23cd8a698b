"""Rank functions for the masked-loss tests: models whose loss is a mean over the tokens that
count (ignore_index labels, a loss mask), on batches masked unequally per sample, one
micro-batch's labels masked entirely."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcompile.models import GPT, GPTConfig, gpt_inputs
from tests.distributed.ranks import train_side_by_side

BATCH = 8
GPT_CFG = GPTConfig(num_layers=2)


def masked_labels(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Prompts of 2-10 tokens and some padding masked with -100, per sample; samples 0 and 1
    masked entirely (with dp2 x 2 micro-batches of 2: one micro-batch with no valid label)."""
    g = torch.Generator().manual_seed(1000 + seed)
    labels = labels.clone()
    for i in range(labels.shape[0]):
        prompt = int(torch.randint(2, 11, (1,), generator=g))
        pad = int(torch.randint(0, 6, (1,), generator=g))
        labels[i, :prompt] = -100
        if pad:
            labels[i, -pad:] = -100
    labels[:2] = -100
    return labels


class MaskedTokenModel(nn.Module):
    """A loss mask multiplied in and divided by its sum: (per-token loss * mask).sum() / mask.sum()."""

    def __init__(self, cfg: GPTConfig = GPT_CFG):
        super().__init__()
        self.gpt = GPT(cfg)

    def forward(self, idx, targets, mask):
        gpt = self.gpt
        x = gpt.tok_emb(idx) + gpt.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in gpt.blocks:
            x = block(x)
        logits = gpt.head(gpt.ln_f(x))
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return (losses * mask.flatten()).sum() / mask.sum()


def gpt_batch(seed: int):
    x, y = gpt_inputs(GPT_CFG, BATCH, seed)
    return x, masked_labels(y, seed)


def mask_batch(seed: int):
    x, y = gpt_inputs(GPT_CFG, BATCH, seed)
    mask = (masked_labels(y, seed) != -100).float()
    return x, y, mask


def hf_causal(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tests.models.zoo import CausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "qwen2":
        return CausalLM(Qwen2ForCausalLM(Qwen2Config(**common)))
    return CausalLM(LlamaForCausalLM(LlamaConfig(**common)))


def hf_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (BATCH, 16), generator=g)
    return ids, masked_labels(ids, seed)


MODELS = {
    "gpt": (lambda: GPT(GPT_CFG), gpt_batch),
    "mask": (MaskedTokenModel, mask_batch),
    "qwen2": (lambda: hf_causal("qwen2"), hf_batch),
    "llama": (lambda: hf_causal("llama"), hf_batch),
}


def compare(model_name: str, plan) -> dict:
    cm, _, loss_diff, grad_diff, losses = train_side_by_side(*MODELS[model_name], plan, steps=3, lr=1e-3)
    return {"model": model_name, "plan": plan.default.describe() + (f"·pp{plan.pp}" if plan.pp > 1 else ""),
            "loss_diff": loss_diff, "grad_diff": grad_diff, "losses": losses,
            "normalised": cm.ir.loss_counts is not None}


def compare_many(cases) -> list[dict]:
    return [compare(name, plan) for name, plan in cases]


def pipelined(pp: int, dp: int, microbatches: int):
    import pcompile

    return dataclasses.replace(pcompile.Plan.uniform(dp=dp, pp=pp), num_microbatches=microbatches)

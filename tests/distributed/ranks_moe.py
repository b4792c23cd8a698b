"""Rank functions for the expert-parallel tests: the built-in MoE GPT (4 experts, top-2, two
blocks) trained side by side with its serial copy under plans with ep, one launch for many."""
from __future__ import annotations

import dataclasses
from unittest import mock

import torch.distributed as dist

from pcompile.models import MoEGPT, MoEGPTConfig, moe_gpt_inputs
from pcompile.runtime.expert_parallel import expert_mixture
from tests.distributed.ranks import train_side_by_side

CFG = MoEGPTConfig(num_layers=2, num_experts=4, top_k=2, hidden=16, num_heads=2, seq_len=8, vocab_size=32)
BATCH = 8


def compare_many(cases) -> list[dict]:
    """Each (aux_loss_coef, plan): loss and gradient gaps to serial over 3 AdamW steps, the
    number of expert_mixture nodes in the rewritten graph and of all-to-alls run."""
    out = []
    for coef, plan in cases:
        cfg = dataclasses.replace(CFG, aux_loss_coef=coef)
        with mock.patch.object(dist, "all_to_all_single", wraps=dist.all_to_all_single) as all_to_all:
            cm, _, loss_diff, grad_diff, losses = train_side_by_side(
                lambda: MoEGPT(cfg), lambda step: moe_gpt_inputs(cfg, BATCH, seed=step), plan, steps=3, lr=1e-2)
        out.append({"plan": plan.default.describe(), "coef": coef, "loss_diff": loss_diff, "grad_diff": grad_diff,
                    "losses": losses, "mixtures": sum(n.target is expert_mixture for n in cm.ir.graph.nodes),
                    "all_to_alls": all_to_all.call_count})
    return out

"""Rank functions for the batch-statistics tests: losses with a term that is a function of the
whole batch's statistics - a Switch-style load-balancing loss on a small mixture of experts
(num_experts * sum(token share * mean router probability)) and Hugging Face Mixtral with
output_router_logits=True - beside a cross-entropy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.distributed.ranks import train_side_by_side

BATCH, SEQ, VOCAB, EXPERTS = 8, 8, 64, 4


class SwitchMoE(nn.Module):
    """Embedding -> top-1 routed experts (dense compute, gated) -> head: cross-entropy plus
    0.1 x the Switch Transformer's balancing loss over the batch's tokens."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.router = nn.Linear(dim, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(EXPERTS))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids, labels):
        x = self.emb(ids)
        probs = F.softmax(self.router(x), dim=-1)  # (B, S, E)
        top = probs.argmax(-1)
        gate = probs.gather(-1, top.unsqueeze(-1))
        x = x + gate * sum(F.one_hot(top, EXPERTS)[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))
        ce = F.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())
        share = F.one_hot(top, EXPERTS).float().mean(dim=(0, 1))  # tokens routed to each expert / tokens
        mean_prob = probs.mean(dim=(0, 1))
        return ce + 0.1 * EXPERTS * (share * mean_prob).sum()


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.models.zoo import CausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                        num_experts_per_tok=2, max_position_embeddings=32, output_router_logits=True,
                        router_aux_loss_coef=0.1, tie_word_embeddings=False)
    return CausalLM(MixtralForCausalLM(cfg))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


MODELS = {"switch": SwitchMoE, "mixtral": mixtral}


def compare_many(cases) -> list[dict]:
    """Each (model, plan, reduce?) trained side by side with its serial copy; reduce=False runs
    the plan without the batch_statistics rewrite (the parts' statistics: must differ)."""
    from unittest import mock

    import passes.batch_statistics as rewrite
    from pcompile.runtime.collectives import batch_statistic

    out = []
    for name, plan, reduce in cases:
        with mock.patch.object(rewrite, "classified", rewrite.classified if reduce else lambda ir, inputs: []):
            cm, _, loss_diff, grad_diff, losses = train_side_by_side(MODELS[name], batch, plan, steps=3, lr=1e-3)
        out.append({"model": name, "loss_diff": loss_diff, "grad_diff": grad_diff, "losses": losses,
                    "statistics": sum(n.target is batch_statistic for n in cm.ir.graph.nodes)})
    return out

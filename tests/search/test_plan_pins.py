"""Planning got fast without changing a plan (issue #16): the plans of two benchmark models are
pinned byte for byte, as the search found them before it was made fast - GPT-3 175B (the
built-in config, fx capture of 3 of its 96 blocks) on 1024 A100s at its published batch, and
HuggingFace BERT-Large (torch.export capture) on 8 A100s at 256 x 512.

A deliberate change of the cost model or the search changes these files: regenerate them with
`pcompile plan gpt3-175b --cluster 128x8xA100-80GB --json > tests/search/data/gpt3-...json`
(and `pcompile.plan(...).to_json()` for BERT) and say why in the commit."""
from __future__ import annotations

import os

import pytest
import torch

import pcompile
from pcompile.cli import load_workload

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _pinned(name: str) -> str:
    with open(os.path.join(DATA, name)) as f:
        return f.read().rstrip("\n")


def test_gpt3_175b_on_1024_a100s_plans_as_pinned():
    workload = load_workload("gpt3-175b", meta=True)  # the published batch: 1536 x 2048
    assert tuple(workload.inputs[0].shape) == (1536, 2048)
    plan = pcompile.plan(workload.model, pcompile.Cluster.preset("128x8xA100-80GB"), workload.inputs)
    assert plan.to_json() == _pinned("gpt3-175b-128x8xA100-1536.json")


def test_bert_large_on_8_a100s_plans_as_pinned():
    transformers = pytest.importorskip("transformers")

    class WithLoss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, labels):
            return self.model(input_ids=ids, labels=labels, return_dict=False)[0]

    config = transformers.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, vocab_size=30522, max_position_embeddings=512)
    with torch.device("meta"):
        model = WithLoss(transformers.BertForMaskedLM(config))
    ids = torch.empty(256, 512, dtype=torch.long, device="meta")
    plan = pcompile.plan(model, pcompile.Cluster.preset("8xA100-80GB"), (ids, ids))
    assert plan.to_json() == _pinned("bert-large-8xA100-256.json")

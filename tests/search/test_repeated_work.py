"""Repeated blocks priced once (issue #16): layer_work walks one block for the blocks that repeat
it, and gives what the walk of every block gives; a plan found on the fast analysis is the plan
of the full one, byte for byte."""
import dataclasses

import pytest
import torch

import pcompile
from pcompile.cost.layer_work import NodeFacts, _repeats, layer_work
from pcompile.ir import replicate
from pcompile.models import GPT, GPT_CONFIGS, GPTConfig, gpt_inputs
from pcompile.sharding.tp_rules import plan_tensor_parallel
from tests.models.zoo import token_batch
from tests.passes.test_replicate import _hf, analysed


def _works_equal(ir, tps):
    full = dataclasses.replace(ir, replicas=None)
    for tp in tps:
        planned = plan_tensor_parallel(ir, {layer: tp for layer in ir.layers}) if tp > 1 else None
        splits = (set(planned[0].split_dim), planned[0].row, planned[0].column, planned[0].losses,
                  planned[0].embeddings) if planned else (set(), set(), set(), {}, {})
        assert len(_repeats(ir, NodeFacts(ir), splits)) == len(ir.block_layers) - 4  # blocks 3 .. N-2
        assert layer_work(ir, tp, planned) == layer_work(full, tp, planned)


def test_gpt_blocks_past_the_template_take_its_work():
    cfg = GPTConfig(num_layers=8)
    ir = analysed(GPT(cfg), gpt_inputs(cfg, 8))
    assert ir.replicas is not None
    _works_equal(ir, (1, 2, 4))


def test_llama_blocks_past_the_template_take_its_work():
    pytest.importorskip("transformers")
    ir = analysed(_hf("llama", layers=7), token_batch(0))
    assert ir.replicas is not None
    _works_equal(ir, (1, 2))


def test_a_plan_on_the_fast_analysis_is_the_full_analysis_plan():
    cfg = dataclasses.replace(GPT_CONFIGS["gpt-1.3b"], num_layers=12)
    with torch.device("meta"):
        model = GPT(cfg)
    inputs = tuple(torch.zeros(64, cfg.seq_len, dtype=torch.long, device="meta") for _ in range(2))
    cluster = pcompile.Cluster.preset("2x8xA100-80GB")
    fast = pcompile.plan(model, cluster, inputs)
    with replicate.full_analysis():
        full = pcompile.plan(model, cluster, inputs)
    assert fast.to_json() == full.to_json()

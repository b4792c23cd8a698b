"""Fused projections under tensor parallelism (pcompile/sharding/tp_fused.py): a Linear whose output is
split into equal q, k, v blocks is split block-wise (Shard.blocks) instead of staying
replicated; the split's sizes are divided by tp; a fused output read elsewhere stays whole."""
import operator

import pytest
import torch

from pcompile import Plan
from pcompile.ir import Shard
from pcompile.sharding.tp_rules import plan_tensor_parallel
from tests.distributed.ranks_vocab import OneBlock
from tests.distributed.ranks_vocab import fused_inputs as _inputs
from tests.models import zoo
from tests.toy import analyse, node


@pytest.mark.parametrize("blocks,rank,expected", [
    (1, 1, [2, 3]), (3, 0, [0, 3, 6]), (3, 1, [1, 4, 7]), (3, 2, [2, 5, 8]),
])
def test_param_sharding_chunks_every_block_and_joins_back(blocks, rank, expected):
    full = torch.arange(9.0) if blocks == 3 else torch.arange(6.0)
    sharding = Shard("tp", 0, 3 if blocks == 3 else 3, blocks)
    if blocks == 1:
        expected = [4, 5] if rank == 2 else [2 * rank, 2 * rank + 1]
    assert sharding.chunk(full, rank).tolist() == expected
    assert torch.equal(sharding.join([sharding.chunk(full, r) for r in range(3)]), full)
    weight = torch.randn(4, 12)  # GPT-2's Conv1D [in, 3·out], blocks along dim 1
    fused = Shard("tp", 1, 2, 3)
    parts = [fused.chunk(weight, r) for r in range(2)]
    assert parts[0].shape == (4, 6) and torch.equal(parts[1][:, :2], weight[:, 2:4])  # q's second half first
    assert torch.equal(fused.join(parts), weight) and fused.local_shape(weight.shape) == (4, 6)


@pytest.mark.parametrize("cut", ["split", "chunk"])
def test_fused_linear_splits_block_wise(cut):
    ir = analyse(OneBlock(cut=cut), _inputs(), stop_after="tensor_parallel", devices=2,
                 plan=Plan.uniform(tp=2))
    assert ir.param_shardings["blocks.0.qkv.weight"] == Shard("tp", 0, 2, blocks=3)
    assert ir.param_shardings["blocks.0.qkv.bias"] == Shard("tp", 0, 2, blocks=3)
    assert ir.param_shardings["blocks.0.proj.weight"] == Shard("tp", 1, 2)
    sizes = node(ir, cut).args[1]
    if cut == "split":  # split(w) with w = x.shape[2] traced: w // tp per block
        assert sizes.target is operator.floordiv and sizes.args[1] == 2 and ir.meta(sizes.args[0]).value == 16
    else:
        assert sizes == 3  # chunk(3) keeps its count
    pieces = [n for n in node(ir, cut).users]
    assert len(pieces) == 3 and all(str(ir.meta(n).placement) == "S(2)@tp" for n in pieces)  # q, k, v: heads split


def test_fused_output_read_elsewhere_stays_whole():
    ir = analyse(OneBlock(peek=True), _inputs())
    p, _ = plan_tensor_parallel(ir, {layer: 2 for layer in ir.layers})
    assert not p.column and not p.fused


def test_gpt2_c_attn_is_split_block_wise():
    build, batch = zoo.MODELS["gpt2"]
    ir = analyse(build(), batch(0), stop_after="tensor_parallel", devices=2, plan=Plan.uniform(tp=2))
    for layer in (0, 1):
        prefix = f"model.transformer.h.{layer}.attn"
        assert ir.param_shardings[f"{prefix}.c_attn.weight"] == Shard("tp", 1, 2, blocks=3)
        assert ir.param_shardings[f"{prefix}.c_attn.bias"] == Shard("tp", 0, 2, blocks=3)
        assert ir.param_shardings[f"{prefix}.c_proj.weight"] == Shard("tp", 0, 2)  # row-parallel
    assert node(ir, "split").args[1:] == (16, 2)  # n_embd 32 per block, halved

"""Sequence parallelism == serial: loss after each of 3 AdamW steps and every full gradient
within 1e-5 (fp32), in ONE 4-rank launch over the plans below, on the built-in GPT (fx) and a
Hugging Face ViT (torch.export, aten ops, a class token and a position-embedding parameter
that holds the sequence dim), and a token MLP whose sp region runs from its input to its loss."""
import dataclasses

import pcompile
from pcompile import Plan
from pcompile.plan import LayerAssignment, Strategy
from tests.distributed.ranks_sp import compare_many

TOLERANCE = 1e-5


def _some_layers_sp() -> Plan:
    """blocks 0 and 2 sequence parallel, block 1 and the ends plain tp: two sp runs, each with
    its own entry split and exit gather."""
    tp, sp = Strategy(dp=2, tp=2), Strategy(dp=2, tp=2, sp=True)
    layers = [("pre", tp), ("blocks.0", sp), ("blocks.1", tp), ("blocks.2", sp), ("post", tp)]
    return Plan(4, tp, layers=tuple(LayerAssignment(name, s) for name, s in layers))


CASES = [
    ("gpt", Plan.uniform(tp=4, sp=True)),
    ("gpt", Plan.uniform(dp=2, tp=2, sp=True)),
    ("gpt", _some_layers_sp()),
    ("gpt", Plan.uniform(dp=2, tp=2, sp=True, checkpoint=True)),
    ("gpt", Plan.uniform(dp=2, tp=2, sp=True, sdp=True)),
    ("gpt", dataclasses.replace(Plan.uniform(tp=2, pp=2, sp=True), num_microbatches=2)),
    ("vit", Plan.uniform(dp=2, tp=2, sp=True)),
    ("tokens", Plan.uniform(tp=4, sp=True)),  # the sp region runs from the model's input to the loss
]


def test_sequence_parallel_plans_match_serial():
    per_rank = pcompile.launch(compare_many, 4, CASES)
    assert len(per_rank) == 4
    for results in per_rank:
        assert [r["model"] for r in results] == [name for name, _ in CASES]
        for r in results:
            assert r["loss_diff"] < TOLERANCE, r
            assert r["grad_diff"] < TOLERANCE, r
            # the plan really ran sequence parallel: gathers before and reduce-scatters after the split Linears
            assert r["sp_ops"]["sp_gather"] >= 2 and r["sp_ops"]["sp_reduce_scatter"] >= 2, r
        partial = results[2]["sp_ops"]
        assert partial["sp_split"] == 2 and partial["sp_unsplit"] == 2, partial  # two runs of sp layers
        assert results[-2]["sp_ops"]["sp_split"] >= 1, results[-2]  # ViT: the residual stream enters split
        assert results[-1]["sp_ops"]["sp_split"] == results[-1]["sp_ops"]["sp_unsplit"] == 1, results[-1]

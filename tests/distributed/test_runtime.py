"""The lowered program's run time on 4 gloo ranks (one launch): random streams and cleanup.

Dropout (pcompile.runtime.rng): every process seeds its own generator differently, yet
- tp ranks draw the same masks on the activations they all hold (residual and embedding
  dropout): their replicated parameters stay equal through training, under dp2·tp2, sp, and
  pp2·tp2 (attention dropout, over heads cut across tp, draws per tp rank);
- dp ranks draw different masks: on a batch whose dp halves are the same samples their local
  (unsynchronised) gradients differ;
- activation checkpointing recomputes with the masks of the first forward: the same seed gives
  the same loss and gradients with and without it.
close() destroys every process group the model created (tied-weight groups of pipelines too).
cm.compile() (torch.compile, here with the aot_eager backend) gives the eager program's losses
and gradients under ZeRO-3, tp with sp in bf16, per-layer groupings with a checkpointed layer
and a pipeline - compiling a ZeRO-3 rank module directly gave gradients 100%+ off.
"""
import dataclasses

import torch

import pcompile
from pcompile import Plan
from pcompile.plan import LayerAssignment, Strategy
from tests.distributed.ranks_runtime import run_all

PP2_TP2 = dataclasses.replace(Plan.uniform(tp=2, pp=2), num_microbatches=2)
REPLICATED = [Plan.uniform(dp=2, tp=2), Plan.uniform(dp=2, tp=2, sp=True), PP2_TP2]
CASES = ([("replicated", (plan,)) for plan in REPLICATED] + [("dp", (Plan.uniform(dp=2, tp=2),))]
         + [("checkpoint", (Plan.uniform(dp=2, tp=2),))]
         + [("groups", (plan,)) for plan in (PP2_TP2, Plan.uniform(dp=2, tp=2))])
# per-layer groupings (blocks.1 at dp1·tp4, the head at dp4), blocks.0 checkpointed
MIXED = Plan(num_devices=4, default=Strategy(dp=2, tp=2),
             layers=(LayerAssignment("blocks.0", Strategy(dp=2, tp=2, checkpoint=True)),
                     LayerAssignment("blocks.1", Strategy(dp=1, tp=4)), LayerAssignment("post", Strategy(dp=4))))
COMPILED = [(Plan.uniform(dp=4, sdp=True),), (Plan.uniform(tp=4, sp=True), "bf16"), (MIXED,),
            (dataclasses.replace(Plan.uniform(dp=2, pp=2), num_microbatches=2),)]
CASES += [("compile", args) for args in COMPILED]


def test_dropout_streams_and_process_groups():
    per_rank = pcompile.launch(run_all, 4, CASES, timeout=900)
    n = len(REPLICATED)
    for i, plan in enumerate(REPLICATED):
        results = [r[i] for r in per_rank]
        compared = 0
        for a in range(4):
            for b in range(a + 1, 4):
                ca, cb = results[a]["coords"], results[b]["coords"]
                if all(ca[k] == cb[k] for k in ca if k != "tp"):  # tp peers: the same replicated values
                    for name, value in results[a]["replicated"].items():
                        assert torch.equal(value, results[b]["replicated"][name]), (plan.default.describe(), name, a, b)
                        compared += 1
        assert compared > 0, plan
        assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in results)
    dp = per_rank[0][n]
    grads, coords = dp["grads"], [r[n]["coords"] for r in per_rank]
    for a in range(4):
        for b in range(4):
            if coords[a]["tp"] == coords[b]["tp"] and coords[a]["dp"] != coords[b]["dp"]:
                assert not torch.equal(grads[a], grads[b]), (a, b)  # independent masks over dp
    replay = per_rank[0][n + 1]
    assert replay["loss_diff"] < 1e-6 and replay["grad_diff"] < 1e-6, replay
    for rank in per_rank:
        for groups in rank[n + 2:n + 4]:
            assert groups["during"] > groups["before"] and groups["after"] == groups["before"], groups
        for args, result in zip(COMPILED, rank[n + 4:]):
            assert result["compiled_ops"] > 0, args  # something was compiled
            assert result["loss_diff"] < 1e-6 and result["grad_diff"] < 1e-6, (args, result)


def test_compile_refuses_fullgraph_with_the_fix():
    from pcompile.models import GPT, GPTConfig, gpt_inputs

    cfg = GPTConfig(vocab_size=64, hidden=32, num_layers=1)
    cm = pcompile.compile(GPT(cfg), pcompile.Cluster.local(1), gpt_inputs(cfg, 2))
    try:
        cm.compile(fullgraph=True)
    except pcompile.PcompileError as error:
        assert "collective" in error.cause and error.fix == "drop fullgraph=True"
    else:
        raise AssertionError("fullgraph=True was accepted")

"""The sequence-parallel rewrite: in sp layers tp_copy -> sp_gather and tp_reduce ->
sp_reduce_scatter along the sequence, the norms / residual and bias adds between them carry
S(1)@tp, one sp_split enters a run of sp layers and one sp_unsplit leaves it, norm weights and
biases read through tp_copy (their gradient summed over tp); local shapes checked on fake
tensors. "pre" and "post" stay tp without sp here, so the counts do not depend on how tensor
parallelism treats the embedding and the head."""
import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

import pcompile
from pcompile import PcompileError, Plan
from pcompile.backends import onnx as export_onnx
from pcompile.backends.onnx_reference import reference_ops
from pcompile.ir import IR, local_shape
from pcompile.ir.fake import fake_run
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.plan import LayerAssignment, Strategy
from pcompile.runtime import collectives, ops
from pcompile.runtime.loss_counts import step_counts
from tests.distributed.ranks_sp import TokenMLP, token_batch
from tests.toy import analyse, rows

BLOCK = ["tp_copy", "tp_copy", "sp_gather", "sp_reduce_scatter", "tp_copy",  # ln1 w, b; attention; proj bias
         "tp_copy", "tp_copy", "sp_gather", "sp_reduce_scatter", "tp_copy"]  # ln2 w, b; MLP; out bias


def _plan(sp_blocks, tp=2, layers=2, checkpoint=False) -> Plan:
    whole = Strategy(tp=tp)
    per_layer = [LayerAssignment("pre", whole)]
    per_layer += [LayerAssignment(f"blocks.{i}", Strategy(tp=tp, sp=i in sp_blocks, checkpoint=checkpoint))
                  for i in range(layers)]
    return Plan(tp, whole, layers=tuple(per_layer + [LayerAssignment("post", whole)]))


def _gpt(plan: Plan, layers=2, stop_after="sequence_parallel", seq_len=32) -> IR:
    cfg = GPTConfig(num_layers=layers, seq_len=seq_len)
    return analyse(GPT(cfg), gpt_inputs(cfg, 4), stop_after=stop_after, devices=plan.num_devices, plan=plan)


def _collectives(ir: IR, layer: str) -> list[str]:
    return [n.target.__name__ for n in ir.nodes_of(layer) if n.op == "call_function"
            and ops.is_collective(n) and n.target.__module__ == collectives.__name__]


def test_sp_blocks_gather_before_column_and_reduce_scatter_after_row_linears():
    ir = _gpt(_plan({0, 1}))
    assert _collectives(ir, "blocks.0") == ["sp_split"] + BLOCK  # entry: the residual stream from "pre"
    assert _collectives(ir, "blocks.1") == BLOCK + ["sp_unsplit"]  # exit: "post" reads the full stream
    counts = ir.op_counts()
    assert counts["call_function:pcompile.runtime.collectives.sp_gather"] == 4
    assert counts["call_function:pcompile.runtime.collectives.sp_reduce_scatter"] == 4
    assert not any(n.target is collectives.tp_reduce for layer in ir.block_layers for n in ir.nodes_of(layer))
    # norm weights / biases and the row Linears' biases are what the tp_copy nodes read
    copied = [n.args[0].target for n in ir.nodes_of("blocks.0") if n.target is collectives.tp_copy]
    assert copied == [f"blocks.0.{p}" for p in ("ln1.weight", "ln1.bias", "attn.proj.bias", "ln2.weight",
                                                 "ln2.bias", "mlp.out.bias")]


def test_the_text_form_names_the_sequence_shards():
    ir = _gpt(_plan({0, 1}))
    r = rows(ir)
    # the layernorms, the row Linears' reduce-scatters, bias adds and residual adds of block 0
    for name in ("sp_split", "layer_norm", "sp_reduce_scatter", "add_8", "add_1", "layer_norm_1",
                 "sp_reduce_scatter_1", "add_7", "add_2"):
        assert r[name][-1] == "S(1)@tp", name
        assert r[name][3] == "[4,32,64]", name  # shapes stay global; the sharding says what is local
    assert r["layer_norm"][2] == "torch.nn.functional.layer_norm"  # the module became functional
    assert r["sp_gather"][2] == "pcompile.runtime.collectives.sp_gather" and r["sp_gather"][-1] == "R"
    assert r["sp_unsplit"][-1] == "R" and r["sp_unsplit"][9] == "blocks.1"
    assert r["transpose"][-1] == "S(1)@tp"  # attention keeps its heads split (dim 1 of [b, heads, t, d])
    assert IR.parse(ir.format()) == [(n.name, n.op, r[n.name][2]) for n in ir.graph.nodes]
    # parameter bytes move from the LayerNorm call to its get_attr reads: the total is unchanged
    assert ir.total("param_bytes") == _gpt(_plan({0, 1}), stop_after="tensor_parallel").total("param_bytes")


def test_local_shapes_on_fake_tensors():
    ir = _gpt(_plan({0, 1}))
    seen = {}

    def observe(node, value):
        if isinstance(value, torch.Tensor):
            seen[node.name] = list(value.shape)

    with collectives.simulate():
        fake_run(ir, gpt_inputs(GPTConfig(), 4), observe,
                 shard=lambda name, shape: local_shape(shape, ir.param_shardings.get(name)), grad=False)
    assert seen["sp_split"] == seen["layer_norm"] == seen["add_2"] == [4, 16, 64]  # half the sequence
    assert seen["sp_gather"] == seen["sp_unsplit"] == [4, 32, 64]
    assert seen["blocks_0_attn_q"] == [4, 32, 32]  # column Linear: full sequence, half the features
    assert seen["sp_reduce_scatter_1"] == [4, 16, 64]


def test_only_the_sp_layers_change():
    ir = _gpt(_plan({0}, layers=3), layers=3)
    assert _collectives(ir, "blocks.0") == ["sp_split"] + BLOCK + ["sp_unsplit"]
    assert _collectives(ir, "blocks.1") == _collectives(ir, "blocks.2") == ["tp_copy", "tp_reduce"] * 2
    no_sp = _gpt(_plan(set(), layers=3), layers=3)
    before = _gpt(_plan(set(), layers=3), layers=3, stop_after="tensor_parallel")
    # (node names of tensor_parallel's row Linears vary between compiles: compare counts and shardings)
    assert no_sp.op_counts() == before.op_counts()
    assert sorted(str(no_sp.meta(n).placement) for n in no_sp.graph.nodes) == \
        sorted(str(before.meta(n).placement) for n in before.graph.nodes)


def test_checkpointed_sp_layer_keeps_its_collectives_in_the_region():
    ir = _gpt(_plan({0, 1}, checkpoint=True), stop_after="activation_checkpoint")
    region = ir.gm.get_submodule("pcompile_ckpt_blocks_0")
    names = [n.target.__name__ for n in region.graph.nodes if n.op == "call_function"
             and ops.is_collective(n) and n.target.__module__ == collectives.__name__]
    assert names == ["sp_split"] + BLOCK


def test_sequence_not_divisible_by_tp_is_refused():
    with pytest.raises(PcompileError, match="sequence of 30 tokens, which tp=4 does not divide"):
        _gpt(Plan.uniform(tp=4, sp=True), seq_len=30)


def test_model_without_sequence_dim_is_refused():
    cfg = MLPConfig()
    with pytest.raises(PcompileError, match=r"no sequence dim .*reduces \[4, 64\]"):
        analyse(MLPModel(cfg), mlp_inputs(cfg, 4), stop_after="sequence_parallel", devices=2,
                plan=Plan.uniform(tp=2, sp=True))


def test_sp_from_the_input_to_the_loss_and_its_onnx_export(tmp_path):
    plan = Plan.uniform(dp=2, tp=2, sp=True)
    cm = pcompile.compile(TokenMLP(), pcompile.Cluster.local(4), token_batch(0), plan=plan)  # not lowered
    assert _collectives(cm.ir, "blocks.0") == ["sp_split", "tp_copy", "tp_copy", "sp_gather", "sp_reduce_scatter",
                                               "tp_copy"]
    assert _collectives(cm.ir, "blocks.1")[-1] == "sp_unsplit"  # the loss reads the full output
    paths = export_onnx.export(cm.ir, cm.plan, tmp_path)
    for path in paths:
        onnx.checker.check_model(path, full_check=True)
    model = onnx.load(paths[0])
    ops = [n.op_type for n in model.graph.node if n.domain == "pcompile"]
    assert {"SpSplit", "SpGather", "SpReduceScatter", "SpUnsplit"} <= set(ops)
    # rank 0 alone (peers absent: gathers repeat its chunk, reduce-scatters keep chunk 0) == torch's graph
    local = [t.chunk(2)[0] for t in token_batch(0)]
    counts = step_counts(cm.ir.loss_counts, token_batch(0), None)  # a mean over the step, as the runtime passes it
    with collectives.simulate():
        expected = export_onnx.rank_module(cm.ir, cm.plan, 0)(*local, **counts)
    feeds = {i.name: x.numpy() for i, x in zip(model.graph.input, local)}
    feeds.update({name: np.float32(value) for name, value in counts.items()})
    (loss,) = ReferenceEvaluator(model, new_ops=reference_ops()).run(None, feeds)
    assert abs(float(loss) - expected.item()) < 1e-5


def test_the_search_can_ask_before_the_rewrite():
    """planned_shapes (from the propagation the search already runs) gives sp_problem the
    verdict the pass reaches after tensor_parallel."""
    from pcompile.sharding.sp_rules import planned_shapes, sp_problem
    from pcompile.sharding.tp_rules import plan_tensor_parallel

    cases = [(GPT(GPTConfig(seq_len=32)), gpt_inputs(GPTConfig(seq_len=32), 4), 4, None),
             (GPT(GPTConfig(seq_len=30)), gpt_inputs(GPTConfig(seq_len=30), 4), 4, "sequence of 30 tokens"),
             (MLPModel(MLPConfig()), mlp_inputs(MLPConfig(), 4), 2, "no sequence dim")]
    for model, inputs, tp, expected in cases:
        ir = analyse(model, inputs, stop_after="layers", devices=tp)
        p, _ = plan_tensor_parallel(ir, {layer: tp for layer in ir.layers})
        problem = sp_problem(*planned_shapes(ir, p, "blocks.0"), "blocks.0", tp)
        assert (problem is None) if expected is None else (expected in problem), problem

"""ONNX export of a 4-rank dp2 x tp2 plan: every rank's file passes onnx.checker, holds the
collectives as `pcompile` domain nodes with their group and shape, carries each node's
sharding, and evaluates (onnx.reference) to the values torch computes on that rank's graph
with `collectives.simulate()` (collectives as one rank sees them alone) — node by node. The
same for a plan whose layers use different (dp, tp) groupings (batch regrouping nodes), and for
ZeRO-3 plans (each rank's initializers hold its sdp shard, the gathers are SdpGather nodes)."""
import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
from onnx.reference import ReferenceEvaluator

import pcompile
from pcompile.backends import onnx as export_onnx
from pcompile.backends.onnx_reference import reference_ops
from pcompile.errors import PcompileError
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.plan import LayerAssignment, Plan, Strategy
from pcompile.runtime import collectives, ops, sdp, vocab_parallel
from pcompile.runtime.loss_counts import step_counts

PLAN = pcompile.Plan.uniform(dp=2, tp=2)
MODELS = {"gpt": (lambda: GPT(GPTConfig()), lambda: gpt_inputs(GPTConfig(), 8)),
          "mlp": (lambda: MLPModel(MLPConfig()), lambda: mlp_inputs(MLPConfig(), 16))}
DP2TP2, DP1TP4, DP4TP1 = Strategy(dp=2, tp=2), Strategy(dp=1, tp=4), Strategy(dp=4, tp=1)


def _mixed(default: Strategy, **layers: Strategy) -> Plan:
    return Plan(num_devices=4, default=default, layers=tuple(LayerAssignment(n, s) for n, s in layers.items()))


# "pre" / "post" at dp2·tp2 around dp1·tp4 blocks: batch gathered into the blocks, sliced after
MIXED = _mixed(DP1TP4, pre=DP2TP2, post=DP2TP2)


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    build, inputs = MODELS[request.param]
    torch.manual_seed(0)
    example = inputs()
    cm = pcompile.compile(build(), pcompile.Cluster.local(4), example, plan=PLAN)  # no process group: not lowered
    paths = export_onnx.export(cm.ir, cm.plan, tmp_path_factory.mktemp(request.param))
    return cm, example, paths


def _torch_values(gm: fx.GraphModule, inputs) -> dict[str, torch.Tensor]:
    """Every tensor an fx node produces when this rank's graph runs alone."""
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = result = super().run_node(n)
            return result

    with collectives.simulate(), torch.no_grad():
        Record(gm).run(*inputs)
    return {k: v.detach() for k, v in values.items() if isinstance(v, torch.Tensor)}  # grad_scale: a parameter view


def test_every_rank_passes_the_checker_and_holds_the_collectives(exported):
    cm, _, paths = exported
    ir_collectives = [n for n in cm.ir.graph.nodes
                      if ops.is_collective(n) and n.target.__module__ == collectives.__name__]
    assert len(paths) == 4 and ir_collectives
    for rank, path in enumerate(paths):
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        nodes = [n for n in model.graph.node if n.domain == "pcompile" and n.op_type.startswith("Tp")]
        assert [n.name for n in nodes] == [n.name for n in ir_collectives]
        dp_index, tp_index = divmod(rank, 2)
        for node in model.graph.node:  # vocab-parallel nodes carry this rank's first vocabulary row
            if node.op_type.startswith("Vocab"):
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert attrs["start"] == tp_index * {"gpt": 128, "mlp": 4}[type(cm._model).__name__.lower()[:3]]
        for node, fx_node in zip(nodes, ir_collectives):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert node.op_type == {"tp_copy": "TpCopy", "tp_reduce": "TpReduce"}[fx_node.target.__name__]
            assert attrs["axis"] == b"tp" and attrs["group_size"] == 2
            assert attrs["group_ranks"] == [2 * dp_index, 2 * dp_index + 1]
            assert attrs["rank_in_group"] == tp_index
            global_shape = list(cm.ir.meta(fx_node).shape)
            global_shape[0] //= 2  # this rank's half of the batch
            if str(cm.ir.meta(fx_node).placement).startswith("S("):
                dim = cm.ir.meta(fx_node).placement.shards[0].dim
                global_shape[dim] //= 2
            assert attrs["shape"] == global_shape


def test_node_sharding_and_shards_are_recorded(exported):
    cm, _, paths = exported
    model = onnx.load(paths[3])
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        fx_node = next(n for n in cm.ir.graph.nodes if n.name == props["pcompile.node"])
        assert props["pcompile.sharding"] == str(cm.ir.meta(fx_node).placement or "R")
        assert props["pcompile.layer"] == cm.ir.meta(fx_node).layer
    full = dict(cm.ir.gm.named_parameters())
    initializers = {t.name: t for t in model.graph.initializer}
    for name, spec in cm.ir.param_shardings.items():
        if name not in full:
            continue  # a tied table's other name (head.weight): one initializer
        local = onnx.numpy_helper.to_array(initializers[name])
        expected = spec.chunk(full[name].detach(), 1).numpy()  # rank 3 is tp index 1
        np.testing.assert_array_equal(local, expected)
        assert {p.key: p.value for p in initializers[name].metadata_props}["pcompile.sharding"] == \
            f"S({spec.dim})@tp"


def _evaluates_like_torch(cm, model: onnx.ModelProto, rank: int, local: list, vocab_rank: int,
                          example: tuple) -> None:
    """Every value of `model` (onnx.reference) equals torch's on `rank`'s graph run alone, both
    given the step's counts of a masked mean as the runtime passes them."""
    counts = step_counts(cm.ir.loss_counts, tuple(example), None)  # the whole batch's: the all-reduced count
    with vocab_parallel.as_rank(vocab_rank):  # its vocabulary rows
        expected = _torch_values(export_onnx.rank_module(cm.ir, cm.plan, rank), list(local) + list(counts.values()))
    names = [v.name for v in model.graph.value_info] + [o.name for o in model.graph.output]
    assert len(names) > 10
    feeds = {i.name: x.numpy() for i, x in zip(model.graph.input, local)}
    feeds.update({name: np.float32(value) for name, value in counts.items()})
    got = ReferenceEvaluator(model, new_ops=reference_ops()).run(names, feeds)
    for name, value in zip(names, got):
        np.testing.assert_allclose(value, expected[name].numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    loss = got[names.index(model.graph.output[0].name)]
    assert abs(float(loss) - expected[model.graph.output[0].name].item()) < 1e-5


def test_each_rank_evaluates_like_torch_node_by_node(exported):
    cm, example, paths = exported
    for rank, path in enumerate(paths):
        local = [x.chunk(2)[rank // 2] for x in example]
        _evaluates_like_torch(cm, onnx.load(path), rank, local, export_onnx.mesh_coords(cm.plan, rank)["tp"],
                              example)


def _compile_gpt(plan: Plan):
    torch.manual_seed(0)
    example = gpt_inputs(GPTConfig(), 8)
    return pcompile.compile(GPT(GPTConfig()), pcompile.Cluster.local(4), example, plan=plan), example


def test_a_mixed_grouping_plan_exports_its_batch_regrouping(tmp_path):
    cm, example = _compile_gpt(MIXED)
    layout = cm.ir.mixed_layout
    for rank, path in enumerate(export_onnx.export(cm.ir, cm.plan, tmp_path)):
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        regroups = [n for n in model.graph.node if n.op_type in ("BatchGather", "BatchSlice")]
        assert {n.op_type for n in regroups} == {"BatchGather", "BatchSlice"}
        # blocks: tp over all 4 ranks; pre/post: tp pairs (0, 1), (2, 3); the batch halves of
        # the dp2 layers are regrouped between ranks 2 apart (the same tp2 position)
        pair = rank - rank % 2
        groups = {"tp": [0, 1, 2, 3], "tp2": [pair, pair + 1], "batch1:2": [rank % 2, rank % 2 + 2]}
        for node in model.graph.node:
            if node.domain == "pcompile":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                group = groups[attrs["axis"].decode()]
                assert attrs["group_ranks"] == group and attrs["rank_in_group"] == group.index(rank)
        props = {p.key: p.value for p in model.metadata_props}
        coords = dict(c.split("=") for c in props["pcompile.coords"].split(","))
        assert coords == {"dp": "0", "tp": str(rank), "batch1:2": str(rank // 2), "dp2": str(rank // 2),
                          "tp2": str(rank % 2)}
        assert props["pcompile.dp_group"] == f"dp={rank};dp2={rank % 2},{rank % 2 + 2}"  # blocks' and pre/post's
        # the input split by the first layer's dp; gathering 2 halves then slicing 2 keeps the rank's own
        local = [x.chunk(layout.input_dp)[int(coords[layout.input_axis])] for x in example]
        _evaluates_like_torch(cm, model, rank, local, int(coords["tp2"]), example)


@pytest.mark.parametrize("plan", [Plan.uniform(dp=4, sdp=True), Plan.uniform(dp=2, tp=2, sdp=True),
                                  Plan.uniform(dp=4, sdp=True, split=2)], ids=["dp4", "dp2tp2", "dp4-split2"])
def test_a_zero3_plan_holds_each_ranks_shards_and_gathers_them(plan, tmp_path):
    cm, example = _compile_gpt(plan)
    gathers = [n for n in cm.ir.graph.nodes if n.target is sdp.sdp_gather]
    full = {name: p.detach() for name, p in cm.ir.gm.named_parameters()}
    shardings = {name: cut for name, cut in cm.ir.sdp_shardings.items() if name in full}  # canonical names
    dp = plan.default.dp
    assert shardings and gathers
    for rank, path in enumerate(export_onnx.export(cm.ir, cm.plan, tmp_path)):
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        coords, group = export_onnx.mesh_coords(cm.plan, rank), export_onnx.group_ranks(cm.plan, rank, "dp")
        nodes = [n for n in model.graph.node if n.op_type == "SdpGather"]
        assert [n.name for n in nodes] == [n.name for n in gathers]
        for node, fx_node in zip(nodes, gathers):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["axis"] == b"dp" and attrs["group_size"] == dp and attrs["group_ranks"] == group
            assert attrs["rank_in_group"] == coords["dp"] and attrs["dims"] == list(fx_node.args[1])
            # each gathered parameter keeps the name of the getitem that reads it
            assert list(node.output) == [u.name for u in sorted(fx_node.users, key=lambda u: u.args[1])]
        initializers = {t.name: t for t in model.graph.initializer}
        for name, cut in shardings.items():  # this rank's dp chunk of its tp shard
            tp = cm.ir.param_shardings.get(name)
            shard = full[name] if tp is None else tp.chunk(full[name], coords["tp"])
            expected = cut.chunk(shard, coords["dp"]).numpy()
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(initializers[name]), expected)
            props = {p.key: p.value for p in initializers[name].metadata_props}
            assert props["pcompile.sharding"].endswith(f"S({cut.dim})@dp")
            assert props["pcompile.shard_of"] == str(dp * (tp.size if tp else 1))
        # simulate()'s gather repeats the rank's own shard, as SdpGather's reference does: every rank compares
        local = [x.chunk(dp)[coords["dp"]] for x in example]
        _evaluates_like_torch(cm, model, rank, local, coords["tp"], example)


def test_a_table_shared_across_dp_degrees_reads_through_identity():
    # the tied embedding/head is read at dp2 ("pre") and dp4 ("post"): its embedding read is
    # rewritten to sdp.module_with(tok_emb, {weight: grad_scale(weight)}, idx)
    cm, example = _compile_gpt(_mixed(DP2TP2, **{"blocks.1": DP1TP4, "post": DP4TP1}))
    model = export_onnx.export_rank(cm.ir, cm.plan, 0)
    scaled = [n for n in model.graph.node if n.name.startswith("grad_scale")]
    assert scaled and {n.op_type for n in scaled} == {"Identity"}
    # rank 0 only: it is index 0 of every group, the chunk BatchSlice and simulate() both keep
    local = [x.chunk(2)[0] for x in example]
    _evaluates_like_torch(cm, model, 0, local, 0, example)


def test_a_meta_model_exports_its_structure_without_weights(tmp_path):
    cfg = GPTConfig(vocab_size=512, seq_len=64, hidden=128, num_heads=4, num_layers=2)
    with torch.device("meta"):
        model = GPT(cfg)
    x = torch.zeros(8, cfg.seq_len, dtype=torch.long, device="meta")
    cm = pcompile.compile(model, pcompile.Cluster.local(4), (x, x), plan=PLAN)
    model_proto = export_onnx.export_rank(cm.ir, cm.plan, 1, tmp_path / "rank1.onnx")
    assert not model_proto.graph.initializer
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model_proto.graph.input}
    assert inputs["idx"] == [4, 64]
    assert inputs["blocks.0.mlp.fc.weight"] == [256, 128]  # column-parallel: half the 512 outputs
    assert inputs["blocks.0.mlp.out.weight"] == [128, 256]  # row-parallel: half the 512 inputs
    assert (tmp_path / "rank1.onnx").stat().st_size < 200_000


class _Sine(torch.nn.Module):
    def forward(self, x, y):
        return torch.sin(x).sum() + y.sum()


def test_an_untranslated_op_is_named():
    cm = pcompile.compile(_Sine(), pcompile.Cluster.local(1), (torch.ones(4, 2), torch.ones(4)))
    with pytest.raises(PcompileError, match="torch.sin"):
        export_onnx.export_rank(cm.ir, cm.plan, 0)


def test_ranks_outside_the_plan_are_refused():
    cm = pcompile.compile(MLPModel(MLPConfig()), pcompile.Cluster.local(4), mlp_inputs(MLPConfig(), 16), plan=PLAN)
    with pytest.raises(PcompileError, match="rank 4 is outside"):
        export_onnx.rank_module(cm.ir, cm.plan, 4)

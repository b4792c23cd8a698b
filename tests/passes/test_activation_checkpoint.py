"""The checkpoint rewrite: one run_checkpointed call per checkpointed layer, parameters keep
their names, loss and gradients equal to the serial model (in-process and on 4 gloo ranks with
dp x tp plans, combined with operator splitting)."""
import pytest
import torch

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.passes.activation_checkpoint import region_name
from pcompile.plan import Plan, Strategy
from pcompile.runtime.checkpointing import call_module_ref, run_checkpointed
from tests.passes.ranks_rewrite import compare_many_rewritten, compare_rewritten, layer_plan

TOLERANCE = 1e-5
CALL = "call_function:pcompile.runtime.checkpointing.run_checkpointed"


def _check(result: dict, regions: int) -> None:
    assert result["loss_diff"] < TOLERANCE, result
    assert result["grad_diff"] < TOLERANCE, result
    assert result["names_kept"] and result["state_keys_kept"], result
    assert result["regions"] == regions, result


def _ir(plan: Plan, devices: int = 1, stop_after: str = "activation_checkpoint"):
    torch.manual_seed(0)
    cfg = GPTConfig()
    return pcompile.compile(GPT(cfg), pcompile.Cluster.local(devices), gpt_inputs(cfg, 4), plan=plan,
                            stop_after=stop_after)


@pytest.mark.parametrize("model", ["gpt", "mlp"])
def test_one_checkpointed_block_matches_serial(model):
    _check(compare_rewritten(model, layer_plan(1, 1, {"blocks.0": {"checkpoint": True}})), regions=1)


@pytest.mark.parametrize("model,regions", [("gpt", 4), ("mlp", 3)])  # the MLP has no "pre" nodes
def test_every_layer_checkpointed_matches_serial(model, regions):
    _check(compare_rewritten(model, Plan.uniform(checkpoint=True)), regions=regions)


def test_layer_becomes_one_call_with_original_parameter_names():
    before, after = _ir(Plan.uniform(), stop_after="tensor_parallel"), _ir(
        layer_plan(1, 1, {"blocks.0": {"checkpoint": True}}))
    assert after.op_counts()[CALL] == 1
    kinds = {n.op for n in after.nodes_of("blocks.0")}
    assert kinds == {"get_attr", "call_function"}  # parameter / module references and the call
    # blocks.1 is untouched, node for node
    assert [n.name for n in after.nodes_of("blocks.1")] == [n.name for n in before.nodes_of("blocks.1")]
    assert [n for n, _ in after.gm.named_parameters()] == [n for n, _ in before.gm.named_parameters()]
    assert list(after.gm.state_dict()) == list(before.gm.state_dict())  # the region holds no state
    region = getattr(after.gm, region_name("blocks.0"))
    assert list(region.parameters()) == [] and "scaled_dot_product_attention" in region.code
    assert sum(1 for n in region.graph.nodes if n.target is call_module_ref) == 8  # ln1, q, k, v, proj, ln2, fc, out


def test_saved_bytes_become_the_layer_input():
    """Predicted from the IR: the call keeps its activation input; the rest of the layer's
    saved activations are dropped."""
    before = _ir(Plan.uniform(), stop_after="tensor_parallel")
    after = _ir(layer_plan(1, 1, {"blocks.0": {"checkpoint": True}}))
    call = next(n for n in after.graph.nodes if n.target is run_checkpointed)
    block_input = [n for n in call.args[1:] if n.op != "get_attr"]
    assert [n.name for n in block_input] == ["add"]  # tok_emb + pos_emb
    assert after.meta(call).saved_bytes == 4 * 32 * 64 * 4  # [batch, seq, hidden] fp32
    assert after.total("saved_bytes", "blocks.0") == after.meta(call).saved_bytes
    assert before.total("saved_bytes", "blocks.0") > 4 * after.total("saved_bytes", "blocks.0")
    layer_flops = before.total("flops", "blocks.0")
    assert after.meta(call).flops == layer_flops
    assert after.meta(call).bwd_flops == before.total("bwd_flops", "blocks.0") + layer_flops  # recompute


def test_tensor_parallel_collectives_run_inside_the_region():
    ir = _ir(layer_plan(1, 2, {"blocks.1": {"checkpoint": True}}), devices=2)
    code = getattr(ir.gm, region_name("blocks.1")).code
    assert code.count("tp_copy(") == 2 and code.count("tp_reduce(") == 2
    assert "tp_reduce" not in "".join(str(n.target) for n in ir.nodes_of("blocks.1"))


def test_dp_tp_plans_with_checkpoint_and_split_match_serial_on_4_ranks():
    cases = [
        ("gpt", layer_plan(2, 2, {"blocks.0": {"checkpoint": True}, "blocks.1": {"split": 2}})),
        ("gpt", Plan(num_devices=4, default=Strategy(tp=4, checkpoint=True, split=2))),
        ("gpt-untied", Plan(num_devices=4, default=Strategy(dp=4, checkpoint=True, split=4))),
        ("mlp", layer_plan(2, 2, {"blocks.0": {"checkpoint": True, "split": 4}, "blocks.1": {"checkpoint": True}})),
    ]
    regions = [1, 4, 4, 2]
    per_rank = pcompile.launch(compare_many_rewritten, 4, cases)
    for results in per_rank:
        assert [r["model"] for r in results] == [m for m, _ in cases]
        for result, count in zip(results, regions):
            _check(result, count)


def test_an_export_capture_checkpoints_its_first_layer():
    """torch.export puts HF Llama's `pre` get_attrs before the graph's inputs: the placeholders
    between them stay outside every region and do not make `pre` non-contiguous (it was an
    internal error for every plan that checkpoints `pre`)."""
    pytest.importorskip("transformers")
    from tests.distributed.ranks import train_side_by_side
    from tests.models.zoo import llama, token_batch

    cm, _, loss_diff, grad_diff, _ = train_side_by_side(llama, token_batch, Plan.uniform(checkpoint=True), 2, 1e-2)
    assert loss_diff < TOLERANCE and grad_diff < TOLERANCE
    assert sum(1 for n in cm.ir.graph.nodes if n.target is run_checkpointed) == 4  # pre, two blocks, post

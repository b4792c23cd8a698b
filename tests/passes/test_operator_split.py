"""The operator_split rewrite (OSDP): every Linear of a split layer becomes k partial linears
over input-feature chunks summed; parameters keep their names; loss and gradients equal to the
serial model. (Its 4-rank dp x tp cases run in test_checkpoint's single launch.)"""
import pytest
import torch

import pcompile
from pcompile.errors import PcompileError
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.plan import Plan
from tests.passes.ranks_rewrite import compare_rewritten, layer_plan

TOLERANCE = 1e-5


def _ir(model, inputs, plan: Plan, devices: int = 1):
    return pcompile.compile(model, pcompile.Cluster.local(devices), inputs, plan=plan,
                            stop_after="operator_split")


def _gpt_ir(plan: Plan, devices: int = 1):
    torch.manual_seed(0)
    cfg = GPTConfig()
    return _ir(GPT(cfg), gpt_inputs(cfg, 4), plan, devices)


@pytest.mark.parametrize("model", ["gpt", "mlp"])
@pytest.mark.parametrize("plan", [layer_plan(1, 1, {"blocks.1": {"split": 2}}), Plan.uniform(split=4)],
                         ids=["blocks.1-split2", "all-split4"])
def test_split_matches_serial(model, plan):
    result = compare_rewritten(model, plan)
    assert result["loss_diff"] < TOLERANCE and result["grad_diff"] < TOLERANCE, result
    assert result["names_kept"] and result["state_keys_kept"], result


def test_linears_become_k_partial_products():
    ir = _gpt_ir(layer_plan(1, 1, {"blocks.0": {"split": 2}}))
    nodes = ir.nodes_of("blocks.0")
    assert not [n for n in nodes if n.op == "call_module" and isinstance(ir.gm.get_submodule(n.target),
                                                                          torch.nn.Linear)]
    counts = ir.op_counts()
    assert counts["call_function:torch.chunk"] == 2 * 6  # x and W of q, k, v, proj, fc, out
    assert counts["call_function:torch._C._nn.linear"] == 2 * 6
    # blocks.1 keeps its 6 nn.Linear calls
    assert sum(1 for n in ir.nodes_of("blocks.1") if n.op == "call_module") == 6 + 2  # + 2 LayerNorms
    fc = [n for n in nodes if n.op == "get_attr" and n.target == "blocks.0.mlp.fc.weight"]
    assert len(fc) == 1 and ir.meta(fc[0]).param_bytes == (256 * 64 + 256) * 4  # the module's charge moved
    partials = [n for n in nodes if n.target is torch._C._nn.linear]
    assert all(ir.meta(n).shape[-1] in (64, 256) for n in partials)
    assert ir.total("flops", "blocks.0") == _gpt_ir(Plan.uniform()).total("flops", "blocks.0")


def test_row_parallel_linear_is_split_along_its_local_features():
    ir = _gpt_ir(layer_plan(1, 2, {"blocks.0": {"split": 2}}), devices=2)
    weight = next(n for n in ir.graph.nodes if n.op == "get_attr" and n.target == "blocks.0.mlp.out.weight")
    chunk = next(iter(weight.users))
    assert chunk.target is torch.chunk and chunk.args[1:] == (2, 1)
    assert str(ir.meta(weight).placement) == "S(1)@tp"
    assert [str(ir.meta(n).placement) for n in chunk.users] == ["S(1)@tp"] * 2


def test_split_that_does_not_divide_the_features_is_refused():
    torch.manual_seed(0)
    cfg = MLPConfig()
    with pytest.raises(PcompileError, match="not divisible by 3"):
        _ir(MLPModel(cfg), mlp_inputs(cfg, 8), Plan.uniform(split=3))
    # tp=4 leaves the row-parallel attention projection 64 / 4 = 16 local input features
    with pytest.raises(PcompileError, match="16 \\(local\\) input features are not divisible by 32"):
        _gpt_ir(layer_plan(1, 4, {"blocks.0": {"split": 32}}), devices=4)

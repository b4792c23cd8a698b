"""Front end: fx capture keeps the model's names, computes the same loss, and the IR text
form lists every node and parses back."""
import torch

from pcompile.ir import IR, target_name
from pcompile.models import GPT, GPTConfig, gpt_inputs
from tests.toy import TwoLinear, analyse


def _inputs():
    torch.manual_seed(0)
    return torch.randn(3, 8), torch.randn(3, 8)


def test_trace_node_list_of_a_two_linear_model():
    ir = analyse(TwoLinear(), _inputs(), stop_after="trace")
    assert IR.parse(ir.format()) == [
        ("x", "placeholder", "x"),
        ("y", "placeholder", "y"),
        ("up", "call_module", "up"),
        ("relu", "call_function", "torch.relu"),
        ("down", "call_module", "down"),
        ("mse_loss", "call_function", "torch.nn.functional.mse_loss"),
        ("output", "output", "output"),
    ]


def test_trace_row_has_no_metadata_before_analysis():
    ir = analyse(TwoLinear(), _inputs(), stop_after="trace")
    header, first = ir.format().splitlines()[:2]
    assert header.split() == ["node", "op", "target", "shape", "dtype", "flops", "out", "saved", "params", "layer",
                              "sharding"]
    assert first.split() == ["x", "placeholder", "x"] + ["-"] * 8


def test_traced_module_keeps_parameter_names_and_computes_the_same_loss():
    model = TwoLinear()
    x, y = _inputs()
    ir = analyse(model, (x, y), stop_after="trace")
    assert list(ir.gm.state_dict()) == list(model.state_dict())
    assert torch.equal(ir.gm(x, y), model(x, y))


def test_gpt_trace_parses_back_to_the_graph_node_list():
    cfg = GPTConfig(num_layers=2)
    ir = analyse(GPT(cfg), gpt_inputs(cfg, 2), stop_after="trace")
    expected = [(n.name, n.op, target_name(n)) for n in ir.graph.nodes]
    assert IR.parse(ir.format()) == expected
    ops = [op for _, op, _ in expected]
    assert ops.count("placeholder") == 2 and ops[-1] == "output"
    # 2 blocks x (q, k, v, proj, fc, out) Linears are call_module nodes named by their path
    linears = [t for _, op, t in expected if op == "call_module" and t.startswith("blocks.")
               and t.split(".")[-1] in ("q", "k", "v", "proj", "fc", "out")]
    assert len(linears) == 12 and linears[0] == "blocks.0.attn.q" and linears[-1] == "blocks.1.mlp.out"
    assert ir.capture == "fx"


def test_format_columns_are_fixed():
    cfg = GPTConfig(num_layers=2)
    ir = analyse(GPT(cfg), gpt_inputs(cfg, 2))
    lines = ir.format().splitlines()
    start = lines[0].index("shape")
    for line in lines[1:]:
        assert line[start - 1] == " " and line[start] != " ", line

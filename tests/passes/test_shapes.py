"""Shape propagation on fake tensors: shape, dtype and output bytes of every node, also for a
model whose weights live on the meta device (never allocated)."""
import torch

from pcompile.passes.shapes import tensor_bytes
from tests.toy import Attention, TwoLinear, analyse, rows


def test_two_linear_shapes_dtypes_and_bytes_as_text():
    ir = analyse(TwoLinear(width=8, hidden=16), (torch.randn(3, 8), torch.randn(3, 8)), stop_after="shapes")
    r = rows(ir)
    # node, op, target, shape, dtype, flops, out, ... (flops not yet counted)
    assert r["x"][:7] == ["x", "placeholder", "x", "[3,8]", "float32", "0", "96"]
    assert r["up"][3:7] == ["[3,16]", "float32", "0", "192"]
    assert r["relu"][3:7] == ["[3,16]", "float32", "0", "192"]
    assert r["down"][3:7] == ["[3,8]", "float32", "0", "96"]
    assert r["mse_loss"][3:7] == ["[]", "float32", "0", "4"]


def test_integer_inputs_and_size_values():
    ir = analyse(Attention(width=16, heads=4), (torch.randn(2, 5, 16), torch.randn(2, 5, 16)), stop_after="shapes")
    by_name = {n.name: ir.meta(n) for n in ir.graph.nodes}
    assert by_name["view"].shape == (2, 5, 4, 4)
    assert by_name["transpose"].shape == (2, 4, 5, 4)
    assert by_name["scaled_dot_product_attention"].shape == (2, 4, 5, 4)
    assert by_name["reshape"].shape == (2, 5, 16)
    # x.shape and its items are python values, recorded but not tensors
    assert by_name["getattr_1"].value == (2, 5, 16) and by_name["getattr_1"].shape is None
    assert [by_name[f"getitem{s}"].value for s in ("", "_1", "_2")] == [2, 5, 16]
    assert by_name["floordiv"].value == 4


def test_meta_device_model_analyses_without_weights():
    with torch.device("meta"):
        model = TwoLinear(width=1024, hidden=4096)
    x = torch.empty(64, 1024, device="meta")
    ir = analyse(model, (x, x), stop_after="shapes")
    up = next(n for n in ir.graph.nodes if n.name == "up")
    assert ir.meta(up).shape == (64, 4096) and ir.meta(up).output_bytes == 64 * 4096 * 4


def test_tensor_bytes_of_nested_results():
    assert tensor_bytes(torch.empty(2, 3)) == 24
    assert tensor_bytes((torch.empty(2, dtype=torch.float16), [torch.empty(1, dtype=torch.int64)], 7)) == 4 + 8
    assert tensor_bytes(3) == 0

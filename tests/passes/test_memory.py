"""Memory: bytes saved for backward are observed (saved-tensor hooks on fake tensors), each
storage charged once; parameter bytes charged once to the first reader (tied weights once)."""
import torch

from pcompile.models import GPT, GPTConfig, gpt_inputs
from tests.toy import Attention, OneLinear, Tied, TwoLinear, analyse, node, rows


def test_linear_saves_its_input():
    ir = analyse(OneLinear(8, 4), (torch.randn(3, 8), torch.randn(3, 4)), stop_after="memory")
    fc = ir.meta(node(ir, "fc"))
    assert fc.saved_bytes == 3 * 8 * 4  # the input; the weight is model state, not an activation
    assert fc.param_bytes == (8 * 4 + 4) * 4
    assert rows(ir)["fc"][7:9] == ["96", "144"]
    assert ir.meta(node(ir, "mse_loss")).saved_bytes == 2 * 3 * 4 * 4  # prediction and target


def test_linear_without_bias_parameter_bytes():
    ir = analyse(OneLinear(8, 4, bias=False), (torch.randn(3, 8), torch.randn(3, 4)), stop_after="memory")
    assert ir.meta(node(ir, "fc")).param_bytes == 8 * 4 * 4


def test_a_storage_saved_twice_is_charged_once():
    # relu saves its output; down saves the same tensor as its input: charged to relu only
    ir = analyse(TwoLinear(8, 16), (torch.randn(3, 8), torch.randn(3, 8)), stop_after="memory")
    assert ir.meta(node(ir, "up")).saved_bytes == 3 * 8 * 4
    assert ir.meta(node(ir, "relu")).saved_bytes == 3 * 16 * 4
    assert ir.meta(node(ir, "down")).saved_bytes == 0
    # q, k and v read the same x: saved once, by q
    ir = analyse(Attention(16, 4), (torch.randn(2, 5, 16), torch.randn(2, 5, 16)), stop_after="memory")
    assert [ir.meta(node(ir, n)).saved_bytes for n in ("q", "k", "v")] == [2 * 5 * 16 * 4, 0, 0]


def test_tied_weights_counted_once():
    model = Tied(vocab=10, width=6)
    idx = torch.randint(0, 10, (2, 3))
    ir = analyse(model, (idx, idx), stop_after="memory")
    assert ir.meta(node(ir, "emb")).param_bytes == 10 * 6 * 4
    assert ir.meta(node(ir, "head")).param_bytes == 0
    assert ir.total("param_bytes") == sum(p.numel() * 4 for p in model.parameters()) == 240


def test_gpt_parameter_bytes_total_is_the_model_size():
    for tie in (True, False):
        cfg = GPTConfig(num_layers=2, tie_head=tie)
        model = GPT(cfg)
        ir = analyse(model, gpt_inputs(cfg, 2), stop_after="memory")
        assert ir.total("param_bytes") == 4 * sum(p.numel() for p in model.parameters())
        assert (ir.meta(node(ir, "head")).param_bytes == 0) == tie

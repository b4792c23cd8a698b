"""FLOPs: a Linear is 2*b*in*out, attention 4*B*H*L*S*E by formula (CPU SDPA counts 0 in
FlopCounterMode), backward twice forward, and the per-layer sums add up to the total."""
import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.passes.flops import BACKWARD_FACTOR, sdpa_flops
from tests.toy import Attention, OneLinear, TwoLinear, analyse, node, rows


def reference_flops(model, inputs, math_sdpa: bool = True) -> int:
    """FlopCounterMode's total for the original (untraced) model on fake inputs; with the math
    SDPA kernel forced so attention is counted as its two batched matmuls."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(t) for t in inputs]
    counter = FlopCounterMode(display=False)
    kernel = sdpa_kernel([SDPBackend.MATH]) if math_sdpa else contextlib.nullcontext()
    with mode, kernel, counter, torch.no_grad():
        model(*fake)
    return counter.get_total_flops()


def test_linear_flops_are_2_b_in_out():
    b, d_in, d_out = 3, 8, 4
    ir = analyse(OneLinear(d_in, d_out), (torch.randn(b, d_in), torch.randn(b, d_out)), stop_after="flops")
    fc = ir.meta(node(ir, "fc"))
    assert fc.flops == 2 * b * d_in * d_out == 192
    assert fc.bwd_flops == BACKWARD_FACTOR * fc.flops == 384
    assert rows(ir)["fc"][5] == "192"
    assert ir.total("flops") == 192  # mse_loss and placeholders count 0


def test_batched_linear_counts_every_leading_dim():
    ir = analyse(TwoLinear(width=8, hidden=16), (torch.randn(2, 3, 8), torch.randn(2, 3, 8)), stop_after="flops")
    assert ir.meta(node(ir, "up")).flops == 2 * (2 * 3) * 8 * 16
    assert ir.meta(node(ir, "down")).flops == 2 * (2 * 3) * 16 * 8
    assert ir.meta(node(ir, "relu")).flops == 0


def test_sdpa_formula():
    # two matmuls (q k^T and p v), each 2*B*H*L*S*E
    assert sdpa_flops((2, 4, 5, 8), (2, 4, 7, 8)) == 2 * 2 * (2 * 4) * 5 * 7 * 8
    assert sdpa_flops((5, 8), (7, 8)) == 2 * 2 * 5 * 7 * 8


def test_attention_node_counted_by_formula():
    B, T, W, H = 2, 5, 16, 4
    ir = analyse(Attention(W, H), (torch.randn(B, T, W), torch.randn(B, T, W)), stop_after="flops")
    attn = ir.meta(node(ir, "scaled_dot_product_attention"))
    assert attn.flops == 4 * B * H * T * T * (W // H) == 3200
    assert attn.bwd_flops == 6400
    assert rows(ir)["scaled_dot_product_attention"][5] == "3.2K"
    # 4 Linears of 2*B*T*W*W each plus attention
    assert ir.total("flops") == 4 * 2 * B * T * W * W + 3200


def test_gpt_total_matches_flop_counter_with_math_attention():
    cfg = GPTConfig(num_layers=2)
    model = GPT(cfg)
    inputs = gpt_inputs(cfg, 4)
    ir = analyse(model, inputs)
    assert ir.total("flops") == reference_flops(model, inputs, math_sdpa=True)
    assert sum(ir.total("flops", layer) for layer in ir.layers) == ir.total("flops")
    # What the pass works around: the default CPU kernel counts attention as 0.
    attention = sum(ir.meta(n).flops for n in ir.graph.nodes if "scaled_dot_product" in n.name)
    assert attention > 0
    assert reference_flops(model, inputs, math_sdpa=False) == ir.total("flops") - attention


def test_per_layer_flops_of_a_gpt_block():
    cfg = GPTConfig(num_layers=2)  # hidden 64, seq 32, 4 heads, mlp x4
    ir = analyse(GPT(cfg), gpt_inputs(cfg, 2))
    tokens, h, t = 2 * 32, 64, 32
    linears = 4 * 2 * tokens * h * h + 2 * 2 * tokens * h * 4 * h
    attention = 4 * 2 * 4 * t * t * (h // 4)
    assert ir.total("flops", "blocks.0") == ir.total("flops", "blocks.1") == linears + attention
    assert ir.total("flops", "pre") == 0  # embeddings are lookups
    assert ir.total("flops", "post") == 2 * tokens * h * cfg.vocab_size  # the LM head

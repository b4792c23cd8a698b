"""Blocks found by structure train equal to serial on 4 gloo ranks (loss and gradients within 1e-5
over 3 AdamW steps; parameters too but where nn.MultiheadAttention is: the key part of its
in_proj_bias has a gradient of exactly 0 in exact arithmetic - softmax ignores a shift of every
key - and AdamW turns its rounding noise into whole lr steps, 1e-2 apart under plain dp4 too):
torchvision's ViT layout (blocks `encoder.layers.encoder_layer_N`)
under dp2·tp2 - its blocks split, the Conv2d patch embedding replicated - and ALBERT-style shared
layers (one block applied 3 times: 3 layers reading one parameter set, its gradient the sum over
the calls) under dp2·tp2, ZeRO-3, a 2-stage pipeline and the searched plan, and Hugging Face
ALBERT (its layer group applied 3 times: 3 layers) under dp2·tp2; torch's own
nn.TransformerEncoder / nn.TransformerDecoderLayer under dp2·tp2 (exported: fx keeps them whole),
their Linears split. One launch."""
import pcompile
from pcompile import Plan
from pcompile.plan import Strategy
from tests.distributed.ranks_structural import compare_many

PIPELINE = Plan(num_devices=4, default=Strategy(dp=2), pp=2, num_microbatches=2)
CASES = [("vit", Plan.uniform(dp=2, tp=2)), ("shared", Plan.uniform(dp=2, tp=2)),
         ("shared", Plan.uniform(dp=4, sdp=True)), ("shared", PIPELINE), ("shared", None),
         ("albert", Plan.uniform(dp=2, tp=2)), ("stock", Plan.uniform(dp=2, tp=2))]


def test_structural_blocks_train_like_serial():
    results = pcompile.launch(compare_many, 4, CASES, timeout=900)[0]
    for (name, plan), r in zip(CASES, results):
        assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, (name, plan, r)
        assert name != "shared" or r["param_diff"] < 1e-5, (name, plan, r)  # no attention: parameters too
    vit, shared = results[0], results[1]
    assert vit["layers"][1:-1] == [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    assert "conv_proj.weight" not in vit["split"] and "conv_proj.bias" not in vit["split"]  # replicated
    for i in range(3):  # every block's MLP pair split (column up, row down)
        assert {f"encoder.layers.encoder_layer_{i}.mlp.0.weight", f"encoder.layers.encoder_layer_{i}.mlp.3.weight"} \
            <= set(vit["split"]), vit["split"]
    assert shared["layers"] == ["pre", "block", "block@1", "block@2", "post"]
    assert {"block.up.weight", "block.down.weight"} <= set(shared["split"])  # one sharding for the 3 calls
    stock = results[-1]
    assert stock["capture"] == "export" and stock["layers"] == ["pre", "encoder.layers.0", "encoder.layers.1", "post"]
    assert {"encoder.layers.0.linear1.weight", "encoder.layers.0.linear2.weight", "decoder.linear1.weight"} \
        <= set(stock["split"]), stock["split"]
    group = "model.albert.encoder.albert_layer_groups.0"
    assert results[-2]["layers"][1:-1] == [group, f"{group}@1", f"{group}@2"] and results[-2]["split"]

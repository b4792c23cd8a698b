"""pcompile.runtime.precision.follow_run_time_dtype: casts an fp32 torch.export capture baked in.

Each toy module is exported in fp32, its graph cast to bf16 (as MasterWeights does) and run on
bf16 inputs; the rewritten graph must compute exactly what the eager module computes after
module.to(torch.bfloat16) - the same dtypes op for op, so the same bits. Without the rewrite
RMSNorm's restore stays fp32 and the next Linear raises, and the residual stream turns fp32.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pcompile.runtime.precision import follow_run_time_dtype


class RMSNorm(nn.Module):  # LlamaRMSNorm's forward
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * x.to(input_dtype)


class Block(nn.Module):
    """A pre-norm residual block: the residual is read after the norm's no-op upcast aliased it."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.norm, self.proj = RMSNorm(width), nn.Linear(width, width)

    def forward(self, x):
        residual = x
        return residual + self.proj(self.norm(x))


class EagerAttention(nn.Module):
    """HF eager attention: softmax computed in fp32, cast back to the query's dtype."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = F.softmax(q @ k.transpose(-1, -2), dim=-1, dtype=torch.float32).to(q.dtype)
        return weights @ v


class OldRope(nn.Module):
    """transformers 4.4x's rotary embedding: two `.float()`s of one value (through views only),
    cos / sin computed in fp32 and cast back to x's dtype."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, width, 2).float() / width)))

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)[None, :].expand(x.shape[0], -1)
        inv = self.inv_freq[None, :, None].float().expand(x.shape[0], -1, 1)
        freqs = (inv.float() @ positions[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return x * emb.cos().to(dtype=x.dtype) + x * emb.sin().to(dtype=x.dtype)


class Upcast(nn.Module):
    def forward(self, x):
        return x.float()


class Model(nn.Module):
    """Every pattern in one model, then a loss computed in fp32 (`logits.float()`, as HF's)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.rope, self.block, self.attn = OldRope(width), Block(width), EagerAttention(width)
        self.norm, self.head, self.upcast = RMSNorm(width), nn.Linear(width, 8), Upcast()

    def forward(self, x, labels):
        h = self.attn(self.block(self.rope(x)))
        logits = self.head(self.norm(h)).float()
        fp32 = self.upcast(h)  # a module returning its upcast: the caller reads fp32
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + (fp32 * fp32).mean()


def _exported(model, inputs) -> torch.fx.GraphModule:
    """The export graph without its input dtype assertions (pcompile's capture drops them too)."""
    gm = torch.export.export(model, inputs).module()
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _captured(model, inputs):
    return _exported(model, inputs).to(torch.bfloat16)


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 6, 16), torch.randint(0, 8, (2, 6))


@pytest.mark.parametrize("cls", [Block, EagerAttention, OldRope, Model])
def test_rewritten_capture_computes_what_eager_bf16_computes(cls):
    torch.manual_seed(0)
    model = cls()
    inputs = _inputs() if cls is Model else _inputs()[:1]
    gm = _captured(model, inputs)
    assert follow_run_time_dtype(gm) > 0
    low = tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs)
    expected = copy.deepcopy(model).to(torch.bfloat16)(*low)
    got = gm(*low)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_the_capture_as_it_was_is_not_the_bf16_model():
    """Without the rewrite the baked casts raise (RMSNorm's restore meets a bf16 Linear) or
    compute another function (the residual stream in fp32): the test above can fail."""
    torch.manual_seed(0)
    x = _inputs()[0]
    with pytest.raises(RuntimeError, match="same dtype"):
        _captured(Block(), (x,))(x.to(torch.bfloat16))


def test_fp32_numbers_unchanged():
    """The rewritten casts still cast to fp32 when the graph runs in fp32."""
    torch.manual_seed(0)
    model, inputs = Model(), _inputs()
    gm = _exported(model, inputs)
    expected = gm(*inputs)
    follow_run_time_dtype(gm)
    assert torch.equal(gm(*inputs), expected)

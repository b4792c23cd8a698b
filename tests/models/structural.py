"""Models whose repeated blocks are found by structure, not by `.0`/`.1` names (issue #17):

- `VisionTransformer`: torchvision's ViT-B/16 layout at toy size, written out (torchvision's
  wheel is a CUDA build that does not load on the CPU torch here), with its module names:
  `conv_proj` (a Conv2d patch embedding), `class_token`, `encoder.pos_embedding`,
  `encoder.layers.encoder_layer_N` (an nn.Sequential built from an OrderedDict), `encoder.ln`,
  `heads.head`; its blocks' attention is nn.MultiheadAttention, their MLP an nn.Sequential
  numbered 0..4 (torchvision's MLPBlock); forward(images, labels) returns the cross-entropy.
- `SharedLayers`: ALBERT's cross-layer sharing - one block (one parameter set) applied N times.
- `hf_albert`: Hugging Face ALBERT (one layer group applied num_hidden_layers times), as a masked LM.
- `StockTransformer`: torch's own nn.TransformerEncoder (of nn.TransformerEncoderLayer) and an
  nn.TransformerDecoderLayer, which torch.fx keeps as opaque calls (pcompile exports it).
- `StockEncoderDecoder`: torch's nn.Transformer (an encoder and a decoder stack), exported too.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    def __init__(self, heads: int, dim: int, hidden: int):
        super().__init__()
        self.num_heads = heads
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq: int, layers: int, heads: int, dim: int, hidden: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", EncoderBlock(heads, dim, hidden))
                                                for i in range(layers)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


class VisionTransformer(nn.Module):
    def __init__(self, image: int = 8, patch: int = 4, layers: int = 3, heads: int = 2, dim: int = 16,
                 hidden: int = 32, classes: int = 10):
        super().__init__()
        self.patch_size, self.hidden_dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder((image // patch) ** 2 + 1, layers, heads, dim, hidden)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, classes)))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        x = self.conv_proj(images).reshape(n, self.hidden_dim, (h // self.patch_size) * (w // self.patch_size))
        x = torch.cat([self.class_token.expand(n, -1, -1), x.permute(0, 2, 1)], dim=1)
        return F.cross_entropy(self.heads(self.encoder(x)[:, 0]), labels)


def vit_inputs(step: int, batch: int = 8, image: int = 8, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(batch, 3, image, image, generator=g), torch.randint(0, classes, (batch,), generator=g)


class SharedBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.ln(x))))


class SharedLayers(nn.Module):
    """ALBERT-style: `block` (one parameter set) applied `times` times between an embedding and a head."""

    def __init__(self, vocab: int = 32, dim: int = 16, times: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = SharedBlock(dim)
        self.times = times
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for _ in range(self.times):
            h = self.block(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


def token_inputs(step: int, batch: int = 8, seq: int = 4, vocab: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)


class StockTransformer(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        h = self.decoder(h, self.encoder(h))
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


class StockEncoderDecoder(nn.Module):
    """torch's nn.Transformer (encoder-decoder: nn.TransformerEncoder and nn.TransformerDecoder
    stacks), tokens embedded on both sides, the decoder's output classified per position."""

    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.transformer = nn.Transformer(dim, heads, layers, layers, 2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        h = self.transformer(self.embed(src), self.embed(tgt))
        return F.cross_entropy(self.head(h).flatten(0, 1), tgt.flatten())


def hf_albert(layers: int = 3) -> nn.Module:
    import transformers as hf

    from tests.models.zoo import VOCAB, MaskedLM

    cfg = hf.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=layers,
                          num_hidden_groups=1, num_attention_heads=4, intermediate_size=64, max_position_embeddings=8,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    return MaskedLM(hf.AlbertForMaskedLM(cfg))

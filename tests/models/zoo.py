"""The models of the front-end tests, built from small configs with random weights (nothing is
downloaded): HuggingFace GPT-2, Llama (grouped-query attention), BERT, T5 and ViT behind thin
wrappers that return the loss (the wrapper is what a user compiles), a ResNet-style CNN, and
torch's own nn.Transformer.

Dropout is 0 everywhere: tensor-parallel ranks would draw different masks, and the
equivalence tests compare against the serial model exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, SEQ, BATCH = 96, 8, 4


class CausalLM(nn.Module):
    """loss = the HF model's own shifted cross-entropy (GPT-2, Llama)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        return self.model(input_ids=ids, labels=labels, use_cache=False, return_dict=False)[0]


class MaskedLM(CausalLM):
    """BERT (no cache argument) and ViT (pixel_values in, class labels)."""

    def forward(self, inputs, labels):
        return self.model(inputs, labels=labels, return_dict=False)[0]


class Seq2Seq(nn.Module):
    """T5: the loss is computed here from the logits (cross-entropy over the decoder positions)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        logits = self.model(input_ids=ids, labels=labels, use_cache=False, return_dict=False)[1]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def gpt2(attention: str = "sdpa") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation=attention)
    return CausalLM(GPT2LMHeadModel(cfg))


def llama(kv_heads: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=SEQ,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return CausalLM(LlamaForCausalLM(cfg))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    return MaskedLM(BertForMaskedLM(cfg))


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return Seq2Seq(T5ForConditionalGeneration(cfg))


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return MaskedLM(ViTForImageClassification(cfg))


class ResBlock(nn.Module):
    """conv-norm-relu-conv-norm + (1x1 projection) shortcut. GroupNorm, not BatchNorm: batch
    statistics would differ between a data-parallel rank's half batch and the full batch."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(2, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(2, c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if (c_in, stride) != (c_out, 1) else nn.Identity()

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths=(8, 8, 16, 16), classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1)
        self.stages = nn.Sequential(*[ResBlock(a, b, 2 if b != a else 1) for a, b in zip(widths, widths[1:])])
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, images, labels):
        x = self.stages(F.relu(self.stem(images)))
        return F.cross_entropy(self.head(x.mean(dim=(2, 3))), labels)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: conv-bn-relu-conv-bn + (downsample) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if (c_in, stride) != (c_out, 1) else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TorchvisionResNet18(nn.Module):
    """torchvision's resnet18 layout at toy widths, written out with its module names (conv1, bn1,
    maxpool, layer1..layer4 of 2 BasicBlocks, avgpool, fc): torchvision's wheel here is a CUDA
    build whose C ops do not load on this CPU torch (import fails), and timm imports it. BatchNorm
    in train mode: statistics over the whole batch (pcompile.runtime.batch_norm)."""

    def __init__(self, widths=(4, 8, 8, 16), classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width, 1)))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, images, labels):
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.cross_entropy(self.fc(torch.flatten(self.avgpool(x), 1)), labels)


def torchvision_vit() -> nn.Module:
    """torchvision's VisionTransformer layout (tests/models/structural.py), 5 classes."""
    from tests.models.structural import VisionTransformer

    return VisionTransformer(classes=5)


def token_batch(seed: int, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, SEQ), generator=g), torch.randint(2, VOCAB, (batch, SEQ), generator=g)


def image_batch(seed: int, batch: int = BATCH, size: int = 8, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)


def nn_transformer() -> nn.Module:
    """torch's own nn.Transformer (encoder and decoder stacks of nn.TransformerEncoderLayer /
    nn.TransformerDecoderLayer), exported: attention is nn.MultiheadAttention's packed in_proj."""
    from tests.models.structural import StockEncoderDecoder

    return StockEncoderDecoder(vocab=VOCAB)


MODELS = {
    "gpt2": (gpt2, token_batch),
    "llama": (llama, token_batch),
    "llama-kv1": (lambda: llama(kv_heads=1), token_batch),
    "bert": (bert, token_batch),
    "t5": (t5, token_batch),
    "vit": (vit, image_batch),
    "resnet": (ResNet, image_batch),
    "nn-transformer": (nn_transformer, token_batch),
    "gpt2-eager": (lambda: gpt2("eager"), token_batch),  # refused under bf16 (pcompile.passes.trace)
    "tv-resnet18": (TorchvisionResNet18, lambda seed: image_batch(seed, batch=8, size=32)),
    "tv-vit": (torchvision_vit, image_batch),
}

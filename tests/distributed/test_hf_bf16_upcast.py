"""A Hugging Face Llama under compile(..., mixed_precision="bf16") (found with issue #15, item 5).

torch.export captures the model in fp32, so LlamaRMSNorm's `hidden_states.to(input_dtype)` is
recorded as `aten.to.dtype(x, torch.float32)`: once the runtime casts the module to bf16, the
normalised activations stay fp32 and the first projection fails ("expected m1 and m2 to have
the same dtype, but got: float != c10::BFloat16"). Strict xfail until the capture or the
precision pass maps the model's own casts to the compute dtype; then drop the mark.
"""
import math

import pytest
import torch

import pcompile

transformers = pytest.importorskip("transformers")


class CausalLM(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        return self.model(input_ids=ids, labels=labels, use_cache=False, return_dict=False)[0]


def one_bf16_step() -> float:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = CausalLM(transformers.LlamaForCausalLM(cfg))
    ids = torch.randint(0, 128, (4, 16))
    cm = pcompile.compile(model, pcompile.Cluster.local(1), (ids, ids), mixed_precision="bf16")
    return float(cm.train_step(ids, ids))


@pytest.mark.xfail(strict=True, reason=(
    "exported HF Llama bakes RMSNorm's cast back to the input dtype as fp32; under bf16 the "
    "q_proj Linear gets fp32 activations and bf16 weights and raises"))
def test_hf_llama_trains_in_bf16():
    loss = pcompile.launch(one_bf16_step, 1)[0]
    assert math.isfinite(loss)

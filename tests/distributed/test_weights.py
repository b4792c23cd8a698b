"""Models that do not fit one device: built on the meta device, compiled, and given values on
each rank for its own pieces only (one 4-rank launch):

- init_weights(seed) gives the same full state under dp4, tp4, ZeRO-3 and pp2·tp2 as
  pcompile.init_weights(model, seed) on one device (plan- and world-independent);
- load_weights of a safetensors file, and of a sharded directory (model.safetensors.index.json),
  gives exactly the file's tensors; each rank holds only its pieces;
- from loaded weights, 3 AdamW steps equal the serial model's (loss and gradients 1e-5) under tp4
  and ZeRO-3;
- Hugging Face checkpoints written by save_pretrained load into the wrapped model (names matched
  without the wrapper's prefix; GPT-2's fused q/k/v read block-wise under tp; Llama from a
  sharded directory) and evaluate like the serial model.
The figures for a model of 0.5 GB (peak RSS growth per rank) are benchmarks/large_weights.py's."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import pcompile
from pcompile import Plan
from tests.distributed.ranks import gap
from tests.distributed.ranks_weights import CFG, meta_gpt, run_all
from tests.models import zoo

SEED = 3
PLANS = {"dp4": Plan.uniform(dp=4), "tp4": Plan.uniform(tp=4), "zero3": Plan.uniform(dp=4, sdp=True),
         "pp2·tp2": dataclasses.replace(Plan.uniform(tp=2, pp=2), num_microbatches=2)}


def _save(directory, state: dict, shards: int = 1) -> str:
    """A safetensors file (shards == 1) or a directory of `shards` files with an index."""
    state = {k: v.contiguous() for k, v in state.items()}
    if shards == 1:
        path = os.path.join(directory, "model.safetensors")
        save_file(state, path)
        return path
    names, weight_map = sorted(state), {}
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(directory, file))
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(7)
    serial = pcompile.models.GPT(CFG)
    state = {k: v for k, v in serial.state_dict().items() if k != "head.weight"}  # tied: stored once
    single = _save(tmp_path_factory.mktemp("single"), state)
    sharded = _save(tmp_path_factory.mktemp("sharded"), state, shards=3)
    hf = {}
    for kind, build, shard in (("gpt2", zoo.gpt2, None), ("llama", zoo.llama, "20KB")):
        torch.manual_seed(11)
        model = build()
        directory = tmp_path_factory.mktemp(kind)
        model.model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
        model.eval()
        with torch.no_grad():
            loss = model(*zoo.token_batch(1)).item()
        hf[kind] = (str(directory), model.state_dict(), loss)
    return serial.state_dict(), single, sharded, hf


def test_meta_models_get_their_weights_on_each_rank(checkpoints):
    expected, single, sharded, hf = checkpoints
    reference = pcompile.init_weights(meta_gpt(), SEED).state_dict()
    assert set(reference) == set(expected)
    cases = [("weights", (PLANS[name], SEED, single if i % 2 else sharded)) for i, name in enumerate(PLANS)]
    cases += [("train", (PLANS["tp4"], single)), ("train", (PLANS["zero3"], sharded))]
    cases += [("hf", ("gpt2", Plan.uniform(dp=2, tp=2), hf["gpt2"][0])), ("hf", ("llama", Plan.uniform(tp=4),
                                                                                 hf["llama"][0]))]
    assert any(name.endswith(".json") for name in os.listdir(hf["llama"][0]))  # a sharded HF directory
    per_rank = pcompile.launch(run_all, 4, cases, timeout=900)
    numel = sum(t.numel() for t in pcompile.models.GPT(CFG).parameters())
    for results in per_rank:
        for (name, plan), r in zip(PLANS.items(), results[:4]):
            for key, value in reference.items():
                assert torch.equal(r["init"][key], value), (name, key)  # plan-independent initial values
                assert torch.equal(r["loaded"][key], expected[key]), (name, key)  # the file, exactly
            if name in ("tp4", "zero3"):
                assert r["local_numel"] < numel / 2, (name, r["local_numel"], numel)  # pieces only
        for r in results[4:6]:
            assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5 and r["param_diff"] < 1e-5, r
        for kind, r in zip(("gpt2", "llama"), results[6:]):
            _, state, loss = hf[kind]
            for key, value in state.items():
                assert torch.equal(r["loaded"][key], value), (kind, key)
            assert gap(r["loss"], loss) < 1e-5 * loss, (kind, r["loss"], loss)  # tp sums in another order


def test_a_meta_model_without_weights_is_refused_with_the_fix():
    cm = pcompile.compile(meta_gpt(), pcompile.Cluster.local(1), pcompile.models.gpt_inputs(CFG, 8))
    with pytest.raises(pcompile.PcompileError, match="no values yet") as info:
        cm.train_step(*pcompile.models.gpt_inputs(CFG, 8))
    assert "init_weights" in info.value.fix
    cm.init_weights(0)
    assert torch.isfinite(cm.train_step(*pcompile.models.gpt_inputs(CFG, 8)))


def test_init_weights_on_one_device_is_the_module_rules_with_per_module_seeds():
    a = pcompile.init_weights(meta_gpt(), 5).state_dict()
    b = pcompile.init_weights(pcompile.models.GPT(CFG), 5).state_dict()  # a real model re-initialised the same
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = pcompile.init_weights(meta_gpt(), 6).state_dict()
    assert not torch.equal(a["blocks.0.mlp.fc.weight"], c["blocks.0.mlp.fc.weight"])
    assert torch.allclose(a["ln_f.weight"], torch.ones(CFG.hidden))  # LayerNorm's own rule
    std = a["blocks.1.attn.q.weight"].std().item()
    assert 0.015 < std < 0.025  # the GPT's rule: normal(0, 0.02)


class _Scale(torch.nn.Module):
    """Sets its parameter in __init__ only: on the meta device nothing can recompute it."""

    def __init__(self, width: int):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.gain


def test_a_tensor_no_rule_sets_is_refused_naming_it():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), _Scale(8))
    with pytest.raises(pcompile.PcompileError, match=r"'1.gain'") as info:
        pcompile.init_weights(model, 0)
    assert "reset_parameters" in info.value.fix and "load_weights" in info.value.fix

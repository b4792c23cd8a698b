"""A model larger than any one rank should hold: a 0.44 GB fp32 GPT built on the meta device,
compiled on 4 gloo ranks, given weights by init_weights and load_weights, then trained.

Per plan (tp4, ZeRO-3 over 4, and for initial values dp4 and pp2·tp2 = "pp2tp2"), one launch:
1. peak RSS growth of each rank while compiling, init_weights(seed) and load_weights(file)
   (Linux's peak resident set, reset through /proc/self/clear_refs before compiling): target
   below half the model's bytes under tp4 and ZeRO-3 (each rank holds a quarter, plus one
   module's full tensors while initialising and a bounded slab while reading);
2. the full state after init_weights(seed), as sha256 per tensor: identical under every plan
   and to pcompile.init_weights(model, seed) on one device;
3. the full state after load_weights: the file's tensors exactly;
4. tp4 and ZeRO-3: 3 AdamW steps from the loaded weights next to the serial model loaded from
   the same file (on rank 0, after the parallel steps): loss and parameters within 1e-5.

Usage: python benchmarks/large_weights.py [--layers N] [--skip-train]. Last line: key=value.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pcompile  # noqa: E402
from pcompile import Plan  # noqa: E402
from pcompile.models import GPT, GPTConfig, gpt_inputs  # noqa: E402

CFG = GPTConfig(vocab_size=8192, seq_len=32, hidden=1024, num_heads=16, num_layers=8)
BATCH, SEED, STEPS = 4, 5, 3
PLANS = {"tp4": Plan.uniform(tp=4), "zero3": Plan.uniform(dp=4, sdp=True), "dp4": Plan.uniform(dp=4),
         "pp2tp2": dataclasses.replace(Plan.uniform(tp=2, pp=2), num_microbatches=2)}
TRAINED = ("tp4", "zero3")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in state.items()}


def rank_run(cfg: GPTConfig, plan: Plan, path: str, train: bool) -> dict:
    with torch.device("meta"):
        model = GPT(cfg)
    _reset_peak_rss()
    before, _ = _rss()
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), gpt_inputs(cfg, BATCH), plan=plan)
    cm.init_weights(SEED)
    _, init_peak = _rss()
    cm.load_weights(path)
    _, load_peak = _rss()
    local = sum(t.numel() * t.element_size() for t in cm.parameters())
    out = {"growth": max(init_peak, load_peak) - before, "local_bytes": local}
    cm.init_weights(SEED)
    state = cm.full_state_dict()
    out["init"] = digests(state) if dist.get_rank() == 0 else None
    del state
    cm.load_weights(path)
    state = cm.full_state_dict()
    out["loaded"] = digests(state) if dist.get_rank() == 0 else None
    del state
    if train:
        out.update(_train(cfg, cm, path))
    cm.close()
    return out


def _train(cfg: GPTConfig, cm, path: str) -> dict:
    from safetensors.torch import load_file

    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-4, eps=1e-6)
    losses = []
    for step in range(STEPS):
        losses.append(cm.train_step(*gpt_inputs(cfg, BATCH, seed=step)).item())
        optimizer.step()
        optimizer.zero_grad()
    state = cm.full_state_dict()
    if dist.get_rank() != 0:
        dist.barrier()
        return {}
    serial = GPT(cfg)
    serial.load_state_dict(load_file(path), strict=False)  # the tied head is the embedding's table
    optimizer = torch.optim.AdamW(serial.parameters(), lr=1e-4, eps=1e-6)
    serial_losses = []
    for step in range(STEPS):
        loss = serial(*gpt_inputs(cfg, BATCH, seed=step))
        loss.backward()
        serial_losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    reference = serial.state_dict()
    dist.barrier()
    return {"loss_diff": max(abs(a - b) for a, b in zip(losses, serial_losses)),
            "param_diff": max((state[k] - reference[k]).abs().max().item() for k in reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=CFG.num_layers)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    from safetensors.torch import save_file

    cfg = dataclasses.replace(CFG, num_layers=args.layers)
    start = time.perf_counter()
    torch.manual_seed(0)
    serial = GPT(cfg)
    model_bytes = sum(p.numel() * p.element_size() for p in serial.parameters())
    print(f"GPT {cfg}: {model_bytes / 1e6:.0f} MB of fp32 parameters")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.safetensors")
        save_file({k: v.contiguous() for k, v in serial.state_dict().items() if k != "head.weight"}, path)
        file_state = digests({k: v for k, v in serial.state_dict().items()})
        del serial
        with torch.device("meta"):
            reference = digests(pcompile.init_weights(GPT(cfg), SEED).state_dict())
        results = {name: pcompile.launch(rank_run, 4, cfg, plan, path, name in TRAINED and not args.skip_train,
                                         timeout=1800) for name, plan in PLANS.items()}
    figures = {}
    print(f"\n{'plan':8} {'rank':>4} {'RSS growth MB':>14} {'local params MB':>16} {'growth / model':>15}")
    for name, per_rank in results.items():
        for rank, r in enumerate(per_rank):
            print(f"{name:8} {rank:>4} {r['growth'] / 1e6:>14.0f} {r['local_bytes'] / 1e6:>16.0f} "
                  f"{r['growth'] / model_bytes:>15.2f}")
        if name in TRAINED:
            figures[f"{name}_growth_ratio"] = round(max(r["growth"] for r in per_rank) / model_bytes, 3)
        first = per_rank[0]
        figures[f"{name}_init_same"] = int(first["init"] == reference)
        figures[f"{name}_loaded_exact"] = int(first["loaded"] == file_state)
        if "loss_diff" in first:
            print(f"{name}: {STEPS} AdamW steps vs serial: loss diff {first['loss_diff']:.2e}, "
                  f"parameter diff {first['param_diff']:.2e}")
            figures[f"{name}_train_ok"] = int(first["loss_diff"] < 1e-5 and first["param_diff"] < 1e-5)
    figures["model_mb"] = round(model_bytes / 1e6)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

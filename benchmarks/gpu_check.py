"""`make gpu-check`: the CUDA path on a machine with one or more GPUs and no network, in a few
minutes. Prints one `key=value` line per check group and a last line with every figure; exits
1 when a check fails.

1. the CUDA-gated tests (pytest -m "not slow" on the files that hold them: each skips itself
   without CUDA);
2. one GPU, world 1 (no process group): the built-in GPT compiled under the one-device plan,
   plus activation checkpointing and operator splitting, in fp32 and bf16, against the serial
   fp32 model on the same GPU: loss and gradients; `torch.cuda.max_memory_allocated()` of a training
   step against the plan's predicted peak, and the median step time against the predicted one
   (ratios measured / predicted, reported, not asserted);
3. a model built on the meta device: init_weights on the GPU equals pcompile.init_weights;
4. cm.compile() (inductor) against eager;
5. with 2+ GPUs, NCCL ranks (up to 4): dp, tp, ZeRO-3 and a pipeline against the serial model.

GPU_CHECK_ALLOW_CPU=1 runs the same script on the CPU (a dry run: every path but CUDA's).
Usage: python3 benchmarks/gpu_check.py [--quick] (quick: smaller model, no pytest, no inductor).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pcompile  # noqa: E402
from pcompile import Plan  # noqa: E402
from pcompile.models import GPT, GPTConfig, gpt_inputs  # noqa: E402

GPU_TESTS = ["tests/test_device.py", "tests/cost/test_profile_gpu.py", "tests/test_gpu.py"]
CFG = GPTConfig(vocab_size=8192, seq_len=256, hidden=1024, num_heads=16, num_layers=4)
QUICK = GPTConfig(vocab_size=512, seq_len=32, hidden=128, num_heads=4, num_layers=2)
BATCH = 8
# relative to the serial fp32 model, loss and gradients norm-wise: bf16 keeps 8 bits (u = 3.9e-3),
# a few roundings per op (tests/distributed/test_mixed_precision.py: observed <= 1e-2)
TOLERANCE = {None: 1e-4, "bf16": 5e-2}


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
        return torch.device("cpu")
    raise SystemExit("gpu_check: no CUDA device (set GPU_CHECK_ALLOW_CPU=1 for a dry run on the CPU)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative(got: dict, expected: dict) -> float:
    diff = sum(((got[n].float() - e.float()) ** 2).sum().item() for n, e in expected.items())
    return (diff / max(sum((e.float() ** 2).sum().item() for e in expected.values()), 1e-30)) ** 0.5


def _serial(cfg: GPTConfig, device: torch.device, batch: tuple):
    """Loss and gradients of the serial fp32 model."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    loss = model(*batch)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def one_device(cfg: GPTConfig, device: torch.device, steps: int) -> dict:
    """World-1 plans against the serial model; memory and time against the prediction."""
    out = {}
    cluster = pcompile.Cluster.local(1)
    batch = tuple(x.to(device) for x in gpt_inputs(cfg, BATCH))
    plans = {"plain": Plan.uniform(dp=1), "ckpt": Plan.uniform(dp=1, checkpoint=True),
             "split2": Plan.uniform(dp=1, split=2)}
    expected_loss, expected = _serial(cfg, device, batch)
    for precision in (None, "bf16"):
        for name, plan in plans.items():
            key = f"{name}_{precision or 'fp32'}"
            torch.manual_seed(0)
            cm = pcompile.compile(GPT(cfg), cluster, batch, plan=plan, mixed_precision=precision)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            loss = cm.train_step(*batch).item()
            grads = cm.full_grads()
            out[f"{key}_loss_rel"] = abs(loss - expected_loss) / abs(expected_loss)
            out[f"{key}_grad_rel"] = _relative(grads, expected)
            out[f"{key}_ok"] = int(out[f"{key}_loss_rel"] < TOLERANCE[precision]
                                   and out[f"{key}_grad_rel"] < TOLERANCE[precision])
            optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-4)
            times = []
            for _ in range(steps):
                _sync(device)
                start = time.perf_counter()
                cm.train_step(*batch)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                _sync(device)
                times.append(time.perf_counter() - start)
            estimate = cm.plan.estimate
            if estimate is not None:
                out[f"{key}_time_ratio"] = statistics.median(times[1:] or times) / estimate.step_time
                if device.type == "cuda":
                    out[f"{key}_mem_ratio"] = torch.cuda.max_memory_allocated(device) / estimate.peak_memory
            cm.close()
    return out


def meta_init(cfg: GPTConfig, device: torch.device) -> dict:
    with torch.device("meta"):
        model = GPT(cfg)
    cm = pcompile.compile(model, pcompile.Cluster.local(1), gpt_inputs(cfg, BATCH)).init_weights(3)
    with torch.device("meta"):
        reference = pcompile.init_weights(GPT(cfg), 3).state_dict()
    state = cm.full_state_dict()
    placed = all(t.device.type == device.type for t in cm.parameters())
    return {"meta_init_ok": int(placed and all(torch.equal(state[k].cpu(), v) for k, v in reference.items()))}


def compiled(cfg: GPTConfig, device: torch.device, backend: str) -> dict:
    batch = tuple(x.to(device) for x in gpt_inputs(cfg, BATCH))
    runs = []
    for use_compile in (False, True):
        torch.manual_seed(0)
        cm = pcompile.compile(GPT(cfg), pcompile.Cluster.local(1), batch, plan=Plan.uniform(dp=1, checkpoint=False))
        if use_compile:
            cm.compile(backend=backend)
        loss = cm.train_step(*batch).item()
        runs.append((loss, cm.full_grads()))
    (loss, grads), (compiled_loss, compiled_grads) = runs
    rel = _relative(compiled_grads, grads)
    return {"compile_loss_rel": abs(loss - compiled_loss) / abs(loss), "compile_grad_rel": rel,
            "compile_ok": int(rel < 1e-3)}


def _ranks(cfg: GPTConfig, plans: dict) -> dict:
    """On each NCCL rank: every plan against the serial model (rank-local comparison)."""
    import torch.distributed as dist

    from pcompile.launch import rank_device

    device = rank_device()
    batch = gpt_inputs(cfg, BATCH)
    expected_loss, expected = _serial(cfg, device, tuple(x.to(device) for x in batch))
    out = {}
    for name, plan in plans.items():
        torch.manual_seed(0)
        cm = pcompile.compile(GPT(cfg), pcompile.Cluster.local(dist.get_world_size()), batch, plan=plan)
        loss = cm.train_step(*batch).item()
        grads = {n: g.to(device) for n, g in cm.full_grads().items()}
        out[name] = int(abs(loss - expected_loss) / abs(expected_loss) < 1e-4 and _relative(grads, expected) < 1e-4)
        cm.close()
    return out


def multi_gpu(cfg: GPTConfig) -> dict:
    world = min(4, torch.cuda.device_count())
    plans = {"dp": Plan.uniform(dp=world), "tp": Plan.uniform(tp=world), "zero3": Plan.uniform(dp=world, sdp=True),
             "pp": dataclasses.replace(Plan.uniform(pp=2, dp=world // 2), num_microbatches=2)}
    per_rank = pcompile.launch(_ranks, world, cfg, plans, backend="nccl")
    return {f"nccl{world}_{name}_ok": min(r[name] for r in per_rank) for name in plans}


def gpu_tests() -> dict:
    files = [f for f in GPU_TESTS if os.path.exists(f)]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                            capture_output=True, text=True)
    print(result.stdout[-3000:], result.stderr[-2000:], sep="\n")
    return {"gpu_tests_ok": int(result.returncode == 0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    device = _device()
    cfg = QUICK if args.quick else CFG
    start = time.perf_counter()
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} GPU(s))"
             if device.type == "cuda" else " (dry run)"), flush=True)
    checks = [("one_device", lambda: one_device(cfg, device, 3 if args.quick else 10)),
              ("meta_init", lambda: meta_init(cfg, device))]
    if not args.quick:
        checks.insert(0, ("gpu_tests", gpu_tests))
        checks.append(("compile", lambda: compiled(cfg, device, "inductor" if device.type == "cuda" else "aot_eager")))
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        checks.append(("multi_gpu", lambda: multi_gpu(cfg)))
    figures, failed = {}, []
    for name, check in checks:
        try:
            result = check()
        except Exception:  # report and go on: one broken path should not hide the others' figures
            traceback.print_exc()
            result = {f"{name}_ok": 0}
        line = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
        print(" ".join(f"{k}={v}" for k, v in line.items()), flush=True)
        failed += [k for k, v in result.items() if k.endswith("_ok") and not v]
        figures.update(line)
    figures["failed"] = len(failed)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

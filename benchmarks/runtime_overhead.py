"""Runtime overhead: pcompile's lowered program vs the hand-written torch-native equivalent of
the same plan, on 4 local gloo ranks, measured side by side in one run.

  dp4      DDP                                   vs  pcompile dp=4
  sdp4     FSDP2 fully_shard (per block + root)  vs  pcompile sdp dp=4 (ZeRO-3)
  tp4      DTensor parallelize_module (Colwise q/k/v/fc, Rowwise proj/out) vs pcompile tp=4
  dp2tp2   DTensor TP on the tp mesh dim + DDP on the dp dim  vs  pcompile dp=2 x tp=2
  pp4      torch.distributed.pipelining Schedule1F1B over hand-written stages  vs  pcompile pp=4
           (1F1B, 4 micro-batches, the same cut; LM head untied from the embedding on both sides)

Under injected latency (--latency-ms L, default 30; 0 skips these rows): dp4, sdp4 and pp4
again with every torch.distributed transfer taking at least L ms from its issue, without CPU
(pcompile.runtime.latency.inject, as a slow network would), the torch-native side set up to
overlap as it does on GPUs:

  dp4+L    DDP with a comm hook that all-reduces each bucket through the Python
           dist.all_reduce(async_op=True) (DDP's reducer calls the C++ all-reduce itself, which
           latency.inject cannot see); the bucket is divided by the world size first, as DDP's
           default hook does; the hook's future completes when the delayed work does
  sdp4+L   FSDP2 with asynchronous unshard and explicit prefetch (forward: the next block, backward:
           the previous one); its reduce-scatter stays synchronous on CPU (on GPUs it runs on its
           own stream: FSDP2 has no async reduce-scatter without streams)
  pp4+L    the same two 1F1B programs; torch 2.13's pipelining issues homogeneous p2p batches
           (only sends, only receives) with dist.isend / irecv directly, which cannot be delayed
           (P2POp accepts only the originals), so inside latency.inject every batch goes through
           dist.batch_isend_irecv, which it delays (what the schedule did before that fast path)

Each side's transfers per step are counted (latency.inject's `calls`, and by function), so a
transfer one side exposes and the other hides can be named; exposed ms = step under latency -
step without it (the rows above), hidden % = 1 - exposed / (transfers x L). latency.DelayedWork
is a dist.Work, which FSDP2 requires of an async all-gather before it waits for it (else it
copies out gathers still in flight: NaN losses), and inject() routes pipelining's p2p through
batch_isend_irecv (its isend / irecv fast path would escape the delay).

What pcompile issues that the native programs do not: dp / ZeRO-3, the masked-mean loss-count
all-reduce (issued before the forward, waited where the loss divides: runtime.loss_counts) and
the global-loss all-reduce (async, behind backward); pp, the broadcast of the loss from the last
stage to every pp rank (torch's schedule leaves it there), sent as soon as the last micro-batch's
loss is computed, under the drain (backends/loss_relay.py).
Measured at L = 30 on 2 cores, 2026-12-07 (load 0.6-2.1), one run: ddp_latency_ratio 1.048 (was
1.22 with the loss counts reduced synchronously before the forward) - pcompile exposes 18.8 ms of
4 all-reduces against DDP's 16.1 ms of 2; fsdp_latency_ratio 0.922; pp_latency_ratio 0.996
(1.105 with the loss broadcast after the schedule: +40 ms exposed).

A step is forward + backward + gradient synchronisation + AdamW step on the same global
batch, both programs built from the same seed (their first losses are printed as a check
that the two sides run the same model). The two sides alternate step by step; a step's time
is the slowest rank's (barrier before, max-reduce after); the figure is the median of the
timed steps after warm-up. Ratio = pcompile / native (target <= 1.10). A pair's +L
programs run in the same rotation as its plain ones, so both rows see the same load. Ends with one
`key=value` line.

  python benchmarks/runtime_overhead.py [--steps 10] [--warmup 3] [--hidden 128] [--layers 4]
                                       [--latency-ms 30] [--only dp4,sdp4,pp4]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import math
import os
import statistics
import sys
import threading
import time
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import pcompile  # noqa: E402
from pcompile.api import PIPELINE  # noqa: E402
from pcompile.models import GPT, GPTConfig, gpt_inputs  # noqa: E402
from pcompile.plan import LayerAssignment, Strategy  # noqa: E402
from pcompile.runtime import latency  # noqa: E402

WORLD = 4
PAIRS = [  # (key, native description, pcompile plan)
    ("dp4", "DDP", dict(dp=4)),
    ("sdp4", "FSDP2 fully_shard", dict(dp=4, sdp=True)),
    ("tp4", "DTensor TP", dict(tp=4)),
    ("dp2tp2", "DTensor TP + DDP", dict(dp=2, tp=2)),
]
PP_PAIR = ("pp4", "pipelining 1F1B", dict(pp=4))  # 4 micro-batches, stage i = block i (+ embeddings / head)
RATIO_KEYS = {"dp4": "ddp_ratio", "sdp4": "fsdp_ratio", "tp4": "tp_ratio", "dp2tp2": "dp2tp2_ratio",
              "pp4": "pp_ratio"}
LATENCY_KEYS = {"dp4": "ddp_latency_ratio", "sdp4": "fsdp_latency_ratio", "pp4": "pp_latency_ratio"}
LATENCY_NAMES = {"dp4": "DDP, Python hook", "sdp4": "FSDP2 async prefetch", "pp4": "pipelining 1F1B"}
MICROBATCHES = 4


# -- the native programs ---------------------------------------------------------------------
def _local_attention(self, x):
    """The GPT attention with this rank's heads only (q/k/v are column-parallel): the sizes come
    from the local q instead of x, as hand-written TP models (e.g. torchtitan) do."""
    batch, length, _ = x.shape
    q, k, v = self.q(x), self.k(x), self.v(x)
    width = q.shape[-1]
    head_dim = width // self.num_heads
    q, k, v = (t.view(batch, length, self.num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).contiguous().view(batch, length, width))


def _tensor_parallel(model: GPT, mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.blocks:
        block.attn.num_heads //= mesh.size()
        block.attn.forward = types.MethodType(_local_attention, block.attn)
        parallelize_module(block, mesh, {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(),
                                         "attn.v": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                                         "mlp.fc": ColwiseParallel(), "mlp.out": RowwiseParallel()})


class _Stage(torch.nn.Module):
    """Stage `index` of `pp` of the GPT, written by hand: its blocks, the embeddings on the
    first stage, the final norm and LM head (logits out; the schedule's loss_fn) on the last."""

    def __init__(self, model: GPT, index: int, pp: int):
        super().__init__()
        per = len(model.blocks) // pp
        self.blocks = torch.nn.ModuleList(model.blocks[index * per:(index + 1) * per])
        self.first, self.last = index == 0, index == pp - 1
        if self.first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        if self.last:
            self.ln_f, self.head = model.ln_f, model.head

    def forward(self, x):
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)) if self.last else x


def _lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def native_pipeline(cfg: GPTConfig, x, y):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.manual_seed(0)
    rank = dist.get_rank()
    stage = _Stage(GPT(cfg), rank, WORLD)
    schedule = Schedule1F1B(PipelineStage(stage, rank, WORLD, torch.device("cpu")), n_microbatches=MICROBATCHES,
                            loss_fn=_lm_loss)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4, foreach=False)

    def step() -> float:
        losses = []
        if stage.first:
            schedule.step(x)
        elif stage.last:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        optimizer.step()
        optimizer.zero_grad()
        return torch.stack(losses).mean().item() if losses else 0.0
    return step, 1  # the loss lives on the last stage only: the sum over ranks is the loss


def pipeline_plan(cfg: GPTConfig) -> pcompile.Plan:
    """pp=4 with the hand-written stages' cut and the same schedule and micro-batches."""
    stages = [("pre", 0)] + [(f"blocks.{i}", i * WORLD // cfg.num_layers) for i in range(cfg.num_layers)]
    return pcompile.Plan(num_devices=WORLD, pp=WORLD, num_microbatches=MICROBATCHES, schedule="1F1B",
                         layers=tuple(LayerAssignment(layer, Strategy(), stage) for layer, stage in
                                      stages + [("post", WORLD - 1)]))


def python_all_reduce_hook(group, bucket):  # no annotations: DDP checks them, and these are strings
    """DDP comm hook: DDP's default (divide the bucket by the world size, all-reduce it), but
    through the Python dist.all_reduce(async_op=True), looked up at call time, so latency.inject
    delays it as it delays pcompile's buckets. The returned future completes when the work
    handle's wait() returns (a delayed handle: no earlier than issue + L), waited on a thread
    of its own, so backward goes on meanwhile, as DDP's does while NCCL reduces."""
    tensor = bucket.buffer().div_(dist.get_world_size(group))
    work = dist.all_reduce(tensor, group=group, async_op=True)
    future = torch.futures.Future()

    def complete():
        try:
            work.wait()
            future.set_result(tensor)
        except Exception as error:  # noqa: BLE001  (the reducer re-raises it)
            future.set_exception(error)
    threading.Thread(target=complete, daemon=True).start()
    return future


def _fsdp2_overlap(model: GPT) -> None:
    """FSDP2's explicit prefetching with asynchronous unshard (its overlap where there are no
    streams): each block's forward issues the next block's all-gather, each block's backward the
    previous one's; the root's forward the first block's."""
    blocks = list(model.blocks)
    for module in [model, *blocks]:
        module._set_unshard_async_op(True)
    model.set_modules_to_forward_prefetch(blocks[:1])
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
        block.set_modules_to_backward_prefetch(blocks[max(i - 1, 0):i])


def native_program(key: str, model: GPT, overlap: bool = False):
    """(module to call on the local batch, dp degree, dp coordinate). `overlap`: set up DDP / FSDP2
    to overlap communication through the Python collectives (the rows under latency)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    if key == "dp4":
        ddp = DDP(model)
        if overlap:
            ddp.register_comm_hook(None, python_all_reduce_hook)
        return ddp, WORLD, dist.get_rank()
    if key == "sdp4":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        root = fully_shard(model, mesh=mesh)
        if overlap:
            _fsdp2_overlap(root)
        return root, WORLD, dist.get_rank()
    if key == "tp4":
        _tensor_parallel(model, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)))
        return model, 1, 0
    if key == "dp2tp2":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        _tensor_parallel(model, mesh["tp"])
        from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform

        _pre_dp_module_transform(model)  # torch's TP + DDP recipe: DDP sees local tensors
        return DDP(model, process_group=mesh["dp"].get_group()), 2, mesh["dp"].get_local_rank()
    raise ValueError(key)


def native_step(key: str, cfg: GPTConfig, x, y, overlap: bool = False):
    """(one training step, the divisor that turns the sum of the ranks' losses into the loss)."""
    if key == "pp4":
        return native_pipeline(cfg, x, y)
    torch.manual_seed(0)
    module, dp, coord = native_program(key, GPT(cfg), overlap)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=False)
    xl, yl = x.chunk(dp)[coord], y.chunk(dp)[coord]

    def step() -> float:
        loss = module(xl, yl)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()
    return step, WORLD  # every rank holds the mean loss of its dp shard (tp ranks the same one)


# -- the pcompile programs -------------------------------------------------------------------
def compile_plan(cfg: GPTConfig, plan: pcompile.Plan, x, y):
    torch.manual_seed(0)
    model = GPT(cfg)
    if plan.default.sdp and "sharded_data_parallel" not in PIPELINE:
        # until the backend lowers sdp itself: the test-only lowering of tests/distributed/ranks_sdp.py
        sys.path.insert(0, ROOT)
        from tests.distributed.ranks_sdp import compile_sdp

        return compile_sdp(model, plan, (x, y))
    return pcompile.compile(model, pcompile.Cluster.local(WORLD), (x, y), plan=plan)


def pcompile_step(cfg: GPTConfig, plan: pcompile.Plan, x, y):
    cm = compile_plan(cfg, plan, x, y)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-4, foreach=False)

    def step() -> float:
        loss = cm.train_step(x, y)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()
    return step


# -- measurement (runs on every rank) ----------------------------------------------------------
@contextlib.contextmanager
def injected_latency(ms: float):
    """latency.inject(ms) (pipelining's p2p routed through batch_isend_irecv, async handles
    dist.Work: both in pcompile.runtime.latency), every delayed function counted by name;
    yields (Injected, Counter)."""
    counts = collections.Counter()

    def counting(name, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    with latency.inject(ms) as injected:
        delayed = {name: getattr(dist, name) for name in (*latency._COLLECTIVES, "batch_isend_irecv")
                   if hasattr(dist, name)}
        try:
            for name, fn in delayed.items():
                setattr(dist, name, counting(name, fn))
            yield injected, counts
        finally:
            for name, fn in delayed.items():
                setattr(dist, name, fn)


def _timed(fn, latency_ms: float = 0.0) -> tuple[float, float, collections.Counter]:
    """(slowest rank's seconds, this rank's loss, this rank's delayed transfers by function)."""
    dist.barrier()
    counts = collections.Counter()
    start = time.perf_counter()
    if latency_ms:
        with injected_latency(latency_ms) as (injected, counts):
            loss = fn()
        assert injected.calls == sum(counts.values()), (injected.calls, counts)
    else:
        loss = fn()
    elapsed = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), loss, counts


def _global_loss(loss: float, divisor: int) -> float:
    total = torch.tensor(loss)
    dist.all_reduce(total)
    return total.item() / divisor


def _interleaved(programs: dict, divisor: int, warmup: int, steps: int) -> dict:
    """programs: (row, side) -> (step, latency ms), run in turn step by step (so the rows with and
    without latency see the same load). Per program: median ms, first-step loss, and (under
    latency) delayed transfers per step: the most over the ranks, and that rank's by function."""
    times = {k: [] for k in programs}
    losses, counts = {}, {}
    for i in range(warmup + steps):
        for k, (fn, ms) in programs.items():
            elapsed, loss, counts[k] = _timed(fn, ms)
            if i == 0:
                losses[k] = _global_loss(loss, divisor) if k[1] == "native" else loss
            if i >= warmup:
                times[k].append(elapsed)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, counts)
    out = {}
    for k in programs:
        most = max((c[k] for c in everyone), key=lambda c: sum(c.values()))
        out[k] = {"ms": 1e3 * statistics.median(times[k]), "loss": losses[k], "calls": sum(most.values()),
                  "by_fn": dict(most)}
    return out


def measure(cfg: GPTConfig, batch: int, warmup: int, steps: int, keys: list[str],
            latency_ms: float = 0.0) -> list[dict]:
    rows = []
    for key, native_name, degrees in [pair for pair in PAIRS + [PP_PAIR] if pair[0] in keys]:
        model_cfg = dataclasses.replace(cfg, tie_head=False) if key == "pp4" else cfg  # no cross-stage tie
        x, y = gpt_inputs(model_cfg, batch, seed=0)
        native, divisor = native_step(key, model_cfg, x, y)
        plan = pipeline_plan(model_cfg) if key == "pp4" else pcompile.Plan.uniform(**degrees)
        ours = pcompile_step(model_cfg, plan, x, y)
        programs = {("plain", "native"): (native, 0.0), ("plain", "pcompile"): (ours, 0.0)}
        latency_row = bool(latency_ms) and key in LATENCY_KEYS
        if latency_row:
            if key == "pp4":  # the same two programs, every other step under latency
                programs.update({("L", "native"): (native, latency_ms), ("L", "pcompile"): (ours, latency_ms)})
            else:  # their own programs: DDP with the Python hook, FSDP2 with async prefetch
                programs[("L", "native")] = (native_step(key, model_cfg, x, y, overlap=True)[0], latency_ms)
                programs[("L", "pcompile")] = (pcompile_step(model_cfg, plan, x, y), latency_ms)
        got = _interleaved(programs, divisor, warmup, steps)
        plain = {"native_ms": got["plain", "native"]["ms"], "pcompile_ms": got["plain", "pcompile"]["ms"],
                 "loss_diff": abs(got["plain", "native"]["loss"] - got["plain", "pcompile"]["loss"])}
        rows.append({"key": key, "native_name": native_name, **plain})
        if latency_row:
            row = {"key": f"{key}+L", "native_name": LATENCY_NAMES[key], "plain": plain,
                   "loss_diff": abs(got["L", "native"]["loss"] - got["L", "pcompile"]["loss"])}
            for side in ("native", "pcompile"):
                row.update({f"{side}_ms": got["L", side]["ms"], f"{side}_calls": got["L", side]["calls"],
                            f"{side}_by_fn": got["L", side]["by_fn"]})
            rows.append(row)
        del native, ours, programs
    return rows


def pp_status(cfg: GPTConfig) -> str | None:
    """None if the pp pair can be measured, else why not."""
    if "pipeline_split" not in PIPELINE:
        return "pcompile's pipeline does not run pipeline_split yet"
    if cfg.num_layers % WORLD:
        return f"{cfg.num_layers} blocks do not cut into {WORLD} equal stages"
    return None


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--only", default="dp4,sdp4,tp4,dp2tp2,pp4", help="comma-separated pairs to measure")
    parser.add_argument("--latency-ms", type=float, default=30.0,
                        help="also measure dp4, sdp4, pp4 with this latency injected per transfer (0: not)")
    args = parser.parse_args(argv)
    cfg = GPTConfig(vocab_size=2048, seq_len=args.seq, hidden=args.hidden, num_heads=8, num_layers=args.layers)
    sys.path.insert(0, ROOT)  # ranks import this module as benchmarks.runtime_overhead
    from benchmarks import runtime_overhead as this

    reason = pp_status(cfg)
    keys = [k for k in args.only.split(",") if k != "pp4" or reason is None]
    start, load_start = time.perf_counter(), os.getloadavg()[0]  # the cores are shared: timings move with it
    rows = pcompile.launch(this.measure, WORLD, cfg, args.batch, args.warmup, args.steps, keys, args.latency_ms,
                           timeout=1800)[0]
    print(f"GPT hidden={cfg.hidden} layers={cfg.num_layers} seq={cfg.seq_len} vocab={cfg.vocab_size}, "
          f"global batch {args.batch}, {WORLD} gloo ranks, {torch.get_num_threads()} threads here, "
          f"{os.cpu_count()} cores, load {load_start:.1f} -> {os.getloadavg()[0]:.1f}; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'plan':<8} {'native':<20} {'native ms':>10} {'pcompile ms':>12} {'ratio':>6} {'|loss diff|':>12}")
    figures = {}
    for r in rows:
        ratio = r["pcompile_ms"] / r["native_ms"]
        key = r["key"].removesuffix("+L")
        figures[(LATENCY_KEYS if r["key"].endswith("+L") else RATIO_KEYS)[key]] = ratio
        print(f"{r['key']:<8} {r['native_name']:<20} {r['native_ms']:>10.1f} {r['pcompile_ms']:>12.1f} "
              f"{ratio:>6.2f} {r['loss_diff']:>12.2e}")
    if reason is not None and "pp4" in args.only:
        print(f"pp4      torch.distributed.pipelining: not measured ({reason})")
        figures["pp_ratio"] = math.nan
        if args.latency_ms:
            figures["pp_latency_ratio"] = math.nan
    latency_rows = [r for r in rows if r["key"].endswith("+L")]
    if latency_rows:
        ms = args.latency_ms
        print(f"\nunder {ms:g} ms per transfer (+L rows): transfers per step (the rank with the most), "
              f"exposed ms = +L step - plain step, hidden % = 1 - exposed / (transfers x {ms:g} ms)")
        print(f"{'plan':<8} {'side':<9} {'transfers':>9} {'exposed ms':>11} {'hidden':>7}  by function")
        for r in latency_rows:
            for side in ("native", "pcompile"):
                calls = r[f"{side}_calls"]
                exposed = r[f"{side}_ms"] - r["plain"][f"{side}_ms"]
                hidden = 100 * (1 - exposed / (calls * ms)) if calls else math.nan
                by_fn = ", ".join(f"{name} {n}" for name, n in sorted(r[f"{side}_by_fn"].items()))
                print(f"{r['key']:<8} {side:<9} {calls:>9} {exposed:>11.1f} {hidden:>6.0f}%  {by_fn}")
        figures["latency_ms"] = ms
    figures["load1_start"], figures["load1_end"] = load_start, os.getloadavg()[0]
    figures["seconds"] = time.perf_counter() - start
    print(" ".join(f"{k}={v:.3f}" if "ratio" in k else f"{k}={v:.2f}" if "load" in k else f"{k}={v:.0f}"
                   for k, v in figures.items()))
    return figures


if __name__ == "__main__":
    main()

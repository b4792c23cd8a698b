"""Runtime overhead: pcompile's lowered program vs the hand-written torch-native equivalent of
the same plan, on 4 local gloo ranks, measured side by side in one run.

  dp4      DDP                                   vs  pcompile dp=4
  sdp4     FSDP2 fully_shard (per block + root)  vs  pcompile sdp dp=4 (ZeRO-3)
  tp4      DTensor parallelize_module (Colwise q/k/v/fc, Rowwise proj/out) vs pcompile tp=4
  dp2tp2   DTensor TP on the tp mesh dim + DDP on the dp dim  vs  pcompile dp=2 x tp=2
  pp4      torch.distributed.pipelining Schedule1F1B over hand-written stages  vs  pcompile pp=4
           (1F1B, 4 micro-batches, the same cut; LM head untied from the embedding on both sides)

A step is forward + backward + gradient synchronisation + AdamW step on the same global
batch, both programs built from the same seed (their first losses are printed as a check
that the two sides run the same model). The two sides alternate step by step; a step's time
is the slowest rank's (barrier before, max-reduce after); the figure is the median of the
timed steps after warm-up. Ratio = pcompile / native (target <= 1.10). Ends with one
`key=value` line.

  python benchmarks/runtime_overhead.py [--steps 10] [--warmup 3] [--hidden 128] [--layers 4]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
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


def native_program(key: str, model: GPT):
    """(module to call on the local batch, dp degree, dp coordinate)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    if key == "dp4":
        return DDP(model), WORLD, dist.get_rank()
    if key == "sdp4":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh), WORLD, dist.get_rank()
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


def native_step(key: str, cfg: GPTConfig, x, y):
    """(one training step, the divisor that turns the sum of the ranks' losses into the loss)."""
    if key == "pp4":
        return native_pipeline(cfg, x, y)
    torch.manual_seed(0)
    module, dp, coord = native_program(key, GPT(cfg))
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
def _timed(fn) -> tuple[float, float]:
    dist.barrier()
    start = time.perf_counter()
    loss = fn()
    elapsed = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), loss


def _global_loss(loss: float, divisor: int) -> float:
    total = torch.tensor(loss)
    dist.all_reduce(total)
    return total.item() / divisor


def measure(cfg: GPTConfig, batch: int, warmup: int, steps: int, keys: list[str]) -> list[dict]:
    rows = []
    for key, native_name, degrees in [pair for pair in PAIRS + [PP_PAIR] if pair[0] in keys]:
        model_cfg = dataclasses.replace(cfg, tie_head=False) if key == "pp4" else cfg  # no cross-stage tie
        x, y = gpt_inputs(model_cfg, batch, seed=0)
        native, divisor = native_step(key, model_cfg, x, y)
        plan = pipeline_plan(model_cfg) if key == "pp4" else pcompile.Plan.uniform(**degrees)
        ours = pcompile_step(model_cfg, plan, x, y)
        times = {"native": [], "pcompile": []}
        losses = {}
        for i in range(warmup + steps):
            for side, fn in (("native", native), ("pcompile", ours)):
                elapsed, loss = _timed(fn)
                if i == 0:
                    losses[side] = _global_loss(loss, divisor) if side == "native" else loss
                if i >= warmup:
                    times[side].append(elapsed)
        rows.append({"key": key, "native_name": native_name,
                     "native_ms": 1e3 * statistics.median(times["native"]),
                     "pcompile_ms": 1e3 * statistics.median(times["pcompile"]),
                     "loss_diff": abs(losses["native"] - losses["pcompile"])})
        del native, ours
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
    args = parser.parse_args(argv)
    cfg = GPTConfig(vocab_size=2048, seq_len=args.seq, hidden=args.hidden, num_heads=8, num_layers=args.layers)
    sys.path.insert(0, ROOT)  # ranks import this module as benchmarks.runtime_overhead
    from benchmarks import runtime_overhead as this

    reason = pp_status(cfg)
    keys = [k for k in args.only.split(",") if k != "pp4" or reason is None]
    rows = pcompile.launch(this.measure, WORLD, cfg, args.batch, args.warmup, args.steps, keys, timeout=900)[0]
    print(f"GPT hidden={cfg.hidden} layers={cfg.num_layers} seq={cfg.seq_len} vocab={cfg.vocab_size}, "
          f"global batch {args.batch}, {WORLD} gloo ranks, {torch.get_num_threads()} threads here; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'plan':<8} {'native':<20} {'native ms':>10} {'pcompile ms':>12} {'ratio':>6} {'|loss diff|':>12}")
    figures = {}
    for r in rows:
        ratio = r["pcompile_ms"] / r["native_ms"]
        figures[RATIO_KEYS[r["key"]]] = ratio
        print(f"{r['key']:<8} {r['native_name']:<20} {r['native_ms']:>10.1f} {r['pcompile_ms']:>12.1f} "
              f"{ratio:>6.2f} {r['loss_diff']:>12.2e}")
    if reason is not None and "pp4" in args.only:
        print(f"pp4      torch.distributed.pipelining: not measured ({reason})")
        figures["pp_ratio"] = math.nan
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    return figures


if __name__ == "__main__":
    main()

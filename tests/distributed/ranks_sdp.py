"""Rank functions for the ZeRO-3 tests (module-level so they pickle)."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor

import pcompile
from pcompile.ir import local_shape
from pcompile.models import GPT, GPTConfig, MLPConfig, MLPModel, gpt_inputs, mlp_inputs
from pcompile.plan import LayerAssignment, Strategy
from pcompile.runtime import collectives, latency, sdp
from tests.distributed.ranks import MODELS as _MODELS
from tests.distributed.ranks import _max_diff, train_side_by_side

# "mlp6": a classifier of 6 classes, so with dp=4 its weight shards along dim 1 and its bias
# (no dim divisible by 4) stays replicated inside an sdp layer.
MODELS = dict(_MODELS, mlp6=(lambda: MLPModel(MLPConfig(num_classes=6)),
                             lambda seed: mlp_inputs(MLPConfig(num_classes=6), 16, seed)))


def numel_per_rank(cm) -> tuple[int, int]:
    """Parameter elements per rank expected under ZeRO-3 (sdp parameters 1/dp of their tensor-
    parallel slice) and if every layer were plain dp (tensor-parallel slices only)."""
    shardings = cm.ir.sdp_shardings
    expected = replicated = 0
    for name, p in cm.ir.gm.named_parameters():
        local = local_shape(p.shape, cm.ir.param_shardings.get(name)).numel()
        replicated += local
        expected += local // shardings[name].size if name in shardings else local
    return expected, replicated


def gathered_alive_after_forward(cm, inputs: tuple) -> tuple[int, int]:
    """Gathered parameters alive between forward and backward (ZeRO-3: at most those of the last
    unit, which backward needs first), and how many the last unit gathers."""
    order = {node: i for i, node in enumerate(cm.ir.graph.nodes)}
    gathers = [n for n in cm.ir.graph.nodes if n.target is sdp.sdp_gather]
    last = max(gathers, key=lambda g: max(order[op] for item in g.users for op in item.users))
    loss = cm.gm(*cm._local_batch(inputs))
    alive = sdp.live_gathered(), len(last.args[0])
    loss.backward()
    for p in cm.parameters():
        p.grad = None
    return alive


def compare_with_serial(model_name: str, plan: pcompile.Plan, steps: int = 3, lr: float = 1e-2) -> dict:
    """3 AdamW steps under ZeRO-3 and serially: worst loss/grad differences, parameter memory."""
    build, inputs = MODELS[model_name]
    alive = []
    cm, serial, loss_diff, grad_diff, _ = train_side_by_side(
        build, inputs, plan, steps, lr, before=lambda cm: alive.extend(gathered_alive_after_forward(cm, inputs(0))))
    expected_numel, replicated = numel_per_rank(cm)
    return {"model": model_name, "plan": describe(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "param_diff": _max_diff(cm.full_state_dict(), serial.state_dict()),
            "numel": sum(p.numel() for p in cm.parameters()), "expected_numel": expected_numel,
            "replicated_numel": replicated,
            "sharded": len({id(cm.ir.gm.get_parameter(n)) for n in cm.ir.sdp_shardings}),
            "alive_after_forward": alive[0], "last_unit": alive[1],
            "offloaded": cm.masters is not None and cm.masters.offload}


def describe(plan: pcompile.Plan) -> str:
    return plan.default.describe() + "".join(f" {a.layer}={a.strategy.describe()}" for a in plan.layers) + (
        " offloaded" if plan.offload_optimizer else "")


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare_with_serial(name, plan) for name, plan in cases]


# -- overlap (tests/distributed/test_sdp_overlap.py) -----------------------------------------
class _Busy(torch.autograd.Function):
    """Identity that takes `ms` of wall time forward and 2 ms backward without using the CPU
    (a sleep): compute whose length does not depend on how loaded the machine is, so overlap
    with latency.inject's collectives shows in wall time. Fake tensors (the analyses) skip it."""

    @staticmethod
    def forward(ctx, x, ms):
        ctx.ms = ms
        _sleep(x, ms)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _sleep(grad, 2 * ctx.ms)
        return grad, None


def _sleep(x: torch.Tensor, ms: float) -> None:
    if not isinstance(x, FakeTensor) and x.device.type != "meta":
        time.sleep(ms / 1e3)


def busy(x: torch.Tensor, ms: float) -> torch.Tensor:
    return _Busy.apply(x, ms)


torch.fx.wrap("busy")  # a call_function node (fx would trace into it, and apply cannot take a Proxy)


class BusyBlock(torch.nn.Module):
    """A GPT block followed by `ms` of busy time."""

    def __init__(self, block: torch.nn.Module, ms: float):
        super().__init__()
        self.block, self.ms = block, ms

    def forward(self, x):
        return busy(self.block(x), self.ms)


def _timed_step(cm, batch, serial: bool) -> float:
    for p in cm.parameters():
        p.grad = None
    with sdp.serialized() if serial else contextlib.nullcontext():
        start = time.perf_counter()
        cm.train_step(*batch)
        return time.perf_counter() - start


def _all_gathers(cm, batch, serial: bool) -> int:
    """All-gathers one train_step issues (calls of torch.distributed's flat all-gather)."""
    name = collectives._GATHER
    calls, original = [], getattr(dist, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(dist, name, counted)
    try:
        _timed_step(cm, batch, serial)
    finally:
        setattr(dist, name, original)
    return len(calls)


def overlap(latency_ms: float, busy_ms: float, layers: int, steps: int) -> dict:
    """A ZeRO-3 GPT of `layers` busy blocks under injected latency: the best step time overlapped
    and serialized (sdp.serialized()), whether both give the same gradients, what is left in
    flight after the steps; and, on a plan with checkpointed layers, the all-gathers one step
    issues overlapped and serialized (prefetching adds none)."""
    cfg = GPTConfig(num_layers=layers)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.blocks = torch.nn.ModuleList(BusyBlock(block, busy_ms) for block in model.blocks)
    plan = pcompile.Plan.uniform(dp=4, sdp=True)
    cm = pcompile.compile(model, pcompile.Cluster.local(4), gpt_inputs(cfg, 8), plan=plan)
    batch = gpt_inputs(cfg, 8, 1)
    _timed_step(cm, batch, serial=False)  # warm-up
    times = {"overlapped": [], "serialized": []}
    grads = {}
    with latency.inject(latency_ms):
        for _ in range(steps):
            for mode in times:
                times[mode].append(_timed_step(cm, batch, mode == "serialized"))
                grads[mode] = [p.grad.clone() for p in cm.parameters()]
    out = {mode: min(t) for mode, t in times.items()}
    out["same_grads"] = all(torch.equal(a, b) for a, b in zip(grads["overlapped"], grads["serialized"]))
    out["pending"] = sdp.wait_pending()
    checkpointed = pcompile.Plan(num_devices=4, default=Strategy(dp=4, sdp=True), layers=tuple(
        LayerAssignment(f"blocks.{i}", Strategy(dp=4, sdp=True, checkpoint=True)) for i in range(0, layers, 2)))
    cm = pcompile.compile(GPT(cfg), pcompile.Cluster.local(4), gpt_inputs(cfg, 8), plan=checkpointed)
    out["all_gathers"] = {mode: _all_gathers(cm, batch, mode == "serialized") for mode in ("overlapped", "serialized")}
    return out

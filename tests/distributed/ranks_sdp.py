"""Rank functions for the ZeRO-3 tests (module-level so they pickle).

`SdpCompiledModel` is a test-only lowering: CompiledModel.lower plus what the backend needs
for sdp parameters (the change proposed for backends/distributed.py): keep this rank's dp
chunk of each sdp parameter after the tensor-parallel slice, bind the sdp_gather axis names,
skip the dp all-reduce of their gradients (already reduce-scattered), and unshard them in
full_grads / full_state_dict. Used until pcompile.api.PIPELINE runs the sdp pass (then the
backend is expected to do this, and `compile_sdp` uses it); delete it then.
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.distributed as dist
import torch.fx as fx

import pcompile
from pcompile.runtime import collectives, sdp
from pcompile.api import PIPELINE
from pcompile.backends.distributed import CompiledModel
from pcompile.passes.tensor_parallel import local_shape
from pcompile.models import MLPConfig, MLPModel, mlp_inputs
from tests.distributed.ranks import MODELS as _MODELS, _max_diff

# "mlp6": a classifier of 6 classes, so with dp=4 its weight shards along dim 1 and its bias
# (no dim divisible by 4) stays replicated inside an sdp layer.
MODELS = dict(_MODELS, mlp6=(lambda: MLPModel(MLPConfig(num_classes=6)),
                             lambda seed: mlp_inputs(MLPConfig(num_classes=6), 16, seed)))

def _with_sdp(pipeline: list[str]) -> list[str]:
    """The pipeline with sharded_data_parallel after the rewrites it must see (tp, operator split)."""
    if "sharded_data_parallel" in pipeline:
        return list(pipeline)
    at = pipeline.index("operator_split" if "operator_split" in pipeline else "tensor_parallel") + 1
    return pipeline[:at] + ["sharded_data_parallel"] + pipeline[at:]


SDP_PIPELINE = _with_sdp(PIPELINE)
_KEYS = itertools.count()


class SdpCompiledModel(CompiledModel):
    def lower(self) -> "SdpCompiledModel":
        super().lower()
        if self.groups:
            key = f"sdp-test{next(_KEYS)}/dp"
            collectives.bind_group(key, self.groups["dp"])
            for module in self.gm.modules():  # checkpoint regions are nested GraphModules
                if isinstance(module, fx.GraphModule):
                    for node in module.graph.nodes:
                        if node.op == "call_function" and node.target in sdp.COLLECTIVES:
                            node.args = tuple(key if a == "dp" else a for a in node.args)
                    module.recompile()
        self.sdp_shardings = sdp.shard_parameters(self.gm, sdp.param_shardings(self.ir.gm), self.coords)
        return self

    def train_step(self, *inputs) -> torch.Tensor:
        self._check_lowered()
        named = list(self.gm.named_parameters())
        previous = [p.grad for _, p in named]
        for _, p in named:
            p.grad = None
        loss = self.gm(*self._local_batch(inputs))
        loss.backward()
        if self.dp > 1:
            for name, p in named:
                if p.grad is not None and name not in self.sdp_shardings:
                    dist.all_reduce(p.grad, group=self.groups["dp"])
                    p.grad.div_(self.dp)
        for (_, p), old in zip(named, previous):
            if old is not None:
                p.grad = old if p.grad is None else p.grad + old
        loss = loss.detach().clone()
        if self.dp > 1:
            dist.all_reduce(loss, group=self.groups["dp"])
            loss /= self.dp
        return loss

    def _full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        inner = self.sdp_shardings.get(name)
        local = sdp.unshard(local, inner, self.groups.get("dp"))
        return super()._full(name, local)


def compile_sdp(model: torch.nn.Module, plan: pcompile.Plan, inputs: tuple) -> CompiledModel:
    """The compiled model for this rank: the real backend once the pipeline runs the sdp pass."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if "sharded_data_parallel" in PIPELINE:
        return pcompile.compile(model, pcompile.Cluster.local(world), inputs, plan=plan)
    ir = pcompile.compile(model, pcompile.Cluster.local(world), inputs, plan=plan, passes=SDP_PIPELINE,
                          stop_after=SDP_PIPELINE[-1])
    return SdpCompiledModel(ir, plan, model, []).lower()


def numel_per_rank(cm: SdpCompiledModel) -> tuple[int, int]:
    """Parameter elements per rank expected under ZeRO-3 (sdp parameters 1/dp of their tensor-
    parallel slice) and if every layer were plain dp (tensor-parallel slices only)."""
    shardings = sdp.param_shardings(cm.ir.gm)
    expected = replicated = 0
    for name, p in cm.ir.gm.named_parameters():
        local = local_shape(p.shape, cm.ir.param_shardings.get(name)).numel()
        replicated += local
        expected += local // shardings[name].size if name in shardings else local
    return expected, replicated


def gathered_alive_after_forward(cm: SdpCompiledModel, inputs: tuple) -> tuple[int, int]:
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
    torch.manual_seed(0)
    model = build()
    serial = copy.deepcopy(model)
    cm = compile_sdp(model, plan, inputs(0))
    alive = gathered_alive_after_forward(cm, inputs(0))
    optimizer = torch.optim.AdamW(cm.parameters(), lr=lr)
    serial_optimizer = torch.optim.AdamW(serial.parameters(), lr=lr)
    loss_diff = grad_diff = 0.0
    for step in range(steps):
        x, y = inputs(step)
        loss = cm.train_step(x, y)
        serial_loss = serial(x, y)
        serial_loss.backward()
        loss_diff = max(loss_diff, abs(loss.item() - serial_loss.item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        optimizer.step()
        optimizer.zero_grad()
        serial_optimizer.step()
        serial_optimizer.zero_grad()
    expected_numel, replicated = numel_per_rank(cm)
    return {"model": model_name, "plan": describe(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "param_diff": _max_diff(cm.full_state_dict(), serial.state_dict()),
            "numel": sum(p.numel() for p in cm.parameters()), "expected_numel": expected_numel,
            "replicated_numel": replicated,
            "sharded": len(sdp.param_shardings(cm.ir.gm)), "alive_after_forward": alive[0], "last_unit": alive[1]}


def describe(plan: pcompile.Plan) -> str:
    return plan.default.describe() + "".join(f" {a.layer}={a.strategy.describe()}" for a in plan.layers)


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare_with_serial(name, plan) for name, plan in cases]

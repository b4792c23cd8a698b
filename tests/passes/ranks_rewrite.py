"""Rank functions (module-level so they pickle) and helpers for the checkpoint and operator_split
tests: train a model compiled with a custom pass pipeline next to the serial model."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import pcompile
from pcompile.api import PIPELINE
from pcompile.runtime.checkpointing import run_checkpointed
from pcompile.plan import LayerAssignment, Plan, Strategy
from tests.distributed.ranks import MODELS, _max_diff

# The default pipeline already runs operator_split after tensor_parallel and checkpoint after
# both (it must see the layer's final nodes: split Linears, collectives).
REWRITES = PIPELINE


def layer_plan(dp: int, tp: int, per_layer: dict[str, dict]) -> Plan:
    """A (dp, tp) plan whose listed layers also checkpoint / split, e.g. {"blocks.0": {"checkpoint": True}}."""
    layers = tuple(LayerAssignment(name, Strategy(dp=dp, tp=tp, **fields)) for name, fields in per_layer.items())
    return Plan(num_devices=dp * tp, default=Strategy(dp=dp, tp=tp), layers=layers)


def compare_rewritten(model_name: str, plan: Plan, steps: int = 3, lr: float = 1e-2) -> dict:
    """Worst loss / gradient differences over `steps` AdamW steps, compiled with REWRITES vs serial."""
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    serial = copy.deepcopy(model)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cm = pcompile.compile(model, pcompile.Cluster.local(world), inputs(0), plan=plan, passes=REWRITES)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=lr)
    serial_optimizer = torch.optim.AdamW(serial.parameters(), lr=lr)
    loss_diff = grad_diff = 0.0
    for step in range(steps):
        x, y = inputs(step)
        loss = cm.train_step(x, y)
        expected = serial(x, y)
        expected.backward()
        loss_diff = max(loss_diff, abs(loss.item() - expected.item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        optimizer.step()
        optimizer.zero_grad()
        serial_optimizer.step()
        serial_optimizer.zero_grad()
    names = [n for n, _ in cm.named_parameters()]
    return {"model": model_name, "plan": str(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "names_kept": names == [n for n, _ in serial.named_parameters()],
            "state_keys_kept": list(cm.gm.state_dict()) == list(serial.state_dict()),
            "regions": sum(1 for n in cm.ir.graph.nodes if n.target is run_checkpointed),
            "report": list(cm.report)}


def compare_many_rewritten(cases: list[tuple[str, Plan]]) -> list[dict]:
    return [compare_rewritten(name, plan) for name, plan in cases]

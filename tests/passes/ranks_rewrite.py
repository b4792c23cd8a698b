"""Rank functions (module-level so they pickle) and helpers for the activation_checkpoint and
operator_split tests: train a model compiled with per-layer checkpointing / splitting next to the
serial model."""
from __future__ import annotations

from pcompile.plan import LayerAssignment, Plan, Strategy
from pcompile.runtime.checkpointing import run_checkpointed
from tests.distributed.ranks import MODELS, train_side_by_side


def layer_plan(dp: int, tp: int, per_layer: dict[str, dict]) -> Plan:
    """A (dp, tp) plan whose listed layers also checkpoint / split, e.g. {"blocks.0": {"checkpoint": True}}."""
    layers = tuple(LayerAssignment(name, Strategy(dp=dp, tp=tp, **fields)) for name, fields in per_layer.items())
    return Plan(num_devices=dp * tp, default=Strategy(dp=dp, tp=tp), layers=layers)


def compare_rewritten(model_name: str, plan: Plan, steps: int = 3, lr: float = 1e-2) -> dict:
    """Worst loss / gradient differences over `steps` AdamW steps, compiled vs serial."""
    cm, serial, loss_diff, grad_diff, _ = train_side_by_side(*MODELS[model_name], plan, steps, lr)
    names = [n for n, _ in cm.named_parameters()]
    return {"model": model_name, "plan": str(plan), "loss_diff": loss_diff, "grad_diff": grad_diff,
            "names_kept": names == [n for n, _ in serial.named_parameters()],
            "state_keys_kept": list(cm.gm.state_dict()) == list(serial.state_dict()),
            "regions": sum(1 for n in cm.ir.graph.nodes if n.target is run_checkpointed),
            "report": list(cm.report)}


def compare_many_rewritten(cases: list[tuple[str, Plan]]) -> list[dict]:
    return [compare_rewritten(name, plan) for name, plan in cases]

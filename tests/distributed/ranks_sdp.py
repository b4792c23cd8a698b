"""Rank functions for the ZeRO-3 tests (module-level so they pickle)."""
from __future__ import annotations

import pcompile
from pcompile.ir import local_shape
from pcompile.models import MLPConfig, MLPModel, mlp_inputs
from pcompile.runtime import sdp
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
            "alive_after_forward": alive[0], "last_unit": alive[1]}


def describe(plan: pcompile.Plan) -> str:
    return plan.default.describe() + "".join(f" {a.layer}={a.strategy.describe()}" for a in plan.layers)


def compare_many(cases: list[tuple[str, pcompile.Plan]]) -> list[dict]:
    return [compare_with_serial(name, plan) for name, plan in cases]

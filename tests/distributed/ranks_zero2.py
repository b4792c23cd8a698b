"""Rank functions for the ZeRO-2 tests (module-level so they pickle)."""
from __future__ import annotations

import copy

import torch

import pcompile
from pcompile.ir import local_shape
from pcompile.runtime import zero2
from tests.distributed.ranks import _max_diff, gap
from tests.distributed.ranks_mixed_precision import cross_load, run_bf16
from tests.distributed.ranks_sdp import MODELS
from tests.distributed.ranks_weights import train_from_file, weights


def optimizer_numel(cm) -> tuple[int, int, int]:
    """(exp_avg elements the optimizer should hold on this rank: zero2 and ZeRO-3 parameters 1/dp
    of their tp slice; the same with every parameter replicated; how many parameters are zero2)."""
    cuts = (cm._pipeline or cm).sdp_shardings  # ZeRO-3's and ZeRO-2's
    z2 = {n for n in cuts if n not in cm.ir.sdp_shardings}
    expected = replicated = 0
    for name, _ in cm.named_parameters():  # this rank's (a pipeline rank: its stages')
        p = cm.ir.gm.get_parameter(name)
        local = local_shape(p.shape, cm.ir.param_shardings.get(name)).numel()
        replicated += local
        expected += local // cuts[name].size if name in cuts else local
    return expected, replicated, len({id(cm.ir.gm.get_parameter(n)) for n in z2})


def train(model_name: str, plan: pcompile.Plan, bucket_bytes: int = zero2.BUCKET_BYTES, steps: int = 3,
          lr: float = 1e-2, clip: float = 0.5) -> dict:
    """`steps` AdamW steps of 2 train_steps each (the first under no_sync), clipped to a global
    norm of `clip`, in parallel and serially: worst loss / gradient / parameter differences, and
    the optimizer state each rank holds. `bucket_bytes`: the ZeRO-2 buckets' cap."""
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    serial = copy.deepcopy(model)
    default, zero2.BUCKET_BYTES = zero2.BUCKET_BYTES, bucket_bytes
    try:
        cm = pcompile.compile(model, pcompile.Cluster.local(plan.num_devices), inputs(0), plan=plan)
    finally:
        zero2.BUCKET_BYTES = default
    opts = torch.optim.AdamW(cm.parameters(), lr=lr), torch.optim.AdamW(serial.parameters(), lr=lr)
    loss_diff = grad_diff = norm_diff = 0.0
    for step in range(steps):
        for micro in range(2):
            batch = inputs(2 * step + micro)
            if micro == 0:
                with cm.no_sync():
                    loss = cm.train_step(*batch)
            else:
                loss = cm.train_step(*batch)
            expected = serial(*batch)
            expected.backward()
            loss_diff = max(loss_diff, gap(loss.item(), expected.item()))
        norm = torch.nn.utils.clip_grad_norm_(cm.parameters(), clip)  # routed to the global norm
        norm_diff = max(norm_diff, gap(norm.item(), torch.nn.utils.clip_grad_norm_(serial.parameters(), clip).item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        for opt in opts:
            opt.step()
            opt.zero_grad()
    held = sum(state["exp_avg"].numel() for state in opts[0].state.values())
    expected_numel, replicated, zero2_params = optimizer_numel(cm)
    eval_diff = gap(cm.eval_step(*inputs(99)).item(), _eval(serial, inputs(99)))
    try:  # a whole-tensor optimizer would step each chunk as if it were the parameter
        torch.optim.Adafactor(cm.parameters(), lr=1e-3).step()
        adafactor = ""
    except pcompile.PcompileError as exc:
        adafactor = str(exc)
    return {"model": model_name, "plan": str(plan).splitlines()[0], "loss_diff": loss_diff, "grad_diff": grad_diff,
            "norm_diff": norm_diff, "eval_diff": eval_diff,
            "param_diff": _max_diff(cm.full_state_dict(), serial.state_dict()),
            "optimizer_numel": held, "expected_numel": expected_numel, "replicated_numel": replicated,
            "zero2_params": zero2_params, "adafactor": adafactor, "buckets": len(cm.zero2.buckets) if cm.zero2 else 0}


def _eval(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(*batch).item()


def run_all(cases: list[tuple], bf16: list, loads: list, directory: str, meta: list = (), from_file: list = ()) -> dict:
    """`cases`: (model name, plan[, bucket bytes]); `bf16`, `loads`: ranks_mixed_precision's
    run_bf16 and cross_load cases; `meta`, `from_file`: ranks_weights' weights and train_from_file
    cases (a model built on the meta device, given values by init_weights / load_weights)."""
    return {"fp32": [train(*case) for case in cases],
            "meta": [weights(*case) for case in meta], "from_file": [train_from_file(*case) for case in from_file],
            "bf16": [run_bf16(name, plan) for name, plan in bf16],
            "loads": [cross_load(name, save_as, load_as, f"{directory}/{i}")
                      for i, (name, save_as, load_as) in enumerate(loads)]}

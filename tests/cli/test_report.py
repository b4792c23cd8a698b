"""The report's data behind the pictures: schedule timelines reproduce the textbook pipeline
bubble, and memory bars split states by the rank's shards."""
import dataclasses

import pytest

import pcompile
from pcompile import report
from pcompile.api import PIPELINE
from pcompile.models import MLPConfig, MLPModel, mlp_inputs
from pcompile.plan import Estimate, Plan


def _plan(pp: int, m: int, schedule: str) -> Plan:
    plan = Plan.uniform(dp=1, tp=2, pp=pp)
    return dataclasses.replace(plan, num_microbatches=m, schedule=schedule,
                               estimate=Estimate(step_time=1.3, peak_memory=0, compute_time=1.2, comm_time=0.1))


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B"])
@pytest.mark.parametrize("pp,m", [(1, 1), (2, 4), (4, 8)])
def test_timeline_has_the_textbook_bubble(schedule, pp, m):
    blocks = report.schedule_blocks(_plan(pp, m, schedule))
    per_op = 1.2 / m / pp  # forward + backward of one micro-batch on one stage
    compute_end = max(b.start + b.length for b in blocks if b.kind != "comm")
    assert compute_end == pytest.approx((m + pp - 1) * per_op)
    for stage in range(pp):
        ops = sorted((b for b in blocks if b.stage == stage and b.kind != "comm"), key=lambda b: b.start)
        assert len(ops) == 2 * m
        assert all(a.start + a.length <= b.start + 1e-12 for a, b in zip(ops, ops[1:]))  # one op at a time
    assert sum(b.kind == "comm" for b in blocks) == pp


def test_memory_bars_count_this_ranks_shards():
    cfg = MLPConfig()
    model = MLPModel(cfg)
    plan = pcompile.plan(model, pcompile.Cluster.local(2), mlp_inputs(cfg, 16))
    forced = Plan.uniform(dp=1, tp=2)
    ir = pcompile.compile(model, pcompile.Cluster.local(2), mlp_inputs(cfg, 16), plan=forced, stop_after=PIPELINE[-1])
    costed = dataclasses.replace(forced, estimate=plan.estimate)
    split = sum(ir.gm.get_parameter(n).numel() // s.size for n, s in ir.param_shardings.items())
    whole = sum(p.numel() for n, p in ir.gm.named_parameters() if n not in ir.param_shardings)
    bars = report.device_memory(costed, ir, pcompile.Cluster.local(2))
    assert len(bars) == 2 and split > 0
    for bar in bars:
        assert bar.params == 4 * (split + whole) and bar.grads == bar.params and bar.optimizer == 2 * bar.params
        assert bar.budget == pcompile.Cluster.local(2).device_of(0).memory_bytes


def test_plots_are_written(tmp_path):
    paths = report.write_plots(_plan(4, 8, "1F1B"), str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["timeline.png", "memory.png", "gain.png"]
    assert all((tmp_path / name).stat().st_size > 3000 for name in ("timeline.png", "memory.png", "gain.png"))



"""The search keeps a loss that sums over the batch exact: it only offers plans without data
parallelism or micro-batches for it (which the loss_check pass then accepts), and when none of
those fits the cluster it says so, naming the summed loss and the fix."""
import pytest

import pcompile
from pcompile import Cluster, PcompileError
from tests.passes.test_loss_check import Regressor, _inputs


def test_summed_loss_gets_a_plan_without_dp_or_micro_batches():
    plan = pcompile.plan(Regressor("ce-sum"), Cluster.local(2), _inputs())
    # tp=2 cannot split the Regressor: two pipeline stages with one micro-batch are left
    assert plan.pp == 2 and plan.num_microbatches == 1, str(plan)
    assert all(a.strategy.dp == 1 for a in plan.layers) and "loss is not an average over the batch" in plan.explanation
    pcompile.compile(Regressor("ce-sum"), Cluster.local(2), _inputs(), plan=plan, stop_after="loss_check")
    mean = pcompile.plan(Regressor("normalised"), Cluster.local(2), _inputs())
    assert "loss is not an average over the batch" not in mean.explanation


def test_summed_loss_without_a_dp1_plan_is_refused_with_the_cause():
    with pytest.raises(PcompileError) as info:
        pcompile.plan(Regressor("final-sum"), Cluster.local(2), _inputs(),
                      search_space={"tp_degrees": (1,), "pp_degrees": (1,)})
    message = str(info.value)
    assert "the loss is not an average over the batch" in message and "sum() of a tensor" in message
    assert "use a mean loss" in message

"""Loss terms that are functions of batch statistics: told apart from sums and coupled terms
(textual: which reductions they read), made the whole batch's by the batch_statistics rewrite
under dp (one batch_statistic per statistic, after it), refused under micro-batching and mixed
dp degrees with the cause, searched with one micro-batch and one dp degree. The numbers under
dp, ZeRO-3, tp and a one-micro-batch pipeline: tests/distributed/test_batch_statistics.py."""
import dataclasses

import pytest
import torch
import torch.nn as nn

import pcompile
from pcompile import Cluster, PcompileError, Plan
from pcompile.runtime.collectives import batch_statistic
from pcompile.sharding.loss_terms import COUPLED, STATS, SUM, classified
from tests.distributed.ranks_statistics import SwitchMoE, batch


class Stats(nn.Module):
    """x -> Linear -> a loss chosen by `kind`, each reading batch reductions differently."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "product-of-means":  # statistics: f(mean over the batch)
            return (h.mean(0) * torch.sigmoid(h).mean(0)).sum()
        if self.kind == "square-of-sum-per-count":  # statistics: (sum / n)^2, n from the sizes
            return ((h.sum(0) / x.shape[0]) ** 2).sum()
        if self.kind == "sum-plus-one":  # the statistic is the sum, not the sum + 1 (added once)
            return (h.sum(0) + 1.0).pow(2).sum()
        if self.kind == "per-sample":  # a nonlinearity of per-sample values: coupled
            return torch.logsumexp(h.flatten(), 0)
        return h.sum()  # a plain sum


def _x():
    return (torch.randn(8, 4),)


@pytest.mark.parametrize("kind, expected, stats", [
    ("product-of-means", STATS, "mean_1 mean, mean mean"), ("square-of-sum-per-count", STATS, "truediv mean"),
    ("sum-plus-one", STATS, "sum_1 sum"), ("per-sample", COUPLED, ""), ("plain", SUM, "")])
def test_terms_are_told_apart(kind, expected, stats):
    ir = pcompile.compile(Stats(kind), Cluster.local(2), _x(), plan=Plan.uniform(dp=1), stop_after="layers")
    (term,) = classified(ir, _x())
    assert term.kind == expected, term
    assert ", ".join(f"{n.name} {k}" for n, k in term.stats) == stats


def test_without_inputs_statistics_are_not_told_apart():
    ir = pcompile.compile(Stats("product-of-means"), Cluster.local(2), _x(), plan=Plan.uniform(dp=1),
                          stop_after="layers")
    assert [t.kind for t in classified(ir, None)] == [SUM]  # its final .sum(), as before


def test_the_rewrite_reduces_each_statistic_after_it():
    ir = pcompile.compile(Stats("product-of-means"), Cluster.local(2), _x(), plan=Plan.uniform(dp=2),
                          stop_after="batch_statistics")
    made = [n for n in ir.graph.nodes if n.target is batch_statistic]
    assert [(n.args[0].name, n.args[1:]) for n in made] == [("mean", ("mean", "dp", 2)), ("mean_1", ("mean", "dp", 2))]
    assert all(set(n.args[0].users) == {n} for n in made)  # every reader reads the whole batch's


def test_a_plan_that_averages_nothing_is_left_alone():
    ir = pcompile.compile(Stats("product-of-means"), Cluster.local(2), _x(), plan=Plan.uniform(tp=2),
                          stop_after="batch_statistics")
    assert not any(n.target is batch_statistic for n in ir.graph.nodes)


def test_micro_batches_are_refused_with_the_cause():
    plan = dataclasses.replace(Plan.uniform(dp=2, pp=2), num_microbatches=2)
    with pytest.raises(PcompileError, match=r"function of batch statistics .*pp=2 runs 2 micro-batches") as info:
        pcompile.compile(SwitchMoE(), Cluster.local(4), batch(0), plan=plan, stop_after="loss_check")
    assert "num_microbatches=1" in info.value.fix


def test_the_search_keeps_one_micro_batch_and_one_dp_degree():
    plan = pcompile.plan(SwitchMoE(), Cluster.local(4), batch(0))
    assert plan.num_microbatches == 1 and len({a.strategy.dp for a in plan.layers}) == 1, str(plan)
    assert "batch statistics" in plan.explanation
    pcompile.compile(SwitchMoE(), Cluster.local(4), batch(0), plan=plan, stop_after="batch_statistics")

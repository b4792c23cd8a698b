"""The search's memory (CostTable rows summed as search_space.evaluate does) never charges a
uniform plan less than estimate_uniform's peak, which walks backward layer by layer and then
the optimizer step (one tensor at a time on gloo, foreach on NCCL): a plan the search says
fits does fit the cost model's own peak."""
import dataclasses

import pytest

from pcompile import Cluster
from pcompile.cost.pricing import CostOptions, cost_table, estimate_uniform
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import Strategy
from pcompile.search.space import Setting, evaluate
from tests.cost.conftest import analyse

ACTIVATION_HEAVY = (GPTConfig(vocab_size=128, seq_len=32, hidden=64, num_heads=4, num_layers=2), 8)
# a large table and a short batch: the optimizer step's transient is the peak
PARAMETER_HEAVY = (GPTConfig(vocab_size=8192, seq_len=8, hidden=64, num_heads=4, num_layers=2), 4)
STRATEGIES = (Strategy(dp=4), Strategy(dp=4, sdp=True), Strategy(dp=2, tp=2), Strategy(dp=1, tp=4),
              Strategy(dp=4, checkpoint=True), Strategy(dp=2, tp=2, sdp=True, split=2))


@pytest.mark.parametrize("cfg, batch", [ACTIVATION_HEAVY, PARAMETER_HEAVY], ids=["activations", "parameters"])
@pytest.mark.parametrize("cluster", [Cluster.local(4), dataclasses.replace(Cluster.local(4), backend="nccl")],
                         ids=["gloo", "nccl"])
def test_table_memory_covers_the_uniform_peak(cluster, cfg, batch):
    ir, _ = analyse(GPT(cfg), gpt_inputs(cfg, batch))
    options = CostOptions(overlap_grad_sync=False)  # no bucketed sync: its transient is estimate_uniform's own
    table = cost_table(ir, cluster, 4, batch, STRATEGIES, options)
    layers = len(ir.layers)
    for j, strategy in enumerate(STRATEGIES):
        charged = evaluate(Setting(1, 1), [table], [float("inf")], (((0, layers),),), [j] * layers, 1e9, 0.0)
        peak = estimate_uniform(ir, cluster, strategy, options).peak_memory
        assert charged.stage_memory[0] >= peak - 1, (strategy.describe(), charged.stage_memory[0], peak)

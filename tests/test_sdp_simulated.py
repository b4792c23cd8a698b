"""ZeRO-3's simulated collectives (the shape checks after each rewrite run them): the values a
simulated all-gather / reduce-scatter has, built with as many ops at dp = 1024 as at dp = 2 -
never one chunk per rank - and the rewrite check of a ZeRO-3 plan over many ranks."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.runtime import collectives
from pcompile.runtime.sdp import _all_gather_flat, _reduce_scatter_flat


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _counted(fn, *args):
    with _Count() as count:
        out = fn(*args)
    return out, count.ops


def test_simulated_gather_and_scatter_are_one_rank_view_whatever_the_size():
    shards = (torch.randn(3, 4), torch.randn(5))
    with collectives.simulate():
        for size in (2, 7):
            full = _all_gather_flat(shards, (0, 0), "dp", size)
            assert [f.shape for f in full] == [torch.Size([3 * size, 4]), torch.Size([5 * size])]
            for f, s in zip(full, shards):  # every rank's chunk is this rank's: `size` copies
                assert torch.equal(f, torch.cat([s] * size))
            grads = tuple(f * 3 for f in full)
            chunks = _reduce_scatter_flat(grads, (0, 0), "dp", size)
            for c, g in zip(chunks, grads):
                assert torch.equal(c, g.chunk(size)[0] / size)
        small, large = (_counted(_all_gather_flat, shards, (0, 0), "dp", n)[1] for n in (2, 1024))
        assert small == large
        grads = tuple(torch.randn(4096, 2) for _ in range(2))
        small, large = (_counted(_reduce_scatter_flat, grads, (0, 0), "dp", n)[1] for n in (2, 1024))
        assert small == large


def test_a_zero3_plan_over_64_ranks_passes_the_rewrite_checks():
    cfg = GPTConfig(num_layers=2)
    plan = pcompile.Plan.uniform(dp=64, tp=1, sdp=True)
    ir = pcompile.compile(GPT(cfg), pcompile.Cluster.local(64), gpt_inputs(cfg, 64), plan=plan,
                          stop_after="sharded_data_parallel")
    assert ir.sdp_shardings and all(s.size == 64 for s in ir.sdp_shardings.values())

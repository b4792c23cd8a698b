"""A model without repeated blocks whose Megatron pair spans two top-level Linears (Alpa's
two-Linear MLP, joined into one unit "up+down") trains equal to serial under tp4, dp2·tp2 and a
mixed plan (the joined unit at tp2, the ends at dp4): 3 AdamW steps, loss and gradients within
1e-5. One 4-rank launch."""
import torch

import pcompile
from pcompile import LayerAssignment, Plan, Strategy
from tests.distributed.ranks import train_side_by_side
from tests.passes.test_megatron_units import UpDown

PLANS = [Plan.uniform(tp=4), Plan.uniform(dp=2, tp=2),
         Plan(num_devices=4, default=Strategy(dp=4), layers=(LayerAssignment("up+down", Strategy(dp=2, tp=2)),))]


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)


def _compare(plans) -> list[tuple[float, float, str]]:
    out = []
    for plan in plans:
        cm, _, loss_diff, grad_diff, _ = train_side_by_side(UpDown, _batch, plan, steps=3, lr=1e-2)
        out.append((loss_diff, grad_diff, cm.ir.gm.code))
    return out


def test_the_joined_unit_trains_equal_to_serial():
    for plan, (loss_diff, grad_diff, code) in zip(PLANS, pcompile.launch(_compare, 4, PLANS)[0]):
        assert loss_diff < 1e-5 and grad_diff < 1e-5, (str(plan), loss_diff, grad_diff)
        assert "tp_reduce" in code, str(plan)  # the pair was split

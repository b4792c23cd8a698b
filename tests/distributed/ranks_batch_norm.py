"""Rank functions for the batch-norm tests: a small CNN with BatchNorm (as modules, or as
F.batch_norm calls) trained under a plan next to the serial model."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import pcompile
from tests.distributed.ranks import _max_diff, gap

STEPS, BATCH = 3, 8


class BNNet(nn.Module):
    """conv-BN-relu blocks, a BatchNorm1d before the head; `functional`: the second block's
    batch norm as an F.batch_norm call on the module's own tensors."""

    def __init__(self, functional: bool = False, momentum: float | None = 0.1):
        super().__init__()
        self.functional = functional
        # no bias before a batch norm (it cancels: its gradient is rounding noise, which AdamW
        # would turn into steps of +-lr that differ between any two summation orders)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8, momentum=momentum)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 16, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, images, labels):
        x = F.relu(self.bn0(self.stem(images)))
        x = self.conv(x)
        if self.functional:
            x = F.batch_norm(x, self.bn1.running_mean, self.bn1.running_var, self.bn1.weight, self.bn1.bias,
                             self.training, 0.1, 1e-5)
        else:
            x = self.bn1(x)
        x = F.relu(x).mean((2, 3))
        return F.cross_entropy(self.head(F.relu(self.bn2(self.fc(x)))), labels)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 5, (BATCH,), generator=g)


def side_by_side(plan, functional: bool = False, momentum: float | None = 0.1, capture: str = "auto") -> dict:
    """STEPS AdamW steps of the compiled and the serial model; then each in eval mode."""
    torch.manual_seed(0)
    model = BNNet(functional, momentum)
    serial = BNNet(functional, momentum)
    serial.load_state_dict(model.state_dict())
    cm = pcompile.compile(model, pcompile.Cluster.local(dist.get_world_size()), batch(0), plan=plan, capture=capture)
    optimizers = (torch.optim.AdamW(cm.parameters(), lr=1e-2, eps=1e-6),
                  torch.optim.AdamW(serial.parameters(), lr=1e-2, eps=1e-6))
    loss_diff = grad_diff = 0.0
    for step in range(STEPS):
        loss = cm.train_step(*batch(step))
        expected = serial(*batch(step))
        expected.backward()
        loss_diff = max(loss_diff, gap(loss.item(), expected.item()))
        grad_diff = max(grad_diff, _max_diff(cm.full_grads(), {n: p.grad for n, p in serial.named_parameters()}))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    state = cm.full_state_dict()
    stats = {k: v for k, v in serial.state_dict().items() if "running" in k or "num_batches" in k}
    serial.eval()
    with torch.no_grad():
        eval_expected = serial(*batch(99)).item()
    out = {"loss": loss_diff, "grad": grad_diff, "stats": _max_diff({k: state[k].float() for k in stats},
                                                                   {k: v.float() for k, v in stats.items()}),
           "finite": all(torch.isfinite(state[k].float()).all() for k in stats),
           "eval": gap(cm.eval_step(*batch(99)).item(), eval_expected)}
    cm.close()
    return out


def refused(plan) -> str:
    try:
        pcompile.compile(BNNet(), pcompile.Cluster.local(dist.get_world_size()), batch(0), plan=plan)
    except pcompile.PcompileError as error:
        return f"{error.cause} | {error.fix}"
    return "accepted"


def run_all(cases, refusals) -> dict:
    return {"cases": [side_by_side(*args) for args in cases], "refusals": [refused(plan) for plan in refusals]}


def pipeline(pp: int, dp: int, microbatches: int):
    return dataclasses.replace(pcompile.Plan.uniform(dp=dp, pp=pp), num_microbatches=microbatches,
                               schedule="GPipe" if microbatches < pp else "1F1B")

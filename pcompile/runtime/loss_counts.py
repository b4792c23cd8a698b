"""The whole step's counts of masked-mean losses (passes/normalise_loss.py), at run time: each
rank counts its own part of the batch with `IR.loss_counts.gm` and the ranks that split the
batch sum their counts before the step, so every rank and micro-batch divides by the same total."""
from __future__ import annotations

import torch
import torch.distributed as dist

from pcompile.ir import LossCounts


def step_counts(counts: LossCounts | None, inputs: tuple, group) -> dict[str, float]:
    """Placeholder name -> the step's count of its term: this rank's counts of `inputs` summed
    over `group` (None: this rank holds the whole batch). 1 where nothing counts at all (the
    term's sum is then 0 as well: an all-ignored batch contributes 0, not 0 / 0)."""
    if counts is None:
        return {}
    with torch.no_grad():
        local = torch.stack([torch.as_tensor(c).reshape(()) for c in counts.gm(*inputs)]).double()
    if group is not None:
        dist.all_reduce(local, group=group)
    return {name: value if value != 0 else 1.0 for name, value in zip(counts.placeholders, local.tolist())}

"""The pipeline step's loss, from the last stage to every pp rank, hidden behind the drain.

The last stage knows the step's loss once its last micro-batch's forward has run (the
schedule's loss_fn called for the n-th time); backwards are still to run there and, in the
1F1B cool-down, on every earlier stage. So the last stage issues the loss's broadcast
asynchronously right then, every other pp rank posts its side when the step starts, and all
wait at the step's end: with a slow link the broadcast's latency runs under the drain instead
of after it (benchmarks/runtime_overhead.py, pp4+L: one exposed transfer fewer).

The broadcast runs on a group of its own (the same pp ranks again): a collective pending beside
the schedule's point-to-point transfers on one NCCL communicator would hold them back, and the
receivers' side is pending for the whole step. torch.distributed.pipelining returns losses on
the last stage only and has no such hook, hence this by hand.
"""
from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist


def pp_line_group(mesh: torch.Tensor, coords: dict) -> dist.ProcessGroup:
    """A new group of this rank's pp line (the ranks of its dp and tp coordinates over pp).
    Every rank creates every line's group (new_group is collective), in the same order."""
    pp, dp, tp = mesh.shape
    mine = None
    for d, t in itertools.product(range(dp), range(tp)):
        group = dist.new_group([int(mesh[p, d, t]) for p in range(pp)])
        if (d, t) == (coords["dp"], coords["tp"]):
            mine = group
    return mine


class LossRelay:
    """Per step: begin(), the schedule's loss_fn per micro-batch, then loss() on every pp rank.
    `loss_fn` also makes each micro-batch's backward start from 1/n of its loss (the model's
    forward returns the micro-batch's loss, a mean over it): the summed micro-batch gradients
    are then the whole batch mean's (the schedule runs with scale_grads=False: dividing .grad by
    n after the step would miss the gradients already moved to fp32 masters)."""

    def __init__(self, n_microbatches: int, group: dist.ProcessGroup, is_last: bool, device: torch.device):
        self.n, self.group, self.is_last, self.device = n_microbatches, group, is_last, device
        self.src = group.size() - 1  # the last stage's rank in its pp line
        self._shares: list[torch.Tensor] = []
        self._value: torch.Tensor | None = None
        self._work = None
        self._inferring = False

    @contextlib.contextmanager
    def inferring(self):
        """While torch's metadata inference runs (before the first step, and when a schedule
        switches between train and eval): the loss it computes on uninitialised outputs is not a
        micro-batch's."""
        self._inferring = True
        try:
            yield
        finally:
            self._inferring = False

    def begin(self) -> None:
        self._shares, self._value, self._work = [], None, None
        if not self.is_last:  # the receiving side, pending until the last stage sends
            self._value = torch.zeros((), device=self.device)
            self._work = dist.broadcast(self._value, group=self.group, group_src=self.src, async_op=True)

    def loss_fn(self, output: torch.Tensor, target) -> torch.Tensor:
        share = output / self.n
        if self._inferring:
            return share
        self._shares.append(share.detach().float())
        if len(self._shares) == self.n:  # the step's last micro-batch: its loss is known
            self._value = torch.stack(self._shares).sum()
            self._work = dist.broadcast(self._value, group=self.group, group_src=self.src, async_op=True)
        return share

    def loss(self) -> torch.Tensor:
        """The sum of the micro-batches' shares (the step's mean loss), on every pp rank."""
        if self._work is None or (self.is_last and len(self._shares) != self.n):
            # a schedule that computed another number of losses than micro-batches: the sum sent
            # would not be the step's loss
            raise RuntimeError(f"the pipeline schedule computed {len(self._shares)} micro-batch losses in a step "
                               f"of {self.n} micro-batches on its last stage")
        self._work.wait()
        return self._value

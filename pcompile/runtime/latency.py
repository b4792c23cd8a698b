"""A slow network on this machine: every collective and point-to-point transfer also takes at
least `ms` milliseconds from the moment it is issued, without using the CPU (a sleep), as a
link with that latency would. Synchronous calls return no earlier than issue + ms; an async
call (async_op=True, batch_isend_irecv) returns at once, and its work handle's
wait() returns no earlier than issue + ms - so communication that the runtime overlaps with
compute is hidden behind it and communication it waits for right away is not. Tests and
benchmarks/overlap.py use it to show overlap on CPU/gloo ranks, where the real transfers are
too fast to see.

    with latency.inject(20) as injected:
        cm.train_step(...)
    injected.calls  # how many transfers were delayed

Why by hand: torch.distributed has no latency injection; this patches its module-level
functions (the runtime, torch's pipelining and DDP/FSDP look them up at call time) for the
duration of the block.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch.distributed as dist

# isend / irecv stay as they are: P2POp accepts only the originals (batch_isend_irecv, which
# torch's pipelining issues them through - inside inject() always - is delayed as a whole)
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "reduce", "gather", "scatter",
                "all_gather_single", "reduce_scatter_single")  # the last two: torch 2.13's new names


class DelayedWork(dist.distributed_c10d.Work):
    """A work handle that completes no earlier than `deadline` (time.monotonic()). A dist.Work:
    FSDP2 waits an async all-gather only if it is one (else it copies out a gather still in
    flight, and is not delayed)."""

    def __init__(self, work, deadline: float):
        super().__init__()
        self._work, self._deadline = work, deadline

    def wait(self, *args, **kwargs):
        result = self._work.wait(*args, **kwargs) if self._work is not None else True
        remaining = self._deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        return result

    def is_completed(self) -> bool:
        return time.monotonic() >= self._deadline and (self._work is None or self._work.is_completed())

    def get_future(self):  # the real handle's: it completes without the delay
        return self._work.get_future()

    def __getattr__(self, name):  # exception, ... of the real handle
        return getattr(self._work, name)


class Injected:
    """What an inject() block delayed: `calls` transfers (a batch_isend_irecv counts once)."""

    def __init__(self):
        self.calls = 0


def _delayed(fn, seconds: float, injected: Injected):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        injected.calls += 1
        deadline = time.monotonic() + seconds
        result = fn(*args, **kwargs)
        if kwargs.get("async_op"):
            return DelayedWork(result, deadline)
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        return result
    return call


def _delayed_batch(fn, seconds: float, injected: Injected):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        injected.calls += 1
        deadline = time.monotonic() + seconds
        return [DelayedWork(work, deadline) for work in fn(*args, **kwargs)]
    return call


@contextlib.contextmanager
def inject(ms: float):
    """Every torch.distributed transfer issued inside the block takes at least `ms` milliseconds;
    yields an Injected that counts them."""
    seconds, injected = ms / 1e3, Injected()
    originals = {name: getattr(dist, name) for name in (*_COLLECTIVES, "batch_isend_irecv") if hasattr(dist, name)}
    schedules = _pipelining_schedules()
    batch_p2p = getattr(schedules, "_batch_p2p", None)
    try:
        for name, fn in originals.items():
            if name == "batch_isend_irecv":
                setattr(dist, name, _delayed_batch(fn, seconds, injected))
            else:
                setattr(dist, name, _delayed(fn, seconds, injected))
        if batch_p2p is not None:
            # torch's pipelining sends a batch of only sends or only receives through isend / irecv
            # (its fast path), which cannot be delayed here (P2POp takes only the originals):
            # every batch goes through batch_isend_irecv instead (a private function of torch)
            schedules._batch_p2p = _through_batch
        yield injected
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        if batch_p2p is not None:
            schedules._batch_p2p = batch_p2p


def _pipelining_schedules():
    try:
        from torch.distributed.pipelining import schedules
    except ImportError:
        return None
    return schedules


def _through_batch(p2p_ops, desc=None):
    return dist.batch_isend_irecv(p2p_ops) if p2p_ops else []

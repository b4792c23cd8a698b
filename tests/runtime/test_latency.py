"""Injected latency (pcompile.runtime.latency) on 2 gloo ranks: a synchronous collective takes
at least the latency, an async one returns at once and its wait() only after the latency, so
work done between issue and wait hides it; outside the block nothing is delayed."""
import time

import torch
import torch.distributed as dist

import pcompile
from pcompile.runtime import collectives, latency

MS = 200


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _timings() -> dict:
    x = torch.ones(4)
    dist.barrier()
    out = {}
    with latency.inject(MS):
        start = time.monotonic()
        dist.all_reduce(x)
        out["sync"] = time.monotonic() - start
        start = time.monotonic()
        work = dist.all_reduce(x, async_op=True)
        out["issue"] = time.monotonic() - start
        _busy(MS / 1e3)  # compute while the transfer is in flight
        work.wait()
        out["overlapped"] = time.monotonic() - start
        start = time.monotonic()
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend if dist.get_rank() == 0 else dist.irecv, x,
                                                   1 - dist.get_rank())])
        for work in works:
            work.wait()
        out["p2p"] = time.monotonic() - start
        start = time.monotonic()  # the flat collectives ZeRO-3 issues, under this torch's name for them
        gathered, flat = torch.empty(2 * x.numel()), torch.empty(x.numel() // 2)
        collectives.all_gather_single(gathered, x, None)
        collectives.reduce_scatter_single(flat, x, None, async_op=True).wait()
        out["flat"] = time.monotonic() - start
    start = time.monotonic()
    dist.all_reduce(x)
    out["after"] = time.monotonic() - start
    return out


def test_injected_latency_is_paid_once_and_hidden_by_overlapped_work():
    for t in pcompile.launch(_timings, 2):
        assert t["sync"] >= MS / 1e3 and t["p2p"] >= MS / 1e3, t
        assert t["flat"] >= 2 * MS / 1e3, t
        assert t["issue"] < MS / 2e3, t
        assert t["overlapped"] < 1.5 * MS / 1e3, t  # max(compute, latency), not their sum
        assert t["after"] < MS / 2e3, t


def test_pipelining_sends_and_fsdp2_waits_are_delayed_too():
    from torch.distributed.pipelining import schedules

    # FSDP2 waits an async all-gather only if its handle is a dist.Work
    assert issubclass(latency.DelayedWork, dist.distributed_c10d.Work)
    original = schedules._batch_p2p  # its isend / irecv fast path escapes the delay: batched instead
    with latency.inject(1):
        assert schedules._batch_p2p is latency._through_batch
    assert schedules._batch_p2p is original

"""`launch(fn, world_size, *args)`: run `fn` on `world_size` local ranks with a process group.

Ranks are forked from a forkserver that has already imported torch, so each rank starts in
well under a second instead of re-importing torch (about 2 s per process on this machine).
"""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcompile.errors import PcompileError


def device_for(backend: str | None, local_rank: int, cuda_available: bool) -> torch.device:
    """The device a rank computes on. `backend`: the process group's backend string (None: no
    process group) - NCCL in it ("nccl", "cpu:gloo,cuda:nccl") means this rank's GPU; gloo
    alone means the CPU; no process group means the GPU when there is one (a one-device plan
    runs on it). The GPU is the LOCAL_RANK-th of the node's (torchrun's numbering)."""
    if backend is None:
        return torch.device("cuda", local_rank) if cuda_available else torch.device("cpu")
    uses_nccl = any(part.rpartition(":")[2].strip() == "nccl" for part in backend.split(","))
    if uses_nccl and not cuda_available:
        raise PcompileError(f"the process group's backend {backend!r} needs CUDA, which this process does not see",
                            "launch with backend='gloo' on a machine without GPUs, or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank) if uses_nccl else torch.device("cpu")


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device() -> torch.device:
    """This rank's device (device_for) from the running process group and the environment."""
    return device_for(dist.get_backend() if dist.is_initialized() else None, local_rank(), torch.cuda.is_available())


def _init_group(backend: str, **kwargs) -> None:
    """init_process_group bound to this rank's GPU when the backend has NCCL: set_device first,
    then device_id, which creates the communicator eagerly and lets new groups be split from the
    default one (ncclCommSplit) instead of each bootstrapping its own."""
    device = device_for(backend, local_rank(), torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, threads: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        _init_group(backend, rank=rank, world_size=world_size)
        # Plain pickle, not the queue's ForkingPickler: tensors then travel by value rather than
        # as shared-memory handles that die with this process.
        result = pickle.dumps(fn(*args))
        queue.put((rank, True, result))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        _teardown(rank, world_size)


def _teardown(rank: int, world_size: int) -> None:
    """Destroy the process group, rank 0 last: it hosts the TCPStore, and a rank still talking to
    it once it is gone prints c10d warnings (sendBytes / recvValue failed) after a clean refusal.
    The store is torch's default one (no public accessor): the others count themselves out on it."""
    if not dist.is_initialized():
        return
    store = dist.distributed_c10d._get_default_store()
    if rank != 0:
        dist.destroy_process_group()
        store.add("pcompile_exited", 1)
        return
    deadline = time.monotonic() + 5  # a rank that died without reaching here is not waited for longer
    while world_size > 1 and store.add("pcompile_exited", 0) < world_size - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    dist.destroy_process_group()


def launch(fn, world_size: int = 4, *args, backend: str | None = None, timeout: float = 600.0) -> list:
    """Start `world_size` ranks, call `fn(*args)` on each, return their results in rank order.

    `fn` must be picklable (a module-level function or a functools.partial of one). Raises
    RuntimeError with the failing rank's traceback if any rank fails.
    """
    if world_size < 1:
        raise PcompileError(f"launch(world_size={world_size}) needs at least one rank", "pass world_size >= 1")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "pcompile"])
    queue = context.SimpleQueue()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, world_size, port, backend, threads, fn, args, queue),
                                 daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    results: dict[int, object] = {}
    failure = None
    deadline = time.monotonic() + timeout
    while len(results) < world_size and failure is None:
        if not queue.empty():
            rank, ok, value = queue.get()
            if ok:
                results[rank] = pickle.loads(value)
            else:
                failure = (rank, value)
            continue
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(results))
            failure = (-1, f"timed out after {timeout:.0f} s waiting for ranks {missing}")
        elif any(p.exitcode not in (None, 0) for p in processes) and queue.empty():
            dead = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0)]
            time.sleep(0.2)
            if queue.empty():
                failure = (dead[0], f"rank {dead[0]} died with exit code {processes[dead[0]].exitcode}")
        time.sleep(0.01)
    if failure is not None:  # ranks failing alike (the usual refusal) exit by themselves: a killed rank
        grace = time.monotonic() + 5  # leaks its semaphores (Python warns about them at exit)
        while any(p.is_alive() for p in processes) and time.monotonic() < grace:
            time.sleep(0.05)
    for process in processes:
        if failure is not None and process.is_alive():
            process.terminate()
        process.join(timeout=30)
    if failure is not None:
        raise RuntimeError(f"rank {failure[0]} failed:\n{failure[1]}")
    return [results[rank] for rank in range(world_size)]


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> None:
    """`init_process_group` from torchrun's environment, safe across `--max-restarts`.

    Why not plain init_process_group("gloo"): under torchrun (torch 2.13) a restarted group
    reuses the agent's TCPStore on the same port and gloo reads the previous attempt's peer
    addresses from it, then times out connecting. Prefixing the store with the restart count
    gives every attempt fresh keys.
    """
    if dist.is_initialized():
        return
    from datetime import timedelta

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=(not agent_store and rank == 0), timeout=timedelta(seconds=timeout_s),
                          multi_tenant=not agent_store)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _init_group(backend, store=dist.PrefixStore(f"/pcompile/attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))

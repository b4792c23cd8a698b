"""Profile the machine at hand into a Cluster: `profile_cluster(world_size, path)`.

Where: `world_size` ranks launched on this machine, or, under torchrun (or inside a running
process group), the launched world itself, which may span nodes: its ranks numbered node by
node, LOCAL_WORLD_SIZE on each (`check_nodes` holds that against the ranks' host names).
Each rank measures its own device (pcompile.launch.rank_device: its GPU when the process
group's backend has NCCL). GPU work runs asynchronously, so it is timed with CUDA events
(`_stopwatch`), on problems large enough to reach the GPU's rates (SIZES); the Device carries
the GPU's name and the memory its allocator may fill (`cuda_memory_budget`).

Every figure is measured with all ranks running at once (as they do in training), so ranks
that share cores or a link are measured sharing them (the compute figures over a common
wall-clock window in which every rank stays busy, `_shared_timed`):
- matmul throughput of square fp32 matmuls by size (the Device's matmul curve) and of bf16
  ones (Device.matmul_curve_bf16; on GPUs in every mode, as mixed precision trains in bf16
  there, and its peak is the Device's; on CPUs in the full mode),
- Linear throughput by arithmetic intensity (`_linear_curve`: F.linear of a square weight on
  m rows; the Device's linear curve),
- memory bandwidth (a large copy: read + write bytes / s),
- GELU throughput, forward and backward, elements / s (`_gelu_rates`),
- the fixed per-op cost (a chain of tiny differentiable ops, forward),
- all_reduce, all_gather and reduce_scatter by link, group size and message size, and
  point-to-point sends: on each link (`link_groups`: inside a node, and on several nodes
  across them with one rank per node) the world split into equal groups, all busy, each
  fitted as time = latency + bytes * seconds_per_byte (least squares on relative error), the
  links apart (CollectiveFit.link; the Cluster's intra / inter link figures from each). Each
  call follows a short burst of compute, as in training, and the burst's own time is
  subtracted: ranks that share cores pay the wake-up of a waiting peer, which back-to-back
  calls hide,
- on CPUs, the wake-up cost of a collective that follows a long compute phase (`_wakeup`), by
  group size: what a tp collective pays in training beyond the fit above,
- the overlap efficiency eta of an async all-reduce running under a matmul loop:
  eta = (t_compute + t_comm - t_both) / min(t_compute, t_comm), clipped to [0, 1], each time
  over samples of a common call count at least 0.3 s long (`_timed`).

Medians over samples; per-rank figures are combined as the median rank for compute and, for
collectives, the median rank's loop time less the median rank's burst (the loop runs in step).
The JSON holds {"cluster": Cluster.to_dict(), "measurements": ...}; `Cluster.from_profile(path)`
loads it. The quick mode (tests) takes well under 30 s on CPUs.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from pcompile.cluster import GB, Cluster, CollectiveFit, Device, NodeGroup
from pcompile.errors import PcompileError
from pcompile.launch import init_distributed, launch, rank_device
from pcompile.mesh import contiguous_groups, stage_groups

# Problem sizes by device type. A CPU's finish quickly on 2 cores. A GPU's must reach its rates:
# a kernel of a few microseconds is bound by its launch and tail (a 1024^3 bf16 matmul, 2 GFLOP,
# lasts 2 us at an H100's 989 TFLOP/s; the curve must reach the sizes of a large model's
# matmuls, as its end point prices all larger ones) and a copy must not fit the L2 cache (50 MB
# on an H100). messages["full"]: up to 16 MiB on CPUs, the size of the runtime's
# dp gradient buckets (25 MiB at most): a fit of messages up to 4 MiB put a 16.8 MB all-reduce on
# 4 gloo ranks at 18.6 ms, measured 28 ms; on GPUs up to the 256 MiB of a large ZeRO-3 gather.
SIZES = {
    "cpu": dict(matmul={"quick": (64, 128, 256), "full": (32, 64, 128, 256, 512, 1024)},
                linear_features=1024, copy_elements=8 << 20, gelu_elements=1 << 19, overlap=(256, 256 << 10),
                messages={"quick": (4096, 65536, 1 << 20),
                          "full": (1024, 8192, 65536, 262144, 1 << 20, 4 << 20, 16 << 20)}),
    "cuda": dict(matmul={"quick": (1024, 4096, 8192), "full": (256, 512, 1024, 2048, 4096, 8192)},
                 linear_features=8192, copy_elements=1 << 26, gelu_elements=1 << 26, overlap=(4096, 16 << 20),
                 messages={"quick": (65536, 1 << 20, 16 << 20),
                           "full": (8192, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20)}),
}
LINEAR_ROWS = {"quick": (32, 128, 512), "full": (16, 32, 64, 128, 256, 512, 1024)}

MIN_SECONDS = 0.01  # a timed sample loops fn for at least this long: ranks sharing cores get time-sliced
WINDOW_SECONDS = 0.1  # a compute sample on CPUs: every rank loops fn for this wall time, many scheduler slices
WINDOWS = 3


def _stopwatch(device: torch.device):
    """A function returning the seconds since `_stopwatch` was called, for work on `device`.

    GPU kernels (and NCCL collectives) run asynchronously: host time around a loop would time
    its launches. CUDA events bracket it on the current stream instead, where collectives are
    ordered too (a synchronous one makes the stream wait for it), and reading synchronizes on
    the end event. On the CPU the work is done when the call returns: host time."""
    if device.type != "cuda":
        start = time.perf_counter()
        return lambda: time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()

    def seconds() -> float:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # milliseconds
    return seconds


def _timed(fn, device: torch.device, seconds: float = MIN_SECONDS) -> float:
    """Median seconds of one `fn()` (which may call collectives) over WINDOWS samples of the same
    call count on every rank, chosen so a sample lasts at least `seconds` on the slowest rank;
    each sample starts at a barrier. The count comes from one call after a warm-up call (lazy
    cuBLAS handles and NCCL communicators are no part of a call); with counts from ~10 ms of
    calls, the overlap figure (three ~1 ms timings combined) swung between 0.00 and 1.00 from
    one CPU profile to the next: it takes 0.3 s samples."""
    fn()
    elapsed = _stopwatch(device)
    fn()
    calls = torch.tensor([max(1, int(seconds / max(elapsed(), 1e-7)))], device=device)
    dist.all_reduce(calls, op=dist.ReduceOp.MAX)  # every rank makes the same number of (collective) calls
    calls = int(calls.item())
    samples = []
    for _ in range(WINDOWS):
        dist.barrier()
        elapsed = _stopwatch(device)
        for _ in range(calls):
            fn()
        samples.append(elapsed() / calls)
    return statistics.median(samples)


def _shared_timed(fn, device: torch.device) -> float:
    """Median seconds of one `fn()` while every rank runs it for the same wall-clock window.

    Ranks that share cores must all be busy for the whole sample: with a fixed number of calls
    (`_timed`) the rank that finishes first idles at the next barrier and the others run alone
    for the rest, which on 4 ranks of 2 cores measured a 64x64 matmul at 106-109 GFLOP/s (one
    core's rate) instead of the 41-45 GFLOP/s each rank gets while all four compute. On GPUs
    (one per rank) nothing is shared: `_timed`."""
    if device.type == "cuda":
        return _timed(fn, device)
    fn()
    samples = []
    for _ in range(WINDOWS):
        dist.barrier()
        elapsed, calls = _stopwatch(device), 0
        while elapsed() < WINDOW_SECONDS:
            fn()
            calls += 1
        samples.append(elapsed() / calls)
    return statistics.median(samples)


def _matmul_curve(device, dtype, sizes) -> list[tuple[float, float]]:
    curve = []
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _shared_timed(lambda: torch.mm(a, b), device)
        curve.append((2.0 * n ** 3, 2.0 * n ** 3 / seconds))
    return curve


def _linear_curve(device, rows, n: int) -> list[tuple[float, float]]:
    """(FLOPs per byte of input + weight + output, achieved FLOP/s) of F.linear (x @ W^T + b, the
    form nn.Linear runs) on an [m, n] input and an n x n weight, for m in `rows`.

    The square matmul curve rates a matmul by its FLOPs alone; the Linears of a training plan
    have a small batch dim (few rows reuse each weight element) and run slower at the same
    FLOPs. Measured on 4 gloo ranks of 2 cores, all busy: square 512 (268 MFLOP) at 80 GFLOP/s,
    while in mlp-w512-b512 dp4 training the [128, 512] x [512, 2048] Linears (268 MFLOP, 49
    FLOP/byte) ran at 55 GFLOP/s forward (addmm) and 62 backward (mm), torch.profiler on every
    rank: the forward's 19-22 ms against 14.4 predicted."""
    w = torch.randn(n, n, device=device)
    b = torch.randn(n, device=device)
    curve = []
    for m in rows:
        x = torch.randn(m, n, device=device)
        seconds = _shared_timed(lambda: torch.nn.functional.linear(x, w, b), device)
        flops = 2.0 * m * n * n
        curve.append((flops / (4.0 * (m * n + n * n + m * n)), flops / seconds))
    return curve


def _bandwidth(device, elements: int) -> float:
    x = torch.empty(elements, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _shared_timed(lambda: y.copy_(x), device)


def _gelu_rates(device, elements: int) -> tuple[float, float]:
    """(forward, backward) elements/s of F.gelu and aten.gelu_backward on `elements` fp32
    elements, every rank busy (`_shared_timed`, as the matmul curve).

    FlopCounterMode counts no FLOPs for GELU, so the roofline charges it its bytes alone; erf
    per element may be slower than that (CPUs) or not (GPUs: memory-bound, the rate then
    exceeds the roofline's and changes nothing, given enough elements not to be launch-bound).
    Measured on 4 gloo ranks of 2 cores (a shared machine, load 2-6), 512 K elements:
    2-5.7 ns/element forward and 3.6-5.7 backward here, against 1-1.8 and 2-3.5 at the copy
    bandwidth. In gpt-h256-b32 dp4 training (0.5 M elements per call), timed by perf_counter
    around the calls: medians 0.45 ms forward (0.9 ns/element) and 1.5 ms backward (2.9), means
    0.8-1.7 and 3.6-5 ms (a rank descheduled mid-call); under torch.profiler the same calls read
    5-20 and 13-30 ms, so profiler figures of GELU overstate it several-fold."""
    x = torch.randn(elements, device=device)
    grad = torch.randn_like(x)
    forward = _shared_timed(lambda: torch.nn.functional.gelu(x), device)
    backward = _shared_timed(lambda: torch.ops.aten.gelu_backward(grad, x), device)
    return elements / forward, elements / backward


def _op_overhead(device) -> tuple[float, float]:
    """(forward, backward) seconds per op of a chain of tiny Linear modules and functions."""
    chain = torch.nn.Sequential(*[m for _ in range(16) for m in (torch.nn.Linear(4, 4), torch.nn.GELU())]).to(device)
    x = torch.ones(2, 4, device=device)
    ops = len(chain)

    def forward():
        return chain(x).sum()

    fwd = _shared_timed(forward, device)
    both = _shared_timed(lambda: forward().backward(), device)
    return fwd / ops, max(both - fwd, 0.0) / ops


def check_nodes(hosts: list[str], per_node: int) -> int:
    """The number of nodes of a world whose rank r runs on host `hosts[r]`, given `per_node`
    ranks on each (LOCAL_WORLD_SIZE). A Cluster numbers ranks node by node, so each node's ranks
    must be consecutive: every block of `per_node` ranks on one host, each block on its own."""
    divides = per_node > 0 and len(hosts) % per_node == 0
    blocks = [hosts[i:i + per_node] for i in range(0, len(hosts), per_node)] if divides else []
    if not blocks or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        raise PcompileError(f"the ranks' hosts {hosts} are not {per_node} consecutive ranks per node "
                            f"(LOCAL_WORLD_SIZE={per_node})",
                            "launch with torchrun (--nproc-per-node ranks on every node, LOCAL_WORLD_SIZE set), "
                            "which numbers ranks node by node")
    return len(blocks)


def link_groups(world: int, per_node: int) -> dict[tuple[str, int], list[list[int]]]:
    """The groups collectives are measured on, by (link, group size); each entry splits the whole
    world, so every group is busy at once, as in training. "intra": consecutive ranks of one node,
    sizes 2, 4, 8, 16 dividing the node. "inter" (several nodes): one rank per node, the same
    local rank on consecutive nodes (the dp groups of a tp = node mesh), sizes 2, 4, 8, 16
    dividing the node count, and the node count."""
    nodes = world // per_node
    groups = {("intra", size): contiguous_groups(world, size) for size in (2, 4, 8, 16) if per_node % size == 0}
    inter = {size for size in (2, 4, 8, 16) if nodes % size == 0} | ({nodes} if nodes > 1 else set())
    for size in sorted(inter):  # blocks of `size` nodes: their dp groups, `per_node` ranks apart
        groups["inter", size] = [g for block in range(nodes // size)
                                 for g in stage_groups(block * size * per_node, size, per_node)[1]]
    return groups


def _collective(op: str, nbytes: int, group, size: int, device):
    """`op` in the call form the runtime issues it: list-based all_gather (pcompile.runtime.sdp's ZeRO-3
    gathers, pcompile.runtime.collectives' tp gathers) and reduce_scatter (pcompile.runtime.sdp's gradients). On
    gloo the list reduce_scatter costs 2-4x the single-tensor one (measured on 4 ranks, 56 KB:
    21-23 ms vs 5-11 ms), so timing the tensor form under-charged every ZeRO-3 step."""
    elements = max(nbytes // 4, size)
    elements -= elements % size
    x = torch.ones(elements, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(x, group=group)
    part = x[: elements // size].clone()
    if op == "all_gather":  # nbytes = the gathered output per rank
        parts = [torch.empty_like(part) for _ in range(size)]
        return lambda: dist.all_gather(parts, part, group=group)
    inputs = list(x.chunk(size))  # reduce_scatter: nbytes = the input per rank
    return lambda: dist.reduce_scatter(part, inputs, group=group)


def _after_compute(fn, device, n: int = 128, count: int = 4):
    """(fn preceded by a compute phase of `count` n x n matmuls, the phase alone); the default
    is the fits' short burst."""
    a = torch.randn(n, n, device=device)

    def burst():
        for _ in range(count):
            torch.mm(a, a)

    def both():
        burst()
        fn()
    return both, burst


# _wakeup's compute phases (size, matmuls): the fits' burst (the zero point), ~1 ms, ~8 ms
WAKEUP_BURSTS = ((128, 4), (128, 16), (256, 16))
WAKEUP_BYTES = 1024


def _wakeup(group, device) -> list[tuple[float, float]]:
    """Per phase of WAKEUP_BURSTS: (seconds of the compute phase + a small all-reduce on
    `group`, of the phase alone), every rank running the same loop. `build_cluster` turns them
    into the extra cost of a collective after that much compute: each phase's (loop - phase)
    less the first's, whose cost the fits already hold.

    Why: ranks that share cores (4 gloo ranks on 2) and block in a collective after a long
    compute phase wait for peers preempted by the other ranks' compute; a collective right
    after a short burst (the fits above, 4 matmuls of 128) does not. Measured on 4 ranks,
    2-rank groups, calls timed inside the loop: a 4 KB all-reduce took 0.15 ms back to back,
    1.1-1.3 ms after 0.2 ms of compute, 3-5 ms after 5-25 ms; a 1 MB one 1-2 ms back to back,
    3-7 ms after 5-25 ms. In training (gpt-h256-b32 dp2·tp2, 10-15 ms of compute between tp
    collectives) the tp all-reduces took 1.7-3.8 ms (4 KB) and 3.8-5.9 ms (1 MB) against
    0.8 and 1.6 ms fitted. 16 matmuls of 256 take 6-13 ms per rank with all four computing,
    the scale of a layer's compute in the fidelity plans; a short phase costs less (a 4 KB
    all-reduce: 1.2 ms after 0.2 ms of compute, 3 ms after 0.9 ms), hence several phases."""
    x = torch.ones(WAKEUP_BYTES // 4, device=device)
    return [_collective_timed(lambda: dist.all_reduce(x, group=group), device, 0.5, n, count)
            for n, count in WAKEUP_BURSTS]


def _collective_timed(fn, device, seconds: float = 0.1, n: int = 128, count: int = 4) -> tuple[float, float]:
    """(seconds of a compute burst + `fn`, of the burst alone) on this rank: the pair in
    lockstep samples of `seconds` or more (`_timed`: every rank makes the same calls), the burst
    as the compute figures (`_shared_timed`, every rank busy). `build_cluster` subtracts the
    ranks' medians. Both used to be timed from a 10 ms call count (the burst alone with ranks
    idling at the barrier, a fair share other than in the pair's loop) and the slowest rank's
    difference taken: the fitted latency of 2-rank all-reduces read 0.38, 0.76 and 1.4 ms in
    three CPU profiles of one afternoon."""
    both, burst = _after_compute(fn, device, n, count)
    dist.barrier()
    return _timed(both, device, seconds), _shared_timed(burst, device)


def _send(nbytes: int, device, peer: int):
    """A round trip (two sends) of `nbytes` with rank `peer`; the lower rank sends first."""
    x = torch.ones(max(nbytes // 4, 1), device=device)
    first = dist.get_rank() < peer

    def run():
        if first:
            dist.send(x, peer)
            dist.recv(x, peer)
        else:
            dist.recv(x, peer)
            dist.send(x, peer)
    return run


def _overlap(device, n: int, elements: int) -> float:
    """eta of an async all-reduce of `elements` fp32 on the world under 8 n x n matmuls."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x = torch.ones(elements, device=device)

    def compute():
        for _ in range(8):
            torch.mm(a, b)

    def comm():
        dist.all_reduce(x)

    def both():
        work = dist.all_reduce(x, async_op=True)
        compute()
        work.wait()

    dist.barrier()
    t_c, t_m, t_b = (_timed(f, device, 0.3) for f in (compute, comm, both))
    return float(np.clip((t_c + t_m - t_b) / min(t_c, t_m), 0.0, 1.0))


# What a plan may not count on beyond the memory PyTorch's allocator could reach when profiled
# (which already leaves out the CUDA context, cuBLAS workspaces, the profile's own NCCL
# communicators and other processes): 2 GiB for the communicators a plan's tp / dp / pp groups
# add (NCCL keeps buffers per communicator, channel and protocol, NCCL_BUFFSIZE = 4 MiB by
# default: hundreds of MB per communicator on NVLink machines), and 5% of the rest for the
# caching allocator's rounding and fragmentation (small blocks carved from 2 MiB segments,
# large ones rounded up to 2 MiB, freed blocks split). E.g. 72 GiB of an H100's 79 GiB when
# 1 GiB sits outside the allocator.
CUDA_RESERVE_BYTES = 2 * GB
CUDA_FRAGMENTATION = 0.05


def cuda_memory_budget(total: int, free: int, held: int) -> int:
    """Bytes a plan may fill on a GPU of `total` bytes with `free` bytes free (mem_get_info) and
    `held` in PyTorch's caching allocator (memory_reserved, reusable): the total less what
    lies outside the allocator, CUDA_RESERVE_BYTES and CUDA_FRAGMENTATION."""
    outside = total - free - held
    return int((total - outside - CUDA_RESERVE_BYTES) * (1 - CUDA_FRAGMENTATION))


def _memory_bytes(device, per_node: int) -> int:
    """Bytes a plan may fill on this rank's device: `cuda_memory_budget` on a GPU, else the
    host's RAM shared by the node's ranks."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return cuda_memory_budget(total, free, torch.cuda.memory_reserved(device))
    if not hasattr(os, "sysconf"):
        return 4 * GB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // per_node


def measure_rank(mode: str = "quick") -> dict:
    """Run on every rank of a launched world: this rank's measurements."""
    device = rank_device()
    sizes = SIZES[device.type]
    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    check_nodes(hosts, per_node)
    out = {"device_type": device.type, "ranks_per_node": per_node,
           "matmul_fp32": _matmul_curve(device, torch.float32, sizes["matmul"][mode]),
           "linear_fp32": _linear_curve(device, LINEAR_ROWS[mode], sizes["linear_features"]),
           "memory_bandwidth": _bandwidth(device, sizes["copy_elements"]), "op_overhead": _op_overhead(device),
           "gelu": _gelu_rates(device, sizes["gelu_elements"])}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    if mode == "full" or device.type == "cuda":  # GPUs: mixed precision trains in bf16
        out["matmul_bf16"] = _matmul_curve(device, torch.bfloat16, sizes["matmul"][mode])
    messages = sizes["messages"][mode]
    out["collectives"], out["wakeup"] = [], []
    for (link, size), groups in link_groups(world, per_node).items():
        group, _ = dist.new_subgroups_by_enumeration(groups)
        if link == "intra" and device.type == "cpu":  # GPUs: a device per rank, no cores shared
            out["wakeup"].append((size, _wakeup(group, device)))
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            for nbytes in messages:
                both, burst = _collective_timed(_collective(op, nbytes, group, size, device), device)
                out["collectives"].append((op, size, nbytes, max(both - burst, 0.0), both, burst, link))
        if size == 2:
            peer, = (r for g in groups if rank in g for r in g if r != rank)
            for nbytes in messages:
                both, burst = _collective_timed(_send(nbytes, device, peer), device)  # a round trip: two sends
                out["collectives"].append(("send", 2, nbytes, max(both - burst, 0.0) / 2, both / 2, burst / 2, link))
    out["overlap"] = _overlap(device, *sizes["overlap"]) if world > 1 else 0.0
    out["memory_bytes"] = _memory_bytes(device, per_node)  # last: libraries and communicators have taken theirs
    return out


def fit_alpha_beta(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(latency, seconds per byte) minimising the relative error of latency + bytes * spb.

    Points timed at 0 (a noisy machine: the burst alone took as long as burst + collective)
    carry no information and would weigh 1/0: they are left out."""
    points = [p for p in points if p[1] > 0]
    if not points:
        return 0.0, 0.0
    x = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    w = 1.0 / t
    (latency, spb), *_ = np.linalg.lstsq(np.stack([w, x * w], axis=1), np.ones_like(t), rcond=None)
    if latency < 0:  # keep both non-negative: refit the other alone
        return 0.0, float(np.sum(x * w) / np.sum((x * w) ** 2))
    if spb < 0:
        return float(np.sum(w) / np.sum(w ** 2)), 0.0
    return float(latency), float(spb)


def _gelu_fields(per_rank: list[dict]) -> dict:
    """Device.gelu_rate / gelu_backward_rate: the median rank's (none in older profiles)."""
    if not all("gelu" in r for r in per_rank):
        return {}
    return dict(gelu_rate=statistics.median(r["gelu"][0] for r in per_rank),
                gelu_backward_rate=statistics.median(r["gelu"][1] for r in per_rank))


DEFAULT_LINK = (1e9, 50e-6)  # (bytes/s, seconds) where no all-reduce was measured


def _ring_link(fits, link: str) -> tuple[float, float] | None:
    """(bandwidth, latency) of a ring on `link` from its largest measured all-reduce group
    (2(n-1) steps of latency + bytes / n / bandwidth each), None when none was measured."""
    ring = [f for f in fits if f.op == "all_reduce" and f.link == link]
    if not ring:
        return None
    f = max(ring, key=lambda f: f.group_size)
    steps = 2 * (f.group_size - 1)
    bandwidth = steps / f.group_size / f.seconds_per_byte if f.seconds_per_byte > 0 else DEFAULT_LINK[0]
    return bandwidth, f.latency / steps


def build_cluster(per_rank: list[dict], world: int, backend: str, memory_bytes: int | None = None) -> Cluster:
    """Combine every rank's measurements into a Cluster of `world` devices on nodes of
    "ranks_per_node" ranks (one node in measurements without it); `memory_bytes`: each device's
    memory, else the least any rank measured."""
    first = per_rank[0]

    def median_curve(key):
        return tuple((first[key][i][0], statistics.median(r[key][i][1] for r in per_rank))
                     for i in range(len(first[key])))

    curve = median_curve("matmul_fp32")
    bf16 = median_curve("matmul_bf16") if "matmul_bf16" in first else ()
    linear = median_curve("linear_fp32") if "linear_fp32" in first else ()
    if memory_bytes is None:
        memory_bytes = min(r["memory_bytes"] for r in per_rank)  # a plan must fit on every rank
    peak = bf16 if first.get("device_type") == "cuda" else curve  # the training dtype's: bf16 on GPUs
    device = Device(name=first.get("device_name", f"{backend}-profiled"), memory_bytes=int(memory_bytes),
                    peak_flops=max(rate for _, rate in peak),
                    memory_bandwidth=statistics.median(r["memory_bandwidth"] for r in per_rank),
                    op_overhead=statistics.median(r["op_overhead"][0] for r in per_rank),
                    backward_overhead=statistics.median(r["op_overhead"][1] for r in per_rank), matmul_curve=curve,
                    linear_curve=tuple(sorted(linear)), matmul_curve_bf16=bf16, **_gelu_fields(per_rank))
    samples: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    for i, (op, size, nbytes, *rest) in enumerate(first["collectives"]):
        if len(rest) >= 3:  # (.., both, burst[, link]): the median ranks' difference
            seconds = max(statistics.median(r["collectives"][i][4] for r in per_rank)
                          - statistics.median(r["collectives"][i][5] for r in per_rank), 0.0)
        else:  # older profiles: the slowest rank's
            seconds = max(r["collectives"][i][3] for r in per_rank)
        link = rest[3] if len(rest) > 3 else "intra"  # older profiles: one node
        samples.setdefault((op, size, link), []).append((nbytes, seconds))
    fits = tuple(CollectiveFit(op, size, link, *fit_alpha_beta(points))
                 for (op, size, link), points in samples.items())
    intra = _ring_link(fits, "intra") or DEFAULT_LINK
    inter = _ring_link(fits, "inter") or intra  # one node: no link across nodes measured
    overlap = statistics.median(r["overlap"] for r in per_rank)
    wakeup = []
    for i, (size, phases) in enumerate(first.get("wakeup", ())):
        # every rank's loop takes the same time (the collective keeps them in step); the phase
        # alone is each rank's fair share: the median rank's, as the compute figures
        costs = []
        for j in range(len(phases)):
            both = statistics.median(r["wakeup"][i][1][j][0] for r in per_rank)
            burst = statistics.median(r["wakeup"][i][1][j][1] for r in per_rank)
            costs.append((burst, both - burst))
        base = costs[0][1]  # the fits' own burst: already in the fitted time
        peak_cost = 0.0
        for burst, cost in costs:  # non-decreasing in the phase (noise may dip a later one)
            peak_cost = max(peak_cost, cost - base)
            wakeup.append((size, burst, peak_cost))
    per_node = first.get("ranks_per_node", world)
    nodes = world // per_node
    name = f"profiled{world}-{backend}" if nodes == 1 else f"profiled{nodes}x{per_node}-{backend}"
    return Cluster((NodeGroup(device, nodes, per_node),), *intra, *inter, backend, name, fits, overlap, tuple(wakeup))


def profile_cluster(world_size: int | None = None, path: str | os.PathLike | None = None, quick: bool = False,
                    memory_bytes: int | None = None) -> Cluster:
    """Measure this machine with `world_size` ranks launched here (4 when not given), or, under
    torchrun or in a running process group, the launched world (every rank calls this; its
    nodes are profiled together, links within and across them apart). Rank 0 writes the
    profile JSON to `path`; every rank returns the Cluster."""
    mode = "quick" if quick else "full"
    start = time.perf_counter()
    created = "WORLD_SIZE" in os.environ and not dist.is_initialized()  # under torchrun
    if created:
        init_distributed()
    writer = True
    try:
        if dist.is_initialized():
            world, writer = dist.get_world_size(), dist.get_rank() == 0
            if world_size not in (None, world):
                raise PcompileError(f"profile_cluster({world_size}) runs in a process group of {world} ranks",
                                    f"call profile_cluster() or profile_cluster({world}) on every rank")
            per_rank = [None] * world
            dist.all_gather_object(per_rank, measure_rank(mode))
        else:
            world = world_size or 4
            per_rank = launch(measure_rank, world, mode)
    finally:
        if created:
            dist.destroy_process_group()
    backend = "nccl" if per_rank[0]["device_type"] == "cuda" else "gloo"  # the ranks' devices (rank_device)
    cluster = build_cluster(per_rank, world, backend, memory_bytes)
    if path is not None and writer:
        with open(path, "w") as f:
            json.dump({"cluster": cluster.to_dict(), "world_size": world, "mode": mode,
                       "seconds": time.perf_counter() - start, "measurements": per_rank}, f, indent=1)
    return cluster

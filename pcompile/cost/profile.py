"""Profile the machine at hand into a Cluster: `profile_cluster(world_size, path)`.

Every figure is measured with all `world_size` ranks running at once (as they do in
training), so ranks that share cores or a link are measured sharing them (the compute
figures over a common wall-clock window in which every rank stays busy, `_shared_timed`):
- matmul throughput of square fp32 matmuls by size (the Device's matmul curve; bf16 too in
  the full mode, recorded in the measurements),
- Linear throughput by arithmetic intensity (`_linear_curve`: F.linear of a 1024 x 1024
  weight on m rows; the Device's linear curve),
- memory bandwidth (a large copy: read + write bytes / s),
- GELU throughput, forward and backward, elements / s (`_gelu_rates`),
- the fixed per-op cost (a chain of tiny differentiable ops, forward),
- all_reduce, all_gather and reduce_scatter by group size (the world split into equal
  contiguous groups, all busy) and message size, and point-to-point sends, each fitted as
  time = latency + bytes * seconds_per_byte (least squares on relative error). Each call
  follows a short burst of compute, as in training, and the burst's own time is subtracted:
  ranks that share cores pay the wake-up of a waiting peer, which back-to-back calls hide,
- the wake-up cost of a collective that follows a long compute phase (`_wakeup`), by group
  size: what a tp collective pays in training beyond the fit above,
- the overlap efficiency eta of an async all-reduce running under a matmul loop:
  eta = (t_compute + t_comm - t_both) / min(t_compute, t_comm), clipped to [0, 1], each time
  over samples of a common call count at least 0.3 s long (`_lockstep_timed`).

Medians over samples; per-rank figures are combined as the median rank for compute and, for
collectives, the median rank's loop time less the median rank's burst (the loop runs in step).
The JSON holds {"cluster": Cluster.to_dict(), "measurements": ...}; `Cluster.from_profile(path)`
loads it. The quick mode (tests) takes well under 30 s.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from pcompile.cluster import GB, Cluster, CollectiveFit, Device, NodeGroup
from pcompile.launch import launch
from pcompile.mesh import contiguous_groups

SIZES = {"quick": (64, 128, 256), "full": (32, 64, 128, 256, 512, 1024)}
# full: up to 16 MiB, the size of the runtime's dp gradient buckets (25 MiB at most): a fit of
# messages up to 4 MiB put a 16.8 MB all-reduce on 4 gloo ranks at 18.6 ms, measured 28 ms
MESSAGES = {"quick": (4096, 65536, 1 << 20), "full": (1024, 8192, 65536, 262144, 1 << 20, 4 << 20, 16 << 20)}


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


MIN_SECONDS = 0.01  # a timed sample loops fn for at least this long: ranks sharing cores get time-sliced


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of one `fn()`, over `repeats` samples of back-to-back calls after a warm-up."""
    start = time.perf_counter()
    fn()
    calls = torch.tensor([max(1, int(MIN_SECONDS / max(time.perf_counter() - start, 1e-7)))], device=device)
    dist.all_reduce(calls, op=dist.ReduceOp.MAX)  # every rank makes the same number of (collective) calls
    calls = int(calls.item())
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


WINDOW_SECONDS = 0.1  # a compute sample: every rank loops fn for this wall time, many scheduler slices
WINDOWS = 3


def _shared_timed(fn, device: torch.device) -> float:
    """Median seconds of one `fn()` while every rank runs it for the same wall-clock window.

    Ranks that share cores must all be busy for the whole sample: with a fixed number of calls
    (`_timed`) the rank that finishes first idles at the next barrier and the others run alone
    for the rest, which on 4 ranks of 2 cores measured a 64x64 matmul at 106-109 GFLOP/s (one
    core's rate) instead of the 41-45 GFLOP/s each rank gets while all four compute. On GPUs
    (one per rank) nothing is shared: `_timed`."""
    if device.type == "cuda":
        return _timed(fn, WINDOWS, device)
    fn()
    samples = []
    for _ in range(WINDOWS):
        dist.barrier()
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < WINDOW_SECONDS:
            fn()
            calls += 1
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _matmul_curve(device, dtype, sizes) -> list[tuple[float, float]]:
    curve = []
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _shared_timed(lambda: torch.mm(a, b), device)
        curve.append((2.0 * n ** 3, 2.0 * n ** 3 / seconds))
    return curve


LINEAR_ROWS = {"quick": (32, 128, 512), "full": (16, 32, 64, 128, 256, 512, 1024)}
LINEAR_FEATURES = 1024


def _linear_curve(device, rows) -> list[tuple[float, float]]:
    """(FLOPs per byte of input + weight + output, achieved FLOP/s) of F.linear (x @ W^T + b, the
    form nn.Linear runs) on an [m, 1024] input and a 1024 x 1024 weight, for m in `rows`.

    The square matmul curve rates a matmul by its FLOPs alone; the Linears of a training plan
    have a small batch dim (few rows reuse each weight element) and run slower at the same
    FLOPs. Measured on 4 gloo ranks of 2 cores, all busy: square 512 (268 MFLOP) at 80 GFLOP/s,
    while in mlp-w512-b512 dp4 training the [128, 512] x [512, 2048] Linears (268 MFLOP, 49
    FLOP/byte) ran at 55 GFLOP/s forward (addmm) and 62 backward (mm), torch.profiler on every
    rank: the forward's 19-22 ms against 14.4 predicted."""
    n = LINEAR_FEATURES
    w = torch.randn(n, n, device=device)
    b = torch.randn(n, device=device)
    curve = []
    for m in rows:
        x = torch.randn(m, n, device=device)
        seconds = _shared_timed(lambda: torch.nn.functional.linear(x, w, b), device)
        flops = 2.0 * m * n * n
        curve.append((flops / (4.0 * (m * n + n * n + m * n)), flops / seconds))
    return curve


def _bandwidth(device) -> float:
    x = torch.empty(8 << 20, device=device)  # 32 MB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _shared_timed(lambda: y.copy_(x), device)


GELU_ELEMENTS = 1 << 19


def _gelu_rates(device) -> tuple[float, float]:
    """(forward, backward) elements/s of F.gelu and aten.gelu_backward on 512 K fp32 elements,
    every rank busy (`_shared_timed`, as the matmul curve).

    FlopCounterMode counts no FLOPs for GELU, so the roofline charges it its bytes alone; erf
    per element may be slower than that (CPUs) or not (GPUs: memory-bound, the rate then
    exceeds the roofline's and changes nothing). Measured on 4 gloo ranks of 2 cores (a shared
    machine, load 2-6): 2-5.7 ns/element forward and 3.6-5.7 backward here, against 1-1.8 and
    2-3.5 at the copy bandwidth. In gpt-h256-b32 dp4 training (0.5 M elements per call),
    timed by perf_counter around the calls: medians 0.45 ms forward (0.9 ns/element) and
    1.5 ms backward (2.9), means 0.8-1.7 and 3.6-5 ms (a rank descheduled mid-call); under
    torch.profiler the same calls read 5-20 and 13-30 ms, so profiler figures of GELU
    overstate it several-fold."""
    x = torch.randn(GELU_ELEMENTS, device=device)
    grad = torch.randn_like(x)
    forward = _shared_timed(lambda: torch.nn.functional.gelu(x), device)
    backward = _shared_timed(lambda: torch.ops.aten.gelu_backward(grad, x), device)
    return GELU_ELEMENTS / forward, GELU_ELEMENTS / backward


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


def _groups(world: int, size: int):
    """This rank's group of the world split into consecutive groups of `size` (every rank calls
    new_group for all of them, in one order)."""
    mine = None
    for ranks in contiguous_groups(world, size):
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


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


def _lockstep_timed(fn, device: torch.device, seconds: float) -> float:
    """Median seconds of one `fn()` (which may call collectives) over WINDOWS samples of the same
    call count on every rank, chosen so a sample lasts at least `seconds` on the slowest rank.
    `_timed` picks the count from one call (10 ms worth): with ~1 ms calls the overlap figure,
    three such timings combined, swung between 0.00 and 1.00 from one profile to the next."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    calls = torch.tensor([max(1, int(seconds / max(time.perf_counter() - start, 1e-7)))], device=device)
    dist.all_reduce(calls, op=dist.ReduceOp.MAX)
    calls = int(calls.item())
    samples = []
    for _ in range(WINDOWS):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _collective_timed(fn, device, seconds: float = 0.1, n: int = 128, count: int = 4) -> tuple[float, float]:
    """(seconds of a compute burst + `fn`, of the burst alone) on this rank: the pair in
    lockstep samples of `seconds` or more (every rank makes the same calls), the burst as the
    compute figures (`_shared_timed`, every rank busy). `build_cluster` subtracts the ranks'
    medians. Both used to be `_timed` (a call count from one 10 ms call; the burst alone with
    ranks idling at the barrier, a fair share other than in the pair's loop) and the slowest
    rank's difference: the fitted latency of 2-rank all-reduces read 0.38, 0.76 and 1.4 ms in
    three profiles of one afternoon."""
    both, burst = _after_compute(fn, device, n, count)
    dist.barrier()
    return _lockstep_timed(both, device, seconds), _shared_timed(burst, device)


def _send(nbytes: int, device):
    x = torch.ones(max(nbytes // 4, 1), device=device)
    rank = dist.get_rank()
    peer = rank ^ 1

    def run():
        if rank % 2 == 0:
            dist.send(x, peer)
            dist.recv(x, peer)
        else:
            dist.recv(x, peer)
            dist.send(x, peer)
    return run  # a round trip: two sends


def _overlap(device) -> float:
    n = 256
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x = torch.ones(256 << 10, device=device)  # 1 MB

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
    t_c, t_m, t_b = (_lockstep_timed(f, device, 0.3) for f in (compute, comm, both))
    return float(np.clip((t_c + t_m - t_b) / min(t_c, t_m), 0.0, 1.0))


def measure_rank(mode: str = "quick") -> dict:
    """Run on every rank of a launched world: this rank's measurements."""
    device = _device()
    world = dist.get_world_size()
    out = {"matmul_fp32": _matmul_curve(device, torch.float32, SIZES[mode]),
           "linear_fp32": _linear_curve(device, LINEAR_ROWS[mode]),
           "memory_bandwidth": _bandwidth(device), "op_overhead": _op_overhead(device),
           "gelu": _gelu_rates(device)}
    if mode == "full":
        out["matmul_bf16"] = _matmul_curve(device, torch.bfloat16, SIZES[mode])
    sizes = [s for s in (2, 4, 8, 16) if s <= world and world % s == 0]
    out["collectives"], out["wakeup"] = [], []
    for size in sizes:
        group = _groups(world, size)
        out["wakeup"].append((size, _wakeup(group, device)))
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            for nbytes in MESSAGES[mode]:
                both, burst = _collective_timed(_collective(op, nbytes, group, size, device), device)
                out["collectives"].append((op, size, nbytes, max(both - burst, 0.0), both, burst))
    if world % 2 == 0 and world > 1:
        for nbytes in MESSAGES[mode]:
            both, burst = _collective_timed(_send(nbytes, device), device)  # a round trip: two sends
            out["collectives"].append(("send", 2, nbytes, max(both - burst, 0.0) / 2, both / 2, burst / 2))
    out["overlap"] = _overlap(device) if world > 1 else 0.0
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


def build_cluster(per_rank: list[dict], world: int, backend: str, memory_bytes: int | None = None) -> Cluster:
    """Combine every rank's measurements into a one-node Cluster of `world` devices."""
    def median_curve(key):
        return tuple((per_rank[0][key][i][0], statistics.median(r[key][i][1] for r in per_rank))
                     for i in range(len(per_rank[0][key])))

    curve = median_curve("matmul_fp32")
    linear = median_curve("linear_fp32") if "linear_fp32" in per_rank[0] else ()
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world if hasattr(
            os, "sysconf") else 4 * GB
    device = Device(name=f"{backend}-profiled", memory_bytes=int(memory_bytes),
                    peak_flops=max(rate for _, rate in curve),
                    memory_bandwidth=statistics.median(r["memory_bandwidth"] for r in per_rank),
                    op_overhead=statistics.median(r["op_overhead"][0] for r in per_rank),
                    backward_overhead=statistics.median(r["op_overhead"][1] for r in per_rank), matmul_curve=curve,
                    linear_curve=tuple(sorted(linear)), **_gelu_fields(per_rank))
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for i, (op, size, nbytes, *_) in enumerate(per_rank[0]["collectives"]):
        if len(per_rank[0]["collectives"][i]) >= 6:  # (.., both, burst): the median ranks' difference
            seconds = max(statistics.median(r["collectives"][i][4] for r in per_rank)
                          - statistics.median(r["collectives"][i][5] for r in per_rank), 0.0)
        else:  # older profiles: the slowest rank's
            seconds = max(r["collectives"][i][3] for r in per_rank)
        samples.setdefault((op, size), []).append((nbytes, seconds))
    fits = tuple(CollectiveFit(op, size, "intra", *fit_alpha_beta(points)) for (op, size), points in samples.items())
    bandwidth, latency = 1e9, 50e-6
    ring = [f for f in fits if f.op == "all_reduce"]
    if ring:  # the ring's link figures, from the largest measured all-reduce group
        f = max(ring, key=lambda f: f.group_size)
        steps = 2 * (f.group_size - 1)
        latency = f.latency / steps
        bandwidth = steps / f.group_size / f.seconds_per_byte if f.seconds_per_byte > 0 else bandwidth
    overlap = statistics.median(r["overlap"] for r in per_rank)
    wakeup = []
    for i, (size, phases) in enumerate(per_rank[0].get("wakeup", ())):
        # every rank's loop takes the same time (the collective keeps them in step); the phase
        # alone is each rank's fair share: the median rank's, as the compute figures
        costs = []
        for j in range(len(phases)):
            both = statistics.median(r["wakeup"][i][1][j][0] for r in per_rank)
            burst = statistics.median(r["wakeup"][i][1][j][1] for r in per_rank)
            costs.append((burst, both - burst))
        base = costs[0][1]  # the fits' own burst: already in the fitted time
        peak = 0.0
        for burst, cost in costs:  # non-decreasing in the phase (noise may dip a later one)
            peak = max(peak, cost - base)
            wakeup.append((size, burst, peak))
    return Cluster((NodeGroup(device, 1, world),), bandwidth, latency, bandwidth, latency, backend,
                   f"profiled{world}-{backend}", fits, overlap, tuple(wakeup))


def profile_cluster(world_size: int = 4, path: str | os.PathLike | None = None, quick: bool = False,
                    memory_bytes: int | None = None) -> Cluster:
    """Measure this machine with `world_size` local ranks; write the profile JSON to `path`."""
    mode = "quick" if quick else "full"
    start = time.perf_counter()
    if world_size == 1:
        per_rank = [_single_rank(mode)]
        backend = "gloo"
    else:
        per_rank = launch(measure_rank, world_size, mode)
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    cluster = build_cluster(per_rank, world_size, backend, memory_bytes)
    if path is not None:
        with open(path, "w") as f:
            json.dump({"cluster": cluster.to_dict(), "world_size": world_size, "mode": mode,
                       "seconds": time.perf_counter() - start, "measurements": per_rank}, f, indent=1)
    return cluster


def _single_rank(mode: str) -> dict:
    """One rank, no process group: compute figures only."""
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as f:
        store = dist.FileStore(f.name, 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        return measure_rank(mode)
    finally:
        dist.destroy_process_group()

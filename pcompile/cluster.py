"""Cluster: the devices a plan runs on, as plain frozen data that round-trips through JSON.

A cluster is a list of node groups (each: a device type, how many nodes, devices per node)
plus the links between devices. Ranks are numbered node by node, so ranks
[k * devices_per_node, (k + 1) * devices_per_node) share node k and its fast links.

Calibration is data too: a Device may carry its measured matmul curve and per-op overhead,
a Cluster its measured collective fits (alpha-beta per collective, group size and link) and
the measured overlap efficiency of communication with compute. Presets carry datasheet
figures times a stated efficiency; `Cluster.from_profile(path)` loads what
`pcompile.cost.profile.profile_cluster` measured on the machine at hand.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from pcompile.errors import PcompileError

GB = 1024**3


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    peak_flops: float  # dense FLOP/s at the training dtype, datasheet x stated efficiency
    memory_bandwidth: float  # bytes/s
    op_overhead: float = 0.0  # seconds of fixed cost per forward op (dispatch / kernel launch), profiled
    backward_overhead: float = 0.0  # the same per backward op (autograd node)
    # Measured matmul throughput: (FLOPs of one matmul, achieved FLOP/s), sorted by FLOPs. Empty = peak_flops.
    matmul_curve: tuple[tuple[float, float], ...] = ()
    # Measured Linear throughput by arithmetic intensity: (FLOPs / bytes of input + weight +
    # output, achieved FLOP/s) of F.linear with a small batch dim, sorted. Empty = matmul_curve alone.
    linear_curve: tuple[tuple[float, float], ...] = ()
    # Measured GELU throughput, elements/s forward (F.gelu) and backward (aten.gelu_backward),
    # every rank busy: erf per element is compute-bound on CPUs. 0 = unknown: the roofline alone.
    gelu_rate: float = 0.0
    gelu_backward_rate: float = 0.0
    # matmul_curve in bf16, the dtype mixed precision computes in (on GPUs several times the fp32
    # rate); profiled on GPUs, and on CPUs in the full mode. Empty = not measured.
    matmul_curve_bf16: tuple[tuple[float, float], ...] = ()
    # Achieved dense FLOP/s of the matmuls of a plan without mixed precision (at_precision): IEEE
    # fp32, or TF32 when torch lets fp32 matmuls use it (torch.backends.cuda.matmul.allow_tf32,
    # off by default and left off by pcompile's runtime). 0 = peak_flops / the curves alone (CPUs,
    # profiled devices: their matmul_curve is measured in fp32).
    fp32_flops: float = 0.0
    tf32_flops: float = 0.0
    # Bytes of memory_bytes a plan may not fill: CUDA context and kernels, NCCL buffers, the
    # caching allocator's fragmentation (presets; a profiled device's memory_bytes is already net).
    memory_reserve: int = 0
    # An offloaded optimizer's (Plan.offload_optimizer): bytes/s of this device's copies to and
    # from pinned host memory, and its share of the host's memory bandwidth for the CPU step.
    # 0 = memory_bandwidth (a CPU device: the host is the device).
    host_bandwidth: float = 0.0
    host_step_bandwidth: float = 0.0

    @property
    def host_link(self) -> float:
        return self.host_bandwidth or self.memory_bandwidth

    @property
    def host_step(self) -> float:
        return self.host_step_bandwidth or self.memory_bandwidth

    @property
    def budget(self) -> int:
        """Bytes a plan may fill on this device: memory_bytes less memory_reserve."""
        return self.memory_bytes - self.memory_reserve

    def at_precision(self, mixed_precision: bool) -> "Device":
        """This device as a plan of that precision computes on it (what the cost model prices a
        layer's ops with). Mixed precision (bf16 compute): the bf16 matmul curve where measured,
        else as it is (peak_flops is the bf16 rate on GPUs). fp32: fp32_flops - or tf32_flops when
        torch.backends.cuda.matmul.allow_tf32 is set while planning, as the training script must
        set it too - and a measured fp32 curve, or the bf16 curve capped at that rate. A device
        with neither (CPUs) is returned as it is. Variants are cached (the search's hot path)."""
        tf32 = False
        if not mixed_precision and self.tf32_flops:
            import torch

            tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        key = (id(self), bool(mixed_precision), tf32)
        hit = _PRECISION_VARIANTS.get(key)
        if hit is not None and hit[0] is self:
            return hit[1]
        if mixed_precision:
            variant = dataclasses.replace(self, matmul_curve=self.matmul_curve_bf16) if self.matmul_curve_bf16 \
                else self
        else:
            rate = self.tf32_flops if tf32 else self.fp32_flops
            if rate:
                curve = self.matmul_curve or tuple((f, min(r, rate)) for f, r in self.matmul_curve_bf16)
                variant = dataclasses.replace(self, peak_flops=rate, matmul_curve=curve)
            else:
                variant = self
        _PRECISION_VARIANTS[key] = (self, variant)  # holding self keeps its id from being reused
        return variant


_PRECISION_VARIANTS: dict = {}


@dataclass(frozen=True)
class CollectiveFit:
    """Measured alpha-beta fit of one collective: time = latency + bytes * seconds_per_byte,
    for `group_size` ranks on one link kind ("intra" = inside a node, "inter" = across nodes).
    `bytes` is the per-rank input size (all_reduce, reduce_scatter) or output size (all_gather)."""

    op: str  # "all_reduce", "all_gather", "reduce_scatter", "send"
    group_size: int
    link: str  # "intra" or "inter"
    latency: float
    seconds_per_byte: float


@dataclass(frozen=True)
class NodeGroup:
    device: Device
    num_nodes: int
    devices_per_node: int


@dataclass(frozen=True)
class Cluster:
    node_groups: tuple[NodeGroup, ...]
    intra_node_bandwidth: float  # bytes/s per device, e.g. NVLink
    intra_node_latency: float  # seconds per message
    inter_node_bandwidth: float  # bytes/s per device, e.g. InfiniBand
    inter_node_latency: float
    backend: str = "nccl"  # "nccl" or "gloo"
    name: str = "custom"
    collectives: tuple[CollectiveFit, ...] = ()  # measured fits; the ring model on the links otherwise
    # Overlap efficiency eta of communication running concurrently with compute: the pair takes
    # max(c, m) + (1 - eta) * min(c, m). Measured by profiling; presets state a guess.
    overlap: float = 0.5
    # Measured (group size, compute seconds before the call, extra seconds): what a collective
    # pays on top of its fit when it follows that much compute (ranks sharing cores wake peers
    # preempted by the others' compute; pcompile.cost.profile._wakeup). Empty = nothing extra.
    wakeup: tuple[tuple[int, float, float], ...] = ()
    # Seconds every transfer (collective or send) takes at least from its issue: a slow network's
    # latency, as pcompile.runtime.latency.inject makes one on CPU ranks (with_min_transfer).
    min_transfer: float = 0.0

    def __post_init__(self):
        if not self.node_groups:
            raise PcompileError("the cluster has no node groups (0 devices)",
                                "give at least one NodeGroup with num_nodes >= 1 and devices_per_node >= 1")
        for group in self.node_groups:
            if group.num_nodes < 1 or group.devices_per_node < 1:
                raise PcompileError(
                    f"cluster {self.name!r} has a node group with {group.num_nodes} node(s) x "
                    f"{group.devices_per_node} device(s): a cluster needs at least one device",
                    "use Cluster.preset(...) or Cluster.local(n) with n >= 1")
            if group.device.memory_bytes <= 0:
                raise PcompileError(f"device {group.device.name!r} has {group.device.memory_bytes} bytes of memory",
                                    "give the device's real memory size in bytes (e.g. 80 * 2**30)")
            if group.device.peak_flops <= 0 or group.device.memory_bandwidth <= 0:
                raise PcompileError(f"device {group.device.name!r} has non-positive FLOP/s or bandwidth",
                                    "give positive peak_flops and memory_bandwidth")
        sizes = {g.devices_per_node for g in self.node_groups}
        if len(sizes) > 1:
            raise PcompileError(f"cluster {self.name!r} mixes node sizes {sorted(sizes)} devices per node",
                                "every node must hold the same number of devices; split the job or "
                                "use the smallest node size for all groups")
        for field in ("intra_node_bandwidth", "inter_node_bandwidth"):
            if getattr(self, field) <= 0:
                raise PcompileError(f"cluster {self.name!r} has {field}={getattr(self, field)}",
                                    "give link bandwidths in bytes/s (> 0)")
        if not 0.0 <= self.overlap <= 1.0:
            raise PcompileError(f"cluster {self.name!r} has overlap={self.overlap}",
                                "overlap is an efficiency between 0 (none) and 1 (fully hidden)")
        if self.backend not in ("nccl", "gloo"):
            raise PcompileError(f"unknown backend {self.backend!r}", "use 'nccl' (GPUs) or 'gloo' (CPUs)")

    # -- shape -----------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return sum(g.num_nodes * g.devices_per_node for g in self.node_groups)

    @property
    def devices_per_node(self) -> int:
        return self.node_groups[0].devices_per_node

    @property
    def num_nodes(self) -> int:
        return sum(g.num_nodes for g in self.node_groups)

    def device_of(self, rank: int) -> Device:
        for group in self.node_groups:
            count = group.num_nodes * group.devices_per_node
            if rank < count:
                return group.device
            rank -= count
        raise IndexError(rank)

    def node_of(self, rank: int) -> int:
        if not 0 <= rank < self.num_devices:
            raise IndexError(rank)
        return rank // self.devices_per_node

    def link_kind(self, ranks) -> str:
        """"intra" when every rank of the group sits in one node, else "inter". Nodes hold
        consecutive ranks, so the lowest and highest rank decide (the search asks this for
        groups of hundreds of ranks, hundreds of thousands of times)."""
        ranks = list(ranks)
        if not ranks:
            return "intra"
        return "intra" if self.node_of(min(ranks)) == self.node_of(max(ranks)) else "inter"

    def link_of(self, ranks) -> tuple[float, float]:
        """(bandwidth, latency) of the slowest link a group of these exact ranks uses."""
        if self.link_kind(ranks) == "intra":
            return self.intra_node_bandwidth, self.intra_node_latency
        return self.inter_node_bandwidth, self.inter_node_latency

    def collective_time(self, op: str, nbytes: float, groups, work_only: bool = False) -> float:
        """Seconds of collective `op` run by every group of `groups` (lists of ranks) at once: the
        slowest group's. `nbytes` is per rank (the input of all_reduce / reduce_scatter, the
        output of all_gather, the message of send). A measured fit for (op, group size, link)
        wins; otherwise the ring on the link: all_reduce 2(n-1) alpha + 2(n-1)/n B / bw,
        all_gather and reduce_scatter (n-1) alpha + (n-1)/n B / bw, send alpha + B / bw.
        At least `min_transfer`, unless `work_only`: the transfer's own time, without that
        wait (a wait uses no CPU: it hides wholly behind compute, the work at the overlap eta)."""
        worst = 0.0
        for kind, size in {(self.link_kind(g), len(g)) for g in groups}:
            worst = max(worst, self._collective(op, nbytes, size, kind, work_only))
        return worst

    def _collective(self, op: str, nbytes: float, size: int, kind: str, work_only: bool = False) -> float:
        if nbytes <= 0 or (size <= 1 and op != "send"):
            return 0.0
        work = self._transfer(op, nbytes, size, kind)
        return work if work_only else max(work, self.min_transfer)

    def _transfer(self, op: str, nbytes: float, size: int, kind: str) -> float:
        fit = next((f for f in self.collectives if (f.op, f.group_size, f.link) == (op, size, kind)), None)
        if fit is not None:
            return fit.latency + nbytes * fit.seconds_per_byte
        bandwidth, latency = ((self.intra_node_bandwidth, self.intra_node_latency) if kind == "intra" else
                              (self.inter_node_bandwidth, self.inter_node_latency))
        if op == "send":
            return latency + nbytes / bandwidth
        steps = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}[op] * (size - 1)
        return steps * latency + steps / size * nbytes / bandwidth

    def wakeup_time(self, group_size: int, gap: float) -> float:
        """Seconds a collective on `group_size` ranks pays after `gap` seconds of compute
        (`wakeup`): linear in the gap between the measured points, the end points' beyond."""
        if group_size <= 1 or not self.wakeup:  # presets: no measurement (the search's hot path)
            return 0.0
        points = sorted((g, t) for size, g, t in self.wakeup if size == group_size)
        if not points:
            return 0.0
        return float(np.interp(gap, [g for g, _ in points], [t for _, t in points]))

    @property
    def is_homogeneous(self) -> bool:
        return len({g.device for g in self.node_groups}) == 1

    def min_device(self) -> Device:
        """The slowest, smallest device: a uniform plan must fit and wait for it."""
        devices = [g.device for g in self.node_groups]
        return Device(name=min(d.name for d in devices), memory_bytes=min(d.memory_bytes for d in devices),
                      peak_flops=min(d.peak_flops for d in devices),
                      memory_bandwidth=min(d.memory_bandwidth for d in devices),
                      memory_reserve=min(d.memory_bytes for d in devices) - min(d.budget for d in devices))

    def link(self, group_size: int, stride: int = 1) -> tuple[float, float]:
        """(bandwidth, latency) for a group of `group_size` ranks spaced `stride` apart."""
        span = (group_size - 1) * stride + 1
        if span <= self.devices_per_node:
            return self.intra_node_bandwidth, self.intra_node_latency
        return self.inter_node_bandwidth, self.inter_node_latency

    def with_memory(self, memory_bytes: int) -> "Cluster":
        """The same cluster with every device's memory budget set to `memory_bytes` (what a plan
        may fill: no reserve is taken off it)."""
        groups = tuple(dataclasses.replace(g, device=dataclasses.replace(g.device, memory_bytes=int(memory_bytes),
                                                                         memory_reserve=0))
                       for g in self.node_groups)
        return dataclasses.replace(self, node_groups=groups)

    # -- constructors ----------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "Cluster":
        if name not in PRESETS:
            raise PcompileError(f"unknown cluster preset {name!r}",
                                f"use one of {sorted(PRESETS)} or build a Cluster(...)")
        return PRESETS[name]

    @staticmethod
    def local(num_devices: int, memory_bytes: int | None = None) -> "Cluster":
        """`num_devices` processes on this machine: GPUs with NCCL when enough are present, else CPU with gloo."""
        import torch

        if num_devices < 1:
            raise PcompileError(f"Cluster.local({num_devices}): a cluster needs at least one device",
                                "ask for Cluster.local(n) with n >= 1")
        if torch.cuda.is_available() and torch.cuda.device_count() >= num_devices:
            props = torch.cuda.get_device_properties(0)
            # a GPU in DATASHEET_FLOPS computes fp32 plans at its fp32 / TF32 rate (at_precision);
            # memory_bytes given: the budget itself, else the GPU's memory less gpu_reserve
            peaks = DATASHEET_FLOPS.get(props.name)
            rates = dict(fp32_flops=peaks["fp32"] * EFFICIENCY, tf32_flops=peaks["tf32"] * EFFICIENCY) if peaks else {}
            device = Device(name=props.name, memory_bytes=memory_bytes or props.total_memory,
                            peak_flops=_GPU_FLOPS.get(props.name, 100e12) * EFFICIENCY,
                            memory_bandwidth=2.0e12, op_overhead=LAUNCH_OVERHEAD, backward_overhead=LAUNCH_OVERHEAD,
                            memory_reserve=0 if memory_bytes else gpu_reserve(props.total_memory), **rates)
            return Cluster((NodeGroup(device, 1, num_devices),), 200e9, 10e-6, 25e9, 20e-6, "nccl",
                           f"local{num_devices}-cuda")
        # CPU ranks share this machine's cores and memory: figures of a 2-core box with gloo
        # over loopback; `pcompile profile` measures the real ones (Cluster.from_profile).
        device = Device(name="cpu", memory_bytes=memory_bytes or 4 * GB, peak_flops=20e9, memory_bandwidth=10e9)
        return Cluster((NodeGroup(device, 1, num_devices),), 1.0e9, 50e-6, 1.0e9, 50e-6, "gloo",
                       f"local{num_devices}-cpu")

    @staticmethod
    def from_profile(path) -> "Cluster":
        """The cluster measured by `pcompile.cost.profile.profile_cluster` (its JSON file at `path`)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise PcompileError(f"cannot read cluster profile {str(path)!r}: {exc}",
                                "write one with pcompile.cost.profile.profile_cluster(path=...)") from None
        if "cluster" not in data:
            raise PcompileError(f"{str(path)!r} is not a cluster profile (no 'cluster' entry)",
                                "write one with pcompile.cost.profile.profile_cluster(path=...)")
        return Cluster.from_dict(data["cluster"])

    def with_min_transfer(self, seconds: float) -> "Cluster":
        """This cluster with every transfer taking at least `seconds` (see `min_transfer`): what
        the cost model charges for plans run under pcompile.runtime.latency.inject(ms)."""
        return dataclasses.replace(self, min_transfer=seconds, name=f"{self.name}+{seconds * 1e3:g}ms")

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "Cluster":
        try:
            groups = tuple(NodeGroup(_device(g["device"]), g["num_nodes"], g["devices_per_node"])
                           for g in data["node_groups"])
            fields = {k: v for k, v in data.items() if k not in ("node_groups", "collectives", "wakeup")}
            fits = tuple(CollectiveFit(**c) for c in data.get("collectives", ()))
            wakeup = tuple((int(size), float(g), float(t)) for size, g, t in data.get("wakeup", ()))
            return Cluster(node_groups=groups, collectives=fits, wakeup=wakeup, **fields)
        except (KeyError, TypeError) as exc:
            raise PcompileError(f"malformed cluster JSON: {exc}", "write it with Cluster.to_json()") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Cluster":
        return Cluster.from_dict(json.loads(text))


def _device(data: dict) -> Device:
    fields = dict(data)
    for curve in ("matmul_curve", "linear_curve", "matmul_curve_bf16"):
        fields[curve] = tuple(tuple(point) for point in fields.get(curve, ()))
    return Device(**fields)


# Datasheet dense bf16 peaks times a stated efficiency, for GPUs without measured figures below
# (V100, a local GPU not in DATASHEET_FLOPS): large GEMMs reach ~70% of peak in practice.
EFFICIENCY = 0.7
# Dense (no sparsity) datasheet peaks by the name torch.cuda.get_device_name gives, per precision:
# NVIDIA A100 Tensor Core GPU datasheet (SXM4: FP32 19.5, TF32 156, BF16 312 TFLOPS); NVIDIA H100
# Tensor Core GPU datasheet (SXM5: FP32 67, TF32 494.7, BF16 989.4; PCIe: 51, 378, 756); the H200
# has the H100 SXM's compute (NVIDIA H200 datasheet). The datasheets quote the sparse rates for
# TF32 / BF16 (2x these).
DATASHEET_FLOPS = {
    "NVIDIA A100-SXM4-80GB": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
    "NVIDIA A100-SXM4-40GB": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
    "NVIDIA H100 80GB HBM3": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "NVIDIA H100 PCIe": {"fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12},
    "NVIDIA H200": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12},
}
_GPU_FLOPS = {name: peaks["bf16"] for name, peaks in DATASHEET_FLOPS.items()}


def datasheet_peak(gpu_name: str, mixed_precision: str | None) -> float | None:
    """The datasheet peak FLOP/s of a GPU (by its CUDA name) for a run's precision: bf16 under
    mixed_precision="bf16", else fp32 - or TF32 when torch lets fp32 matmuls use it
    (torch.backends.cuda.matmul.allow_tf32); None for a GPU not in DATASHEET_FLOPS. The MFU
    denominator (model FLOPs per second over this)."""
    import torch

    peaks = DATASHEET_FLOPS.get(gpu_name)
    if peaks is None:
        return None
    if mixed_precision == "bf16":
        return peaks["bf16"]
    return peaks["tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"]


# -- GPU presets from public measurements ------------------------------------------------------------
# Compute. Achievable dense bf16 matmul FLOP/s: the Maximum Achievable Matmul FLOPS (MAMF) table of
# S. Bekman's "Machine Learning Engineering" (github.com/stas00/ml-engineering,
# compute/accelerator/README.md, v2 table: mean of 100 matmuls at the best shape found, torch
# 2.6-2.7 / CUDA 12.6): A100 SXM 271.2 TFLOPS of 312 (86.9%, shape 1024x10240x5120), H100 SXM
# 794.5 of 989 (80.3%, 2048x2048x13312). No public MAMF exists for fp32 / TF32: their datasheet
# peaks (DATASHEET_FLOPS) times the same efficiency (stated, not measured).
MAMF_EFFICIENCY = {"A100": 271.2 / 312, "H100": 794.5 / 989.4}
# Efficiency by size: a GEMM's time is max(FLOPs / rate, bytes / HBM bandwidth) plus the launch
# overhead below (pcompile.cost.pricing.op_time), so small GEMMs fall short of the MAMF rate: on
# an A100 in bf16 a 1024^3 matmul reaches ~61% of the 271 TFLOPS, 2048^3 ~93%, 4096^3 ~99%
# (tests/test_gpu_presets.py). Wave and tile quantisation (NVIDIA "Matrix Multiplication Background
# User's Guide") are not modelled: no public table of them by shape was at hand.
# HBM bandwidth: datasheets (A100 80GB SXM 2039 GB/s, 40GB 1555 GB/s; H100 SXM 3.35 TB/s).
# Launch overhead: "about 4-6 us" per kernel submitted by the CPU (driver + runtime calls), measured
# in "pegainfer (3): From Launch Overhead to CUDA Graph" (susun-blog.com, CUDA 13): 5 us per op,
# forward and backward (each gradient matmul is its own launch).
LAUNCH_OVERHEAD = 5e-6
# Memory reserve: the CUDA context and kernels, 1343 MB measured by Hugging Face ("Model training
# anatomy", transformers docs: "the kernels alone take up 1.3GB"); 2 GiB for the NCCL communicators
# of a plan's tp / dp / pp groups and 5% of the rest for the caching allocator's fragmentation - the
# figures pcompile.cost.profile.cuda_memory_budget takes off a profiled GPU (NCCL_BUFFSIZE is 4 MiB
# per channel and peer by default, NCCL docs; the 5% is this project's margin: Galvatron reserves
# 20% of its budget, ZeRO-R (Rajbhandari et al., SC'20) reports OOM with over 30% free in extreme
# fragmentation). An 80 GiB device leaves a plan ~72.8 GiB.
CUDA_CONTEXT_BYTES = 1343 * 2**20
NCCL_RESERVE_BYTES = 2 * GB
FRAGMENTATION = 0.05


def gpu_reserve(memory_bytes: int) -> int:
    """Bytes of a GPU of `memory_bytes` that a plan may not fill (see above)."""
    rest = memory_bytes - CUDA_CONTEXT_BYTES - NCCL_RESERVE_BYTES
    return int(memory_bytes - rest * (1 - FRAGMENTATION))


# Host side, for an offloaded optimizer. PCIe: Gen4 x16 (A100 SXM4) 31.5 GB/s per direction, Gen5
# x16 (H100 SXM5) 63 GB/s (PCI-SIG line rates, 128b/130b); pinned cudaMemcpy reaches about 80% of
# it (the project's stated figure, not measured here: ~25 and ~50 GB/s). Host memory: DGX A100's
# two AMD EPYC 7742 (8 channels of DDR4-3200 each, 409.6 GB/s), DGX H100's two Xeon Platinum 8480C
# (8 of DDR5-4800 each, 614.4 GB/s) (NVIDIA DGX A100 / H100 user guides, AMD / Intel datasheets),
# at 70% (a STREAM-like share; stated, not measured), shared by the node's 8 GPUs.
PCIE_PINNED = {"A100": 31.5e9 * 0.8, "H100": 63e9 * 0.8}
HOST_MEMORY_PER_GPU = {"A100": 409.6e9 * 0.7 / 8, "H100": 614.4e9 * 0.7 / 8}


def _gpu(name: str, cuda_name: str, family: str, memory_bytes: int, hbm: float) -> Device:
    peaks, eff = DATASHEET_FLOPS[cuda_name], MAMF_EFFICIENCY[family]
    return Device(name, memory_bytes, peaks["bf16"] * eff, hbm, op_overhead=LAUNCH_OVERHEAD,
                  backward_overhead=LAUNCH_OVERHEAD, fp32_flops=peaks["fp32"] * eff, tf32_flops=peaks["tf32"] * eff,
                  memory_reserve=gpu_reserve(memory_bytes), host_bandwidth=PCIE_PINNED[family],
                  host_step_bandwidth=HOST_MEMORY_PER_GPU[family])


A100_80GB = _gpu("A100-80GB", "NVIDIA A100-SXM4-80GB", "A100", 80 * GB, 2.039e12)
A100_40GB = _gpu("A100-40GB", "NVIDIA A100-SXM4-40GB", "A100", 40 * GB, 1.555e12)
H100_80GB = _gpu("H100-80GB", "NVIDIA H100 80GB HBM3", "H100", 80 * GB, 3.35e12)
# NVIDIA V100 datasheet (SXM2): 125 TFLOPS fp16 tensor, 15.7 fp32, 900 GB/s HBM2; no bf16 or TF32
# (mixed precision priced at the fp16 tensor rate), no public MAMF: EFFICIENCY.
V100_32GB = Device("V100-32GB", 32 * GB, 125e12 * EFFICIENCY, 0.9e12, fp32_flops=15.7e12 * EFFICIENCY,
                   op_overhead=LAUNCH_OVERHEAD, backward_overhead=LAUNCH_OVERHEAD, memory_reserve=gpu_reserve(32 * GB))

# Links, as nccl-tests report bus bandwidth (busbw: the ring's per-rank rate, what the ring model
# 2(n-1)/n B / bw takes). NVLink: 8 x A100-SXM4-80GB all_reduce_perf busbw ~200 GB/s
# (NVIDIA/nccl-tests#149, NCCL 2.18) and 208 GB/s (NVIDIA/nccl-tests#178); 8 x H100: NCCL reaches
# ~370 GB/s of the 450 GB/s NVLink4 line rate with rings (every collective), ~480 GB/s all-reduce
# busbw with NVLink SHARP (NVIDIA/nccl-tests#212, S. Jeaugey of NVIDIA): one bandwidth per link
# here, so the ring's 370. InfiniBand: one NIC per GPU (DGX A100: 8 x 200 Gb/s HDR = 25 GB/s per
# GPU; DGX H100: 8 x 400 Gb/s NDR = 50 GB/s, NVIDIA DGX datasheets), at the 96% of line rate
# all_reduce_perf reached over HDR in NVIDIA/nccl-tests#119 (96 of 100 GB/s peak). Latencies
# (5 us NVLink, 10 us IB per ring step) are the earlier presets' and have no public measurement here.
NVLINK_BUSBW = {"A100": 200e9, "H100": 370e9}
IB_PER_GPU = {"A100": 25e9 * 0.96, "H100": 50e9 * 0.96}


def dgx_cluster(device: Device, num_nodes: int, family: str, name: str | None = None) -> Cluster:
    """`num_nodes` DGX-style nodes of 8 `device`s on NVLink, one InfiniBand NIC per GPU."""
    name = name or (f"{num_nodes}x8x{device.name}" if num_nodes > 1 else f"8x{device.name}")
    return Cluster((NodeGroup(device, num_nodes, 8),), NVLINK_BUSBW[family], 5e-6, IB_PER_GPU[family], 10e-6,
                   "nccl", name)


PRESETS: dict[str, Cluster] = {
    "8xA100-80GB": dgx_cluster(A100_80GB, 1, "A100"),
    "8xA100-40GB": dgx_cluster(A100_40GB, 1, "A100"),
    "8xH100-80GB": dgx_cluster(H100_80GB, 1, "H100"),
    "2x8xA100-80GB": dgx_cluster(A100_80GB, 2, "A100"),
    "2x8xH100-80GB": dgx_cluster(H100_80GB, 2, "H100"),
    "16xA100-80GB": dgx_cluster(A100_80GB, 2, "A100", "16xA100-80GB"),
    "128x8xA100-80GB": dgx_cluster(A100_80GB, 128, "A100"),
    "4xA100-80GB+4xV100-32GB": Cluster(
        (NodeGroup(A100_80GB, 1, 4), NodeGroup(V100_32GB, 1, 4)), 150e9, 5e-6, 12.5e9, 10e-6, "nccl",
        "4xA100-80GB+4xV100-32GB"),
}

"""Plan: which layer gets which parallelism, as frozen data that prints and round-trips JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pcompile.errors import PcompileError


@dataclass(frozen=True)
class Strategy:
    """How one layer runs: tp-way tensor parallel inside a dp-way data-parallel group."""

    dp: int = 1
    tp: int = 1
    sdp: bool = False  # data-parallel group shards parameters (ZeRO-3) instead of replicating them
    sp: bool = False  # sequence parallel in the tp group's layernorm/dropout regions
    checkpoint: bool = False  # recompute the layer's activations in backward
    split: int = 1  # operator split: large Linears run as `split` chunks
    # ZeRO-2: parameters replicated over the dp group, gradients reduce-scattered and optimizer
    # states kept for this rank's 1/dp shard only (pcompile.runtime.zero2)
    zero2: bool = False
    # expert parallelism: a mixture of experts' experts sharded over groups of `ep` ranks inside
    # the dp group, tokens dispatched to them with all-to-all (passes/expert_parallel.py)
    ep: int = 1
    # expert tensor parallelism (with ep > 1 and tp > 1, checked by passes/expert_parallel.py):
    # each expert's two Linears split Megatron-style over the tp group instead of whole on every
    # tp rank; left out of the JSON when off, so plans written before it read and write the same bytes
    etp: bool = False

    def __post_init__(self):
        for name in ("dp", "tp", "split", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PcompileError(f"strategy field {name}={value!r} must be a positive integer",
                                    f"set {name} to 1 or more")
        for name in ("sdp", "sp", "checkpoint", "zero2", "etp"):
            if not isinstance(getattr(self, name), bool):
                raise PcompileError(f"strategy field {name}={getattr(self, name)!r} must be true or false",
                                    f"set {name} to true or false")
        if self.sp and self.tp == 1:
            raise PcompileError("sequence parallelism (sp) needs tp > 1", "set sp=false or tp >= 2")
        if self.zero2 and self.sdp:
            raise PcompileError("zero2 (sharded gradients and optimizer states) and sdp (ZeRO-3, sharded parameters "
                                "too) are exclusive", "set zero2=false or sdp=false")
        if self.zero2 and self.dp == 1:
            raise PcompileError("zero2 shards over the data-parallel group and needs dp > 1",
                                "set zero2=false or dp >= 2")
        if self.dp % self.ep:
            raise PcompileError(f"expert parallelism ep={self.ep} must divide the data-parallel degree dp={self.dp} "
                                "(the ep groups lie inside the dp group)", "choose ep among the divisors of dp")

    @property
    def sharded_grads(self) -> bool:
        """ZeRO-3 or ZeRO-2 over dp > 1: gradients reduce-scattered into this rank's shards."""
        return (self.sdp or self.zero2) and self.dp > 1

    @property
    def num_devices(self) -> int:
        return self.dp * self.tp

    def describe(self) -> str:
        parts = [f"{'sdp' if self.sdp else 'z2dp' if self.zero2 else 'dp'}{self.dp}", f"tp{self.tp}"]
        if self.sp:
            parts.append("sp")
        if self.checkpoint:
            parts.append("ckpt")
        if self.split > 1:
            parts.append(f"split{self.split}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.etp:
            parts.append("etp")
        return "·".join(parts)


@dataclass(frozen=True)
class Estimate:
    """What the cost model predicts for a plan (seconds and bytes per device)."""

    step_time: float
    peak_memory: int
    compute_time: float = 0.0
    comm_time: float = 0.0
    memory_budget: int = 0


@dataclass(frozen=True)
class Candidate:
    """A plan the search weighed: its strategy, its estimate, and why it lost (if it did)."""

    strategy: Strategy
    estimate: Estimate | None
    verdict: str  # "chosen", "slower", "out of memory: ...", "invalid: ..."


@dataclass(frozen=True)
class LayerAssignment:
    layer: str
    strategy: Strategy
    stage: int = 0


@dataclass(frozen=True)
class Plan:
    num_devices: int
    default: Strategy = Strategy()
    layers: tuple[LayerAssignment, ...] = ()
    pp: int = 1
    num_microbatches: int = 1
    schedule: str = "1F1B"
    virtual_stages: int = 1  # model chunks per pp rank (Interleaved1F1B: >= 2); stage s runs on pp rank s mod pp
    model: str = ""  # fingerprint of the model the plan was made for ("" = any)
    global_batch: int | None = None  # samples per step the plan was made for (None = the example inputs')
    # ZeRO-Offload: fp32 master weights, their gradients and the optimizer's moments in host
    # memory, the step on the CPU (pcompile.runtime.precision.MasterWeights(offload=True))
    offload_optimizer: bool = False
    estimate: Estimate | None = None
    candidates: tuple[Candidate, ...] = field(default=(), compare=False)
    reason: str = field(default="", compare=False)
    explanation: str = field(default="", compare=False)  # the search's per-layer reasoning

    def __post_init__(self):
        for name in ("num_devices", "pp", "num_microbatches", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PcompileError(f"plan field {name}={value!r} must be a positive integer",
                                    f"set {name} to 1 or more")
        if self.global_batch is not None and (not isinstance(self.global_batch, int)
                                              or isinstance(self.global_batch, bool) or self.global_batch < 1):
            raise PcompileError(f"plan field global_batch={self.global_batch!r} must be a positive integer or None",
                                "set global_batch to the samples per step, or leave it out")
        if self.schedule not in ("GPipe", "1F1B", "Interleaved1F1B"):
            raise PcompileError(f"unknown pipeline schedule {self.schedule!r}",
                                "use 'GPipe', '1F1B' or 'Interleaved1F1B'")
        if self.schedule == "Interleaved1F1B" and self.virtual_stages < 2:
            raise PcompileError(f"schedule Interleaved1F1B needs virtual_stages >= 2 (model chunks per pp rank), "
                                f"the plan has {self.virtual_stages}", "set virtual_stages=2 or use schedule '1F1B'")
        if self.schedule != "Interleaved1F1B" and self.virtual_stages != 1:
            raise PcompileError(f"virtual_stages={self.virtual_stages} needs schedule Interleaved1F1B, the plan "
                                f"uses {self.schedule}", "set schedule='Interleaved1F1B' or virtual_stages=1")
        num_stages = self.pp * self.virtual_stages  # stages are numbered 0..pp*v-1, stage s on pp rank s mod pp
        for assignment in self.layers:
            if not isinstance(assignment.stage, int) or isinstance(assignment.stage, bool) \
                    or not 0 <= assignment.stage < num_stages:
                raise PcompileError(f"layer {assignment.layer!r} is assigned to stage {assignment.stage!r} but the "
                                    f"plan has pp={self.pp} x virtual_stages={self.virtual_stages} = {num_stages} "
                                    "stages", f"use stages 0..{num_stages - 1}")
            if assignment.strategy.num_devices * self.pp != self.num_devices:
                raise PcompileError(
                    f"layer {assignment.layer!r} uses {assignment.strategy.describe()} = "
                    f"{assignment.strategy.num_devices} devices per stage, but the plan has "
                    f"{self.num_devices // self.pp} per stage", "make every layer's dp * tp equal devices / pp")
        if self.offload_optimizer:
            self._check_offload()
        stages = [a.stage for a in self.layers]
        if stages != sorted(stages):
            raise PcompileError("the plan's layers are not in stage order (stages must be contiguous)",
                                "list layers in model order with non-decreasing stage numbers")
        if self.default.num_devices * self.pp != self.num_devices:
            raise PcompileError(
                f"plan uses dp={self.default.dp} x tp={self.default.tp} x pp={self.pp} = "
                f"{self.default.num_devices * self.pp} devices but says num_devices={self.num_devices}",
                "make dp * tp * pp equal the number of devices")

    def _check_offload(self) -> None:
        """What the offloaded optimizer runs with: one stage, and every data-parallel layer ZeRO-3
        (its gradient chunks reduce-scattered on the device, then copied to the host masters; a
        replicated layer's all-reduce would have to run on host tensors, which NCCL cannot)."""
        if self.pp > 1:
            raise PcompileError(f"offload_optimizer with pp={self.pp}: offloading runs in one-stage plans only",
                                "use pp=1 with offload_optimizer, or keep the optimizer on the devices")
        plain = [s for s in (self.default, *(a.strategy for a in self.layers)) if s.dp > 1 and not s.sdp]
        if plain:
            raise PcompileError(f"offload_optimizer with {plain[0].describe()}: an offloaded optimizer needs every "
                                "data-parallel layer sharded with ZeRO-3 (sdp)",
                                "set sdp=True on the layers with dp > 1, or keep the optimizer on the devices")

    @staticmethod
    def uniform(dp: int = 1, tp: int = 1, pp: int = 1, offload_optimizer: bool = False, **strategy) -> "Plan":
        """One strategy for every layer, e.g. Plan.uniform(dp=2, tp=2)."""
        default = Strategy(dp=dp, tp=tp, **strategy)
        return Plan(num_devices=dp * tp * pp, default=default, pp=pp, offload_optimizer=offload_optimizer)

    def explain(self) -> str:
        """Per layer: the chosen strategy, its time and memory, the runner-ups, the binding
        memory constraint, and the gain over each baseline (what the search wrote)."""
        return self.explanation or str(self)

    def strategy_for(self, layer: str) -> Strategy:
        for assignment in self.layers:
            if assignment.layer == layer:
                return assignment.strategy
        return self.default

    def describe_schedule(self) -> str:
        """e.g. "Interleaved1F1B, 2 virtual stages per rank, 4 micro-batches"."""
        chunks = f", {self.virtual_stages} virtual stages per rank" if self.virtual_stages > 1 else ""
        return f"{self.schedule}{chunks}, {self.num_microbatches} micro-batches"

    # -- text ------------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"Plan for {self.num_devices} device(s): {self.default.describe()}"
                 + (f" x pp{self.pp} ({self.describe_schedule()})" if self.pp > 1 else "")
                 + (f", global batch {self.global_batch}" if self.global_batch else "")
                 + (", optimizer offloaded to the host" if self.offload_optimizer else "")]
        for assignment in self.layers:
            lines.append(f"  {assignment.layer:<24} {assignment.strategy.describe():<20} stage {assignment.stage}")
        if self.estimate is not None:
            e = self.estimate
            lines.append(f"  predicted step {e.step_time * 1e3:.2f} ms (compute {e.compute_time * 1e3:.2f} ms, "
                         f"communication {e.comm_time * 1e3:.2f} ms), peak memory "
                         f"{e.peak_memory / 2**30:.3f} GiB of {e.memory_budget / 2**30:.1f} GiB")
        if self.reason:
            lines.append(f"  why: {self.reason}")
        if self.candidates:
            lines.append("  candidates:")
            for c in self.candidates:
                time = f"{c.estimate.step_time * 1e3:9.2f} ms" if c.estimate else " " * 12
                mem = f"{c.estimate.peak_memory / 2**30:8.3f} GiB" if c.estimate else ""
                lines.append(f"    {c.strategy.describe():<14} {time} {mem}  {c.verdict}")
        return "\n".join(lines)

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _without_etp_off(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(data: dict) -> "Plan":
        try:
            def estimate(e):
                return None if e is None else Estimate(**e)

            return Plan(
                num_devices=data["num_devices"],
                default=Strategy(**data["default"]),
                layers=tuple(LayerAssignment(a["layer"], Strategy(**a["strategy"]), a.get("stage", 0))
                             for a in data.get("layers", ())),
                pp=data.get("pp", 1),
                num_microbatches=data.get("num_microbatches", 1),
                schedule=data.get("schedule", "1F1B"),
                # plans written before the field existed ran interleaved 1F1B with 2 chunks per rank
                virtual_stages=data.get("virtual_stages", 2 if data.get("schedule") == "Interleaved1F1B" else 1),
                model=data.get("model", ""),
                global_batch=data.get("global_batch"),
                offload_optimizer=data.get("offload_optimizer", False),
                estimate=estimate(data.get("estimate")),
                candidates=tuple(Candidate(Strategy(**c["strategy"]), estimate(c["estimate"]), c["verdict"])
                                 for c in data.get("candidates", ())),
                reason=data.get("reason", ""),
                explanation=data.get("explanation", ""),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PcompileError(f"malformed plan: {type(exc).__name__}: {exc}",
                                "write plans with Plan.to_json() (or `pcompile plan --out`) and do not edit "
                                "their structure by hand") from None

    @staticmethod
    def from_json(text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PcompileError(f"plan is not valid JSON: {exc}", "write plans with Plan.to_json()") from None
        if not isinstance(data, dict):
            raise PcompileError("plan JSON is not an object", "write plans with Plan.to_json()")
        return Plan.from_dict(data)


def _without_etp_off(data):
    """Every strategy's `etp` dropped where false (the field came after plans were pinned)."""
    if isinstance(data, dict):
        return {k: _without_etp_off(v) for k, v in data.items() if not (k == "etp" and not v)}
    if isinstance(data, (list, tuple)):
        return type(data)(_without_etp_off(v) for v in data)
    return data

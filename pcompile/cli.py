"""The `pcompile` command (also `python -m pcompile`).

  pcompile plan MODEL --cluster 8xA100-80GB [--memory 16GB] [--batch 8[,16,...] --seq 2048] [--out plan.json]
                [--json] [--debug-dir DIR] [--onnx DIR] [--plot DIR]
  pcompile explain plan.json
  pcompile run MODEL --plan plan.json [--local N] [--steps K]     (or under torchrun --nproc-per-node N)
  pcompile profile | pcompile demo

MODEL is a built-in name (see `pcompile.cli.BUILTINS`) or `path/file.py:factory` (`path/file.py`
alone when the file defines one public function: that is the factory). The factory is called
with `batch=` and `seq=` when the user gave them and its signature takes them; it returns
`(model, example_inputs)` (the model's forward(*example_inputs) returns the loss), or a model
alone when the model is a pcompile GPT or MLPModel (inputs are then built from its cfg).
A built-in model's default batch and sequence length are the published ones it was trained
with (pcompile.models.GPT_BATCHES: e.g. gpt3-175b 1536 x 2048).
Built-in models are built on the meta device for planning (no weights are allocated), so a
laptop plans gpt3-175b; `run` builds real weights. Cluster: a preset name, `localN` (N ranks on
this machine) or a cluster JSON file. Sizes: `16GB` means 16 GiB (GPU memory is quoted in GiB).

User errors (unknown model or preset, a malformed or mismatched plan) print one line on stderr
and exit with status 2. Output is rich tables on a terminal and plain text when piped; `--json`
prints machine-readable JSON only.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

from pcompile import report

BUILTINS = ("gpt-tiny", "gpt-small", "gpt-1.3b", "gpt-7b", "llama-7b", "gpt3-175b")
ALIASES = {"llama-7b": "gpt-7b"}
UNITS = {"": 1, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
         "tb": 2**40, "tib": 2**40}


def _error(cause: str, fix: str):
    from pcompile.errors import PcompileError

    return PcompileError(cause, fix)


# -- inputs: models, clusters, sizes, plans -------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    model: torch.nn.Module
    inputs: tuple
    tokens: int  # tokens (or samples) per global batch
    unit: str  # "tokens" or "samples"
    builtin: str | None = None  # GPT_CONFIGS key, to draw fresh random batches


def _tokens(inputs: tuple) -> tuple[int, str]:
    first = inputs[0]
    if isinstance(first, torch.Tensor) and not first.dtype.is_floating_point and first.dim() >= 2:
        return first.numel(), "tokens"
    return (int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1), "samples"


def _builtin(name: str, batch: int | None, seq: int | None, meta: bool) -> Workload:
    """A built-in GPT with `batch` sequences of `seq` tokens; by default the batch and sequence
    length it was published with (pcompile.models.GPT_BATCHES, GPT_CONFIGS)."""
    from pcompile.models import GPT, GPT_BATCHES, GPT_CONFIGS

    cfg = GPT_CONFIGS[ALIASES.get(name, name)]
    if seq is not None:
        cfg = dataclasses.replace(cfg, seq_len=seq)
    batch = batch or GPT_BATCHES[ALIASES.get(name, name)]
    device = torch.device("meta" if meta else "cpu")
    with device:
        model = GPT(cfg)
    x = torch.zeros(batch, cfg.seq_len, dtype=torch.long, device=device)
    return Workload(name, model, (x, x), batch * cfg.seq_len, "tokens", ALIASES.get(name, name))


def _from_file(spec: str, batch: int | None, seq: int | None) -> Workload:
    path, _, factory_name = spec.rpartition(":") if not spec.endswith(".py") else (spec, "", "")
    if not os.path.isfile(path):
        raise _error(f"model file {path!r} does not exist", "give MODEL as path/file.py:factory or a built-in name")
    module_spec = importlib.util.spec_from_file_location(f"pcompile_user_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory_name = factory_name or _only_factory(path, module)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise _error(f"{path} has no function {factory_name!r}", f"define def {factory_name}(): return model, inputs")
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("batch", batch), ("seq", seq)) if v is not None and k in accepted}
    made = factory(**kwargs)
    model, inputs = made if isinstance(made, tuple) else (made, _default_inputs(made, batch))
    if not isinstance(model, torch.nn.Module):
        raise _error(f"{spec} returned {type(model).__name__}, not an nn.Module",
                     "return (model, example_inputs) from the factory")
    return Workload(spec, model, tuple(inputs), *_tokens(tuple(inputs)))


def _only_factory(path: str, module) -> str:
    """The factory of a model file given without `:factory`: its one public function (imported
    ones do not count); several or none are refused naming the path/file.py:factory form."""
    defined = {name: obj for name, obj in vars(module).items()
               if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__}
    functions = [name for name, obj in defined.items() if inspect.isfunction(obj)]
    if len(functions) == 1:
        return functions[0]
    if functions:
        raise _error(f"{path} defines {len(functions)} functions ({', '.join(functions)}): which one builds the model "
                     "is not clear", f"name the factory as {path}:{functions[0]} (path/file.py:factory)")
    classes = [name for name, obj in defined.items() if isinstance(obj, type) and issubclass(obj, torch.nn.Module)]
    model = f"return {classes[0]}(...), example_inputs" if classes else "return model, example_inputs"
    raise _error(f"{path} defines no factory function" + (f" (only the module class {classes[0]})" if classes else ""),
                 f"add def build(): {model} to it and pass {path}:build (path/file.py:factory)")


def _default_inputs(model, batch: int | None) -> tuple:
    from pcompile.models import GPTConfig, MLPConfig, gpt_inputs, mlp_inputs

    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, GPTConfig):
        return gpt_inputs(cfg, batch or 8)
    if isinstance(cfg, MLPConfig):
        return mlp_inputs(cfg, batch or 16)
    raise _error(f"the factory returned a {type(model).__name__} without example inputs",
                 "return (model, example_inputs) from the factory")


def load_workload(spec: str, batch: int | None = None, seq: int | None = None, meta: bool = False) -> Workload:
    """MODEL argument -> model and example inputs (see the module docstring for the convention)."""
    if spec in BUILTINS:
        return _builtin(spec, batch, seq, meta)
    if spec.endswith(".py") or (":" in spec and spec.rpartition(":")[0].endswith(".py")):
        return _from_file(spec, batch, seq)
    raise _error(f"unknown model {spec!r}", f"use one of {', '.join(BUILTINS)} or path/file.py:factory")


def load_cluster(spec: str, memory: str | None):
    from pcompile.cluster import Cluster

    match = re.fullmatch(r"local(\d+)", spec)
    if match:
        cluster = Cluster.local(int(match.group(1)))
    elif spec.endswith(".json") and os.path.isfile(spec):
        with open(spec) as f:
            data = json.load(f)
        cluster = Cluster.from_dict(data["cluster"] if "cluster" in data else data)  # a profile, or a cluster
    else:
        cluster = Cluster.preset(spec)
    return cluster.with_memory(parse_bytes(memory)) if memory else cluster


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise _error(f"cannot read memory size {text!r}", "write it like 16GB, 512MB or 17179869184")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def read_plan(path: str):
    from pcompile.plan import Plan

    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise _error(f"cannot read plan {path!r}: {exc.strerror}", "write one with pcompile plan MODEL --out plan.json")
    return Plan.from_json(text)


def check_plan_matches(plan, workload: Workload) -> None:
    from pcompile.api import fingerprint

    if plan.model and plan.model != fingerprint(workload.model):
        raise _error(f"the plan was made for another model than {workload.name} (parameter names or shapes differ)",
                     f"re-plan with pcompile plan {workload.name} --out plan.json")


# -- output ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _progress(description: str):
    """A spinner on stderr while `description` runs (only on a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        progress.add_task(description, total=None)
        yield


# -- commands -----------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    """One capture: trace, analyse and search; the rewrites run only for what reads their IR
    (--onnx, --plot, --debug-dir), the FLOP totals of the report come from the analysis."""
    import pcompile
    from pcompile.api import PIPELINE, plan_and_ir

    cluster = load_cluster(args.cluster, args.memory)
    batches = args.batch or [None]
    ranged = len(batches) > 1
    rewrite = bool(args.onnx or args.plot or args.debug_dir)
    meta = args.model != "gpt-tiny"
    with _progress("building the model"):
        workload = load_workload(args.model, batches[0], args.seq, meta=meta)
    space = {"pp_degrees": tuple(args.pp)} if args.pp else None
    with _progress("tracing, analysing (shapes, FLOPs, memory, layers) and searching"
                   + (", rewriting the graph for the plan" if rewrite and not ranged else "")):
        plan, ir = plan_and_ir(workload.model, cluster, workload.inputs, search_space=space,
                               global_batch=batches if ranged else None, rewrite=rewrite and not ranged,
                               debug_dir=None if ranged else args.debug_dir)
    flops = ir.total("flops") + ir.total("bwd_flops")
    first = workload.inputs[0]
    example = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
    if ranged and rewrite:  # the rewrites run the chosen batch: its inputs, the plan forced
        if plan.global_batch != example:
            with _progress(f"building the model for the chosen global batch {plan.global_batch}"):
                workload = load_workload(args.model, plan.global_batch, args.seq, meta=meta)
        with _progress("rewriting the graph for the plan"):
            ir = pcompile.compile(workload.model, cluster, workload.inputs, plan=plan, debug_dir=args.debug_dir,
                                  stop_after=PIPELINE[-1])
        flops = ir.total("flops") + ir.total("bwd_flops")
    elif ranged and plan.global_batch != example:  # every count is linear in the batch
        flops = flops * plan.global_batch // example
        workload = dataclasses.replace(workload, tokens=workload.tokens * plan.global_batch // example)
    notes = []
    if args.out:
        with open(args.out, "w") as f:
            f.write(plan.to_json() + "\n")
        notes.append(f"plan written to {args.out}")
    if args.onnx:
        from pcompile.backends import onnx as onnx_export

        with _progress("exporting each rank's graph to ONNX"):
            paths = onnx_export.export(ir, plan, args.onnx)
        notes.append(f"ONNX: {len(paths)} rank files in {args.onnx}")
    if args.plot:
        with _progress("plotting"):
            paths = report.write_plots(plan, args.plot, ir, cluster)
        notes.append("plots: " + ", ".join(paths))
    if args.debug_dir:
        notes.append(f"IR after each pass: {args.debug_dir}/passes.md")
    if args.json:
        print(plan.to_json())
    else:
        report.print_plan(plan, workload, cluster, flops)
    for note in notes:
        print(note, file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_explain(args) -> int:
    plan = read_plan(args.plan)
    print(plan.explain() if hasattr(plan, "explain") else plan)
    return 0


def _peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated(), "CUDA allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What `pcompile run` gives every rank (plain data: it travels to spawned ranks)."""

    steps: int = 5
    batch: int | None = None
    seq: int | None = None
    lr: float = 1e-3
    log: str = "stdout"
    clip: float = 1.0
    eval_every: int = 0
    cluster: str | None = None  # preset, localN, cluster/profile .json; None: the devices found
    init_seed: int = 0
    weights: str | None = None
    mixed_precision: str | None = None
    rebalance_every: int = 0  # FlexMoE: re-place and replicate experts every N steps (ep plans)


def train_rank(spec: str, plan_json: str, options: RunOptions) -> dict:
    """One rank of `pcompile run`: compile with the plan (a built-in model is built on the meta
    device: each rank allocates only its pieces, filled by init_weights(init_seed) or from the
    `weights` checkpoint), train `steps` AdamW steps on random data (a built-in model's: each
    rank draws only its part of the batch), the gradients clipped to a global norm of `clip`
    (0: not clipped), a held-out batch evaluated every `eval_every` steps, the experts of an ep
    plan rebalanced every `rebalance_every` steps (cm.rebalance: FlexMoE)."""
    import torch.distributed as dist

    import pcompile
    from pcompile.cluster import datasheet_peak
    from pcompile.models import GPT_CONFIGS, gpt_inputs
    from pcompile.plan import Plan

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    workload = load_workload(spec, options.batch, options.seq, meta=spec in BUILTINS)
    cluster = load_cluster(options.cluster, None) if options.cluster else pcompile.Cluster.local(world)
    cm = pcompile.compile(workload.model, cluster, workload.inputs, plan=Plan.from_json(plan_json),
                          mixed_precision=options.mixed_precision)
    if options.weights:
        cm.load_weights(options.weights)
    elif not cm.has_values:
        cm.init_weights(options.init_seed)
    steps, clip, eval_every = options.steps, options.clip, options.eval_every
    if options.rebalance_every:
        from pcompile.backends import expert_rebalance

        expert_rebalance.check(cm)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=options.lr)
    flops = cm.ir.total("flops") + cm.ir.total("bwd_flops")
    cuda = cm.device.type == "cuda"
    # MFU against the datasheet peak of this GPU at the precision the run computes in
    peak_device = datasheet_peak(torch.cuda.get_device_name(cm.device), options.mixed_precision) if cuda else None
    stream = sys.stdout if options.log == "stdout" else sys.stderr
    records = []

    def batch_at(seed: int) -> tuple[tuple, bool]:
        """(inputs, whether they are this rank's part only) of step `seed`."""
        if not workload.builtin:
            return workload.inputs, False
        cfg = dataclasses.replace(GPT_CONFIGS[workload.builtin], seq_len=workload.inputs[0].shape[1])
        return gpt_inputs(cfg, workload.inputs[0].shape[0], seed, cm.data_rank, cm.data_world), True

    for step in range(steps):
        inputs, local = batch_at(step)
        start = time.perf_counter()
        loss = cm.train_step(*inputs, local=local)
        norm = torch.nn.utils.clip_grad_norm_(cm.parameters(), clip) if clip > 0 else None
        optimizer.step()
        optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        record = {"step": step, "loss": loss.item(), "seconds": seconds,
                  f"{workload.unit}_per_s": workload.tokens / seconds,
                  "tflops_per_device": flops / seconds / world / 1e12}
        if norm is not None:
            record["grad_norm"] = norm.item()
        if eval_every and (step + 1) % eval_every == 0:
            held_out, local = batch_at(1_000_000 + step)
            record["eval_loss"] = cm.eval_step(*held_out, local=local).item()
        if peak_device:
            record["mfu"] = flops / seconds / world / peak_device
        if options.rebalance_every and (step + 1) % options.rebalance_every == 0 and step + 1 < steps:
            moved = cm.rebalance(optimizer)  # collective; between steps, not timed with the step
            record["rebalanced"] = {layer: placement.describe() for layer, placement in moved.items()}
        records.append(record)
        if rank == 0:
            print(f"step {step + 1}/{steps}  loss {record['loss']:.4f}  {seconds * 1e3:.1f} ms  "
                  f"{report.human(workload.tokens / seconds)} {workload.unit}/s  "
                  f"{report.human(record['tflops_per_device'] * 1e12, 'FLOP/s')} per device"
                  + (f"  grad norm {record['grad_norm']:.3f}" if "grad_norm" in record else "")
                  + (f"  eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else "")
                  + (f"  MFU {record['mfu']:.1%}" if "mfu" in record else "")
                  + (f"  rebalanced {len(record['rebalanced'])} MoE layer(s)" if record.get("rebalanced") else ""),
                  file=stream, flush=True)
    peak, kind = _peak_memory()
    return {"rank": rank, "plan": cm.plan.default.describe(), "steps": records, "peak_memory": peak,
            "memory_kind": kind, "unit": workload.unit}


def _launched(args, plan) -> list[dict]:
    import torch.distributed as dist

    import pcompile

    options = RunOptions(args.steps, args.batch, args.seq, args.lr, "stderr" if args.json else "stdout", args.clip,
                         args.eval_every, args.cluster, args.init_seed, args.weights, args.mixed_precision,
                         args.rebalance_every)
    call = (args.model, plan.to_json(), options)
    if args.local:
        if args.local != plan.num_devices:
            raise _error(f"the plan needs {plan.num_devices} ranks but --local {args.local} was given",
                         f"use --local {plan.num_devices} or re-plan for --cluster local{args.local}")
        try:
            return pcompile.launch(train_rank, args.local, *call)
        except RuntimeError as exc:  # a rank's PcompileError, as its traceback: its cause and fix
            refusal = rank_refusal(str(exc))
            if refusal:
                raise refusal from None
            raise
    created = "WORLD_SIZE" in os.environ and not dist.is_initialized()  # under torchrun
    if created:
        from pcompile.launch import init_distributed

        init_distributed()
    if dist.is_initialized():
        try:
            results = [None] * dist.get_world_size()
            dist.all_gather_object(results, train_rank(*call))
            return results if dist.get_rank() == 0 else []
        finally:
            if created:
                dist.destroy_process_group()
    if plan.num_devices != 1:
        raise _error(f"the plan needs {plan.num_devices} ranks and no process group is running",
                     f"run under torchrun --nproc-per-node {plan.num_devices} or pass --local {plan.num_devices}")
    return [train_rank(*call)]


# How a traceback joins the exceptions of a chain (torch's pipelining wraps a stage's exception
# in a RuntimeError "failed to run forward": the rank's refusal is then not the last exception).
_CHAINED = re.compile(r"\n\n(?:The above exception was the direct cause of the following exception|"
                      r"During handling of the above exception, another exception occurred):\n\n")


def rank_refusal(traceback_text: str):
    """The PcompileError (cause and fix) a rank's traceback ends in or carries in its chain, the
    outermost one, rebuilt; None if it holds none."""
    from pcompile.errors import PcompileError

    for part in reversed(_CHAINED.split(traceback_text.strip())):
        # the exception's own line(s) at the end of its part: "pcompile.errors.PcompileError: cause\n  fix: fix"
        found = re.search(r"^pcompile\.[\w.]+: (.*?)(?:\n\s*fix: (.*))?\Z", part.strip(), re.S | re.M)
        if found:
            return PcompileError(found.group(1).strip(), found.group(2) and found.group(2).strip())
    return None


def cmd_run(args) -> int:
    from pcompile.backends.expert_rebalance import check_plan

    plan = read_plan(args.plan)
    check_plan(plan, args.rebalance_every)  # before any rank starts
    check_plan_matches(plan, load_workload(args.model, args.batch, args.seq, meta=args.model in BUILTINS))
    results = _launched(args, plan)
    if not results:  # a torchrun rank other than 0
        return 0
    if args.json:
        print(json.dumps({"plan": results[0]["plan"], "world_size": len(results), "ranks": results}, indent=2))
        return 0
    steady = results[0]["steps"][1:] or results[0]["steps"]
    mean = sum(s["seconds"] for s in steady) / len(steady)
    print(f"trained {len(results[0]['steps'])} steps with {results[0]['plan']} on {len(results)} rank(s): "
          f"mean step {mean * 1e3:.1f} ms (after the first), final loss {results[0]['steps'][-1]['loss']:.4f}")
    report.table("peak memory per rank", ["rank", results[0]["memory_kind"]],
                 [[str(r["rank"]), report.human_bytes(r["peak_memory"])] for r in results])
    return 0


def cmd_profile(args) -> int:
    """Measure this machine (--ranks local ranks), or under torchrun every node of the job; rank 0
    prints the cluster (and writes the profile to --out, which `--cluster FILE` reads)."""
    from pcompile.cost.profile import profile_cluster

    cluster = profile_cluster(None if "WORLD_SIZE" in os.environ else args.ranks, args.out, quick=args.quick)
    if os.environ.get("RANK", "0") == "0":
        print(cluster.to_json())
    return 0


def cmd_demo(args) -> int:
    from pcompile.demo import main as demo_main

    return demo_main(args.ranks)


def _batches(text: str) -> list[int]:
    """"8" or "8,16,32" -> the allowed global batches."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read global batch {text!r}: use e.g. 8 or 8,16,32") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"global batch {text!r} must be positive")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcompile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="search a parallel plan (no GPU needed)")
    plan.add_argument("model")
    plan.add_argument("--cluster", required=True, help="preset (e.g. 8xA100-80GB), localN, or a cluster .json")
    plan.add_argument("--memory", help="memory budget per device, e.g. 16GB")
    plan.add_argument("--batch", type=_batches, help="global batch (default: a built-in model's published one, "
                                                     "e.g. 1536 for gpt3-175b), or several (8,16,32): the search "
                                                     "picks the most samples/s")
    plan.add_argument("--seq", type=int, help="sequence length (built-in GPTs)")
    plan.add_argument("--pp", type=int, action="append",
                      help="allowed pipeline degree (repeat for several; default: searched)")
    plan.add_argument("--out", help="write the plan JSON here")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON only")
    plan.add_argument("--debug-dir", help="write the IR after every pass here")
    plan.add_argument("--onnx", help="write each rank's graph as ONNX here")
    plan.add_argument("--plot", help="write timeline/memory/gain PNGs here")
    explain = commands.add_parser("explain", help="why the plan is what it is")
    explain.add_argument("plan")
    run = commands.add_parser("run", help="train with a plan (--local N, or under torchrun)")
    run.add_argument("model")
    run.add_argument("--plan", required=True)
    run.add_argument("--local", type=int, help="spawn N local ranks")
    run.add_argument("--steps", type=int, default=5)
    run.add_argument("--batch", type=int)
    run.add_argument("--seq", type=int)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--clip", type=float, default=1.0, help="clip gradients to this global norm (0: off)")
    run.add_argument("--eval-every", type=int, default=0, help="evaluate a held-out batch every N steps")
    run.add_argument("--cluster", help="preset (e.g. 8xH100-80GB), localN, or a cluster / profile .json "
                                       "(default: the devices found)")
    run.add_argument("--init-seed", type=int, default=0, help="initial weights of a meta-built model from this seed")
    run.add_argument("--weights", help="load weights: a safetensors file, a Hugging Face model directory, or a "
                                       "pcompile checkpoint")
    run.add_argument("--mixed-precision", choices=["bf16"], help="bf16 compute with fp32 master weights")
    run.add_argument("--json", action="store_true", help="print per-rank results as JSON")
    run.add_argument("--rebalance-every", type=int, default=0, metavar="N",
                     help="ep plans: move and replicate experts by their measured token load every N steps (FlexMoE)")
    profile = commands.add_parser("profile", help="measure this cluster's devices and links (under torchrun: "
                                                  "every node, links within and across nodes apart)")
    profile.add_argument("--ranks", type=int, default=4, help="local ranks to measure with (outside torchrun)")
    profile.add_argument("--out", help="write the profile JSON here (read by --cluster FILE)")
    profile.add_argument("--quick", action="store_true", help="fewer sizes: seconds instead of minutes")
    demo = commands.add_parser("demo", help="plan, train and check a small GPT on 4 local ranks")
    demo.add_argument("--ranks", type=int, default=4)
    return p


COMMANDS = {"plan": cmd_plan, "explain": cmd_explain, "run": cmd_run, "profile": cmd_profile, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    from pcompile.errors import PcompileError

    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PcompileError as exc:
        line = f"pcompile {args.command}: error: {exc.cause}" + (f" (fix: {exc.fix})" if exc.fix else "")
        print(" ".join(line.split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Front end, second path: capture with torch.export for models torch.fx cannot trace
(HuggingFace transformers and anything with Python control flow on sizes or config).

The result is made to look like an fx capture so every later pass works on it unchanged:
  * `ep.module()` is an fx GraphModule whose parameters are the model's own Parameter objects,
    under the model's own names (full_state_dict / full_grads look them up by those names);
  * the batch dimension (dim 0 of every tensor input) is exported symbolic (`Dim.AUTO`), so the
    same graph runs on a data-parallel rank's slice of the batch;
  * a graph that returns one tensor (the loss) takes its inputs positionally and returns the
    tensor, as an fx capture does (export's pytree calling convention lets no pass add an input);
  * export's input guard module and its dtype assertions are dropped (the backend slices the
    batch; the assertions compute nothing), and every parameter read (get_attr) is moved to just
    before its first use, so layers stay contiguous in graph order as they are in fx captures;
  * `config.use_cache` of HuggingFace models is off during capture (a training step never uses
    the KV cache; with it on, export fails on the cache object);
  * a model on the meta device is exported on fake CPU tensors, then the graph is given the
    model's meta parameters back: a 175B-parameter model is captured without its weights;
  * nn.MultiheadAttention's head reshape keeps the heads a dim of their own (`heads_apart`, for
    tensor parallelism), and `x.to(device)` does not record the capture's dtype (`device_moves`,
    for bf16).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import operator
import re

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import statically_known_true

from pcompile.errors import PcompileError

aten = torch.ops.aten
_DROPPED_TARGETS = (torch.ops.aten._assert_tensor_metadata.default,)
_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")
SUPPORTED = "torch 2.13 and transformers 5.x"


@contextlib.contextmanager
def cache_disabled(model: torch.nn.Module):
    """Set `config.use_cache = False` on every submodule that has one, restoring it afterwards."""
    changed = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False) is True:
            config.use_cache = False
            changed.append(config)
    try:
        yield len(changed)
    finally:
        for config in changed:
            config.use_cache = True


@contextlib.contextmanager
def _quiet():
    """export logs whole graphs at WARNING level on failures; the PcompileError says what matters."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def dynamic_batch(inputs: tuple) -> tuple:
    """dim 0 of every tensor input symbolic (export keeps it static if the model needs it static)."""
    return tuple({0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None for x in inputs)


def _on_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _export(model: torch.nn.Module, inputs: tuple):
    shapes = dynamic_batch(inputs)
    if not _on_meta(model):
        return torch.export.export(model, tuple(inputs), dynamic_shapes=shapes, strict=False)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_model = copy.deepcopy(model)  # meta tensors: no memory
    with mode:
        fake_model = fake_model.to_empty(device="cpu")
        fake_inputs = tuple(torch.empty(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x
                            for x in inputs)
        return torch.export.export(fake_model, fake_inputs, dynamic_shapes=shapes, strict=False)


def _owner(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def _restore_state(gm: fx.GraphModule, model: torch.nn.Module) -> None:
    """Give the graph the model's own parameters and buffers (by name): shared storage, tied
    weights tied again, meta tensors instead of the fakes export ran on."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    for name, tensor in itertools.chain(gm.named_parameters(remove_duplicate=False),
                                        gm.named_buffers(remove_duplicate=False)):
        if name in state and state[name] is not tensor:
            owner, attr = _owner(gm, name)
            if isinstance(tensor, torch.nn.Parameter):
                owner._parameters[attr] = state[name]
            else:
                owner._buffers[attr] = state[name]


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's guard call and dtype assertions; read each parameter just before its first
    use; a graph returning one tensor returns it plainly, from positional inputs."""
    graph = gm.graph
    spec, output = getattr(gm, "_out_spec", None), next(n for n in graph.nodes if n.op == "output")
    single = isinstance(output.args[0], (tuple, list)) and len(output.args[0]) == 1
    if spec is not None and spec.is_leaf() and single:
        output.args = (output.args[0][0],)
        graph.set_codegen(fx.graph.CodeGen())
        for attr in ("_in_spec", "_out_spec"):  # export's calling convention, no longer used
            if hasattr(gm, attr):
                delattr(gm, attr)
        for key, hook in list(gm._forward_pre_hooks.items()):  # its input check against that convention
            if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
                del gm._forward_pre_hooks[key]
                gm._forward_pre_hooks_with_kwargs.pop(key, None)
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and node.target in _DROPPED_TARGETS and not node.users):
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in [n for n in graph.nodes if n.op == "get_attr" and n.users]:
        min(node.users, key=order.__getitem__).prepend(node)
    graph.lint()
    gm.recompile()
    return gm


def _same(a, b) -> bool:
    return bool(statically_known_true(a == b))


def heads_apart(graph: fx.Graph) -> int:
    """nn.MultiheadAttention's head reshape, exported: `x.view(S, B*H, hd).transpose(0, 1)
    .view(B, H, S, hd)` (torch merges batch and heads into one dim, so no dim of the first view
    holds the heads) becomes `x.view(S, B, H, hd).permute(1, 2, 0, 3)`: the same values, with
    the heads a dim of their own that tensor parallelism can split (tp_rules). Returns the count."""
    count = 0
    for last in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.view.default]:
        t = last.args[0]
        if not (t.op == "call_function" and t.target is aten.transpose.int and len(t.users) == 1
                and sorted(d % 3 for d in t.args[1:3]) == [0, 1] and len(t.args) == 3):
            continue
        first = t.args[0]
        if not (first.op == "call_function" and first.target is aten.view.default and len(first.users) == 1):
            continue
        x, sizes = first.args[0], list(last.args[1])
        vals = [n.meta.get("val") for n in (x, first, last)]
        if len(sizes) != 4 or not all(isinstance(v, torch.Tensor) for v in vals):
            continue
        (s, b, e), (_, bh, hd), (b2, h, s2, hd2) = (tuple(v.shape) for v in vals) if (
            [v.dim() for v in vals] == [3, 3, 4]) else ((None,) * 3, (None,) * 3, (None,) * 4)
        if s is None or not (_same(b, b2) and _same(s, s2) and _same(hd, hd2) and _same(b * h, bh)
                             and _same(h * hd, e)):
            continue
        with graph.inserting_before(last):
            view = graph.call_function(aten.view.default, (x, [sizes[2], sizes[0], sizes[1], sizes[3]]))
            heads = graph.call_function(aten.permute.default, (view, [1, 2, 0, 3]))
        view.meta.update({k: v for k, v in first.meta.items() if k != "val"})
        heads.meta.update({k: v for k, v in last.meta.items() if k != "val"})
        view.meta["val"] = vals[0].view(s, b, h, hd)
        heads.meta["val"] = view.meta["val"].permute(1, 2, 0, 3)
        last.replace_all_uses_with(heads)
        merged = list(first.args[1])
        for node in (last, t, first):
            graph.erase_node(node)
        for size in merged:  # B*H, computed for the merged view only
            if isinstance(size, fx.Node) and not size.users and size.target is operator.mul:
                graph.erase_node(size)
        count += 1
    return count


def device_moves(graph: fx.Graph) -> int:
    """`x.to(device)` is recorded as `aten.to.dtype_layout(x, dtype=<x's dtype at capture>,
    layout, device)`: a cast to fp32 in an fp32 capture, which under bf16 would turn the moved
    value fp32 (GPT-2's `position_embeds.to(inputs_embeds.device)` promotes the residual stream,
    and the next LayerNorm refuses its bf16 weight). When the recorded dtype and device are the
    input's own at capture, the dtype is dropped: the op keeps the run-time dtype, as the source
    did. (An explicit `.to(torch.float32)` / `.float()` is aten.to.dtype: kept.) Returns the count."""
    count = 0
    for node in graph.nodes:
        if not (node.op == "call_function" and node.target is aten.to.dtype_layout and "dtype" in node.kwargs
                and "device" in node.kwargs and node.args):
            continue
        value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if (isinstance(value, torch.Tensor) and node.kwargs["dtype"] == value.dtype
                and torch.device(node.kwargs["device"]) == value.device):
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
            count += 1
    return count


def batch_is_dynamic(gm: fx.GraphModule) -> bool:
    """Whether export kept dim 0 of the tensor inputs symbolic (needed to run dp > 1)."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.dim():
            if not isinstance(value.shape[0], torch.SymInt):
                return False
    return True


def export_graph(model: torch.nn.Module, inputs: tuple) -> tuple[fx.GraphModule, list[str]]:
    """torch.export capture as an fx GraphModule named like `model`, plus notes for the report."""
    notes = []
    with cache_disabled(model) as caches, _quiet():
        try:
            program = _export(model, inputs)
        except Exception as exc:  # export raises many types (UserError, GuardOnDataDependentSymNode, ...)
            raise explain_export_failure(exc, model) from exc
    if caches:
        notes.append("use_cache=False during capture (a training step needs no KV cache)")
    gm = program.module()
    _restore_state(gm, model)
    gm = normalize(gm)
    if heads_apart(gm.graph) + device_moves(gm.graph):
        gm.graph.lint()
        gm.recompile()
    if not batch_is_dynamic(gm):
        notes.append("the model needs a static batch size (export specialised dim 0): data parallelism "
                     "must keep the example batch per rank")
    return gm, notes


# -- errors ------------------------------------------------------------------------------------
def failing_module(exc: BaseException, model: torch.nn.Module) -> str | None:
    """Path of the innermost module of `model` whose code is on the exception's traceback."""
    paths = {id(m): name for name, m in model.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        first = code.co_varnames[0] if code.co_argcount else None
        owner = tb.tb_frame.f_locals.get(first) if first else None
        if owner is not None and id(owner) in paths:
            found = paths[id(owner)]
        tb = tb.tb_next
    return found


def _user_line(text: str) -> str:
    match = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)', text)
    return f" at {match.group(1)}:{match.group(2)} `{match.group(4).strip()}`" if match else ""


def construct_of(text: str) -> tuple[str, str]:
    """(the construct export could not capture, what to do about it) from export's message."""
    lower = text.lower()
    if "data-dependent" in lower or "guard on data" in lower:
        return ("Python control flow or a shape that depends on tensor values (e.g. `if x.sum() > 0`, "
                "`x[mask]`, `.item()`)",
                "make the branch depend on config or shapes only (torch.where / torch.cond for values), "
                "or move the data-dependent part out of the model's forward")
    if "cache" in lower:
        return ("a KV-cache object in the model's inputs or outputs",
                "call the HuggingFace model with use_cache=False (and return_dict=False) in your forward")
    if "unsupported" in lower or "not supported" in lower or "no fake impl" in lower or "meta" in lower:
        return ("an operator torch.export cannot run on fake tensors (a custom op or extension without a "
                "meta/fake implementation)",
                "register a fake implementation (torch.library.register_fake) or replace the op, "
                f"and check the versions (pcompile is tested with {SUPPORTED})")
    return ("Python code torch.export could not trace",
            f"simplify that module's forward, or check the versions (pcompile is tested with {SUPPORTED})")


def explain_export_failure(exc: Exception, model: torch.nn.Module) -> PcompileError:
    text = f"{type(exc).__name__}: {exc}"
    path = failing_module(exc, model)
    where = (f"module {path!r} ({type(model.get_submodule(path)).__name__})" if path else
             f"the top-level module ({type(model).__name__})")
    construct, fix = construct_of(text)
    return PcompileError(f"torch.export cannot capture {where}: {construct}{_user_line(text)}. "
                         f"torch.export said: {text.splitlines()[0][:300]}", fix)

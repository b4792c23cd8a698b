"""Mixed precision: bf16 compute with fp32 master weights (Megatron's Float16Module + its
mixed-precision optimizer; FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)).

`compile(..., mixed_precision="bf16")` lowers the rank's module (a pipeline rank: its stages) as
usual, then `MasterWeights`
  1. keeps an fp32 copy (the master) of every local parameter (its tp / ZeRO-3 shard), and
     casts the module's floating parameters and buffers to bf16 (as Megatron's module.bfloat16():
     an fp32 buffer would promote bf16 activations back to fp32);
  2. `pull()` before each forward: the (possibly stepped) masters -> the bf16 parameters;
  3. `cast_inputs()`: floating inputs to bf16 (FSDP2's cast_forward_inputs); integer ones as is;
     casts an export capture baked at fp32 that restore a dtype (RMSNorm's `.to(input_dtype)`)
     are rewritten to follow the run-time dtype, the model's own fp32 upcasts kept
     (`follow_run_time_dtype`, the rule at the end of this file);
  4. every backward (each micro-batch of a pipeline schedule, each train_step) moves the bf16
     gradient of a parameter into its fp32 master gradient as soon as autograd has accumulated
     it (a post-accumulate-grad hook: Megatron's main_grad), so gradients accumulate in fp32
     across micro-batches and train_steps - a bf16 sum keeps 8 bits, and 1 + 8 * 2**-9 stays 1.
The backend then averages the master gradients over dp IN FP32 (cast first, then all-reduce:
Megatron forces accumulate_allreduce_grads_in_fp32 for bf16) - a bf16 ring all-reduce rounds
every partial sum to 8 bits, an error that grows with dp; fp32 costs twice the bytes.
ZeRO-3 (sdp) parameters are the exception: their gradients are reduce-scattered inside the
graph (pcompile.runtime.sdp) in the gradient's dtype, bf16 (FSDP2's default reduce_dtype = param_dtype),
and become fp32 master gradients after that. Known gaps against pcompile.cost.pricing, which charges
2-byte gradients: the dp all-reduce moves 4-byte ones, and each parameter holds a 4-byte fp32
master gradient from its first backward to zero_grad() (18 bytes per parameter with Adam at
the step, not 16).
The user's optimizer is built on `CompiledModel.parameters()`, which are the masters, so it
steps (and keeps its moments) in fp32 and checkpoints save fp32; the next train_step's
`pull()` is the copy back to bf16 (done lazily so any optimizer and checkpoint.load work).

Offloaded (`offload=True`, Plan.offload_optimizer; ZeRO-Offload, FSDP2's CPUOffloadPolicy for
the optimizer): the masters live in host memory (pinned when the module is on a GPU), so the
user's optimizer keeps its moments there and steps on the CPU; the hook copies each gradient to
the host as backward finishes it (in the compute dtype, cast to fp32 there) and frees the
device's; `pull()` casts the masters to the compute dtype on the host and copies them in. Also
with fp32 compute (the masters then fp32 copies of fp32 parameters). The plan makes every
data-parallel layer ZeRO-3 (Plan._check_offload): its gradients are reduce-scattered on the
device before the hook sees them, so no collective reads a host tensor.
"""
from __future__ import annotations

import contextlib
import re

import torch

from pcompile.errors import PcompileError
from pcompile.ir.graph import META_KEY

DTYPES = {None: None, "bf16": torch.bfloat16}


def compute_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The compute dtype of a `mixed_precision` option (None: everything fp32)."""
    if mixed_precision not in DTYPES:
        raise PcompileError(f"unknown mixed_precision {mixed_precision!r}",
                            f"use one of {list(DTYPES)} (None = fp32 everywhere, 'bf16' = bf16 compute "
                            "with fp32 master weights)")
    return DTYPES[mixed_precision]


class MasterWeights:
    """fp32 masters for a module whose parameters compute in `dtype`."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, offload: bool = False):
        self.dtype, self.offload = dtype, offload
        self._module = module
        self._names = [name for name, _ in module.named_parameters()]  # one name per tensor (tied ones once)
        self.masters = [torch.nn.Parameter(_host(p.detach().float()) if offload else p.detach().float().clone(),
                                           requires_grad=p.requires_grad)
                        for _, p in module.named_parameters()]
        # export's baked `.to(input_dtype)` casts follow bf16 (below); first, while get_attr
        # tensors still have their capture dtype
        follow_run_time_dtype(module)
        module.to(dtype)  # tied parameters stay one tensor
        self._low = [p for _, p in module.named_parameters()]
        self._by_id = {id(low): master for low, master in zip(self._low, self.masters)}
        for low in self._low:
            if low.requires_grad:
                low.register_post_accumulate_grad_hook(self._accumulate)

    def named_parameters(self):
        return zip(self._names, self.masters)

    def parameters(self):
        return iter(self.masters)

    def master(self, tensor: torch.Tensor) -> torch.Tensor:
        """The master of one of the module's parameters; any other tensor (a buffer) as it is."""
        return self._by_id.get(id(tensor), tensor)

    def by_name(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter name of the module, tied aliases included (as state_dict lists them) -> its master."""
        return {name: self.master(p) for name, p in self._module.named_parameters(remove_duplicate=False)}

    def pull(self) -> None:
        """Masters -> the module's bf16 parameters (after an optimizer step or checkpoint load)."""
        with torch.no_grad():
            for low, master in zip(self._low, self.masters):
                # offloaded: cast on the host, copy the compute dtype's bytes in
                low.copy_(master.to(low.dtype) if self.offload else master)

    def cast_inputs(self, inputs: tuple) -> tuple:
        return tuple(x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                     for x in inputs)

    def _accumulate(self, low: torch.Tensor) -> None:
        """Post-accumulate-grad hook of a bf16 parameter: its gradient into the master's, in fp32."""
        master = self._by_id[id(low)]
        grad = low.grad.to(master.device) if self.offload else low.grad  # offloaded: the compute dtype's bytes out
        if master.grad is None:
            master.grad = grad.float()
        else:
            master.grad.add_(grad)
        low.grad = None


# torch's messages for an op given tensors of two floating dtypes (matmul, linear, conv, addmm, ...)
_DTYPE_MISMATCH = re.compile(r"same dtype|expected scalar type|should be the same|dtype mismatch", re.IGNORECASE)


@contextlib.contextmanager
def dtype_errors(dtype: torch.dtype | None):
    """Under mixed precision, a forward that fails because an op meets fp32 and `dtype` tensors is
    a dtype the capture baked in that the cast rule below cannot follow (a Python branch on a
    tensor's dtype, a factory op given the capture's dtype): raised as a PcompileError naming
    that, not as torch's message. Every rank runs the same graph to the same op, so all raise."""
    try:
        yield
    except RuntimeError as exc:
        if dtype is None or not _DTYPE_MISMATCH.search(str(exc)):
            raise
        raise PcompileError(
            f"under mixed_precision='bf16' an op of the captured graph meets fp32 and {dtype} tensors ({exc}): "
            "the model chose a dtype in Python while it was captured in fp32 (e.g. T5LayerNorm's "
            "`if self.weight.dtype in (float16, bfloat16)`, a mask built with the input's dtype), so the "
            "captured graph keeps fp32 where the bf16 model would not",
            "train this model in fp32 (mixed_precision=None)") from None


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in host memory, pinned when it comes from a GPU (asynchronous copies)."""
    host = tensor.to("cpu", copy=True)
    return host.pin_memory() if tensor.is_cuda else host


# -- casts the capture recorded at its own dtype ------------------------------------------------
# torch.export runs the model once in fp32 and records every dtype as the constant it was then:
# LlamaRMSNorm's `input_dtype = x.dtype; x = x.to(torch.float32); ...; return w * x.to(input_dtype)`
# becomes two casts to fp32, and so do `softmax(s, dtype=torch.float32).to(q.dtype)` and RoPE's
# `cos.to(dtype=x.dtype)`. Under bf16 the first of each pair must stay fp32 (the model's own
# upcast for a stable variance / softmax) and the second must follow the run-time dtype: left
# at fp32, the next Linear multiplies fp32 activations by bf16 weights and raises. (fx captures
# keep `x.dtype` a graph value; only export graphs carry such constants.)
#
# The rule (`follow_run_time_dtype`), for a graph captured with its floating values in fp32:
#   upcast   a node given dtype=float32 explicitly that reads a floating value already fp32 at
#            capture: a no-op cast (`.float()`, `.to(torch.float32)`) or an op computing in fp32
#            (softmax / log_softmax / sum / mean with dtype=torch.float32);
#   restore  a no-op cast to fp32 whose input was computed (by an op that is not a view, copy
#            or cast: arithmetic, or the fp32-computing upcast itself) from an upcast's output
#            in the same module call (the same nn_module_stack: one forward's own code, not
#            the calls it makes - the loss' `logits.float()` in LlamaForCausalLM.forward is not a
#            restore of the final norm's upcast in its submodule). It casts back to the
#            run-time dtype of what that upcast read (`getattr(x, "dtype")` in the graph), as
#            the source's `.to(input_dtype)` did; of repeated upcasts of one value through views
#            (`x.float().expand(...).float()`), the first one's.
# Every other cast keeps its constant: a first upcast (RMSNorm's `.to(torch.float32)`; the loss'
# `logits.float()`, with no upcast before it in its module call), an int -> float cast, and a
# second `.float()` of an upcast value reached through views only (old RoPE's
# `inv_freq[None, :, None].float().expand(...).float()`: nothing was computed in fp32 to bring
# back, so it means the fp32 it says). Under fp32 every rewritten cast still casts to fp32.
#
# Aliases: at capture a no-op `x.to(torch.float32)` returned x itself, so export recorded every
# later use of x as a use of the cast - LlamaDecoderLayer's `residual + attn` reads RMSNorm's
# upcast. At run time the cast makes a new fp32 tensor, and the residual stream would silently
# turn fp32. A no-op upcast of a value from outside its module call (the caller holds it), read
# outside that call, by a module call that returned something else, is therefore read there as
# the x it aliased (a module that returns its upcast - nothing else of it read outside - keeps it).
# Nodes the rewrites inserted (sp_split, tp_copy, gathers: no nn_module_stack) are transparent to
# both walks: they run where the values they carry are read.
#
# Not covered: a factory op given the capture dtype (`torch.full(..., torch.finfo(dtype).min,
# dtype=dtype)`) stays fp32 and promotes what it meets. Hugging Face's eager attention adds such a
# float mask to the scores, so its softmax restore follows fp32 and the matmul with the bf16 values
# raises (loudly: "expected ... same dtype"); its default attention (sdpa, a boolean mask) is
# covered - load the model with attn_implementation="sdpa".
_CASTS = {"to", "_to_copy", "convert_element_type"}


def _dtype_arg(node) -> tuple[int | str, object] | None:
    """(position or keyword, value) of the `dtype` argument an aten op node was given, if any."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return None
    for index, argument in enumerate(schema.arguments):
        if argument.name == "dtype":
            if not argument.kwarg_only and index < len(node.args):
                return index, node.args[index]
            if "dtype" in node.kwargs:
                return "dtype", node.kwargs["dtype"]
    return None


def _capture_dtype(value, depth: int = 8) -> torch.dtype | None:
    """A node's dtype at capture: export's `val`, else the IR's NodeMeta (the shapes pass and the
    rewrites record it; a checkpoint region's inputs carry their outer node's). Failing both, a
    node a rewrite inserted takes the dtype of its first floating input (collectives, gathers and
    vocab-parallel lookups keep their data's dtype: tp_reduce, sdp_gather, vocab_embedding)."""
    if not isinstance(value, torch.fx.Node):
        return None
    val = value.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    recorded = getattr(value.meta.get(META_KEY), "dtype", None)
    if isinstance(recorded, str) and recorded.startswith("torch."):
        dtype = getattr(torch, recorded[len("torch."):], None)
        if isinstance(dtype, torch.dtype):
            return dtype
    if value.op == "get_attr":  # a parameter or buffer, read before MasterWeights casts it
        owner = value.graph.owning_module
        try:
            tensor = owner.get_submodule(value.target.rpartition(".")[0]) if owner is not None else None
            tensor = getattr(tensor, value.target.rpartition(".")[2], None)
        except AttributeError:
            tensor = None
        return tensor.dtype if isinstance(tensor, torch.Tensor) else None
    if val is None and depth and value.op == "call_function":
        dtypes = [_capture_dtype(arg, depth - 1) for arg in value.all_input_nodes]
        return next((d for d in dtypes if d is not None and d.is_floating_point), None)
    return None


def _is_cast(node: torch.fx.Node) -> bool:
    return getattr(node.target, "_opname", None) in _CASTS


def _to_fp32(node: torch.fx.Node) -> bool:
    """Given dtype=float32, reading a floating value that was fp32 at capture (a no-op there)."""
    given = _dtype_arg(node)
    source = node.args[0] if node.args else None
    return (given is not None and given[1] == torch.float32 and _capture_dtype(source) == torch.float32
            and _capture_dtype(node) == torch.float32)


def _computes(node: torch.fx.Node) -> bool:
    """Whether a node computes new values (not a view, alias, copy or cast of its input)."""
    return not (_is_cast(node) or getattr(node.target, "_opname", None) in ("clone", "contiguous")
                or any(r.alias_info is not None for r in node.target._schema.returns))


def _call(node: torch.fx.Node) -> tuple | None:
    """The module call a node belongs to: its nn_module_stack's keys, outermost first."""
    stack = node.meta.get("nn_module_stack")
    return tuple(stack) if stack else None


def _within(node: torch.fx.Node, call: tuple, depth: int = 4) -> bool:
    """Whether a node runs in module call `call` or in a call inside it. A node a rewrite inserted
    (no nn_module_stack: tp_copy, a gather) runs where the nodes it feeds run."""
    inner = _call(node)
    if inner is None:
        return bool(depth and node.users) and all(_within(user, call, depth - 1) for user in node.users)
    return inner[:len(call)] == call


def _made_within(node, call: tuple, depth: int = 4) -> bool:
    """Whether a value was computed in module call `call` (or a call inside it); a node a rewrite
    inserted, from what it reads. Graph inputs and parameters come from outside."""
    if not isinstance(node, torch.fx.Node) or node.op in ("placeholder", "get_attr"):
        return False
    inner = _call(node)
    if inner is None:
        inputs = node.all_input_nodes
        return bool(depth and inputs) and all(_made_within(arg, call, depth - 1) for arg in inputs)
    return inner[:len(call)] == call


def _restored(cast: torch.fx.Node) -> torch.fx.Node | None:
    """The upcast a no-op fp32 cast restores (the rule above), or None."""
    call = _call(cast)
    if call is None:
        return None
    todo, seen = [(cast.args[0], False)], set()  # (node, whether fp32 was computed after it)
    while todo:
        node, computed = todo.pop()
        if not isinstance(node, torch.fx.Node) or node.op != "call_function" or (node, computed) in seen:
            continue
        seen.add((node, computed))
        inner = _call(node)
        if inner is not None and inner != call:  # another module call's value: the walk ends
            continue
        # nodes a rewrite inserted (no nn_module_stack: sp_split, tp_copy, ...) and run-time ops
        # pass the value on; the model's own aten ops are upcasts, computations or views
        if inner is not None and getattr(node.target, "_schema", None) is not None:
            if _to_fp32(node) and (computed or not _is_cast(node)):
                return _first(node, call)
            computed = computed or _computes(node)
        todo.extend((arg, computed) for arg in node.all_input_nodes)
    return None


def _first(upcast: torch.fx.Node, call: tuple) -> torch.fx.Node:
    """The first of repeated upcasts of one value (`x.float().expand(...).float()`): the one that
    read the value in its own dtype - what a restore casts back to."""
    node = upcast.args[0]
    while (isinstance(node, torch.fx.Node) and node.op == "call_function" and _call(node) == call
           and getattr(node.target, "_schema", None) is not None and not _computes(node)):
        if _to_fp32(node):
            upcast = node
        node = node.args[0]
    return upcast


def _unalias(gm: torch.fx.GraphModule, upcast: torch.fx.Node) -> bool:
    """Readers of a no-op upcast outside its module call read the value it aliased at capture."""
    call = _call(upcast)
    if call is None or _made_within(upcast.args[0], call):  # an alias of a value the caller holds only
        return False
    outside = [user for user in upcast.users if not _within(user, call)]
    returned_else = any(not _within(user, call) for node in gm.graph.nodes
                        if node is not upcast and _call(node) == call for user in node.users)
    if not outside or not returned_else:
        return False
    for user in outside:
        user.replace_input_with(upcast, upcast.args[0])
    return True


def follow_run_time_dtype(module: torch.nn.Module) -> int:
    """Apply the rule above to every GraphModule in `module` (nested ones too: checkpoint regions,
    pipeline stages): restore casts cast to the run-time dtype of what their upcast read, and a
    no-op upcast's readers outside its module call read what it aliased. Returns the number
    of casts rewritten plus the number of upcasts un-aliased."""
    rewritten = 0
    for gm in module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        changed, dtypes = False, {}  # upcast -> the node reading its input's dtype
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or not _is_cast(node) or not _to_fp32(node):
                continue
            upcast = _restored(node)
            if upcast is None:  # an upcast itself (or a cast left as it says)
                if _unalias(gm, node):
                    changed, rewritten = True, rewritten + 1
                continue
            if upcast not in dtypes:
                with gm.graph.inserting_after(upcast):
                    dtypes[upcast] = gm.graph.call_function(getattr, (upcast.args[0], "dtype"))
            where, _ = _dtype_arg(node)
            if where == "dtype":
                node.kwargs = {**node.kwargs, "dtype": dtypes[upcast]}
            else:
                node.args = node.args[:where] + (dtypes[upcast],) + node.args[where + 1:]
            changed, rewritten = True, rewritten + 1
        if changed:
            gm.recompile()
    return rewritten

"""Run an IR's graph on fake tensors (FakeTensorMode: shapes and dtypes, no memory), node by
node, so analysis passes can observe each node. Shared by the shape, FLOP and memory passes."""
from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module

from pcompile.errors import PcompileError
from pcompile.ir import IR

NodeHook = Callable[[fx.Node], AbstractContextManager]


def _fake_empty(mode: FakeTensorMode, shape, dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    # Build from shape and dtype, never from data: the model may live on the meta device.
    with mode:
        fake = torch.empty(shape, dtype=dtype, device="cpu")
    return fake.requires_grad_(requires_grad and (dtype.is_floating_point or dtype.is_complex))


def fake_state(gm: fx.GraphModule, mode: FakeTensorMode,
               shard: Callable[[str, torch.Size], torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """Fake parameters and buffers of `gm`, optionally with per-rank shard shapes."""
    state = {}
    for name, p in gm.named_parameters():
        shape = shard(name, p.shape) if shard else p.shape
        state[name] = _fake_empty(mode, shape, p.dtype, p.requires_grad)
    for name, b in gm.named_buffers():
        state[name] = _fake_empty(mode, b.shape, b.dtype, False)
    return state


def fake_inputs(mode: FakeTensorMode, inputs: tuple) -> list:
    return [_fake_empty(mode, x.shape, x.dtype, False) if isinstance(x, torch.Tensor) else x for x in inputs]


class _Observed(fx.Interpreter):
    def __init__(self, gm, hook: NodeHook | None, on_result):
        super().__init__(gm)
        self.hook, self.on_result = hook, on_result

    def run_node(self, n):
        with ExitStack() as stack:
            if self.hook is not None:
                stack.enter_context(self.hook(n))
            try:
                result = super().run_node(n)
            except Exception as exc:
                if not hasattr(exc, "pcompile_node"):
                    exc.pcompile_node = f"node {n.name} ({n.op} {n.target})"
                raise
        self.on_result(n, result)
        return result


@contextmanager
def _constant_momentum(gm: fx.GraphModule):
    """Batch norms with momentum=None (a cumulative average) run with a constant momentum: the
    average's factor 1 / num_batches_tracked reads a buffer's value, which a fake tensor has not
    (a data-dependent error), while shapes, FLOPs and memory are the same either way."""
    cumulative = [m for m in gm.modules()
                  if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is None]
    for module in cumulative:
        module.momentum = 0.1
    try:
        yield
    finally:
        for module in cumulative:
            module.momentum = None


def fake_run(ir: IR, inputs: tuple, on_result: Callable[[fx.Node, object], None],
             hook: NodeHook | None = None, shard=None, grad: bool = True) -> None:
    """Interpret `ir` on fake tensors; call `on_result(node, value)` after every node."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    state = fake_state(ir.gm, mode, shard)
    args = fake_inputs(mode, inputs)
    try:
        with mode, torch.set_grad_enabled(grad), _reparametrize_module(ir.gm, state, tie_weights=True), \
                _constant_momentum(ir.gm):
            _Observed(ir.gm, hook, on_result).run(*args)
    except PcompileError:
        raise
    except Exception as exc:
        node = getattr(exc, "pcompile_node", None)
        raise PcompileError(
            f"shape analysis failed{' at ' + node if node else ''}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            "check that example_inputs have the shapes and dtypes the model expects; a model whose "
            "shapes depend on tensor values (data-dependent shapes) cannot be planned statically") from exc


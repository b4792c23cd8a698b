"""The pass manager: the debug dump after every pass, stop_after, and invariant checks that
name the pass which broke them."""
import os

import pytest
import torch

import pcompile
from pcompile import Cluster, PcompileError, Plan
from pcompile.api import PIPELINE, _context
from pcompile.ir import IR, META_KEY, Placement
from pcompile.ir.pass_manager import _REGISTRY, PassManager, get_pass, register_pass
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.options import CompileOptions

CFG = GPTConfig(num_layers=2)


def _gpt():
    return GPT(CFG), gpt_inputs(CFG, 4)


@pytest.fixture
def broken_passes():
    """Passes that break an invariant on purpose, registered for one test only."""
    @register_pass("test_drop_metadata", kind="analysis")
    def drop_metadata(ir, ctx):
        """Deletes one node's metadata (breaks 'annotated')."""
        next(n for n in ir.graph.nodes if n.op == "call_module").meta.pop(META_KEY, None)
        return ir

    @register_pass("test_forget_layer", kind="analysis")
    def forget_layer(ir, ctx):
        """Moves a node to a layer the IR does not list (breaks 'layers')."""
        ir.meta(next(iter(ir.graph.nodes))).layer = "nowhere"
        return ir

    @register_pass("test_dangling_use", kind="rewrite")
    def dangling_use(ir, ctx):
        """Makes an early node use a node defined after it (breaks the graph lint)."""
        nodes = list(ir.graph.nodes)
        last = [n for n in nodes if n.op == "call_module"][-1]
        nodes[2].args = (last,) + tuple(nodes[2].args[1:])
        return ir

    names = ["test_drop_metadata", "test_forget_layer", "test_dangling_use"]
    yield names
    for name in names:
        _REGISTRY.pop(name, None)


def test_debug_dir_dumps_every_pass(tmp_path):
    model, inputs = _gpt()
    cm = pcompile.compile(model, Cluster.local(2), inputs, plan=Plan.uniform(tp=2), debug_dir=str(tmp_path))
    expected = [f"{i:02d}-{name}.txt" for i, name in enumerate(PIPELINE)]
    assert expected[:5] == ["00-trace.txt", "01-shapes.txt", "02-flops.txt", "03-memory.txt", "04-layers.txt"]
    # each pass: the IR table (.txt) and a graph rendering (.svg with pydot, else .dot)
    drawings = [name.replace(".txt", ".svg" if (tmp_path / name.replace(".txt", ".svg")).exists() else ".dot")
                for name in expected]
    assert sorted(os.listdir(tmp_path)) == sorted(expected + drawings + ["passes.md"])
    for drawing in drawings:
        assert (tmp_path / drawing).read_text().lstrip().startswith(("digraph", "<?xml", "<svg")), drawing
    trace = (tmp_path / "00-trace.txt").read_text()
    assert trace.startswith("# after pass 'trace' (frontend)")
    tp = (tmp_path / f"{PIPELINE.index('tensor_parallel'):02d}-tensor_parallel.txt").read_text()
    # 2 blocks x 2 pairs, + the LM head's copy and the vocab-parallel embedding's reduce
    assert "+5 call_function:pcompile.runtime.collectives.tp_copy" in tp
    assert "+5 call_function:pcompile.runtime.collectives.tp_reduce" in tp
    # the dumped table is IR.format(): it parses back to the final graph's nodes
    table = tp.split("\n\n")[1]
    assert IR.parse(table) == IR.parse(cm.ir.format())
    assert "def forward" in tp  # the generated code follows the table
    index = (tmp_path / "passes.md").read_text().splitlines()
    assert index[0] == "# passes" and index[2].startswith("| # | pass | kind | seconds | nodes | change |")
    body = index[4:]
    assert [row.split("|")[2].strip() for row in body] == PIPELINE
    assert "annotated only" in body[1]  # shapes adds no node


def test_stop_after_returns_the_ir_and_dumps_up_to_there(tmp_path):
    model, inputs = _gpt()
    ir = pcompile.compile(model, Cluster.local(1), inputs, stop_after="layers", debug_dir=str(tmp_path))
    assert isinstance(ir, IR) and ir.layers == ["pre", "blocks.0", "blocks.1", "post"]
    tables = sorted(name for name in os.listdir(tmp_path) if name.endswith(".txt"))
    assert tables == ["00-trace.txt", "01-shapes.txt", "02-flops.txt", "03-memory.txt", "04-layers.txt"]
    assert len(os.listdir(tmp_path)) == 2 * len(tables) + 1  # + one drawing per pass + passes.md
    assert ir.total("flops") > 0


def test_timings_recorded_per_pass():
    model, inputs = _gpt()
    manager = PassManager(["trace", "shapes"])
    manager.run(None, _context(model, Cluster.local(1), inputs, None, CompileOptions()))
    assert [name for name, _ in manager.timings] == ["trace", "shapes"]


@pytest.mark.parametrize("broken,problem", [
    ("test_drop_metadata", "has no pcompile metadata"),
    ("test_forget_layer", "names unknown layer 'nowhere'"),
    ("test_dangling_use", "graph lint"),
])
def test_broken_pass_is_named(broken_passes, broken, problem):
    model, inputs = _gpt()
    with pytest.raises(PcompileError) as info:
        pcompile.compile(model, Cluster.local(1), inputs, passes=["trace", "shapes", "flops", "memory", "layers",
                                                                  broken, "search"])
    message = str(info.value)
    assert f"invariant broken after pass {broken!r}" in message and problem in message
    assert "pcompile bug" in info.value.fix


def test_verify_false_skips_the_checks(broken_passes):
    model, inputs = _gpt()
    ir = pcompile.compile(model, Cluster.local(1), inputs, passes=["trace", "shapes", "test_drop_metadata"],
                          stop_after="test_drop_metadata", verify=False)
    assert any(META_KEY not in n.meta for n in ir.graph.nodes)


def test_invariants_start_once_established(broken_passes):
    # before `shapes` establishes "annotated", a node without metadata is fine
    model, inputs = _gpt()
    ir = pcompile.compile(model, Cluster.local(1), inputs, passes=["trace", "test_drop_metadata"],
                          stop_after="test_drop_metadata")
    assert any(META_KEY not in n.meta for n in ir.graph.nodes)  # broken, and not checked yet


def test_unknown_pass():
    with pytest.raises(PcompileError, match="unknown pass 'nope'") as info:
        get_pass("nope")
    assert "trace" in info.value.fix


def test_a_pass_before_what_it_requires_is_refused_before_anything_runs():
    with pytest.raises(PcompileError, match=r"pass 'tensor_parallel' requires \['plan', 'loss_normalised'\]") as info:
        PassManager(["trace", "shapes", "flops", "memory", "layers", "tensor_parallel", "search", "loss_check"])
    assert "PIPELINE" in info.value.fix
    with pytest.raises(PcompileError, match=r"pass 'sequence_parallel' requires \['tensor_parallel'\]"):
        PassManager(PIPELINE[:PIPELINE.index("tensor_parallel")] + ["sequence_parallel"])
    PassManager(PIPELINE)  # the default pipeline is in order


def test_every_pass_says_what_it_requires_and_ensures():
    for name in PIPELINE[1:]:
        assert get_pass(name).requires, name
    assert all(get_pass(name).ensures for name in PIPELINE), [n for n in PIPELINE if not get_pass(n).ensures]


def test_a_rewrite_that_breaks_a_placement_is_named(broken_passes):
    @register_pass("test_wrong_placement", kind="rewrite", requires=("tensor_parallel",))
    def wrong_placement(ir, ctx):
        """Claims a replicated activation is split, and adds a node so the graph changed."""
        node = next(n for n in ir.graph.nodes if n.op == "call_module" and ir.meta(n).placement is None
                    and ir.meta(n).shape and len(ir.meta(n).shape) == 3)
        ir.meta(node).placement = Placement.shard(2, "tp", 2)
        with ir.graph.inserting_after(node):
            extra = ir.graph.call_function(torch.neg, (node,))
        ir.meta(extra).layer = ir.meta(node).layer
        return ir

    try:
        model, inputs = _gpt()
        upto = PIPELINE[:PIPELINE.index("tensor_parallel") + 1]
        with pytest.raises(PcompileError, match=r"after pass 'test_wrong_placement'.*has local shape \[4, 32, 64\], "
                                                r"expected \[4, 32, 32\]"):
            pcompile.compile(model, Cluster.local(2), inputs, plan=Plan.uniform(tp=2),
                             passes=upto + ["test_wrong_placement"], stop_after="test_wrong_placement")
    finally:
        _REGISTRY.pop("test_wrong_placement", None)

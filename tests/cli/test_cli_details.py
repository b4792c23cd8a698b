"""The CLI's small promises (issue #17, item 7), in-process and fast: a rank's refusal prints its
own fix even when torch wraps it, a model file without `:factory` finds its one factory or says
how to name it, `explain` sizes the layer column to the longest name, and the flat collectives
ZeRO-3 issues use this torch's names (no FutureWarning per rank)."""
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist

import pcompile
from pcompile import cli
from pcompile.errors import PcompileError
from pcompile.plan import Plan
from pcompile.runtime import collectives


def _wrapped_refusal() -> str:
    """A rank's traceback as launch() reports it: a refusal raised inside a pipeline stage, which
    torch's pipelining re-raises as a RuntimeError."""
    try:
        try:
            raise PcompileError("BatchNorm layer 'bn' sees one micro-batch", "use num_microbatches=1")
        except PcompileError as exc:
            raise RuntimeError("\n    [Stage 0] failed to run forward:\n    args: ('Tensor(...)',)\n") from exc
    except RuntimeError:
        return "rank 1 failed:\n" + traceback.format_exc()


def test_a_refusal_wrapped_by_torch_prints_its_own_cause_and_fix(monkeypatch, tmp_path, capsys):
    def failing_launch(*args, **kwargs):
        raise RuntimeError(_wrapped_refusal())

    monkeypatch.setattr(pcompile, "launch", failing_launch)
    (tmp_path / "plan.json").write_text(Plan.uniform(dp=4).to_json())
    assert cli.main(["run", "gpt-tiny", "--plan", str(tmp_path / "plan.json"), "--local", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pcompile run: error: BatchNorm layer 'bn' sees one micro-batch (fix: use num_microbatches=1)"


def test_rank_refusal_reads_the_outermost_refusal_and_only_refusals():
    refusal = cli.rank_refusal(_wrapped_refusal())
    assert (refusal.cause, refusal.fix) == ("BatchNorm layer 'bn' sees one micro-batch", "use num_microbatches=1")
    assert cli.rank_refusal("rank 0 failed:\nTraceback ...\nValueError: PcompileError: not ours") is None


FACTORIES = '''
import torch
from torch import nn
from pcompile.models import MLPConfig, MLPModel, mlp_inputs  # imported: not a factory of this file


class Net(nn.Module):
    def forward(self, x):
        return x.sum()
'''


def test_a_model_file_without_factory_uses_its_one_function(tmp_path):
    path = tmp_path / "one.py"
    path.write_text(FACTORIES + "\n\ndef build(batch=16):\n"
                    "    return MLPModel(MLPConfig()), mlp_inputs(MLPConfig(), batch)\n")
    workload = cli.load_workload(str(path), batch=8)
    assert isinstance(workload.model, torch.nn.Module) and workload.inputs[0].shape[0] == 8


@pytest.mark.parametrize("extra,message,fix", [
    ("\n\ndef build():\n    pass\n\n\ndef other():\n    pass\n",
     "defines 2 functions (build, other)", ".py:build (path/file.py:factory)"),
    ("", "defines no factory function (only the module class Net)",
     "add def build(): return Net(...), example_inputs to it and pass"),
])
def test_a_model_file_without_one_factory_is_refused_naming_the_factory_form(tmp_path, capsys, extra, message, fix):
    path = tmp_path / "many.py"
    path.write_text(FACTORIES + extra)
    assert cli.main(["plan", str(path), "--cluster", "local4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and fix in err and "unknown model" not in err, err


class _LongNames(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.the_input_projection_of_this_model = torch.nn.Linear(8, 32)
        self.mid = torch.nn.Linear(32, 32)
        self.the_output_projection_of_this_model_too = torch.nn.Linear(32, 8)

    def forward(self, x, y):
        h = self.mid(torch.relu(self.the_input_projection_of_this_model(x)))
        return torch.nn.functional.mse_loss(self.the_output_projection_of_this_model_too(h), y)


def test_explain_sizes_the_layer_column_to_the_longest_name():
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    plan = pcompile.plan(_LongNames(), pcompile.Cluster.local(2), (x, y))
    lines = plan.explain().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    column = lines[head].index("strategy")
    rows = lines[head + 1:lines.index("baselines (same cost tables):")]
    names = [row[:column].rstrip() for row in rows]
    assert len(rows) >= 2 and max(map(len, names)) > 14, rows  # longer than the column used to be
    for row, name in zip(rows, names):
        assert name in {a.layer for a in plan.layers} and row[column - 1] == " ", row  # a gap after the longest
        assert row[column:].startswith(plan.strategy_for(name).describe()), row


def _future_warnings() -> list[str]:
    """The FutureWarnings one rank sees: the flat collectives, then a model exported (capture=
    "export") and trained a step under ZeRO-3, the path that printed one per rank."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.ones(4)
        gathered, part = torch.empty(4 * dist.get_world_size()), torch.empty(4 // dist.get_world_size())
        collectives.all_gather_single(gathered, x, None)
        collectives.reduce_scatter_single(part, x, None, async_op=True).wait()
        torch.manual_seed(0)
        model, x = _Regression(), torch.randn(8, 8)
        cm = pcompile.compile(model, pcompile.Cluster.local(2), (x,), plan=Plan.uniform(dp=2, sdp=True),
                              capture="export")
        cm.train_step(x)
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).pow(2).mean()


def test_flat_collectives_and_exported_zero3_print_no_future_warning():
    assert pcompile.launch(_future_warnings, 2) == [[], []]
    assert collectives._GATHER in ("all_gather_single", "all_gather_into_tensor")  # older torch: the old name
    assert hasattr(dist, collectives._GATHER) and hasattr(dist, collectives._SCATTER)

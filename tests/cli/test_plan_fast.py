"""`pcompile plan` does only what planning needs (issue #16): one capture, no rewrite unless an
output reads the rewritten graph (--onnx, --plot, --debug-dir); built-in models default to
their published batch and sequence length; a batch the devices cannot split gets the nearest
batches that work."""
import json
import subprocess
import sys

import pytest

from pcompile import cli
from pcompile.ir.pass_manager import PassManager
from pcompile.models import GPT_BATCHES, GPT_CONFIGS
from pcompile.plan import Plan


def pcompile_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcompile", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def runs(monkeypatch):
    """The passes of every PassManager run, in order."""
    seen: list[list[str]] = []
    original = PassManager.run

    def run(self, ir, ctx):
        seen.append([p.name for p in self.passes])
        return original(self, ir, ctx)

    monkeypatch.setattr(PassManager, "run", run)
    return seen


def test_plan_traces_once_and_rewrites_nothing(runs, capsys):
    assert cli.main(["plan", "gpt-tiny", "--cluster", "local4", "--json"]) == 0
    assert len(runs) == 1 and runs[0][0] == "trace" and runs[0][-1] == "search"
    assert Plan.from_json(capsys.readouterr().out).num_devices == 4


def test_outputs_that_read_the_rewritten_graph_rewrite_in_the_same_run(runs, tmp_path, capsys):
    assert cli.main(["plan", "gpt-tiny", "--cluster", "local4", "--pp", "1", "--debug-dir", str(tmp_path)]) == 0
    assert len(runs) == 1 and "tensor_parallel" in runs[0] and runs[0][-1] == "pipeline_split"
    assert (tmp_path / "passes.md").exists() and "search" in (tmp_path / "passes.md").read_text()
    assert "per-layer strategies" in capsys.readouterr().out


def test_a_range_of_batches_is_searched_in_one_run(runs, capsys):
    assert cli.main(["plan", "gpt-tiny", "--cluster", "local4", "--batch", "4,8,16"]) == 0
    assert len(runs) == 1
    out = capsys.readouterr().out
    assert "global batch" in out and "tokens/s" in out


@pytest.mark.parametrize("name", cli.BUILTINS)
def test_built_in_models_default_to_their_published_batch(name):
    workload = cli.load_workload(name, meta=True)
    key = cli.ALIASES.get(name, name)
    assert tuple(workload.inputs[0].shape) == (GPT_BATCHES[key], GPT_CONFIGS[key].seq_len)
    assert cli.load_workload(name, batch=4, seq=16, meta=True).inputs[0].shape == (4, 16)


def test_gpt3_175b_on_1024_gpus_plans_with_no_other_flag():
    result = pcompile_cli("plan", "gpt3-175b", "--cluster", "128x8xA100-80GB", "--json")
    assert result.returncode == 0, result.stderr
    plan = Plan.from_dict(json.loads(result.stdout))
    assert plan.num_devices == 1024 and plan.global_batch == 1536
    assert plan.estimate.peak_memory <= plan.estimate.memory_budget


def test_a_batch_the_devices_cannot_split_gets_the_nearest_that_work(capsys):
    assert cli.main(["plan", "gpt-small", "--cluster", "8xH100-80GB", "--batch", "7", "--pp", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "global batch of 7" in err
    assert "the nearest that work are 6 and 8" in err and "--batch 8" in err

"""The `pcompile` command, run as a subprocess: plan (table, --json, --out, --plot, --onnx,
--debug-dir), explain, run --local 4 (losses equal serial training), demo, and bad input
(one line on stderr, exit status 2)."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import pcompile
from pcompile.models import GPT, GPTConfig, gpt_inputs
from pcompile.plan import Plan

HERE = os.path.dirname(os.path.abspath(__file__))
FACTORY = os.path.join(HERE, "factory.py")


def pcompile_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcompile", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    # --pp 1: ONNX export covers (dp, tp) plans; pipeline stages are not exported yet.
    result = pcompile_cli("plan", "gpt-tiny", "--cluster", "local4", "--pp", "1", "--out", str(out / "plan.json"),
                          "--plot", str(out / "plots"), "--onnx", str(out / "onnx"), "--debug-dir", str(out / "debug"))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_plan_prints_the_plan_and_writes_json_plots_onnx_and_the_pass_dump(planned):
    out, stdout = planned
    plan = Plan.from_json((out / "plan.json").read_text())
    assert plan.num_devices == 4 and plan.model and plan.estimate is not None
    assert "per-layer strategies" in stdout and plan.default.describe() in stdout
    assert "candidates" in stdout and "gain:" in stdout and "tokens/s" in stdout
    assert "\x1b[" not in stdout  # plain text when piped
    for name in ("timeline.png", "memory.png", "gain.png"):
        path = out / "plots" / name
        assert path.stat().st_size > 5000
        import matplotlib.image

        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300 and np.ptp(pixels[..., :3]) > 0.5
    for rank in range(4):
        model = onnx.load(out / "onnx" / f"rank{rank}.onnx")
        onnx.checker.check_model(model)
        if plan.default.tp > 1:
            assert any(n.domain == "pcompile" for n in model.graph.node)
    index = (out / "debug" / "passes.md").read_text()
    assert "search" in index and "tensor_parallel" in index


def test_plan_json_for_a_7b_model_on_the_meta_device():
    result = pcompile_cli("plan", "llama-7b", "--cluster", "8xA100-80GB", "--json")
    assert result.returncode == 0, result.stderr
    plan = Plan.from_dict(json.loads(result.stdout))
    assert plan.num_devices == 8
    # the device's 80 GiB less the reserve a CUDA process needs (Device.budget)
    budget = pcompile.Cluster.preset("8xA100-80GB").device_of(0).budget
    assert plan.estimate.peak_memory <= plan.estimate.memory_budget == budget
    assert any("dp: out of memory" in c.verdict for c in plan.candidates)  # pure dp8 does not fit


def test_plan_picks_the_global_batch_from_a_list():
    result = pcompile_cli("plan", "gpt-tiny", "--cluster", "local4", "--batch", "4,8,16", "--json")
    assert result.returncode == 0, result.stderr
    plan = Plan.from_dict(json.loads(result.stdout))
    assert plan.global_batch in (4, 8, 16)
    report = plan.explanation.split("global batch (the range allowed)")[1]
    assert all(f"{b}: " in report for b in (4, 8, 16)) and "<- chosen" in report


def test_explain_reads_the_plan_back(planned):
    out, _ = planned
    plan = Plan.from_json((out / "plan.json").read_text())
    result = pcompile_cli("explain", str(out / "plan.json"))
    assert result.returncode == 0, result.stderr
    assert plan.default.describe() in result.stdout
    for candidate in plan.candidates:
        assert candidate.strategy.describe() in result.stdout


def _serial_losses(steps: int, eval_every: int = 0, state: dict | None = None) -> tuple[list[float], list[float]]:
    """What `pcompile run gpt-tiny` computes, serially: losses (clipped to a norm of 1.0, the default)
    and the held-out batches' eval losses, from init_weights(seed 0) (the run builds the model on
    the meta device) or from `state`."""
    cfg = GPTConfig()
    model = pcompile.init_weights(GPT(cfg), 0)
    if state is not None:
        model.load_state_dict(state, strict=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, evals = [], []
    for step in range(steps):
        loss = model(*gpt_inputs(cfg, 8, seed=step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                evals.append(model(*gpt_inputs(cfg, 8, seed=1_000_000 + step)).item())
            model.train()
    return losses, evals


def test_run_local_4_trains_like_serial(planned):
    out, _ = planned
    result = pcompile_cli("run", "gpt-tiny", "--plan", str(out / "plan.json"), "--local", "4", "--steps", "3",
                          "--eval-every", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["world_size"] == 4 and len(report["ranks"]) == 4
    steps = report["ranks"][0]["steps"]
    losses, evals = [s["loss"] for s in steps], [s["eval_loss"] for s in steps if "eval_loss" in s]
    expected, expected_evals = _serial_losses(3, eval_every=2)
    assert np.allclose(losses, expected, atol=1e-5), (losses, expected)
    assert np.allclose(evals, expected_evals, atol=1e-5) and len(evals) == 1, (evals, expected_evals)
    assert all("grad_norm" in s for s in steps)  # clipped to 1.0 by default
    for rank in report["ranks"]:
        assert rank["peak_memory"] > 0
        assert all(s["tokens_per_s"] > 0 and s["tflops_per_device"] > 0 for s in rank["steps"])
    assert "step 3/3" in result.stderr  # the step log goes to stderr when stdout is JSON


def test_run_loads_weights_from_a_safetensors_file(planned, tmp_path):
    from safetensors.torch import save_file

    out, _ = planned
    torch.manual_seed(4)
    state = {k: v for k, v in GPT(GPTConfig()).state_dict().items() if k != "head.weight"}  # tied: stored once
    save_file(state, tmp_path / "model.safetensors")
    result = pcompile_cli("run", "gpt-tiny", "--plan", str(out / "plan.json"), "--local", "4", "--steps", "2",
                          "--weights", str(tmp_path / "model.safetensors"), "--json")
    assert result.returncode == 0, result.stderr
    losses = [s["loss"] for s in json.loads(result.stdout)["ranks"][0]["steps"]]
    expected, _ = _serial_losses(2, state=state)
    assert np.allclose(losses, expected, atol=1e-5), (losses, expected)


def test_a_rank_refusal_prints_its_own_fix(planned, tmp_path):
    out, _ = planned
    result = pcompile_cli("run", "gpt-tiny", "--plan", str(out / "plan.json"), "--local", "4", "--steps", "1",
                          "--weights", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "is not a safetensors file" in result.stderr and "fix: pass a .safetensors file" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_demo():
    result = pcompile_cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "match" in result.stdout


def test_a_model_file_factory_plans(tmp_path):
    result = pcompile_cli("plan", f"{FACTORY}:mlp", "--cluster", "local4", "--out", str(tmp_path / "mlp.json"))
    assert result.returncode == 0, result.stderr
    assert "samples/s" in result.stdout
    # ... and that plan is refused for another model, before any rank starts
    result = pcompile_cli("run", "gpt-tiny", "--plan", str(tmp_path / "mlp.json"), "--local", "4")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "another model" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["plan", "gpt-huge", "--cluster", "8xA100-80GB"], "unknown model 'gpt-huge'"),
    (["plan", "gpt-tiny", "--cluster", "9xB300"], "unknown cluster preset '9xB300'"),
    (["plan", "gpt-tiny", "--cluster", "local4", "--memory", "lots"], "cannot read memory size"),
    (["explain", "MALFORMED"], "plan is not valid JSON"),
    (["explain", "STRUCTURE"], "malformed plan"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, args, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "structure.json").write_text('{"num_devices": 4}')
    args = [{"MALFORMED": str(tmp_path / "bad.json"), "STRUCTURE": str(tmp_path / "structure.json")}.get(a, a)
            for a in args]
    result = pcompile_cli(*args)
    assert result.returncode == 2, result
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr and "fix:" in result.stderr

"""A rank killed mid-run under `torchrun --max-restarts` costs nothing: the group restarts,
resumes from the latest checkpoint, and the loss curve equals an uninterrupted run."""
import json
import os
import subprocess
import sys

import pcompile
from tests.reliability import resume_script

SCRIPT = os.path.join(os.path.dirname(__file__), "resume_script.py")


def _records(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "losses.jsonl")) as f:
        return [json.loads(line) for line in f]


def _torchrun(out_dir: str, kill_at: int) -> list[dict]:
    os.makedirs(out_dir, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", "--monitor-interval", "0.2", SCRIPT, out_dir, str(kill_at)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _records(out_dir)


def test_killed_rank_resumes_with_the_same_loss_curve(tmp_path):
    os.makedirs(tmp_path / "clean")
    pcompile.launch(resume_script.run, 2, str(tmp_path / "clean"), -1, 0)
    clean = _records(str(tmp_path / "clean"))
    faulty = _torchrun(str(tmp_path / "faulty"), kill_at=3)
    assert {r["attempt"] for r in clean} == {0}
    assert {r["attempt"] for r in faulty} == {0, 1}, "the kill should have forced one restart"
    resumed = [r for r in faulty if r["attempt"] == 1]
    assert resumed[0]["step"] == 2, "resume starts from the checkpoint saved after step 2"
    final = {r["step"]: r["loss"] for r in faulty}  # later attempts overwrite earlier ones
    expected = {r["step"]: r["loss"] for r in clean}
    assert sorted(final) == sorted(expected) == list(range(6))
    for step, loss in expected.items():
        assert final[step] == loss, (step, final[step], loss)

"""The same model, cluster and seed give the same plan, byte for byte, in fresh processes
(different hash seeds: no dict/set ordering or timing leaks into the plan)."""
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("model,cluster", [("gpt-tiny", "local4"), ("gpt-tiny", "2x8xA100-80GB")])
def test_plan_json_is_byte_identical_across_processes(model, cluster):
    outputs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-m", "pcompile", "plan", model, "--cluster", cluster, "--json"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert '"explanation"' in outputs[0] and '"candidates"' in outputs[0]

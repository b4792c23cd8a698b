"""`make gpu-check`'s script dry-runs on the CPU (GPU_CHECK_ALLOW_CPU=1, --quick): every path but
CUDA's - one-device plans (plain, checkpointing, operator split; fp32 and bf16) against the
serial model, predictions read, a meta-built model initialised - so the script a GPU machine
runs cannot rot unnoticed."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_runs_on_the_cpu():
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "GPU_CHECK_ALLOW_CPU": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = dict(item.split("=", 1) for item in result.stdout.strip().splitlines()[-1].split())
    assert figures["failed"] == "0"
    for plan in ("plain", "ckpt", "split2"):
        for precision in ("fp32", "bf16"):
            assert figures[f"{plan}_{precision}_ok"] == "1", figures
            assert float(figures[f"{plan}_{precision}_time_ratio"]) > 0
    assert figures["meta_init_ok"] == "1"

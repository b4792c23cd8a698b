"""A 7B-parameter GPT (32 layers, hidden 4096, batch 8 x 2048) analyses and plans on fake
tensors in seconds with process peak RSS under 2 GB: benchmarks/analysis_memory.py runs in a
fresh process so its RSS is the analysis alone, not this test session's."""
import os
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "analysis_memory.py"


def _figures(stdout: str) -> dict[str, float]:
    last = stdout.strip().splitlines()[-1]
    return {key: float(value) for key, value in (item.split("=") for item in last.split())}


def test_7b_gpt_analyses_under_2gb_rss():
    result = subprocess.run([sys.executable, str(BENCHMARK)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    figures = _figures(result.stdout)
    print(result.stdout)  # shown with pytest -s: the plan and the figures
    assert 6.5 < figures["params_b"] < 7.0
    assert figures["peak_rss_gb"] < 2.0, figures
    assert figures["analyse_s"] < 60, figures
    assert "Plan for 8 device(s)" in result.stdout

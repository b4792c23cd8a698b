"""Run every benchmark and print one summary table: each headline figure next to its target.

Each benchmark runs as its own subprocess (own memory, own peak RSS) under a timeout; its last
`key=value` line is read back and each figure that has a target is checked against it (targets
from the issues: search time, cost-model fidelity, runtime overhead, memory, capture, search
quality). Figures without a target are listed with an empty target. `--quick` skips the slow
benchmarks (multi-rank runs and large captures) and runs search_quality and search_time on
BERT-Large only.

  python benchmarks/run_all.py [--quick] [--only search_time,analysis_memory] [--log-dir DIR]

Exit status 0 when every benchmark ran and met its targets, 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Target:
    """figure `op` bound: "<", "<=", ">=", "==", "abs<=" (|x| <= bound) or "all" ("W/N" with W == N)."""

    op: str
    bound: float = 0.0

    def met(self, value: str) -> bool | None:
        """True / False, or None when the figure is not a number (e.g. "nan": not measured)."""
        if self.op == "all":
            m = re.fullmatch(r"(\d+)/(\d+)", value)
            return None if m is None else int(m[1]) == int(m[2]) and int(m[2]) > 0
        try:
            x = float(value)
        except ValueError:
            return None
        if math.isnan(x):
            return None
        return {"<": x < self.bound, "<=": x <= self.bound, ">=": x >= self.bound, "==": x == self.bound,
                "abs<=": abs(x) <= self.bound}[self.op]

    def __str__(self) -> str:
        if self.op == "all":
            return "all"
        bound = f"{self.bound:g}"
        return f"within ±{bound}" if self.op == "abs<=" else f"{self.op} {bound}"


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]
    timeout_s: int
    targets: dict
    quick_args: tuple[str, ...] | None = None  # None: skipped under --quick; else the args to run with


RATIO = Target("<=", 1.10)
BENCHES = (
    Bench("search_quality", (), 600, {"never_worse": Target("==", 1), "tight_wins": Target("all")},
          quick_args=("--only", "bert-large")),
    Bench("search_time", (), 1800, {"bert_s": Target("<", 1), "llama7b_s": Target("<", 2), "gpt3_s": Target("<", 10)},
          quick_args=("bert",)),
    Bench("cost_model_fidelity", ("--quick-profile",), 1200,
          {"spearman": Target(">=", 0.9), "mem_err_pct": Target("<=", 10)}),
    Bench("runtime_overhead", (), 1200, {k: RATIO for k in ("ddp_ratio", "fsdp_ratio", "tp_ratio", "dp2tp2_ratio",
                                                             "pp_ratio")}),
    Bench("memory_savings", (), 600, {"ckpt_err_pct": Target("abs<=", 10)}, quick_args=()),
    Bench("analysis_memory", (), 600, {"peak_rss_gb": Target("<", 2)}, quick_args=()),
    Bench("galvatron_memory", (), 600, {"unexplained": Target("==", 0)}, quick_args=()),
    Bench("capture_large", (), 2400, {"peak_rss_gb": Target("<", 4)}),
    Bench("large_weights", (), 1800,
          {"tp4_growth_ratio": Target("<", 0.5), "zero3_growth_ratio": Target("<", 0.5),
           **{f"{plan}_{check}": Target("==", 1) for plan in ("tp4", "zero3", "dp4", "pp2tp2")
              for check in ("init_same", "loaded_exact")},
           "tp4_train_ok": Target("==", 1), "zero3_train_ok": Target("==", 1)}),
)

_PAIR = re.compile(r"[A-Za-z_][\w.]*=\S+")


def figures(output: str) -> dict[str, str]:
    """The last line made only of key=value pairs."""
    for line in reversed(output.strip().splitlines()):
        tokens = line.split()
        if tokens and all(_PAIR.fullmatch(t) for t in tokens):
            return dict(t.split("=", 1) for t in tokens)
    return {}


def run(bench: Bench, args: tuple[str, ...], log_dir: str | None) -> tuple[dict[str, str], str, float]:
    """(figures, error or "", seconds) of one benchmark subprocess."""
    start = time.perf_counter()
    command = [sys.executable, os.path.join(HERE, f"{bench.name}.py"), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=bench.timeout_s,
                              cwd=os.path.dirname(HERE))
        output, error = done.stdout + done.stderr, "" if done.returncode == 0 else f"exit code {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        error = f"timed out after {bench.timeout_s} s"
    seconds = time.perf_counter() - start
    if log_dir:
        with open(os.path.join(log_dir, f"{bench.name}.log"), "w") as f:
            f.write(f"$ {' '.join(command)}\n{output}")
    found = figures(output)
    if not found and not error:
        error = "no key=value line in its output"
    if error:
        tail = "\n".join("    " + line for line in output.strip().splitlines()[-6:])
        print(f"  {bench.name}: {error}\n{tail}", flush=True)
    return found, error, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the slow benchmarks (minutes each)")
    parser.add_argument("--only", help="comma-separated benchmark names")
    parser.add_argument("--log-dir", help="write each benchmark's full output to DIR/<name>.log")
    opts = parser.parse_args(argv)
    if opts.log_dir:
        os.makedirs(opts.log_dir, exist_ok=True)
    chosen = [b for b in BENCHES if not opts.only or b.name in opts.only.split(",")]
    rows, ok = [], True
    for bench in chosen:
        if opts.quick and bench.quick_args is None:
            rows.append((bench.name, "-", "skipped (--quick)", "", "skip"))
            continue
        args = bench.quick_args if opts.quick else bench.args
        print(f"running {bench.name} {' '.join(args)}".rstrip() + " ...", flush=True)
        found, error, seconds = run(bench, args, opts.log_dir)
        print(f"  {bench.name}: {seconds:.0f} s", flush=True)
        if error:
            ok = False
            rows.append((bench.name, "-", error, "", "FAIL"))
        for key, value in found.items():
            target = bench.targets.get(key)
            met = target.met(value) if target else None
            mark = "" if target is None else {True: "pass", False: "FAIL", None: "n/a"}[met]
            ok &= met is not False
            rows.append((bench.name, key, value, str(target or ""), mark))
        for key in sorted(bench.targets.keys() - found.keys()):
            if found and opts.quick and args != bench.args:  # the quick run measures a subset
                rows.append((bench.name, key, "not run (--quick)", str(bench.targets[key]), "skip"))
            elif found:
                ok = False
                rows.append((bench.name, key, "missing", str(bench.targets[key]), "FAIL"))
    widths = [max(len(str(r[i])) for r in rows + [("benchmark", "figure", "value", "target", "")]) for i in range(5)]
    print()
    for row in [("benchmark", "figure", "value", "target", "")] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"\n{'all targets met' if ok else 'some targets missed or benchmarks failed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Parallel == serial on random models and random forced plans (hypothesis, on 4 gloo ranks).
CI runs a fast, derandomized profile; `make fuzz` sets PCOMPILE_FUZZ_EXAMPLES=1000 and a new
PCOMPILE_FUZZ_SEED each run (printed: rerun a failure with that seed)."""
import os

import pcompile
from tests.fuzz.ranks_fuzz import fuzz

EXAMPLES = int(os.environ.get("PCOMPILE_FUZZ_EXAMPLES", "12"))


def test_random_models_and_plans_match_serial():
    per_rank = pcompile.launch(fuzz, 4, EXAMPLES, timeout=max(600.0, EXAMPLES * 5.0))
    outcome = per_rank[0]
    print(f"fuzz: examples={outcome['examples']} mismatches={len(outcome['mismatches'])} seed={outcome['seed']}")
    assert all(r["examples"] == outcome["examples"] for r in per_rank)
    assert outcome["examples"] >= min(EXAMPLES, 1)
    assert outcome["mismatches"] == [], outcome["mismatches"][:5]

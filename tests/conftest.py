"""Hypothesis profiles: CI ("ci", the default) draws the same examples every run (derandomized,
no example database), so a red CI is reproducible; `HYPOTHESIS_PROFILE=explore` (what
`make fuzz` sets) draws new ones each run."""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

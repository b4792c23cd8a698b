"""The one error type users see: every message names the cause and the fix."""
from __future__ import annotations


class PcompileError(Exception):
    """A problem with the user's model, cluster or plan, stated as cause + fix."""

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(cause if fix is None else f"{cause}\n  fix: {fix}")

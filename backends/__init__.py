"""Backends lower a rewritten IR to something that runs (pcompile.backends)."""
from pcompile.backends.distributed import CompiledModel

__all__ = ["CompiledModel"]

"""CompileOptions: what the user chose for one compile / plan, frozen and checked when the
pipeline is built (an unknown capture path, precision or search-space field fails before any
pass runs). Passes read it from `ctx.options`; none writes it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pcompile.errors import PcompileError
from pcompile.search.space import SearchSpace

CAPTURES = ("auto", "fx", "export")
PRECISIONS = (None, "bf16")
# What Plan._check_offload lets an offloaded optimizer run with: ZeRO-3 wherever dp > 1 (a dp = 1
# layer is plain whatever sdp says; expert parallelism needs plain dp, so it is not offered), no
# ZeRO-2, one stage
OFFLOAD_SPACE = {"sdp": (True,), "zero2": (False,), "pp_degrees": (1,)}


@dataclass(frozen=True)
class CompileOptions:
    capture: str = "auto"  # "fx" | "export" | "auto" (fx, falling back to export)
    # the user's narrowing of the search: (SearchSpace field, allowed values) pairs
    search_space: tuple[tuple[str, tuple], ...] = ()
    mixed_precision: str | None = None  # None (fp32) or "bf16" (bf16 compute, fp32 masters)
    global_batches: tuple[int, ...] | None = None  # the batches the search may pick; None: the inputs'
    # the symbolic analysis' batch / sequence dims: (("b", ((input, dim), ...)), ("s", ...)); () = found
    symbolic_dims: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    # ZeRO-Offload (Plan.offload_optimizer): the search then offers what the offloaded step runs
    # with, one stage and ZeRO-3 on every data-parallel layer (OFFLOAD_SPACE)
    offload_optimizer: bool = False

    def __post_init__(self):
        if self.capture not in CAPTURES:
            raise PcompileError(f"capture={self.capture!r} is not a capture path", f"use one of {CAPTURES}")
        if self.mixed_precision not in PRECISIONS:
            raise PcompileError(f"unknown mixed_precision {self.mixed_precision!r}",
                                f"use one of {list(PRECISIONS)} (None = fp32 everywhere, 'bf16' = bf16 compute "
                                "with fp32 master weights)")
        known = {f.name for f in dataclasses.fields(SearchSpace)}
        unknown = [key for key, _ in self.search_space if key not in known]
        if unknown:
            raise PcompileError(f"unknown search_space option(s) {unknown}",
                                f"use fields of pcompile.search.space.SearchSpace: {sorted(known)}")

    @staticmethod
    def make(capture: str = "auto", search_space: dict | None = None, mixed_precision: str | None = None,
             global_batch=None, symbolic_dims: dict | None = None,
             offload_optimizer: bool = False) -> "CompileOptions":
        """From the public API's arguments (a dict search space, an int or iterable global batch)."""
        if search_space is not None and not isinstance(search_space, dict):
            raise PcompileError(f"search_space must be a dict, got {type(search_space).__name__}",
                                "pass e.g. search_space={'pp_degrees': (1,)}")
        limits = {key: tuple(values) if isinstance(values, (list, tuple, set, range)) else (values,)
                  for key, values in (search_space or {}).items()}
        if offload_optimizer:
            for key, allowed in OFFLOAD_SPACE.items():
                narrowed = tuple(v for v in limits.get(key, allowed) if v in allowed)
                if not narrowed:
                    raise PcompileError(f"search_space {key}={limits[key]} leaves nothing an offloaded optimizer runs "
                                        f"with ({key} in {allowed})", f"drop {key} from search_space, or "
                                        "offload_optimizer=False")
                limits[key] = narrowed
        space = tuple(sorted(limits.items()))
        dims = tuple((name, tuple(tuple(place) for place in places))
                     for name, places in sorted((symbolic_dims or {}).items()))
        return CompileOptions(capture, space, mixed_precision, _global_batches(global_batch), dims,
                              bool(offload_optimizer))

    @property
    def space_limits(self) -> dict[str, tuple]:
        return dict(self.search_space)


def _global_batches(global_batch) -> tuple[int, ...] | None:
    if global_batch is None:
        return None
    values = (global_batch,) if isinstance(global_batch, int) else tuple(global_batch)
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in values):
        raise PcompileError(f"global_batch={global_batch!r} must be a positive int or an iterable of them",
                            "pass e.g. global_batch=range(64, 513, 64) or global_batch=(128, 256)")
    return tuple(sorted(set(values)))

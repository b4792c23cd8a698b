"""Data-parallel gradient buckets, one rule for the runtime that packs them and the cost model
that prices them: whole gradients packed in order into flat buckets, a bucket closed once it
holds its cap or more - FIRST_BUCKET_BYTES for the first (1 MiB, DDP's: the gradients backward
produces first go out early, so the all-reduces start while backward still runs), then
GRAD_BUCKET_BYTES (DDP's default cap, 25 MiB)."""
from __future__ import annotations

GRAD_BUCKET_BYTES = 25 * 2**20
FIRST_BUCKET_BYTES = 2**20


def bucket_ranges(sizes: list[float], cap: float = GRAD_BUCKET_BYTES,
                  first_cap: float = FIRST_BUCKET_BYTES) -> list[tuple[int, int]]:
    """The [start, stop) index ranges of the buckets that `sizes` (bytes per gradient, in order) pack into."""
    out, start, size = [], 0, 0.0
    first_cap = min(first_cap, cap)
    for i, n in enumerate(sizes):
        size += n
        if size >= (first_cap if not out else cap):
            out.append((start, i + 1))
            start, size = i + 1, 0.0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out

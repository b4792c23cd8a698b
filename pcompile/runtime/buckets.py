"""Data-parallel gradient buckets, one rule for the runtime that packs them and the cost model
that prices them: whole gradients packed in order into flat buckets, a bucket closed once it
holds GRAD_BUCKET_BYTES or more (DDP's default cap, 25 MiB)."""
from __future__ import annotations

GRAD_BUCKET_BYTES = 25 * 2**20


def bucket_ranges(sizes: list[float], cap: float = GRAD_BUCKET_BYTES) -> list[tuple[int, int]]:
    """The [start, stop) index ranges of the buckets that `sizes` (bytes per gradient, in order) pack into."""
    out, start, size = [], 0, 0.0
    for i, n in enumerate(sizes):
        size += n
        if size >= cap:
            out.append((start, i + 1))
            start, size = i + 1, 0.0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out

"""Pieces of safetensors tensors read with positioned reads equal the same cut of the full tensor
(row and column blocks, block-wise fused cuts, every dtype, slabs smaller than the piece)."""
import pytest
import torch
from safetensors.torch import save_file

from pcompile.ir.placement import Shard
from pcompile.runtime import safetensors_slices
from pcompile.runtime.materialise import local_piece, read_piece
from pcompile.runtime.safetensors_slices import SafetensorsFile

CUTS = {
    "rows": [(Shard("tp", 0, 4), 1)],
    "columns": [(Shard("tp", 1, 4), 3)],
    "fused q/k/v columns": [(Shard("tp", 1, 2, blocks=3), 1)],
    "fused rows, then ZeRO-3 columns": [(Shard("tp", 0, 2, blocks=3), 0), (Shard("dp", 1, 2), 1)],
    "tp rows, then ZeRO-3 rows": [(Shard("tp", 0, 2), 1), (Shard("dp", 0, 2), 0)],
    "block-wise, then the same dim": [(Shard("tp", 0, 2, blocks=3), 1), (Shard("dp", 0, 2), 1)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("cut", CUTS)
def test_a_piece_read_from_the_file_is_the_cut_of_the_tensor(tmp_path, monkeypatch, cut, dtype):
    monkeypatch.setattr(safetensors_slices, "CHUNK_BYTES", 40)  # several slabs per piece
    full = (torch.randn(24, 12) * 100).to(dtype)
    save_file({"w": full, "b": torch.arange(5.0), "s": torch.tensor(2.5)}, tmp_path / "m.safetensors")
    with SafetensorsFile(str(tmp_path / "m.safetensors")) as f:
        assert torch.equal(read_piece(f, "w", CUTS[cut]), local_piece(full, CUTS[cut]))
        assert torch.equal(read_piece(f, "b", []), torch.arange(5.0))
        assert torch.equal(read_piece(f, "s", []), torch.tensor(2.5))

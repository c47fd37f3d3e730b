"""zupatch.io.safetensors_file: reading a tensor's rows without reading the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file

from zupatch.io.safetensors_file import SafetensorsError, SafetensorsFile


def test_rows_are_read_from_the_file_or_from_bytes_and_bounded(tmp_path: Path) -> None:
    """Any run of rows equals the same slice of the saved tensor, for a file and for bytes in
    memory, and rows outside the tensor (which would read a neighbour's data) are refused."""
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "m": torch.randn(7, 5, dtype=torch.float64)}  # fmt: skip
    save_file(tensors, str(tmp_path / "t.safetensors"))
    for reader in (SafetensorsFile(tmp_path / "t.safetensors"), SafetensorsFile("mem", data=save(tensors))):
        for start, stop in [(0, 7), (2, 5), (6, 7), (3, 3)]:
            rows = reader.read_rows("m", start, stop, np.float64)
            assert np.array_equal(rows, tensors["m"][start:stop].numpy()) and rows.flags.writeable
        with pytest.raises(ValueError, match="rows 2:4 of a tensor with 3"):
            reader.read_rows("a", 2, 4, np.float32)
        with pytest.raises(ValueError, match="does not match"):
            reader.read_rows("a", 0, 1, np.float64)


def test_a_file_cut_short_after_its_header_was_read_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"m": torch.ones(64, 8, dtype=torch.float64)}, str(path))
    reader = SafetensorsFile(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert reader.read_rows("m", 0, 10, np.float64).sum() == 80
    with pytest.raises(SafetensorsError, match="truncated"):
        reader.read_rows("m", 60, 64, np.float64)

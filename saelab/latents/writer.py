"""A safetensors file written in pieces: its tensors' names, dtypes and sizes are declared up front (the header),
and their contents arrive later, slice by slice, at any offset. The latent cache's shards and token index are
written this way (`saelab.latents.build`), so no array of the whole cache ever exists in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_DTYPES = {
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
}


class SafetensorsWriter:
    """A safetensors file of 1-D tensors whose sizes are known up front and whose contents arrive in pieces."""

    def __init__(self, path: Path, tensors: list[tuple[str, np.dtype[Any], int]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        self._where: dict[str, tuple[int, np.dtype[Any]]] = {}
        offset = 0
        for name, dtype, n in tensors:
            size = n * dtype.itemsize
            header[name] = {"dtype": _DTYPES[dtype], "shape": [n], "data_offsets": [offset, offset + size]}
            self._where[name] = (offset, dtype)
            offset += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._base = 8 + len(raw)
        self.f: BinaryIO = path.open("wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self._base + offset)

    def write_at(self, name: str, start: int, arr: np.ndarray) -> None:
        """Write `arr` into tensor `name` from element `start` on."""
        offset, dtype = self._where[name]
        out = np.ascontiguousarray(arr, dtype=dtype)
        if dtype == np.float16:  # a positive activation below float16's range stays a nonzero
            out[(out == 0) & (np.asarray(arr) > 0)] = np.finfo(np.float16).smallest_subnormal
        self.f.seek(self._base + offset + start * dtype.itemsize)
        self.f.write(out.tobytes())

    def close(self) -> None:
        self.f.close()

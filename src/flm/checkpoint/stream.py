"""Writing a safetensors file one tensor at a time, for files larger than memory (`flm grow` of a big model).

The safetensors library writes a file from a dict of tensors that must all be in memory together. Here each
tensor's bytes go to a body file as it comes; at the end the header (names, dtypes, shapes, offsets: the
format's JSON, padded to 8 bytes) is written into the real file and the body copied after it in chunks. The
result is an ordinary safetensors file (tests read it back with the safetensors library); peak memory is one
tensor, at the price of writing the bytes twice.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from flm.files import DurableFile

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class StreamingSafetensors:
    """`add(name, tensor)` as often as needed, then `close()`; the file appears at `path` only when complete."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._body_path = self.path.with_name(self.path.name + ".body")
        self._body = open(self._body_path, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"{name} written twice")
        t = tensor.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        if size:  # the tensor's own bytes, written without a copy
            self._body.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size

    def close(self) -> None:
        self._body.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with DurableFile(self.path) as out, open(self._body_path, "rb") as body:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(body, out, length=16 << 20)
        self._body_path.unlink()

    def discard(self) -> None:
        """Give up (an error while writing): remove what was written."""
        self._body.close()
        self._body_path.unlink(missing_ok=True)

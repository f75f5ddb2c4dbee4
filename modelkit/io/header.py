"""Pure-Python safetensors header reader: keys, dtypes, shapes, offsets and
``__metadata__`` without importing torch or touching tensor data.

Format: 8-byte little-endian header length N, N bytes of JSON, then the data
buffer, which must be covered by the tensors' ``data_offsets`` exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from modelkit.errors import BadFileError

MAX_HEADER_SIZE = 100_000_000  # the safetensors library's own limit

DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}
FLOAT_DTYPES = frozenset(
    {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset into the data buffer
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header. ``tensors`` is in file (offset) order."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_size: int = 0  # N, the JSON length

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    @property
    def file_size(self) -> int:
        return self.data_start + max((t.end for t in self.tensors.values()), default=0)


def _bad(path: Path, problem: str) -> BadFileError:
    return BadFileError(f"{path}: {problem}")


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"header entry {name!r} is not an object; the file is corrupt")
    try:
        dtype = str(entry["dtype"])
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(path, f"header entry {name!r} is malformed ({exc})") from None
    if dtype not in DTYPE_SIZES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    info = TensorInfo(name, dtype, shape, begin, end)
    expected = info.numel * DTYPE_SIZES[dtype]
    if end < begin or end - begin != expected:
        raise _bad(path, f"tensor {name!r} spans {end - begin} bytes but "
                         f"{dtype}{list(shape)} needs {int(expected)}; the file is corrupt")
    return info


def parse_header_bytes(path: Path, raw: bytes, file_size: int) -> Header:
    """Parse header JSON ``raw`` and check it against the file size."""
    if not raw.lstrip()[:1] == b"{":
        raise _bad(path, "not a safetensors file (header is not JSON)")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "not a safetensors file (header is not valid JSON)") from None
    if not isinstance(obj, dict):
        raise _bad(path, "not a safetensors file (header is not a JSON object)")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _bad(path, "__metadata__ is not a string map")
    infos = [_parse_entry(path, name, entry) for name, entry in obj.items()]
    infos.sort(key=lambda t: (t.begin, t.end))
    data_len = file_size - 8 - len(raw)
    pos = 0
    for t in infos:
        if t.begin != pos:
            raise _bad(path, f"tensor {t.name!r} does not start where the previous one "
                             "ends; the file is corrupt")
        pos = t.end
    if pos != data_len:
        if pos > data_len:
            raise _bad(path, f"truncated: tensors need {pos} data bytes, the file has "
                             f"{max(data_len, 0)}; download or copy it again")
        raise _bad(path, f"{data_len - pos} stray bytes after the last tensor; "
                         "the file is corrupt")
    metadata = {str(k): str(v) for k, v in meta.items()}
    return Header(path, {t.name: t for t in infos}, metadata, len(raw))


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at ``path``.

    Raises:
        BadFileError: the file is missing, too short, truncated, not
            safetensors or has a header over 100 MB.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(p, "not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_SIZE:
                if head[:1] in (b"P", b"\x80"):
                    raise _bad(p, "not a safetensors file (looks like a pickle/.ckpt)")
                if all(32 <= c < 127 or c in b"\t\r\n" for c in head):
                    raise _bad(p, "not a safetensors file (it starts with text, not a "
                                  "header length)")
                raise _bad(p, f"header size {n} is over the 100 MB limit; "
                              "not a safetensors file or corrupt")
            if n + 8 > size:
                raise _bad(p, "truncated: the header runs past the end of the file")
            raw = f.read(n)
    except FileNotFoundError:
        raise _bad(p, "no such file") from None
    except IsADirectoryError:
        raise _bad(p, "is a directory, not a model file") from None
    except PermissionError:
        raise _bad(p, "permission denied") from None
    return parse_header_bytes(p, raw, size)


_SMALL_TENSOR_LIMIT = 1 << 20


def _decode(dtype: str, raw: bytes) -> list[float]:
    import array
    import struct

    if dtype in ("F32", "F64", "I64", "I32", "I16", "I8", "U8"):
        code = {"F32": "f", "F64": "d", "I64": "q", "I32": "i", "I16": "h", "I8": "b",
                "U8": "B"}[dtype]
        arr = array.array(code, raw)
        return [float(x) for x in arr]
    if dtype == "F16":
        return [float(x) for x in struct.unpack(f"<{len(raw) // 2}e", raw)]
    if dtype == "BF16":
        halves = array.array("H", raw)
        widened = array.array("I", (h << 16 for h in halves))
        return [float(x) for x in array.array("f", widened.tobytes())]
    if dtype == "BOOL":
        return [float(b) for b in raw]
    raise BadFileError(f"cannot decode dtype {dtype} without torch")


def read_small_tensor(header: Header, name: str) -> list[float]:
    """Values of a small tensor (at most 1 MiB) as a flat list, decoded in
    pure Python. For inspection details (alphas, position ids, one norm bias)
    without importing torch."""
    info = header.tensors[name]
    if info.nbytes > _SMALL_TENSOR_LIMIT:
        raise BadFileError(f"{header.path}: tensor {name!r} is too large to decode "
                           "without torch")
    with open(header.path, "rb") as f:
        f.seek(header.data_start + info.begin)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise BadFileError(f"{header.path}: truncated inside tensor {name!r}")
    return _decode(info.dtype, raw)

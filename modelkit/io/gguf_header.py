"""Pure-Python, bounded GGUF header reader: key/values and tensor infos
without numpy, torch or the ``gguf`` package, safe against hostile files.

Layout (GGUF v2/v3): magic ``GGUF``, u32 version, u64 tensor count, u64
key/value count; each key/value is a string key, a u32 value type and the
value (arrays: u32 element type, u64 count, elements); each tensor info is a
string name, u32 dimension count, u64 dimensions (innermost first), u32 GGML
type and u64 offset into the data section, which starts at the next multiple
of ``general.alignment`` (default 32) after the infos. Strings are a u64
byte length and UTF-8 bytes. Files may be big-endian (the version then reads
as a byte-swapped number).

Nothing is allocated from a count before the bytes it claims are known to
exist in the file, the bytes read for the header are capped, arrays longer
than :data:`KEEP_ARRAY` are summarised instead of kept, and nesting is
bounded.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from modelkit.errors import BadFileError
from modelkit.io.files import open_input_file
from modelkit.io.header import decode_values
from modelkit.io.suffixes import SNIFF_BYTES, sniff
from modelkit.textsafe import quoted, shown

MAGIC = b"GGUF"
MAX_HEADER_BYTES = 100_000_000  # as for safetensors headers
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
MAX_KV = 1 << 16  # key/values (ComfyUI-GGUF files hold a few hundred orig_shape records)
MAX_TENSORS = 1 << 18  # tensor infos (an SDXL UNet has ~1,700; big LLMs a few thousand)
KEEP_ARRAY = 64  # arrays up to this length are kept (orig_shape records are 2-4)
DEFAULT_ALIGNMENT = 32
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

# GGML type id -> (name, elements per block, bytes per block), as gguf-py's
# GGMLQuantizationType and GGML_QUANT_SIZES
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# GGUF value type id -> (name, struct code; None for string/array)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"),
    12: ("float64", "d"),
}
STRING, ARRAY = 8, 9
_PLAIN_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I8": "I8",
                 "I16": "I16", "I32": "I32", "I64": "I64"}


@dataclass(frozen=True)
class ArraySummary:
    """An array too long to keep: its element type and length."""

    element_type: str
    count: int

    def __str__(self) -> str:
        return f"[{self.count} x {self.element_type}]"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor info. ``shape`` is in torch (outermost-first) order."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    offset: int  # into the data section
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFHeader:
    """A parsed GGUF header; ``tensors`` in file order."""

    path: Path
    version: int
    byte_order: str  # "little" or "big"
    kv: dict[str, object] = field(default_factory=dict)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str | None:
        arch = self.kv.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def orig_shape(self, name: str) -> tuple[int, ...] | None:
        """The ``comfy.gguf.orig_shape.<name>`` record, when it is a valid
        shape with the tensor's element count."""
        rec = self.kv.get(ORIG_SHAPE_PREFIX + name)
        t = self.tensors.get(name)
        if not isinstance(rec, list) or t is None or not rec:
            return None
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in rec):
            return None
        shape = tuple(rec)
        return shape if math.prod(shape) == t.numel else None


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` starts with the GGUF magic (a regular
    file is required; see :func:`modelkit.io.files.open_input_file`)."""
    with open_input_file(path) as f:
        return f.read(4) == MAGIC


class _Cursor:
    """Sequential reads with every length checked against the bytes left in
    the file and the header budget."""

    def __init__(self, f: BinaryIO, path: Path, size: int, order: str) -> None:
        self.f, self.path, self.size, self.order = f, path, size, order
        self.pos = 0

    def fail(self, problem: str) -> BadFileError:
        return BadFileError(f"{shown(self.path, 300)}: {problem}")

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(f"truncated: {what} runs past the end of the file")
        if self.pos + n > MAX_HEADER_BYTES:
            raise self.fail(f"GGUF header is over the {MAX_HEADER_BYTES // 1_000_000} MB "
                            "limit; not a model file or corrupt")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail("truncated while reading the header (the file changed?)")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(f"truncated: {what} runs past the end of the file")
        if self.pos + n > MAX_HEADER_BYTES:
            raise self.fail("GGUF header is over the 100 MB limit; corrupt")
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, code: str, what: str) -> object:
        fmt = ("<" if self.order == "little" else ">") + code
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))
        return value

    def u32(self, what: str) -> int:
        value = self.unpack("I", what)
        assert isinstance(value, int)  # struct unpacks "I" as an int
        return value

    def u64(self, what: str) -> int:
        value = self.unpack("Q", what)
        assert isinstance(value, int)  # struct unpacks "Q" as an int
        return value

    def count(self, what: str, min_item_bytes: int, limit: int | None = None) -> int:
        """A u64 count of items of at least ``min_item_bytes`` each that must fit
        in the rest of the file (and be at most ``limit``)."""
        n = self.u64(what)
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n}, over modelkit's limit of {limit}; the file "
                            "is corrupt or not a model file")
        if n * min_item_bytes > self.left():
            raise self.fail(f"{what} is {n}, more than the rest of the file can hold; "
                            "the file is corrupt")
        return n

    def string(self, what: str, strict: bool = False) -> str:
        raw = self.take(self.u64(f"{what} length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise self.fail(f"{what} is not valid UTF-8; the file is corrupt") from None
            return raw.decode("utf-8", errors="replace")


def _value(cur: _Cursor, vtype: int, what: str, depth: int = 0) -> object:
    if vtype not in VALUE_TYPES:
        raise cur.fail(f"{what} has unknown value type {vtype}; the file is corrupt")
    _, code = VALUE_TYPES[vtype]
    if code is not None:
        return cur.unpack(code, what)
    if vtype == STRING:
        return cur.string(what)
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    etype = cur.u32(f"{what} element type")
    if etype not in VALUE_TYPES:
        raise cur.fail(f"{what} has unknown element type {etype}; the file is corrupt")
    ename, ecode = VALUE_TYPES[etype]
    item_size = struct.calcsize(ecode) if ecode else (8 if etype == STRING else 12)
    n = cur.count(f"{what} length", item_size)
    if n <= KEEP_ARRAY:
        return [_value(cur, etype, what, depth + 1) for _ in range(n)]
    if ecode is not None:
        cur.skip(n * item_size, what)
    else:
        for _ in range(n):
            _skip_value(cur, etype, what, depth + 1)
    return ArraySummary(ename, n)


def _skip_value(cur: _Cursor, vtype: int, what: str, depth: int) -> None:
    """Skip one string or array element without keeping it."""
    if vtype == STRING:
        cur.skip(cur.u64(f"{what} length"), what)
    else:
        _value(cur, vtype, what, depth)


def _read_kv(cur: _Cursor, n_kv: int) -> dict[str, object]:
    kv: dict[str, object] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}", strict=True)
        if key in kv:
            raise cur.fail(f"key {quoted(key)} appears twice; the file is corrupt")
        kv[key] = _value(cur, cur.u32(f"type of {quoted(key)}"), f"value of {quoted(key)}")
    return kv


def _read_tensor(cur: _Cursor, i: int) -> GGUFTensor:
    name = cur.string(f"tensor {i} name", strict=True)
    label = f"tensor {quoted(name)}"
    n_dims = cur.u32(f"{label} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{label} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    dims = [cur.u64(f"{label} dimensions") for _ in range(n_dims)]
    type_id = cur.u32(f"{label} type")
    if type_id not in GGML_TYPES:
        raise cur.fail(f"{label} has GGML type {type_id}, which modelkit does not know")
    ggml, block, block_bytes = GGML_TYPES[type_id]
    offset = cur.u64(f"{label} offset")
    if 0 in dims:
        raise cur.fail(f"{label} has a dimension of 0 (shape {list(reversed(dims))}); "
                       "the file is corrupt")
    numel = math.prod(dims)
    if numel >= 1 << 63:
        raise cur.fail(f"{label} has {numel} elements, over the 2^63 limit; corrupt")
    if dims[0] % block:
        raise cur.fail(f"{label}: rows of {dims[0]} do not fill {ggml} blocks of {block}; "
                       "the file is corrupt")
    return GGUFTensor(name, ggml, tuple(reversed(dims)), offset,
                      numel // block * block_bytes)


def _alignment(cur: _Cursor, kv: dict[str, object]) -> int:
    value = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(value, int) or isinstance(value, bool) or value <= 0
            or value & (value - 1) or value > 1 << 30):
        raise cur.fail(f"general.alignment is {shown(value, 30)}, not a power of two; "
                       "the file is corrupt")
    return value


def _check_data(cur: _Cursor, header: GGUFHeader) -> None:
    data_len = header.file_size - header.data_start
    if data_len < 0:
        raise cur.fail("truncated: the file ends before its tensor data")
    total = sum(t.nbytes for t in header.tensors.values())
    if total > data_len:
        raise cur.fail(f"truncated or corrupt: its tensors need {total} bytes of data, the "
                       f"file has {data_len} (tensors overlap, or it was cut short)")
    for t in header.tensors.values():
        label = f"tensor {quoted(t.name)}"
        if t.offset % header.alignment:
            raise cur.fail(f"{label} starts at {t.offset}, not a multiple of the "
                           f"alignment {header.alignment}; the file is corrupt")
        if t.offset + t.nbytes > data_len:
            raise cur.fail(f"truncated: {label} ends at byte {t.offset + t.nbytes} of the "
                           f"data, which has {data_len}; download or copy it again")


def _byte_order(cur: _Cursor) -> int:
    raw = cur.take(4, "version")
    little, big = struct.unpack("<I", raw)[0], struct.unpack(">I", raw)[0]
    version, cur.order = (little, "little") if little <= big else (big, "big")
    if version not in (2, 3):
        raise cur.fail(f"GGUF version {version} is not supported (2 and 3 are)")
    return version


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read and validate the header of the GGUF file at ``path``.

    Raises:
        BadFileError: missing, not a regular file, not GGUF, truncated,
            corrupt, or a header over 100 MB.
    """
    p = Path(path)
    with open_input_file(p) as f:
        size = os.fstat(f.fileno()).st_size
        cur = _Cursor(f, p, size, "little")
        if cur.take(4, "magic") != MAGIC:
            f.seek(0)
            what = sniff(f.read(SNIFF_BYTES))
            raise cur.fail(f"is {what}, not a GGUF file" if what else
                           "not a GGUF file (no GGUF magic)")
        version = _byte_order(cur)
        # a tensor info is at least 8 + 4 + 8 + 4 + 8 bytes, a key/value 8 + 4 + 1
        n_tensors = cur.count("tensor count", 32, MAX_TENSORS)
        n_kv = cur.count("key/value count", 13, MAX_KV)
        header = GGUFHeader(p, version, cur.order, file_size=size)
        header.kv = _read_kv(cur, n_kv)
        header.alignment = _alignment(cur, header.kv)
        for i in range(n_tensors):
            t = _read_tensor(cur, i)
            if t.name in header.tensors:
                raise cur.fail(f"tensor {quoted(t.name)} appears twice; the file is corrupt")
            header.tensors[t.name] = t
        header.data_start = -(-cur.pos // header.alignment) * header.alignment
        _check_data(cur, header)
    return header


def read_small_gguf_tensor(header: GGUFHeader, name: str) -> list[float] | None:
    """Values of a small (at most 1 MiB) unquantized little-endian tensor, or
    None when it is quantized, big-endian or larger."""
    t = header.tensors[name]
    dtype = _PLAIN_DTYPES.get(t.ggml_type)
    if dtype is None or header.byte_order != "little" or t.nbytes > 1 << 20:
        return None
    with open_input_file(header.path) as f:
        f.seek(header.data_start + t.offset)
        raw = f.read(t.nbytes)
    if len(raw) != t.nbytes:
        raise BadFileError(f"{shown(header.path, 300)}: truncated inside tensor "
                           f"{quoted(name)} (the file changed since it was opened?)")
    return decode_values(dtype, raw)


__all__ = ["GGUFHeader", "GGUFTensor", "is_gguf", "read_gguf_header",
           "read_small_gguf_tensor"]

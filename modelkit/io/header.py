"""Pure-Python safetensors header reader: keys, dtypes, shapes, offsets and
``__metadata__`` without importing torch or touching tensor data.

Format: 8-byte little-endian header length N (at most 100 MB), N bytes of
UTF-8 JSON starting with ``{`` (trailing whitespace allowed), then the data
buffer, which must be covered by the tensors' ``data_offsets`` exactly.

The reader accepts exactly what the format allows (huggingface/safetensors
README "Format" and its reference parser): an object whose entries are
``{"dtype", "shape", "data_offsets"}`` with a known dtype and whole numbers
from 0 to 2**64-1 (no sign, fraction, exponent, NaN/Infinity, booleans or
strings), element and bit counts that do not overflow 64 bits (checked factor
by factor, as the reference does), sub-byte tensors ending on a byte, and an
optional ``__metadata__`` map of strings to strings (``null`` is read as no
metadata, as the reference does). Where the library is laxer than the
format's text, the text wins: duplicate keys (the text disallows them) and a
header not starting with ``{`` (the text requires it) are refused. Entry
fields other than the three are refused too: the format defines no others
and modelkit's writers would silently drop them. Strings holding an unpaired
UTF-16 surrogate escape are not valid Unicode (the reference refuses them).
Every refusal is one :class:`BadFileError` line naming the file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.errors import BadFileError
from modelkit.io.files import open_input_file
from modelkit.textsafe import quoted, shown

MAX_HEADER_SIZE = 100_000_000  # the safetensors library's own limit
GGUF_MAGIC = b"GGUF"

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


U64_MAX = 2**64 - 1  # shapes, offsets and sizes are u64 (usize) in the format
DTYPE_BITS: dict[str, int] = {k: int(v * 8) for k, v in DTYPE_SIZES.items()}
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
               int: "a number", type(None): "null"}


def _bad(path: Path, problem: str) -> BadFileError:
    return BadFileError(f"{shown(path, 300)}: {problem}")


class _Refused(Exception):
    """Raised by the JSON hooks; turned into a BadFileError naming the file."""


@dataclass(frozen=True)
class _Number:
    """A JSON number that is not a whole number from 0 to 2**64-1 (negative,
    fractional, exponent, too large, NaN/Infinity): never valid in a header."""

    text: str


def _parse_int(text: str) -> int | _Number:
    # bounded before int(): a 100,000-digit number is not worth converting
    if text.startswith("-") or len(text) > 20 or int(text) > U64_MAX:
        return _Number(text)
    return int(text)


def _json_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"duplicate key {quoted(key)} (the format disallows duplicates)")
        if _SURROGATE.search(key):
            raise _Refused(f"key {quoted(key)} holds a lone UTF-16 surrogate escape, "
                           "which is not valid Unicode")
        obj[key] = value
    return obj


def _describe(value: object) -> str:
    if isinstance(value, _Number):
        return shown(value.text, 40)
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _uint(path: Path, what: str, value: object) -> int:
    """A shape entry or offset: a JSON whole number from 0 to 2**64-1."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _bad(path, f"{what} is {_describe(value)}, not a whole number from 0 to 2^64-1; "
                     "the file is corrupt")


def _uint_list(path: Path, what: str, value: object) -> list[int]:
    if not isinstance(value, list):
        raise _bad(path, f"{what} is {_describe(value)}, not a list of whole numbers; "
                         "the file is corrupt")
    return [_uint(path, what, v) for v in value]


def _byte_size(path: Path, name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of ``dtype[shape]``, refused where the format's u64 arithmetic
    overflows (checked after each factor, as the reference reader does) or a
    sub-byte tensor does not end on a byte boundary."""
    numel = 1
    for d in shape:
        numel *= d
        if numel > U64_MAX:
            raise _bad(path, f"tensor {quoted(name)}: shape {shown(list(shape), 80)} "
                             "overflows 64 bits; the file is corrupt")
    bits = numel * DTYPE_BITS[dtype]
    if bits > U64_MAX:
        raise _bad(path, f"tensor {quoted(name)}: shape {shown(list(shape), 80)} of "
                         f"{dtype} overflows 64 bits; the file is corrupt")
    if bits % 8:
        raise _bad(path, f"tensor {quoted(name)}: {numel} {dtype} values do not fill "
                         "whole bytes; the file is corrupt")
    return bits // 8


def _plain_entry(name: str, entry: object) -> TensorInfo | None:
    """A valid entry, checked without building any message (a header has
    thousands, nearly always valid); None for anything else, which
    :func:`_parse_entry` then checks in full and names."""
    if type(entry) is not dict or len(entry) != 3:
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if (type(dtype) is not str or dtype not in DTYPE_BITS or type(shape) is not list
            or type(offsets) is not list or len(offsets) != 2
            or any(type(v) is not int for v in (*shape, *offsets))):
        return None  # ints here are 0..2**64-1 already (_parse_int)
    numel = 1
    for d in shape:
        numel *= d
        if numel > U64_MAX:
            return None
    bits = numel * DTYPE_BITS[dtype]
    begin, end = offsets
    if bits > U64_MAX or bits % 8 or end < begin or end - begin != bits // 8:
        return None
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    label = f"tensor {quoted(name)}"
    if not isinstance(entry, dict):
        raise _bad(path, f"{label} is {_describe(entry)}, not an object with dtype, "
                         "shape and data_offsets; the file is corrupt")
    for field_name in ENTRY_FIELDS:
        if field_name not in entry:
            raise _bad(path, f"{label} has no {field_name}; the file is corrupt")
    extra = [k for k in entry if k not in ENTRY_FIELDS]
    if extra:
        raise _bad(path, f"{label} has an unknown field {quoted(extra[0], 40)} (a "
                         "safetensors entry has dtype, shape and data_offsets only)")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        shown_dtype = quoted(dtype, 20) if isinstance(dtype, str) else _describe(dtype)
        raise _bad(path, f"{label} has unknown dtype {shown_dtype}")
    shape = tuple(_uint_list(path, f"{label}: shape", entry["shape"]))
    offsets = _uint_list(path, f"{label}: data_offsets", entry["data_offsets"])
    if len(offsets) != 2:
        raise _bad(path, f"{label}: data_offsets has {len(offsets)} numbers, not 2 "
                         "(begin, end); the file is corrupt")
    begin, end = offsets
    size = _byte_size(path, name, dtype, shape)
    if end < begin or end - begin != size:
        raise _bad(path, f"{label} spans {end - begin} bytes but {dtype}"
                         f"{shown(list(shape), 80)} needs {size}; the file is corrupt")
    return TensorInfo(name, dtype, shape, begin, end)


def _parse_metadata(path: Path, meta: object) -> dict[str, str]:
    if meta is None:  # the reference reader treats null as no metadata
        return {}
    if not isinstance(meta, dict):
        raise _bad(path, f"__metadata__ is {_describe(meta)}, not a map of strings to "
                         "strings; the file is corrupt")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise _bad(path, f"__metadata__ value of {quoted(key, 60)} is "
                             f"{_describe(value)}, not a string (the format allows "
                             "strings only)")
        if _SURROGATE.search(value):
            raise _bad(path, f"__metadata__ value of {quoted(key, 60)} holds a lone "
                             "UTF-16 surrogate escape, which is not valid Unicode")
    return dict(meta)


def _decode_json(path: Path, raw: bytes) -> dict[str, object]:
    """The header JSON as the format defines it: UTF-8, starting with ``{``,
    no duplicate keys, no NaN/Infinity, integers within u64."""
    if raw[:1] != b"{":
        raise _bad(path, "not a safetensors file (the header does not start with '{')")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(path, "not a safetensors file (the header is not valid UTF-8)") from None
    try:
        obj = json.loads(text, object_pairs_hook=_json_object, parse_int=_parse_int,
                         parse_float=_Number, parse_constant=_Number)
    except json.JSONDecodeError as exc:
        raise _bad(path, f"not a safetensors file (the header is not valid JSON: "
                         f"{exc.msg} at byte {exc.pos})") from None
    except _Refused as exc:
        raise _bad(path, f"invalid header: {exc}") from None
    except RecursionError:
        raise _bad(path, "invalid header: JSON nested too deeply") from None
    if not isinstance(obj, dict):  # pragma: no cover - '{' start guarantees an object
        raise _bad(path, "not a safetensors file (header is not a JSON object)")
    return obj


def parse_header_bytes(path: Path, raw: bytes, file_size: int) -> Header:
    """Parse and validate header JSON ``raw`` against the safetensors format
    and the file size: exactly what the format allows is accepted.

    Raises:
        BadFileError: one line naming ``path`` and what is wrong.
    """
    obj = _decode_json(path, raw)
    meta = _parse_metadata(path, obj.pop("__metadata__", None))
    infos = [_plain_entry(name, entry) or _parse_entry(path, name, entry)
             for name, entry in obj.items()]
    infos.sort(key=lambda t: (t.begin, t.end))
    data_len = file_size - 8 - len(raw)
    pos = 0
    for t in infos:
        if t.begin != pos:
            raise _bad(path, f"tensor {quoted(t.name)} does not start where the previous "
                             "one ends; the file is corrupt")
        pos = t.end
    if pos != data_len:
        if pos > data_len:
            raise _bad(path, f"truncated: tensors need {pos} data bytes, the file has "
                             f"{max(data_len, 0)}; download or copy it again")
        raise _bad(path, f"{data_len - pos} stray bytes after the last tensor; "
                         "the file is corrupt")
    return Header(path, {t.name: t for t in infos}, meta, len(raw))


def _too_large(p: Path, head: bytes, n: int) -> BadFileError:
    from modelkit.io.suffixes import sniff

    what = sniff(head)
    if what is not None and what.startswith("a ZIP"):
        return _bad(p, "is a ZIP archive, not a safetensors file (a PyTorch checkpoint "
                       "saved by torch.save? name it .ckpt or .pt to load it safely)")
    if what is not None and head[:4] != GGUF_MAGIC and head[:1] != b"\x80":
        return _bad(p, f"is {what}, not a model file")
    if head[:4] == GGUF_MAGIC:
        return _bad(p, "is a GGUF file, not safetensors ('modelkit inspect' reads it; "
                       "this command needs a .safetensors file)")
    if head[:1] in (b"P", b"\x80"):
        return _bad(p, "not a safetensors file (looks like a pickle/.ckpt)")
    if all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        return _bad(p, "not a safetensors file (it starts with text, not a header length)")
    return _bad(p, f"header size {n} is over the 100 MB limit; not a safetensors file "
                   "or corrupt")


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at ``path``.

    Raises:
        BadFileError: the file is missing, not a regular file, too short,
            truncated, not safetensors, has a header over 100 MB or one the
            format does not allow.
    """
    p = Path(path)
    with open_input_file(p) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise _bad(p, "not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_SIZE:
            raise _too_large(p, head + f.read(8), n)
        if n + 8 > size:
            raise _bad(p, "truncated: the header runs past the end of the file")
        raw = f.read(n)
    if len(raw) != n:
        raise _bad(p, "truncated while reading the header (the file changed?)")
    parsed = _parse_recent(p, raw, size)
    # a copy: the caller may change its dicts, the cached one stays as parsed
    return Header(p, dict(parsed.tensors), dict(parsed.metadata), parsed.header_size)


@functools.lru_cache(maxsize=32)
def _parse_recent(path: Path, raw: bytes, file_size: int) -> Header:
    """:func:`parse_header_bytes`, remembered for the last few headers: its
    result depends only on these arguments, and one run reads the same
    input's header several times (plan, open, inspect, provenance). The
    header bytes are read every time, so a changed file is parsed again."""
    return parse_header_bytes(path, raw, file_size)


_SMALL_TENSOR_LIMIT = 1 << 20
_STRUCT_CODES = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h",
                 "I8": "b", "U64": "Q", "U32": "I", "U16": "H", "U8": "B", "BOOL": "?"}
_FP8 = {"F8_E4M3": (3, 7, True), "F8_E5M2": (2, 15, False)}  # mantissa bits, bias, fn


class UndecodableTensorError(BadFileError):
    """A tensor whose dtype the pure-Python decoder does not handle (complex,
    sub-byte and the rarer fp8 formats): the file is fine, only the value
    cannot be shown without torch."""


def _fp8_value(byte: int, man_bits: int, bias: int, finite_only: bool) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exp_max = (1 << (7 - man_bits)) - 1
    exp = (byte & 0x7F) >> man_bits
    man = byte & ((1 << man_bits) - 1)
    if finite_only and exp == exp_max and man == (1 << man_bits) - 1:
        return math.nan  # e4m3fn: S.1111.111 is NaN, there is no infinity
    if not finite_only and exp == exp_max:
        return sign * math.inf if man == 0 else math.nan
    if exp == 0:
        return sign * man * 2.0 ** (1 - bias - man_bits)
    return sign * (1 + man / (1 << man_bits)) * 2.0 ** (exp - bias)


def decode_values(dtype: str, raw: bytes) -> list[float]:
    """Little-endian ``raw`` bytes of ``dtype`` as floats, in pure Python.

    Raises:
        UndecodableTensorError: a dtype without a pure-Python decoder.
    """
    code = _STRUCT_CODES.get(dtype)
    if code is not None:
        n = len(raw) // struct.calcsize(code)
        return [float(x) for x in struct.unpack(f"<{n}{code}", raw)]
    if dtype == "BF16":
        halves = struct.unpack(f"<{len(raw) // 2}H", raw)
        return list(struct.unpack(f"<{len(halves)}f",
                                  struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves))))
    if dtype in _FP8:
        return [_fp8_value(b, *_FP8[dtype]) for b in raw]
    raise UndecodableTensorError(f"cannot decode dtype {dtype} without torch")


def read_small_tensor(header: Header, name: str) -> list[float]:
    """Values of a small tensor (at most 1 MiB) as a flat list, decoded in
    pure Python. For inspection details (alphas, position ids, one norm bias)
    without importing torch.

    Raises:
        UndecodableTensorError: too large, or a dtype without a pure-Python decoder.
        BadFileError: the file changed since its header was read.
    """
    info = header.tensors[name]
    where = f"{shown(header.path, 300)}: tensor {quoted(name)}"
    if info.nbytes > _SMALL_TENSOR_LIMIT:
        raise UndecodableTensorError(f"{where} is too large to decode without torch")
    with open_input_file(header.path) as f:
        f.seek(header.data_start + info.begin)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise BadFileError(f"{where}: truncated (the file changed since it was opened?)")
    try:
        return decode_values(info.dtype, raw)
    except UndecodableTensorError as exc:
        raise UndecodableTensorError(f"{where}: {exc}") from None


def metadata_json(metadata: dict[str, str], key: str) -> Any:
    """The JSON value stored as text under ``key`` in a file's metadata
    (``sd_merge_recipe``, ``modelkit.history``...), or None when it is
    missing, empty or not JSON."""
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None

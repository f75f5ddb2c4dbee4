"""The one table of weight-file formats modelkit reads and writes.

Each format is declared once, in :data:`FORMATS`: its name, suffixes, magic
bytes, a torch-free header reader, the function that opens it as a
:class:`~modelkit.io.source.Source`, and (for output formats) the name rule
and the writer. Every place that asks "what kind of file is this" (the open,
``inspect``, the writer, the library scan, recipe replay, sweeps) asks here.

Functions are named as ``"module:function"`` strings and imported when
called, so reading the table imports neither torch nor the readers.
Quantized files (GGUF of any type, ComfyUI's scaled fp8/int8, bitsandbytes
NF4) are not formats of their own: they are a GGUF or safetensors file whose
opener dequantizes on read (:mod:`modelkit.io.quantized`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import ModelkitError, OutputError
from modelkit.vocab import OUTPUT_FORMATS as _OUTPUT_NAMES

if TYPE_CHECKING:
    from modelkit.io.header import TensorInfo
    from modelkit.io.source import Source

SNIFF_BYTES = 16


@dataclass(frozen=True)
class Format:
    """One weight-file format.

    Args:
        name: the format's name (``safetensors``, ``gguf``...): ``--format``
            choices and ``inspect``'s ``file_format``.
        suffixes: file name suffixes, lower case, the first one canonical;
            empty for a folder format.
        magic: leading byte strings that identify the format.
        header: ``"module:function"`` reading ``(infos, metadata)`` without
            torch, or ``""`` when only opening the file tells (pickles).
        opener: ``"module:function"`` ``(path, device) -> Source``.
        writer: ``"module:function"`` of the writer (see
            :func:`modelkit.io.write.write`), ``""`` for a read-only format.
        folder: a folder, not a file.
        slow_open: opening reads every tensor (the graph reports it as
            progress).
        refuse_output: why it is never written, for the one-line error.
    """

    name: str
    suffixes: tuple[str, ...]
    magic: tuple[bytes, ...]
    header: str
    opener: str
    writer: str = ""
    folder: bool = False
    slow_open: bool = False
    refuse_output: str = ""

    @property
    def suffix(self) -> str:
        """The canonical suffix (``""`` for a folder)."""
        return self.suffixes[0] if self.suffixes else ""

    def sniff(self, head: bytes) -> bool:
        """Whether the first bytes of a file say it is this format."""
        return any(head.startswith(m) for m in self.magic)

    def open(self, path: str | os.PathLike[str], device: str = "cpu") -> Source:
        """Open ``path`` as a source on ``device``."""
        return _call(self.opener, Path(path), device)

    def read_header(self, path: str | os.PathLike[str]
                    ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Tensor infos and metadata (header only where the format allows)."""
        if not self.header:
            from modelkit.io.reader import read_opened_infos

            return read_opened_infos(Path(path), self)
        return _call(self.header, Path(path))


def _call(target: str, *args: Any) -> Any:
    module, name = target.split(":")
    return getattr(import_module(module), name)(*args)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("safetensors", (".safetensors", ".sft"), (), "modelkit.io.reader:read_st_infos",
           "modelkit.io.quantized:open_safetensors", "modelkit.io.write:write_safetensors"),
    Format("gguf", (".gguf",), (b"GGUF",), "modelkit.io.gguf:read_gguf_infos",
           "modelkit.io.gguf:open_gguf", "modelkit.io.write:write_gguf_file"),
    Format("pickle", (".ckpt", ".pt", ".pth", ".bin"),
           (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), "",
           "modelkit.io.reader:open_model", slow_open=True,
           refuse_output="modelkit writes .safetensors (pickles can run code when "
                         "loaded); use a .safetensors name"),
    Format("diffusers", (), (), "", "modelkit.io.diffusers:open_diffusers",
           "modelkit.io.write:write_folder", folder=True),
)}

SAFETENSORS = FORMATS["safetensors"]
GGUF = FORMATS["gguf"]
PICKLE = FORMATS["pickle"]
DIFFUSERS = FORMATS["diffusers"]
# formats a command can write, in the order ``--format`` lists them (the
# vocabulary's names; tests/test_formats.py checks they are the writable ones)
OUTPUT_FORMATS = tuple(n for n in _OUTPUT_NAMES if FORMATS[n].writer)
# suffixes of model files (the library scan, recipe replay, lineage)
MODEL_SUFFIXES = tuple(s for f in FORMATS.values() for s in f.suffixes)


def by_suffix(path: str | os.PathLike[str]) -> Format | None:
    """The file format a path's suffix names, or None."""
    suffix = Path(path).suffix.lower()
    for f in FORMATS.values():
        if suffix in f.suffixes:
            return f
    return None


def sniff(head: bytes) -> Format | None:
    """The format whose magic bytes ``head`` starts with, or None."""
    for f in FORMATS.values():
        if f.sniff(head):
            return f
    return None


def _head(path: Path) -> bytes:
    from modelkit.io.files import open_input_file

    with open_input_file(path) as f:
        return f.read(SNIFF_BYTES)


def input_format(path: str | os.PathLike[str]) -> Format:
    """The format of an input: a folder is a diffusers model; a known suffix
    names the format, except that a GGUF file is one whatever its name; any
    other name is tried by its magic bytes, then as safetensors (whose reader
    refuses a file that is not one in one line)."""
    p = Path(path)
    if p.is_dir():
        return DIFFUSERS
    by_name = by_suffix(p)
    if by_name is PICKLE:
        return by_name
    head = _head(p) if p.is_file() else b""
    if GGUF.sniff(head):
        return GGUF
    return by_name or sniff(head) or SAFETENSORS


def is_format(path: str | os.PathLike[str], name: str) -> bool:
    """Whether ``path`` names a file of format ``name`` by its suffix."""
    f = by_suffix(path)
    return f is not None and f.name == name


def open_path(path: str | os.PathLike[str], device: str = "cpu") -> Source:
    """Open any input (see :func:`input_format`) as a source."""
    return input_format(path).open(path, device)


def output_format(out: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The output format: given, or from the path's suffix (a name without a
    model suffix is a diffusers folder).

    Raises:
        ModelkitError: an unknown format, or a suffix modelkit never writes.
    """
    if fmt:
        if fmt not in OUTPUT_FORMATS:
            raise ModelkitError(f"unknown output format {fmt!r}; choose one of "
                                f"{', '.join(OUTPUT_FORMATS)}")
        return fmt
    f = by_suffix(out)
    if f is None:
        return DIFFUSERS.name
    if f.refuse_output:
        raise ModelkitError(f"{out}: {f.refuse_output}")
    return f.name


def check_output_name(fmt: str, path: Path) -> None:
    """Refuse an output file name that does not fit its format.

    Raises:
        OutputError: e.g. a GGUF output not named ``.gguf``.
    """
    f = FORMATS[fmt]
    if f.suffixes and path.suffix.lower() not in f.suffixes:
        article = "an" if fmt[0] in "aeiou" else "a"
        what = "GGUF" if fmt == "gguf" else fmt
        raise OutputError(f"{path}: {article} {what} output needs a {f.suffix} name")


def writer_of(fmt: str) -> Any:
    """The writer function of output format ``fmt``."""
    f = FORMATS.get(fmt)
    if f is None or not f.writer:
        raise ModelkitError(f"unknown output format {fmt!r}")
    module, name = f.writer.split(":")
    return getattr(import_module(module), name)


__all__ = ["DIFFUSERS", "FORMATS", "GGUF", "MODEL_SUFFIXES", "OUTPUT_FORMATS", "PICKLE",
           "SAFETENSORS", "Format", "by_suffix", "check_output_name", "input_format",
           "is_format", "open_path", "output_format", "sniff", "writer_of"]

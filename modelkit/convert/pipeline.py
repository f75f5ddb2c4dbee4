"""Open any supported input, chain convert operations, write any supported
output, with provenance. The CLI commands and the recipe runner go through
here.

Inputs: ``.safetensors``, legacy pickles (``.ckpt``/``.pt``/``.pth``/``.bin``,
through the safe loader) and diffusers folders (seen in the original
single-file layout). Outputs: ``.safetensors``, a diffusers folder, or a
``.gguf`` UNet (q8_0).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.convert.base import Converted
from modelkit.convert.provenance import InputHashes, history_entry, with_history
from modelkit.errors import ModelkitError
from modelkit.io.source import DerivedSource, Source
from modelkit.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from modelkit.io.writer import SafetensorsWriter

FORMATS = ("safetensors", "diffusers", "gguf")


@dataclass
class OutputResult:
    """What was written."""

    path: Path
    format: str
    n_tensors: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def open_input(path: str | os.PathLike[str], device: str = "cpu") -> Source:
    """Open a model file or diffusers folder for reading.

    Raises:
        BadFileError: missing, unreadable or unsafe input.
    """
    from modelkit.errors import BadFileError

    p = Path(path)
    if p.is_dir():
        from modelkit.io.diffusers import is_diffusers_folder, open_diffusers

        if not is_diffusers_folder(p):
            raise BadFileError(f"{p}: is a folder but not a diffusers model (no "
                               "model_index.json or unet/); give a model file")
        return open_diffusers(p, device)
    # open_model names what is wrong: missing, a symlink loop, a FIFO, a device
    from modelkit.io.reader import open_model

    return open_model(p, device)


def output_format(out: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The output format: given, or from the path (``.gguf``, ``.safetensors``,
    anything else is a diffusers folder)."""
    if fmt:
        if fmt not in FORMATS:
            raise ModelkitError(f"unknown output format {fmt!r}; choose one of "
                                f"{', '.join(FORMATS)}")
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix == ".gguf":
        return "gguf"
    if suffix in (".safetensors", ".sft"):
        return "safetensors"
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelkitError(f"{out}: modelkit writes .safetensors (pickles can run code "
                            "when loaded); use a .safetensors name")
    return "diffusers"


def write_output(source: Source, out: str | os.PathLike[str], *, fmt: str | None = None,
                 history: Sequence[tuple[str, dict[str, Any], tuple[Path, ...]]] = (),
                 metadata_for: Callable[[InputHashes], dict[str, str]] | None = None,
                 gguf_type: str = "q8_0", gguf_flatten: bool = True,
                 progress: ProgressFn = no_progress, task: str = "write") -> OutputResult:
    """Write ``source`` to ``out`` with its metadata, a ``modelkit.history``
    entry per (op, params, input paths) in ``history`` and ``metadata_for(hashes)`` (extra
    provenance that names the inputs' sha256)."""
    kind = output_format(out, fmt)
    start = time.perf_counter()
    hashes = InputHashes(source.input_paths)
    try:
        entries = [history_entry(op, params, hashes, paths) for op, params, paths in history]
        meta = {**source.metadata, **(metadata_for(hashes) if metadata_for else {})}
        if entries:
            meta = with_history(meta, entries)
        if kind == "safetensors":
            from modelkit.io.stream import write_source

            def patch(writer: SafetensorsWriter) -> None:
                hashes.patch(writer)

            res = write_source(source, out, metadata=meta, progress=progress, task=task,
                               before_commit=patch)
            return OutputResult(Path(out), kind, res.n_tensors, res.bytes_written,
                                time.perf_counter() - start)
        meta = hashes.fill(meta)
        view = DerivedSource(getattr(source, "label", str(out)), source.infos, meta,
                             source.get, source.input_paths)
        return _write_other(kind, view, Path(out), gguf_type, gguf_flatten, progress, start)
    finally:
        hashes.close()


def _write_other(kind: str, view: DerivedSource, out: Path, gguf_type: str,
                 gguf_flatten: bool, progress: ProgressFn, start: float) -> OutputResult:
    if kind == "gguf":
        from modelkit.convert.gguf import export_gguf_source

        g = export_gguf_source(view, out, qtype=gguf_type, flatten=gguf_flatten,
                               progress=progress)
        return OutputResult(out, kind, g.n_tensors, g.bytes_written,
                            time.perf_counter() - start, list(g.notes))
    from modelkit.io.diffusers import write_diffusers

    d = write_diffusers(view, out, progress=progress)
    return OutputResult(out, kind, d.n_tensors, d.bytes_written,
                        time.perf_counter() - start, list(d.notes))


def run_chain(inputs: list[str | os.PathLike[str]], steps: list[tuple[str, dict[str, Any]]],
              out: str | os.PathLike[str], *, fmt: str | None = None, device: str = "cpu",
              gguf_type: str = "q8_0", gguf_flatten: bool = True,
              progress: ProgressFn = no_progress) -> tuple[list[Converted], OutputResult]:
    """Open ``inputs``, apply ``steps`` in turn (the first step takes every
    input; later ones take the previous result) and write ``out``.

    Returns the planned operations (their reports are complete once written)
    and what was written."""
    from modelkit.convert.ops import apply_op
    from modelkit.io.writer import check_output_path

    sources = [open_input(p, device) for p in inputs]
    if output_format(out, fmt) != "diffusers":
        check_output_path(Path(out), [p for s in sources for p in s.input_paths])
    done: list[Converted] = []
    current: list[Source] = sources
    for op, params in steps:
        conv = apply_op(op, current, params)
        if conv.prepare is not None:
            conv.prepare(progress)
        done.append(conv)
        current = [conv.source]
    history = [(c.op, c.params, c.source.input_paths) for c in done] or [
        ("convert", {}, current[0].input_paths)]
    task = steps[-1][0] if steps else "convert"
    result = write_output(current[0], out, fmt=fmt, history=history, gguf_type=gguf_type,
                          gguf_flatten=gguf_flatten, progress=progress, task=task)
    return done, result

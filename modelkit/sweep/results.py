"""What a sweep writes besides its outputs: ``sweep.jsonl`` (one record per
finished cell, appended as cells finish), ``table.md`` and ``table.csv``
(one row per cell, one column per axis and metric) and
``contact_sheet.png`` (rows and columns from the first two axes, each image
labelled with its values and metrics, the reference column first)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.sweep.spec import Axis
from modelkit.verify.outputs import fit_text, label_font

if TYPE_CHECKING:
    from PIL import Image

JSONL = "sweep.jsonl"
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
CONTACT_SHEET = "contact_sheet.png"
METRIC_COLUMNS = ("verdict", "psnr", "ssim", "latent")
TAIL_COLUMNS = ("seconds", "sha256", "output", "error")


# --- sweep.jsonl ----------------------------------------------------------------------


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (one write, flushed to disk, so an
    interrupted sweep keeps every record it reported)."""
    from modelkit.verify.report import json_safe

    line = json.dumps(json_safe(record), allow_nan=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every well-formed record of a ``sweep.jsonl`` (a line cut short by a
    crash is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "index" in record:
            out.append(record)
    return out


# --- the table --------------------------------------------------------------------


def has_verify(records: Iterable[dict[str, Any] | None]) -> bool:
    """Whether any record carries a verify result."""
    return any(r is not None and r.get("verify") for r in records)


def columns(axes: list[Axis], verified: bool) -> list[str]:
    """The table's columns: cell, one per axis, status, the verify
    verdict and metrics (when verified), seconds, sha256, output, error."""
    metric = list(METRIC_COLUMNS) if verified else []
    return ["cell", *(a.name for a in axes), "status", *metric, *TAIL_COLUMNS]


def row(axes: list[Axis], index: int, labels: dict[str, str], record: dict[str, Any] | None
        ) -> dict[str, Any]:
    """One table row with plain values (None where nothing is known)."""
    out: dict[str, Any] = {"cell": index, **{a.name: labels.get(a.name) for a in axes}}
    record = record or {}
    out["status"] = record.get("status", "not run")
    verify = record.get("verify") or {}
    metrics = verify.get("metrics") or {}
    # "reported" where no threshold judged the comparison (a merge), not "pass"
    out["verdict"] = verify.get("outcome") or verify.get("verdict")
    for name in ("psnr", "ssim", "latent"):
        out[name] = metrics.get(name)
    out["seconds"] = (record.get("timings") or {}).get("total")
    out["sha256"] = (record.get("hashes") or {}).get("sha256")
    out["output"] = record.get("output") if out["status"] == "ok" else None
    out["error"] = record.get("error")
    return out


def _number(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if value == "inf" or (isinstance(value, float) and math.isinf(value)):
        return "inf"
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def cell_text(name: str, value: Any, short: bool = True) -> str:
    """A table value as text (markdown shortens the sha256)."""
    if name == "psnr":
        return _number(value, ".2f")
    if name == "ssim":
        return _number(value, ".4f")
    if name == "latent":
        return _number(value, ".3g")
    if name == "seconds":
        return _number(value, ".1f")
    if value is None:
        return "-" if short else ""
    if name == "sha256" and short:
        return str(value)[:12]
    return str(value)


def markdown(title: str, cols: list[str], rows: list[dict[str, Any]]) -> str:
    """The table as markdown."""
    from modelkit.textsafe import markdown_cell as esc

    # file names, labels and errors come from files: escaped (controls, |)
    lines = [f"# {esc(title)}", "", "| " + " | ".join(esc(c) for c in cols) + " |",
             "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(esc(cell_text(c, r.get(c))) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_text(cols: list[str], rows: list[dict[str, Any]]) -> str:
    """The table as CSV (full sha256, numbers unrounded, ``inf`` spelled;
    text escaped and kept from reading as a spreadsheet formula)."""
    from modelkit.textsafe import csv_cell

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([csv_cell(c) for c in cols])
    for r in rows:
        writer.writerow(["" if r.get(c) is None else
                         ("inf" if isinstance(r.get(c), float) and math.isinf(r[c])
                          else csv_cell(r[c])) for c in cols])
    return buf.getvalue()


def write_text(path: Path, text: str) -> Path:
    """Write through a temp file beside ``path`` (renamed into place)."""
    from modelkit.io.writer import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# --- the contact sheet --------------------------------------------------------------

TILE_MIN = 192  # pixels: tiny renders are scaled up (nearest) to this
TILE_MAX = 320
PAD = 6
LINE_H = 15
TILE_LINES = 3
LABEL_W = 150
PER_ROW = 6  # cells per row when there is no second axis
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
DIM = (150, 150, 150)
FAILED = (90, 24, 24)
PASS_COLOUR = (120, 200, 120)
WARN_COLOUR = (230, 200, 90)
FAIL_COLOUR = (235, 110, 110)


def _grid(axes: list[Axis], mode: str, cells: list[tuple[int, dict[str, str]]]
          ) -> tuple[list[str], list[str], list[list[int | None]]]:
    """Row labels, column labels and the cell index at each position."""
    if mode == "product" and len(axes) >= 2:
        col_axis = axes[1]
        col_labels = list(dict.fromkeys(labels[col_axis.name] for _, labels in cells))
        rows: dict[tuple[str, ...], list[int | None]] = {}
        for index, labels in cells:
            key = tuple(f"{a.name}={labels[a.name]}" for a in axes if a is not col_axis)
            rows.setdefault(key, [None] * len(col_labels))
            rows[key][col_labels.index(labels[col_axis.name])] = index
        return ([", ".join(k) for k in rows], [f"{col_axis.name}={c}" for c in col_labels],
                list(rows.values()))
    grid: list[list[int | None]] = []
    row_labels = []
    for start in range(0, len(cells), PER_ROW):
        chunk: list[int | None] = [i for i, _ in cells[start:start + PER_ROW]]
        grid.append(chunk + [None] * (PER_ROW - len(chunk)) if len(cells) > PER_ROW else chunk)
        row_labels.append(f"cells {chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else "")
    width = max(len(r) for r in grid)
    return row_labels, [""] * width, grid


def _open_image(out_dir: Path, rel: str | None) -> Image.Image | None:
    from PIL import Image

    if not rel:
        return None
    try:
        with Image.open(out_dir / rel) as img:
            return img.convert("RGB")
    except (OSError, ValueError):
        return None


def _images(record: dict[str, Any] | None, role: str) -> list[str]:
    verify = (record or {}).get("verify") or {}
    return list((verify.get("images") or {}).get(role) or [])


def _tile_size(out_dir: Path, records: dict[int, dict[str, Any]]) -> tuple[int, int]:
    for record in records.values():
        img = _open_image(out_dir, next(iter(_images(record, "candidate")), None))
        if img is not None:
            w, h = img.size
            scale = max(1.0, TILE_MIN / max(1, min(w, h)))
            scale = min(scale, TILE_MAX / max(w, h)) if max(w, h) * scale > TILE_MAX else scale
            return max(1, round(w * scale)), max(1, round(h * scale))
    return TILE_MIN, TILE_MIN


def _wrap(draw: Any, text: str, width: int, font: Any, max_lines: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = fit_text(lines[-1] + " ...", width, font, draw)
    return [fit_text(line, width, font, draw) for line in lines]


def _metrics_line(record: dict[str, Any]) -> str:
    m = ((record.get("verify") or {}).get("metrics")) or {}
    if m.get("psnr") is None and m.get("latent") is None:
        return ""
    return (f"PSNR {cell_text('psnr', m.get('psnr'))}  SSIM {_number(m.get('ssim'), '.3f')}"
            f"  lat {cell_text('latent', m.get('latent'))}")


def _status_line(record: dict[str, Any]) -> tuple[str, tuple[int, int, int]]:
    verify = record.get("verify") or {}
    seconds = cell_text("seconds", (record.get("timings") or {}).get("total"))
    if record.get("status") != "ok":
        return f"{record.get('status', 'not run').upper()}", FAIL_COLOUR
    verdict = str(verify.get("outcome") or verify.get("verdict") or "no render")
    colour = {"fail": FAIL_COLOUR, "pass": PASS_COLOUR, "warn": WARN_COLOUR}.get(verdict, TEXT)
    return f"{verdict.upper()}  {seconds} s", colour


def contact_sheet(title: str, axes: list[Axis], mode: str,
                  cells: list[tuple[int, dict[str, str]]], records: dict[int, dict[str, Any]],
                  out_dir: Path) -> Image.Image | None:
    """The contact sheet (see the module docstring), or None when no cell
    has a render."""
    from PIL import Image, ImageDraw

    if not any(_images(r, "candidate") for r in records.values()):
        return None
    row_labels, col_labels, grid = _grid(axes, mode, cells)
    tw, th = _tile_size(out_dir, records)
    with_reference = any(_images(r, "reference") for r in records.values())
    n_cols = len(col_labels) + (1 if with_reference else 0)
    cell_h = th + TILE_LINES * LINE_H + PAD
    header_h = 2 * LINE_H + PAD
    width = LABEL_W + PAD + n_cols * (tw + PAD)
    height = header_h + len(grid) * (cell_h + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = label_font()
    draw.text((PAD, PAD), fit_text(title, width - 2 * PAD, font, draw), fill=TEXT, font=font)
    heads = (["reference"] if with_reference else []) + col_labels
    for j, head in enumerate(heads):
        x = LABEL_W + PAD + j * (tw + PAD)
        draw.text((x, PAD + LINE_H), fit_text(head, tw, font, draw), fill=TEXT, font=font)
    for i, (label, indices) in enumerate(zip(row_labels, grid, strict=True)):
        y = header_h + i * (cell_h + PAD)
        for k, line in enumerate(_wrap(draw, label, LABEL_W - PAD, font, 6)):
            draw.text((PAD, y + k * LINE_H), line, fill=TEXT, font=font)
        x = LABEL_W + PAD
        if with_reference:
            in_row = [records.get(idx) or {} for idx in indices if idx is not None]
            ref = next((r for r in in_row if _images(r, "reference")), None)
            _reference_tile(sheet, draw, font, ref, out_dir, (x, y), (tw, th))
            x += tw + PAD
        for idx in indices:
            if idx is not None:
                _cell_tile(sheet, draw, font, records.get(idx) or {"index": idx}, out_dir,
                           (x, y), (tw, th), axes)
            x += tw + PAD
    return sheet


def _reference_tile(sheet: Any, draw: Any, font: Any, record: dict[str, Any] | None,
                    out_dir: Path, at: tuple[int, int], size: tuple[int, int]) -> None:
    from PIL import Image

    if record is None:
        return
    img = _open_image(out_dir, _images(record, "reference")[0])
    if img is not None:
        sheet.paste(img.resize(size, Image.Resampling.NEAREST), at)
    name = str((record.get("verify") or {}).get("reference") or "reference")
    draw.text((at[0], at[1] + size[1] + 2), fit_text(name, size[0], font, draw), fill=DIM,
              font=font)


def _cell_tile(sheet: Any, draw: Any, font: Any, record: dict[str, Any], out_dir: Path,
               at: tuple[int, int], size: tuple[int, int], axes: list[Axis]) -> None:
    from PIL import Image

    x, y = at
    tw, th = size
    img = _open_image(out_dir, next(iter(_images(record, "candidate")), None))
    if img is not None:
        sheet.paste(img.resize(size, Image.Resampling.NEAREST), at)
    else:
        draw.rectangle((x, y, x + tw - 1, y + th - 1),
                       fill=FAILED if record.get("status") not in ("ok",) else (48, 48, 48))
        text = record.get("error") or ("no render" if record.get("status") == "ok"
                                       else str(record.get("status", "not run")))
        for k, line in enumerate(_wrap(draw, str(text), tw - 2 * PAD, font, th // LINE_H - 1)):
            draw.text((x + PAD, y + PAD + k * LINE_H), line, fill=TEXT, font=font)
    labels = record.get("labels") or {}
    values = "  ".join(f"{a.name}={labels[a.name]}" for a in axes if a.name in labels)
    status, colour = _status_line(record)
    lines = [(values, TEXT), (_metrics_line(record), TEXT), (status, colour)]
    for k, (line, fill) in enumerate(lines):
        draw.text((x, y + th + 2 + k * LINE_H), fit_text(line, tw, font, draw), fill=fill,
                  font=font)


def write_png(image: Image.Image, path: Path) -> Path:
    """Save a PNG through a temp file beside ``path``."""
    from modelkit.io.writer import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path

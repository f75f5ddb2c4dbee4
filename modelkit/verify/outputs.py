"""Files a verify run writes: the JSON report, the markdown table, JUnit XML,
the comparison grid PNG and per-image PNGs with their settings in PNG text
chunks (A1111's ``parameters`` chunk too, so "PNG Info" reads them).

Every file is written through a temp file beside it and renamed into place,
and an existing file is refused unless ``overwrite`` (nothing the user owns
is replaced by accident). :func:`check_outputs` runs the same checks before
any work is done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import ModelkitError, OutputError
from modelkit.verify.report import VerifyReport, to_junit, to_markdown

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from modelkit.verify.render import Rendered

MIN_CELL = 192  # pixels: tiny renders are scaled up (nearest) to this
MIN_WIDTH = 640  # the sheet is at least this wide, so labels fit
DIFF_GAIN = 8.0
MAX_GAIN = 64.0
PAD = 4
LABEL_LINES = 3
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)


def check_outputs(paths: Iterable[Path | None], overwrite: bool,
                  inputs: Iterable[Path] = ()) -> None:
    """Refuse output paths that exist (unless ``overwrite``), are inputs or
    sit in a missing folder."""
    from modelkit.io.writer import check_output_path

    for path in paths:
        if path is None:
            continue
        check_output_path(path, list(inputs))
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: exists; pass --overwrite to replace it")


def _write_text(path: Path, text: str, overwrite: bool) -> Path:
    from modelkit.io.writer import atomic_path

    check_outputs([path], overwrite)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(report: VerifyReport, path: str | os.PathLike[str],
               overwrite: bool = False) -> Path:
    """The JSON report (:meth:`VerifyReport.to_dict`)."""
    return _write_text(Path(path), json.dumps(report.to_dict(), indent=2) + "\n", overwrite)


def write_markdown(report: VerifyReport, path: str | os.PathLike[str],
                   overwrite: bool = False) -> Path:
    """The markdown summary (:func:`modelkit.verify.report.to_markdown`)."""
    return _write_text(Path(path), to_markdown(report), overwrite)


def write_junit(report: VerifyReport, path: str | os.PathLike[str],
                overwrite: bool = False) -> Path:
    """JUnit XML (:func:`modelkit.verify.report.to_junit`)."""
    return _write_text(Path(path), to_junit(report), overwrite)


# --- images -------------------------------------------------------------------------


def to_pil(image: np.ndarray) -> Image.Image:
    """A float ``[H, W, 3]`` image in [0, 1] as an 8-bit RGB picture (NaN
    shows as black)."""
    import numpy as np
    from PIL import Image

    arr = np.nan_to_num(np.asarray(image, np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8), "RGB")


def abs_diff(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``|c - r|`` averaged over channels (NaN counts as 1)."""
    import numpy as np

    d = np.abs(np.asarray(candidate, np.float32) - np.asarray(reference, np.float32))
    return np.nan_to_num(d.mean(axis=-1), nan=1.0)


def diff_gain(diff: np.ndarray) -> float:
    """The amplification for a difference map: :data:`DIFF_GAIN` unless that
    would saturate most of it (then less, down to 1: a merge's difference
    is large), up to :data:`MAX_GAIN` for faint ones."""
    import numpy as np

    top = float(np.percentile(diff, 99)) if diff.size else 0.0
    if top <= 0:
        return DIFF_GAIN
    return float(np.clip(round(0.9 / top), 1, MAX_GAIN))


def diff_image(diff: np.ndarray, gain: float) -> np.ndarray:
    """A difference map times ``gain`` as a heat map (black, red, yellow,
    white)."""
    import numpy as np

    x = np.clip(diff * gain, 0, 1) * 3
    return np.stack([np.clip(x, 0, 1), np.clip(x - 1, 0, 1), np.clip(x - 2, 0, 1)], -1)


FONT_SIZE = 12  # Pillow's default FreeType font at its own size (10) draws a space 2 px wide
LINE_H = 15


def label_font() -> Any:
    """The font of the labels on verify's grid and the sweep's contact sheet:
    Pillow's scalable default font at :data:`FONT_SIZE` (at its default
    size, 10 px, spaces all but vanish: "cliffatsunset"), or the bitmap font
    where Pillow has no FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def fit_text(text: str, width: int, font: Any, draw: Any) -> str:
    """``text``, cut with an ellipsis to ``width`` pixels in ``font``: at a
    word boundary when a whole word fits before it, else inside the word."""
    if draw.textlength(text, font=font) <= width:
        return text
    words = text.split(" ")
    while len(words) > 1:
        words.pop()
        head = " ".join(words).rstrip(" ,;:")
        if head and draw.textlength(head + "...", font=font) <= width:
            return head + "..."
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _metric_label(row: Any) -> str:
    if row is None or row.psnr is None:
        return ""
    psnr = "inf" if row.psnr == float("inf") else f"{row.psnr:.1f}"
    return f"PSNR {psnr} dB  SSIM {row.ssim:.4f}  latent {row.latent:.3g}"


def _cell_size(image: np.ndarray) -> tuple[int, int]:
    h, w = image.shape[:2]
    scale = max(1, -(-MIN_CELL // max(1, min(h, w))))
    return w * scale, h * scale


def grid_image(report: VerifyReport) -> Image.Image:
    """The comparison sheet: one row per prompt x seed; columns reference |
    candidate | amplified difference (candidate only without a reference);
    a header and per-row labels with the metrics."""
    from PIL import Image, ImageDraw

    renders = report.renders
    if renders is None or not renders.candidate:
        raise ModelkitError("no renders to draw: the render phase was skipped "
                            f"({report.summary()})")
    ref = renders.reference
    cw, ch = _cell_size(renders.candidate[0].image)
    columns = ([renders.reference_label, report.model, "|difference|, amplified"]
               if ref is not None else [report.model])
    font = label_font()
    line_h = LINE_H
    label_h = line_h * LABEL_LINES + PAD
    header_h = line_h * 2 + PAD
    width = max(MIN_WIDTH, len(columns) * (cw + PAD) + PAD)
    height = header_h + len(renders.candidate) * (ch + label_h + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title = f"modelkit verify: {report.summary()}"
    draw.text((PAD, PAD), fit_text(title, width - 2 * PAD, font, draw), fill=TEXT, font=font)
    for i, name in enumerate(columns):
        draw.text((PAD + i * (cw + PAD), PAD + line_h), fit_text(name, cw, font, draw),
                  fill=TEXT, font=font)
    rows = {m.case: m for m in report.images}
    y = header_h
    for i, cand in enumerate(renders.candidate):
        cells = [cand.image]
        gain_text = ""
        if ref is not None:
            diff = abs_diff(cand.image, ref[i].image)
            gain = diff_gain(diff)
            cells = [ref[i].image, cand.image, diff_image(diff, gain)]
            gain_text = f"  difference x{gain:g}"
        for j, img in enumerate(cells):
            sheet.paste(to_pil(img).resize((cw, ch), Image.Resampling.NEAREST),
                        (PAD + j * (cw + PAD), y))
        text_w = width - 2 * PAD
        lines = [f"{cand.case}  seed {cand.seed}  {_metric_label(rows.get(cand.case))}"
                 f"{gain_text}", cand.prompt]
        for k, line in enumerate(lines):
            draw.text((PAD, y + ch + 2 + k * line_h), fit_text(line, text_w, font, draw),
                      fill=TEXT, font=font)
        y += ch + label_h + PAD
    return sheet


def write_grid(report: VerifyReport, path: str | os.PathLike[str],
               overwrite: bool = False) -> Path:
    """Save :func:`grid_image` as a PNG."""
    from modelkit.io.writer import atomic_path

    p = Path(path)
    check_outputs([p], overwrite)
    sheet = grid_image(report)
    with atomic_path(p) as tmp:
        sheet.save(tmp, format="PNG")
    return p


def png_text(report: VerifyReport, render: Rendered, role: str) -> dict[str, str]:
    """The PNG text chunks of one image: each setting on its own, and
    A1111's ``parameters`` line."""
    plan = report.plan or {}
    model = report.reference if role == "reference" else report.model
    role_key = "reference" if role == "reference" else "model"
    model_hash = report.hashes.get(role_key, {}).get("autov2", "")
    size = f"{plan.get('width')}x{plan.get('height')}"
    sampler = {"euler": "Euler", "ddim": "DDIM"}.get(str(plan.get("scheduler")), "")
    a1111 = (f"{render.prompt}\nNegative prompt: {plan.get('negative_prompt', '')}\n"
             f"Steps: {plan.get('steps')}, Sampler: {sampler}, CFG scale: "
             f"{plan.get('guidance_scale')}, Seed: {render.seed}, Size: {size}, "
             f"Model hash: {model_hash}, Model: {Path(str(model)).stem}")
    return {
        "parameters": a1111, "prompt": render.prompt,
        "negative_prompt": str(plan.get("negative_prompt", "")), "seed": str(render.seed),
        "steps": str(plan.get("steps")), "size": size, "scheduler": str(plan.get("scheduler")),
        "guidance_scale": str(plan.get("guidance_scale")), "model": str(model),
        "model_autov2": model_hash, "case": render.case, "role": role,
        "software": f"modelkit {report.versions.get('modelkit', '')} verify",
    }


def write_images(report: VerifyReport, folder: str | os.PathLike[str],
                 overwrite: bool = False) -> list[Path]:
    """One PNG per rendered case (``<model>-<case>.png``, and
    ``reference-<case>.png`` with a reference), settings in text chunks."""
    from PIL import PngImagePlugin

    from modelkit.io.writer import atomic_path

    renders = report.renders
    if renders is None or not renders.candidate:
        raise ModelkitError("no renders to save: the render phase was skipped")
    out_dir = Path(folder)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(r, "candidate", out_dir / f"{Path(report.model).stem}-{r.case}.png")
            for r in renders.candidate]
    jobs += [(r, "reference", out_dir / f"reference-{r.case}.png")
             for r in renders.reference or []]
    check_outputs([p for _, _, p in jobs], overwrite)
    written = []
    for render, role, path in jobs:
        info = PngImagePlugin.PngInfo()
        for key, value in png_text(report, render, role).items():
            info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
        with atomic_path(path) as tmp:
            to_pil(render.image).save(tmp, format="PNG", pnginfo=info)
        written.append(path)
    return written

"""``check``: placement hints for the files in the library.

- broken or truncated files, and checkpoints with an incomplete component;
- files in a folder meant for another kind (a UNet-only file in a checkpoint
  folder, a LoRA among the VAEs), with the folder the user's UI loads them
  from;
- adapters, embeddings and ControlNets in a folder named for another
  architecture (an SDXL LoRA under ``Lora/SD1.5``);
- adapters, embeddings and ControlNets for an architecture the library has no
  checkpoint of (an SDXL LoRA in an SD1 library), pointing at another indexed
  library that has one when there is one.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelkit.arch import registry
from modelkit.arch.encoders import STANDALONE
from modelkit.io.suffixes import COMFYUI_DIFFUSION_MODELS
from modelkit.jsontypes import JSONDict
from modelkit.library.layout import (
    EXPECTED,
    PLAIN,
    Placement,
    accepts,
    arch_name,
    folder_arch,
    ui_kind,
)
from modelkit.library.query import Entry, Filters, list_entries
from modelkit.wording import with_article

ERROR, WARNING = "error", "warning"
NEEDS_BASE = ("lora", "embedding", "controlnet")
# adapters for these need a base model of their architecture in the library
ADAPTER_ARCHS = registry.names(where=lambda a: a.lora is None or a.lora.adapters)
KIND_NAMES = {"checkpoint": "checkpoint", "unet": "UNet-only (diffusion model) file",
              "lora": "LoRA", "vae": "VAE", "embedding": "embedding",
              "controlnet": "ControlNet", "text_encoder": "text encoder"}
UNET_ONLY_NOTE = ("checkpoint loaders expect UNet, VAE and text encoders in one file; "
                  "load it with a diffusion-model loader and pick the VAE and text "
                  "encoders yourself")


@dataclass(frozen=True)
class Hint:
    """One problem with one file, and where the file belongs."""

    path: str
    code: str  # broken, incomplete, unet-only, wrong-folder, arch-folder, no-base
    severity: str  # error or warning
    message: str
    expected: str | None = None  # the folder the user's UI expects it in

    def to_dict(self) -> JSONDict:
        return asdict(self)


@dataclass
class CheckReport:
    """Hints for every file that has any."""

    n_files: int
    hints: list[Hint] = field(default_factory=list)

    def by_path(self) -> dict[str, list[Hint]]:
        out: dict[str, list[Hint]] = defaultdict(list)
        for h in self.hints:
            out[h.path].append(h)
        return dict(out)

    def to_dict(self) -> JSONDict:
        return {"n_files": self.n_files, "n_hints": len(self.hints),
                "hints": [h.to_dict() for h in self.hints]}


def _placement(e: Entry) -> Placement:
    return Placement(e.layout, e.role, Path(e.base))


# standalone text encoders and VAEs named for themselves (T5-XXL), not a family
COMPONENT_LABELS = frozenset(s.label for s in STANDALONE)


def _kind_name(e: Entry, components: dict[str, Any] | None = None) -> str:
    name = KIND_NAMES.get(e.kind, e.kind)
    if e.kind in ("text_encoder", "vae") and components:
        label = next(iter(components.values())).get("family")
        if label in COMPONENT_LABELS:
            return label if e.kind == "vae" else f"{label} {name}"
    return f"{arch_name(e.arch)} {name}" if e.arch != "unknown" else name


def _broken(e: Entry, components: dict[str, Any]) -> list[Hint]:
    if e.kind == "broken":
        return [Hint(e.path, "broken", ERROR, e.error or "unreadable file")]
    out = []
    for c in components.values():
        if c.get("complete") is False:
            out.append(Hint(e.path, "incomplete", ERROR,
                            f"{c.get('name')} is incomplete ({c.get('n_missing', 0)} missing "
                            f"keys, {c.get('n_shape_mismatches', 0)} wrong shapes): a "
                            "truncated or damaged file; download it again"))
    return out


def _misplaced(e: Entry, components: dict[str, Any] | None = None) -> list[Hint]:
    if e.layout == PLAIN or e.role is None or accepts(e.role, e.kind, e.layout, e.arch) \
            or e.kind not in KIND_NAMES:
        return []
    place = _placement(e)
    expected = place.expected_folder(e.kind, e.arch)
    where = f"; {e.layout} loads it from {expected}" if expected else ""
    if e.kind == "unet" and e.role == "checkpoint":
        if not expected and _ldm(e.arch):  # A1111
            where = ("; A1111 loads only full checkpoints: swap it into one ('modelkit "
                     f"swap --unet') or use it from ComfyUI's {COMFYUI_DIFFUSION_MODELS}")
        elif not expected:
            where = (f"; A1111 and Forge do not load {arch_name(e.arch)} diffusion-model "
                     f"files: ComfyUI loads them from {COMFYUI_DIFFUSION_MODELS}")
        return [Hint(e.path, "unet-only", WARNING,
                     f"UNet-only file in a checkpoint folder: {UNET_ONLY_NOTE}{where}",
                     str(expected) if expected else None)]
    return [Hint(e.path, "wrong-folder", WARNING,
                 f"{_kind_name(e, components)} in {with_article(e.role)} folder{where}",
                 str(expected) if expected else None)]


def _ldm(arch: str) -> bool:
    """Whether ``arch`` is an SD1/SD2/SDXL family (or unknown): one whose
    UNet a checkpoint swap takes."""
    entry = registry.get(arch)
    return entry is None or entry.spec is not None


def _arch_folder(e: Entry) -> list[Hint]:
    if e.kind not in NEEDS_BASE or e.arch == "unknown":
        return []
    named = folder_arch(Path(e.path), Path(e.base))
    if named is None or registry.same_family(named[1], e.arch):
        return []
    folder, arch = named
    return [Hint(e.path, "arch-folder", WARNING,
                 f"{_kind_name(e)} in a folder named {folder!r} ({arch_name(arch)}): "
                 f"it does not work with {arch_name(arch)} checkpoints")]


def _is_base(e: Entry) -> bool:
    """A model a LoRA can be used with: a checkpoint, or in ComfyUI a
    diffusion-model-only file (A1111 cannot load those; Forge a Flux one)."""
    if e.arch == "unknown":
        return False
    return ui_kind(e.layout, e.kind, e.arch) == "checkpoint" or (
        e.kind == "unet" and e.layout == "comfyui")


def _base_hints(entries: list[Entry]) -> list[Hint]:
    """Adapters whose architecture has no checkpoint in their library."""
    archs_by_base: dict[str, set[str]] = defaultdict(set)
    layout_of: dict[str, str] = {}
    for e in entries:
        layout_of[e.base] = e.layout
        if _is_base(e):
            archs_by_base[e.base].add(e.arch)
    everywhere = set().union(*archs_by_base.values()) if archs_by_base else set()
    out = []
    for e in entries:
        if e.kind not in NEEDS_BASE or e.arch not in ADAPTER_ARCHS:
            continue
        have = archs_by_base.get(e.base) or everywhere
        if not have or e.arch in have:
            continue
        others = [b for b, archs in archs_by_base.items() if e.arch in archs]
        expected = None
        if others and layout_of.get(others[0]) in EXPECTED:
            folder = Placement(layout_of[others[0]], None, Path(others[0])
                               ).expected_folder(e.kind, e.arch)
            expected = str(folder) if folder else None
        listing = ", ".join(arch_name(a) for a in sorted(have))
        out.append(Hint(e.path, "no-base", WARNING,
                        f"{_kind_name(e)}, but this library has only {listing} "
                        f"checkpoints: it needs {with_article(arch_name(e.arch))} base model"
                        + (f"; the {arch_name(e.arch)} library is at {others[0]}"
                           if others else ""), expected))
    return out


def check(conn: sqlite3.Connection, filters: Filters | None = None) -> CheckReport:
    """Placement hints for the files matching ``filters`` (default: all);
    the whole index is the reference for which bases each library has."""
    everything = list_entries(conn)
    wanted = {e.path for e in list_entries(conn, filters)} if filters else None
    components = {r["path"]: r["components"] for r in
                  conn.execute("SELECT path, components FROM files WHERE components IS "
                               "NOT NULL AND kind IN ('checkpoint', 'unet', 'text_encoder', "
                               "'vae')")}
    hints: list[Hint] = []
    for e in everything:
        comps = json.loads(components.get(e.path) or "{}")
        hints += _broken(e, comps) + _misplaced(e, comps) + _arch_folder(e)
    hints += _base_hints(everything)
    if wanted is not None:
        hints = [h for h in hints if h.path in wanted]
    hints.sort(key=lambda h: (h.path, h.code))
    return CheckReport(len(wanted) if wanted is not None else len(everything), hints)

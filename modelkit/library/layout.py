"""Where UIs expect each kind of model file: the folder layouts of
A1111/Forge and ComfyUI, as data.

A file's *role* is what the folder it sits in is for (``checkpoint``,
``lora``, ...), taken from the nearest folder with a known name. Its
*layout* says which UI that folder belongs to, and *base* is the UI's model
root (the A1111 install folder, or ComfyUI's ``models`` folder), so the
folder a misplaced file belongs in can be named in full.

Sweep output is no library content: a sweep folder (it holds a
``.modelkit-sweep`` marker or a ``sweep.jsonl``) is never scanned, and the
TUI proposes sweep folders under :data:`SWEEPS_FOLDER` where no UI looks
(:meth:`Placement.sweeps_folder`).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from modelkit.arch import registry
from modelkit.io.suffixes import COMFYUI_DIFFUSION_MODELS

A1111 = "a1111"
COMFYUI = "comfyui"
PLAIN = "plain"

# a folder holding one of these is a sweep's output (modelkit.sweep writes both)
SWEEP_MARKER = ".modelkit-sweep"
SWEEP_FILES = (SWEEP_MARKER, "sweep.jsonl")
SWEEPS_FOLDER = "sweeps"  # where the TUI puts new sweep folders (see sweeps_folder)

# folder path (relative to the UI root, lower case) -> role
A1111_FOLDERS: dict[str, str] = {
    "models/stable-diffusion": "checkpoint",
    "models/lora": "lora",
    "models/lycoris": "lora",
    "models/vae": "vae",
    "embeddings": "embedding",
    "models/controlnet": "controlnet",
    "models/text_encoder": "text_encoder",
}
# folder name directly under ComfyUI's models/ (lower case) -> role
COMFYUI_FOLDERS: dict[str, str] = {
    "checkpoints": "checkpoint",
    "loras": "lora",
    "vae": "vae",
    "embeddings": "embedding",
    "controlnet": "controlnet",
    "diffusion_models": "unet",
    "unet": "unet",
    "clip": "text_encoder",
    "text_encoders": "text_encoder",
}

# kind -> the folder each UI loads it from (None: that UI cannot load it alone)
EXPECTED: dict[str, dict[str, str | None]] = {
    A1111: {
        "checkpoint": "models/Stable-diffusion",
        "lora": "models/Lora",
        "vae": "models/VAE",
        "embedding": "embeddings",
        "controlnet": "models/ControlNet",
        "unet": None,
        "text_encoder": "models/text_encoder",
    },
    COMFYUI: {
        "checkpoint": "checkpoints",
        "lora": "loras",
        "vae": "vae",
        "embedding": "embeddings",
        "controlnet": "controlnet",
        "unet": COMFYUI_DIFFUSION_MODELS.removeprefix("models/"),
        "text_encoder": "text_encoders",
    },
}
# families whose diffusion-model-only (transformer) files Forge, the A1111
# fork that runs them, loads from its checkpoint folder and completes with
# the VAE and text encoders picked in its UI (lllyasviel/stable-diffusion-
# webui-forge: backend/loader.py with huggingface_guess's Flux entries); the
# other families' transformer files load in ComfyUI only
FORGE_TRANSFORMER_ARCHS = frozenset({"flux"})


def ui_kind(layout: str, kind: str, arch: str | None) -> str:
    """The kind a UI files ``kind`` under: Forge takes a Flux transformer
    file for a checkpoint (it sits in ``models/Stable-diffusion``)."""
    if layout == A1111 and kind == "unet" and arch in FORGE_TRANSFORMER_ARCHS:
        return "checkpoint"
    return kind


@dataclass(frozen=True)
class Placement:
    """Which UI folder a file sits in."""

    layout: str  # a1111, comfyui or plain
    role: str | None  # what the folder is for; None in plain folders
    base: Path  # the UI's model root, or the scanned folder for plain ones

    def expected_folder(self, kind: str, arch: str | None = None) -> Path | None:
        """Where this UI expects a file of ``kind`` for ``arch`` (None:
        nowhere, or unknown for plain folders): ComfyUI's
        ``models/diffusion_models`` for every family's transformer-only
        file, Forge's ``models/Stable-diffusion`` for a Flux one."""
        rel = EXPECTED.get(self.layout, {}).get(ui_kind(self.layout, kind, arch))
        return self.base / rel if rel else None

    def sweeps_folder(self) -> Path:
        """Where new sweep folders go, out of every UI's model folders:
        ``sweeps/`` beside A1111's or ComfyUI's ``models`` folder (the UI's
        install folder), or in the scanned folder of a plain library (no
        UI is known to look there; the library skips sweep folders)."""
        base = self.base
        if self.layout == COMFYUI and base.name.lower() == "models":
            base = base.parent
        return base / SWEEPS_FOLDER


def _models_layout(models_dir: Path, folder_name: str) -> str:
    """A1111 or ComfyUI, from the sibling folders of a ``models`` folder; by
    the folder's own name when the siblings do not tell."""
    try:
        names = {p.name.lower() for p in models_dir.iterdir() if p.is_dir()}
    except OSError:
        names = set()
    if names & {"stable-diffusion", "lora", "lycoris"}:
        return A1111
    if names & {"checkpoints", "loras", "diffusion_models"}:
        return COMFYUI
    lower = folder_name.lower()
    if f"models/{lower}" in A1111_FOLDERS and lower not in COMFYUI_FOLDERS:
        return A1111
    if lower in COMFYUI_FOLDERS and folder_name == lower:
        return COMFYUI
    return A1111 if f"models/{lower}" in A1111_FOLDERS else COMFYUI


class Placer:
    """Finds the :class:`Placement` of files, remembering what it learnt
    about each ``models`` folder."""

    def __init__(self) -> None:
        self._layouts: dict[tuple[Path, str], str] = {}

    def _layout(self, models_dir: Path, folder_name: str) -> str:
        key = (models_dir, folder_name)
        if key not in self._layouts:
            self._layouts[key] = _models_layout(models_dir, folder_name)
        return self._layouts[key]

    def place(self, path: Path, root: Path) -> Placement:
        """The placement of ``path``, a file found under the scanned ``root``.

        Folder names are matched case-insensitively from the file upwards,
        so scanning ``webui/models/Lora`` alone still finds an A1111 LoRA
        folder; files in no known folder are ``plain``."""
        parts = path.parent.parts
        for i in range(len(parts) - 1, 0, -1):
            name = parts[i].lower()
            if parts[i - 1].lower() == "models":
                models_dir = Path(*parts[:i])
                layout = self._layout(models_dir, parts[i])
                if layout == A1111 and f"models/{name}" in A1111_FOLDERS:
                    return Placement(A1111, A1111_FOLDERS[f"models/{name}"], models_dir.parent)
                if layout == COMFYUI and name in COMFYUI_FOLDERS:
                    return Placement(COMFYUI, COMFYUI_FOLDERS[name], models_dir)
            if name == "embeddings":
                return Placement(A1111, "embedding", Path(*parts[:i]))
            if name in COMFYUI_FOLDERS and name != "embeddings":
                return Placement(COMFYUI, COMFYUI_FOLDERS[name], Path(*parts[:i]))
        return Placement(PLAIN, None, root)


def is_sweep_folder(names: Container[str]) -> bool:
    """Whether a folder holding the entries ``names`` is a sweep's output."""
    return any(n in names for n in SWEEP_FILES)


def accepts(role: str | None, kind: str, layout: str = PLAIN, arch: str | None = None
            ) -> bool:
    """Whether a folder for ``role`` (in a UI of ``layout``) is where a file
    of ``kind`` for ``arch`` belongs (unknown and broken files belong
    nowhere in particular)."""
    return role is None or kind in ("unknown", "broken") or ui_kind(layout, kind, arch) == role


# folder names that say which architecture the files in them are for
ARCH_FOLDER_NAMES: dict[str, str] = registry.folder_aliases()


def arch_name(arch: str) -> str:
    """How people write an architecture: ``SDXL``, ``SD1``."""
    return registry.label(arch)


def folder_arch(path: Path, base: Path) -> tuple[str, str] | None:
    """(folder name, arch) of the nearest folder between ``base`` and the
    file whose name says which architecture it holds, e.g. ``Lora/SD1.5``."""
    try:
        rel = path.parent.relative_to(base)
    except ValueError:
        return None
    for part in reversed(rel.parts):
        arch = ARCH_FOLDER_NAMES.get(part.lower())
        if arch:
            return part, arch
    return None

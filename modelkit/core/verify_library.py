"""The user's model library, as verify sees it: where LoRAs, textual
inversion embeddings and a CLIP tokenizer are found, and A1111 prompt syntax.

The library root is ``--library DIR`` or, by default, the nearest folder
above the model (at most four levels up) that holds a ``models/`` folder, as
in A1111/Forge (``models/Stable-diffusion/x.safetensors``) and ComfyUI
(``models/checkpoints/x.safetensors``); when the model has none, the
reference's. Under the root:

* LoRAs: ``models/Lora``, ``models/LyCORIS`` (A1111), ``models/loras``
  (ComfyUI), searched recursively by file stem;
* embeddings: ``embeddings`` (A1111), ``models/embeddings`` (ComfyUI);
* a CLIP tokenizer: ``models/tokenizers/clip`` (a folder with
  ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``: e.g. the
  ``tokenizer/`` folder of an SD1.5 diffusers repo). This one is modelkit's
  own convention; ``modelkit demo`` writes a small one there.

In prompts, ``<lora:NAME:WEIGHT>`` (A1111; ``<lyco:...>`` too) applies the
LoRA ``NAME`` at render time at ``WEIGHT`` (default 1), and an embedding's
file stem used as a word applies that embedding.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from modelkit.errors import ModelkitError
from modelkit.io.formats import PICKLE, SAFETENSORS

LORA_DIRS = ("models/Lora", "models/LyCORIS", "models/loras")
EMBEDDING_DIRS = ("embeddings", "models/embeddings")
TOKENIZER_DIRS = ("models/tokenizers/clip", "models/tokenizers/clip-vit-large-patch14")
ADAPTER_SUFFIXES = (*SAFETENSORS.suffixes, *PICKLE.suffixes)  # the format table's
ROOT_SEARCH_DEPTH = 4
LORA_TAG = re.compile(r"<(lora|lyco):([^>]*)>")


@dataclass(frozen=True)
class PromptLora:
    """A ``<lora:name:weight>`` tag found in a prompt."""

    name: str
    weight: float


@dataclass
class Library:
    """Folders of one model library (see the module doc)."""

    root: Path | None
    lora_dirs: list[Path] = field(default_factory=list)
    embedding_dirs: list[Path] = field(default_factory=list)
    tokenizer_dirs: list[Path] = field(default_factory=list)

    def find_lora(self, name: str) -> Path:
        """The LoRA file named ``name`` (file stem, or a relative path)."""
        for folder in self.lora_dirs:
            for suffix in ("", *ADAPTER_SUFFIXES):
                direct = folder / f"{name}{suffix}"
                if direct.is_file():
                    return direct
            hits = sorted(p for p in folder.rglob("*") if p.stem == name
                          and p.suffix.lower() in ADAPTER_SUFFIXES)
            if hits:
                return hits[0]
        where = ", ".join(str(d) for d in self.lora_dirs) or "no library found"
        raise ModelkitError(f"<lora:{name}>: no LoRA named {name!r} in the library "
                            f"({where}); put it in models/Lora or pass --library")

    def embeddings(self) -> dict[str, Path]:
        """Embedding name (file stem) -> file, the first found per name."""
        out: dict[str, Path] = {}
        for folder in self.embedding_dirs:
            for p in sorted(folder.rglob("*")):
                if p.suffix.lower() in ADAPTER_SUFFIXES and p.is_file():
                    out.setdefault(p.stem, p)
        return out


def find_root(model_path: Path) -> Path | None:
    """The library root above ``model_path`` (a folder holding ``models/``)."""
    here = model_path.absolute().parent
    for folder in [here, *here.parents][:ROOT_SEARCH_DEPTH + 1]:
        if (folder / "models").is_dir():
            return folder
    return None


def find_library(model_path: str | os.PathLike[str], root: Path | None = None) -> Library:
    """The library of ``model_path``: ``root`` when given (it must exist),
    else found above the model; an empty library when there is none."""
    if root is not None:
        if not Path(root).is_dir():
            raise ModelkitError(f"--library {root}: no such folder")
        base: Path | None = Path(root)
    else:
        base = find_root(Path(model_path))
    if base is None:
        return Library(None)

    def existing(rels: tuple[str, ...]) -> list[Path]:
        return [base / r for r in rels if (base / r).is_dir()]

    return Library(base, existing(LORA_DIRS), existing(EMBEDDING_DIRS),
                   existing(TOKENIZER_DIRS))


def parse_prompt(prompt: str) -> tuple[str, list[PromptLora]]:
    """Strip A1111 ``<lora:name:weight>`` tags from ``prompt``; return the
    clean prompt and the LoRAs in order."""
    loras = []
    for m in LORA_TAG.finditer(prompt):
        parts = m.group(2).split(":")
        name = parts[0].strip()
        if not name or len(parts) > 2:
            raise ModelkitError(f"prompt tag {m.group(0)!r}: write <lora:NAME> or "
                                "<lora:NAME:WEIGHT>")
        weight = 1.0
        if len(parts) == 2:
            try:
                weight = float(parts[1])
            except ValueError:
                raise ModelkitError(f"prompt tag {m.group(0)!r}: weight {parts[1]!r} is "
                                    "not a number") from None
            if not math.isfinite(weight):
                raise ModelkitError(f"prompt tag {m.group(0)!r}: weight {parts[1].strip()!r} "
                                    "is not a finite number")
        loras.append(PromptLora(name, weight))
    clean = re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip(" ,")
    return clean, loras


def embedding_names_in(texts: list[str], available: dict[str, Path]) -> list[str]:
    """Embedding names used as words in any of ``texts``, in library order."""
    used = []
    for name in available:
        pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
        if any(pattern.search(t) for t in texts):
            used.append(name)
    return used

"""Reading a written model file back in tests: its tensors and metadata."""

from __future__ import annotations

from pathlib import Path

import torch

from modelkit.io.reader import open_model


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path``, copied out of the memory map."""
    with open_model(path) as f:
        return {k: f.get(k).clone() for k in f.infos}


def metadata(path: Path) -> dict[str, str]:
    """The file's metadata."""
    with open_model(path) as f:
        return dict(f.metadata)

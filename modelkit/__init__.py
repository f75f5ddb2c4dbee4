"""modelkit: checkpoint and adapter management for Stable Diffusion model files.

The core API, for programs and front ends (the CLI and the TUI use nothing
else)::

    import threading
    from modelkit import Recipe, run

    recipe = Recipe.merge("a.safetensors", "b.safetensors", alpha=0.3,
                          output="ab.safetensors").then("prune")
    report = run(recipe, progress=print, cancel=threading.Event())

Importing the package is cheap: torch, diffusers and textual are imported
only by the functions that need them (the names below load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "modelkit.engine.runner",
    "RunReport": "modelkit.engine.report",
    "Recipe": "modelkit.core.recipe",
    "Options": "modelkit.core.recipe",
    "RecipeError": "modelkit.core.recipe",
    "validate": "modelkit.core.recipe",
    "load_recipe": "modelkit.core.recipe",
    "parse_recipe": "modelkit.core.recipe",
    "all_transforms": "modelkit.core.registry",
    "Progress": "modelkit.progress",
    "ModelkitError": "modelkit.errors",
    "Cancelled": "modelkit.errors",
    "open_source": "modelkit.io.open",
    "inspect_model": "modelkit.inspect.report",
    "compare_models": "modelkit.inspect.compare",
    "export_gguf": "modelkit.engine.api",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelkit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)

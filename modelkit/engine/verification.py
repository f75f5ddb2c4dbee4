"""The verify phase of a run: the recipe's ``verify:`` section (or
``run(..., verify=True)``) renders the written output and checks it with
:func:`modelkit.verify.verify`, against the right reference:

* a LoRA bake is compared with its base checkpoint plus the same LoRAs
  applied at render time through diffusers (the runtime oracle);
* anything else with the output step's primary input (the model an fp16
  cast, an int8 quantization or a prune was made from), when it is a
  checkpoint file;
* ``reference: <input name>`` picks another input, ``reference: none`` none.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import CancelFlag, ModelkitError

if TYPE_CHECKING:
    from modelkit.core.recipe import Recipe
    from modelkit.engine.graph import Graph
    from modelkit.progress import ProgressFn
    from modelkit.verify import LoraUse, VerifyReport, VerifySettings


def settings_from(section: dict[str, Any], device: str) -> VerifySettings:
    """:class:`VerifySettings` from a recipe's ``verify:`` section."""
    from modelkit.verify import VerifySettings

    fields: dict[str, Any] = {"device": device}
    for key, value in section.items():
        if key == "reference":
            continue
        if key in ("prompts", "seeds"):
            value = tuple(value)
        elif key == "size":
            value = _size(value)
        elif key in ("tokenizer", "library"):
            value = Path(value)
        fields[key] = value
    settings = VerifySettings(**fields)
    settings.validate()
    return settings


def _size(value: Any) -> tuple[int, int]:
    try:
        w, h = (value.lower().split("x") if isinstance(value, str) else value)
        return int(w), int(h)
    except (TypeError, ValueError):
        raise ModelkitError(f"verify.size {value!r}: give WIDTHxHEIGHT, e.g. 256x256"
                            ) from None


def reference_and_loras(recipe: Recipe, graph: Graph, section: dict[str, Any]
                        ) -> tuple[Path | None, list[LoraUse]]:
    """The reference file and render-time LoRAs for the written output."""
    from modelkit.verify import LoraUse

    choice = section.get("reference")
    if choice == "none":
        return None, []
    if choice is not None:
        return recipe.resolve(recipe.inputs[choice].path), []
    bake = next((r for r in reversed(graph.records) if r.transform == "lora_bake"), None)
    if bake is not None and bake.planned is not None:
        paths = bake.planned.source.input_paths
        weights = [a.weight for a in bake.report.adapters]
        return paths[0], [LoraUse(p, w) for p, w in zip(paths[1:], weights, strict=False)]
    path = recipe.resolve(recipe.inputs[recipe.primary_input()].path)
    return (path if path.is_file() or path.is_dir() else None), []


def verify_output(recipe: Recipe, graph: Graph, output: Path, section: dict[str, Any],
                  device: str, progress: ProgressFn, cancel: CancelFlag | None) -> VerifyReport:
    """Render and check ``output`` (the file the run just wrote)."""
    from modelkit.verify import verify

    settings = settings_from(section, device)
    reference, loras = reference_and_loras(recipe, graph, section)
    return verify(output, settings, reference, loras, progress=progress, cancel=cancel)

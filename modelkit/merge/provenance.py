"""Provenance metadata written into every merge output.

- ``modelkit.recipe``: the canonical recipe YAML with input sha256 pinned, so
  ``modelkit recipe replay`` can re-run and check it.
- ``modelkit.version``, ``modelkit.inputs`` (JSON: name -> file name, sha256),
  ``modelkit.block_map``.
- A1111-compatible ``sd_merge_recipe`` and ``sd_merge_models`` (the parents'
  own ``sd_merge_models`` are inherited, as A1111 does), so A1111 and
  civitai-style tools show the lineage.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from modelkit import __version__
from modelkit.merge.plan import Plan
from modelkit.merge.recipe import BlockParam
from modelkit.progress import ProgressFn, no_progress

RECIPE_KEY = "modelkit.recipe"


def _a1111_recipe(plan: Plan, hashes: dict[str, Any]) -> dict[str, Any]:
    recipe = plan.recipe
    step = recipe.steps[recipe.output_step]
    leaves = [m for m in step.models if m in recipe.inputs]
    roles = ("primary", "secondary", "tertiary")
    out: dict[str, Any] = {"type": "modelkit", "modelkit_version": __version__,
                           "interp_method": step.method}
    for role, name in zip(roles, leaves, strict=False):
        out[f"{role}_model_hash"] = hashes[name].sha256
    alpha = step.params.get("alpha")
    if alpha is not None:
        out["multiplier"] = alpha.to_yaml() if isinstance(alpha, BlockParam) else alpha
    out["save_as_half"] = recipe.output_dtype == "fp16"
    out["bake_in_vae"] = plan.vae.path.name if plan.vae else None
    out["is_inpainting"] = plan.inputs[plan.primary].variant == "inpaint"
    out["is_instruct_pix2pix"] = plan.inputs[plan.primary].variant == "pix2pix"
    out["steps"] = len(recipe.steps)
    return out


def _lineage(plan: Plan, hashes: dict[str, Any], merge_recipe: dict[str, Any]
             ) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name, f in plan.inputs.items():
        h = hashes[name]
        models[h.sha256] = {"name": f.path.stem, "legacy_hash": h.legacy,
                            "sd_merge_recipe": _parent_recipe(f.metadata)}
        parent = f.metadata.get("sd_merge_models")
        if parent:
            # a parent with broken lineage metadata keeps what it has
            with contextlib.suppress(ValueError):
                models.update(json.loads(parent))
    return models


def _parent_recipe(meta: dict[str, str]) -> Any:
    raw = meta.get("sd_merge_recipe")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def merge_metadata(plan: Plan, progress: ProgressFn = no_progress) -> dict[str, str]:
    """The output's ``__metadata__``; hashes the inputs (cached by mtime) and
    checks any sha256 pinned in the recipe."""
    from concurrent.futures import ThreadPoolExecutor

    from modelkit.errors import ModelkitError
    from modelkit.io.hashcache import cached_hashes

    # sha256 only, all inputs at once: hashlib releases the GIL
    with ThreadPoolExecutor(max(1, min(4, len(plan.inputs)))) as pool:
        jobs = {n: pool.submit(cached_hashes, f.path, progress, False)
                for n, f in plan.inputs.items()}
        hashes = {n: job.result() for n, job in jobs.items()}
    for name, spec in plan.recipe.inputs.items():
        if spec.sha256 and spec.sha256 != hashes[name].sha256:
            raise ModelkitError(
                f"input {name!r}: {plan.inputs[name].path} has sha256 "
                f"{hashes[name].sha256[:12]}..., the recipe pins {spec.sha256[:12]}...; "
                "the file changed since the recipe was locked")
    pinned = plan.recipe.with_hashes({n: h.sha256 for n, h in hashes.items()}, absolute=True)
    a1111 = _a1111_recipe(plan, hashes)
    inputs = {n: {"file": f.path.name, "sha256": hashes[n].sha256}
              for n, f in plan.inputs.items()}
    if plan.vae is not None:
        inputs["vae"] = {"file": plan.vae.path.name,
                         "sha256": cached_hashes(plan.vae.path, tensor_hash=False).sha256}
    return {
        RECIPE_KEY: pinned.to_yaml(),
        "modelkit.version": __version__,
        "modelkit.inputs": json.dumps(inputs),
        "modelkit.block_map": plan.recipe.options.block_map,
        "modelkit.arch": plan.arch,
        "sd_merge_recipe": json.dumps(a1111),
        "sd_merge_models": json.dumps(_lineage(plan, hashes, a1111)),
        "format": "pt",
    }

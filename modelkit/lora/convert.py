"""``convert``: rename an adapter between kohya, PEFT/diffusers and ComfyUI-native
keys, alpha kept.

* ``kohya``: ``lora_unet_``/``lora_te*_`` names (SD1/SD2 diffusers paths,
  SDXL LDM paths), ``lora_down``/``lora_up``/``alpha``; LyCORIS tensors
  (``hada_*``, ``lokr_*``, ``diff``, ``dora_scale``...) keep their suffixes.
* ``comfy``: ``diffusion_model.<LDM path>`` and
  ``text_encoders.<clip_l|clip_h|clip_g>.transformer.<HF path>``, same
  suffixes; ``alpha`` tensors are kept (ComfyUI reads them).
* ``peft``: ``unet.``/``text_encoder.``/``text_encoder_2.`` diffusers paths
  with ``lora_A``/``lora_B``. PEFT files carry no per-module alpha, so
  ``s = alpha / rank`` is folded into ``lora_B``; plain LoRA/LoCon modules
  only (no Tucker ``lora_mid``, no LyCORIS algorithms), DoRA magnitudes per
  output row become ``lora_magnitude_vector``. diffusers/PEFT read these
  files; ComfyUI maps diffusers UNet attention only under the old
  ``processor.to_q`` spelling and skips the rest of the UNet's attention, so
  ``comfy`` is the output for ComfyUI (:data:`READERS`, printed by the command).
* (IA)3 modules are refused for ``comfy``: ComfyUI has no (IA)3 adapter.

The effective ΔW of every module is unchanged by any conversion. A family
with its own LoRA module table (the transformer families) is converted weight by weight
(:func:`modelkit.lora.table.convert_path`): kohya/ComfyUI fused q/k/v split
into PEFT's to_q/to_k/to_v (rank kept) or fused back (ranks summed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.arch.configs import ARCHS
from modelkit.arch.lora_names import ModuleTarget, lora_module_targets, norm_module_targets
from modelkit.core.step import PlannedStep
from modelkit.errors import ModelkitError
from modelkit.io.source import DerivedSource, Source, source_label, tensor_info
from modelkit.jsontypes import JSONDict
from modelkit.lora.adapter import DOWN, LORA_ARCHS, MID, UP, Adapter, AdapterModule, open_adapter
from modelkit.lora.delta import DORA, module_scale
from modelkit.lora.table import PlannedTensor, convert_path, has_table, path_of
from modelkit.wording import agree

if TYPE_CHECKING:
    import torch

TARGET_NAMINGS = {"kohya": "kohya", "peft": "peft", "comfy": "comfyui", "comfyui": "comfyui"}
# which loaders read each output naming (the cross-tool load matrix of
# Nerogar/OneTrainer PR #1563 and huggingface/diffusers issue #10860; ComfyUI's
# comfy/lora.py maps diffusers UNet attention only as ``processor.to_q``)
READERS = {
    "kohya": "A1111/Forge, ComfyUI and kohya's scripts (diffusers: plain LoRA/LoCon only)",
    "comfyui": "ComfyUI (A1111 does not read diffusion_model./text_encoders. keys)",
    "peft": "diffusers/PEFT; ComfyUI skips its UNet attention keys (it expects the old "
            "processor.to_q spelling): use --to comfy for ComfyUI",
}
# the same for a family with its own module table: ComfyUI reads kohya and
# ``diffusion_model.`` names of every family (comfy/lora.py
# ``model_lora_keys_unet``) and diffusers ``transformer.`` names of SD3, Flux.1
# (Chroma is a Flux subclass there) and Qwen-Image; diffusers converts the
# original names of Flux.1, Flux.2, Wan, Qwen-Image and Z-Image
# (loaders/lora_conversion_utils.py ``_convert_kohya_flux_lora_to_diffusers``,
# ``_convert_non_diffusers_{flux2,wan,qwen,z_image}_lora_to_diffusers``)
COMFY_READS_PEFT = frozenset({"sd3", "flux", "chroma", "qwen_image"})
DIFFUSERS_READS_ORIGINAL = frozenset({"flux", "flux2", "wan", "qwen_image", "z_image"})


def table_readers(arch: str, naming: str) -> str:
    """Which tools read an adapter of ``arch`` written in ``naming``."""
    if naming == "peft":
        return "diffusers/PEFT" + (" and ComfyUI" if arch in COMFY_READS_PEFT else
                                   " (ComfyUI: use --to comfy)")
    readers = ["ComfyUI", "Forge"] if arch == "flux" and naming == "kohya" else ["ComfyUI"]
    if naming == "kohya":
        readers.append("kohya sd-scripts/musubi-tuner")
    if arch in DIFFUSERS_READS_ORIGINAL:
        readers.append("diffusers")
    return ", ".join(readers)


PEFT_SUFFIX = {DOWN: "lora_A.weight", UP: "lora_B.weight", DORA: "lora_magnitude_vector"}


def _index(arch: str, naming: str) -> dict[tuple[str, tuple[int, int] | None], ModuleTarget]:
    spec = ARCHS[arch]
    found = {**lora_module_targets(spec, naming), **norm_module_targets(spec, naming)}
    return {(t.key, t.rows): t for t in found.values()}


def _plan_module(ad: Adapter, mod: AdapterModule, name: str, to: str,
                 plan: dict[str, tuple[str, Any]]) -> None:
    """Output key -> (input key, how) for one module; ``how`` is None (copy),
    a float (multiply) or a shape (reshape)."""
    if to != "peft":
        for suffix, key in mod.keys.items():
            how: Any = None
            if suffix == DORA and not key.endswith(DORA):  # PEFT magnitude -> kohya
                ndim = len(ad.source.infos[mod.keys[DOWN]].shape) if DOWN in mod.keys else 2
                how = (ad.source.infos[key].shape[0], *([1] * (ndim - 1)))
            plan[f"{name}.{suffix}"] = (key, how)
        return
    if mod.algo != "lora" or MID in mod.keys:
        kind = "Tucker LoCon" if MID in mod.keys else mod.algo
        raise ModelkitError(f"{ad.label}: module {mod.name} is {kind}; PEFT/diffusers files "
                            "hold plain LoRA only (convert to kohya or comfy instead)")
    plan[f"{name}.lora_A.weight"] = (mod.keys[DOWN], None)
    plan[f"{name}.lora_B.weight"] = (mod.keys[UP], module_scale(ad, mod))
    if DORA in mod.keys:
        shape = ad.source.infos[mod.keys[DORA]].shape
        out = ad.source.infos[mod.keys[UP]].shape[0]
        if shape[0] != out or math.prod(shape) != out:
            raise ModelkitError(f"{ad.label}: {mod.keys[DORA]}: PEFT keeps DoRA magnitudes per "
                                "output row only; this one is per input channel")
        plan[f"{name}.lora_magnitude_vector"] = (mod.keys[DORA], (out,))


def convert(lora: Source, to: str, *, arch: str | None = None) -> PlannedStep:
    """Plan ``lora`` renamed to ``to`` (``kohya``, ``peft`` or ``comfy``).

    Raises:
        ModelkitError: unknown target, unknown architecture, keys that match
            no module, or (for ``peft``) modules PEFT cannot hold.
    """
    naming = TARGET_NAMINGS.get(to)
    if naming is None:
        raise ModelkitError(f"unknown adapter format {to!r}; choose kohya, peft or comfy")
    ad = open_adapter(lora, arch)
    use = arch or ad.arch
    if use not in LORA_ARCHS:
        raise ModelkitError(f"{ad.label}: cannot tell which architecture it is for "
                            f"({'; '.join(ad.evidence) or 'no evidence'}); pass it explicitly")
    if ad.unmatched:
        keys = agree(len(ad.unmatched), "key", "matches", "match")
        raise ModelkitError(f"{ad.label}: {keys} no module of {use} "
                            f"(first: {ad.unmatched[0]}); nothing to convert them to")
    if naming == "comfyui":
        ia3 = [m.name for m in ad.modules.values() if m.algo == "ia3"]
        if ia3:
            raise ModelkitError(f"{ad.label}: module {ia3[0]} ({len(ia3)} in all) is (IA)3, "
                                "which ComfyUI has no adapter for (it would skip them as "
                                "'lora key not loaded'); keep kohya naming (A1111 reads "
                                "(IA)3) or bake it with 'modelkit lora bake'")
    if has_table(use):
        return _convert_table(lora, ad, use, naming, to)
    index = _index(use, naming)
    plan: dict[str, tuple[str, Any]] = {}
    for mod in ad.modules.values():
        assert mod.target is not None
        name = index[(mod.target.key, mod.target.rows)].name
        _plan_module(ad, mod, name, "peft" if naming == "peft" else naming, plan)
    infos = {}
    for out_key, (in_key, how) in plan.items():
        info = lora.infos[in_key]
        shape = how if isinstance(how, tuple) else info.shape
        infos[out_key] = tensor_info(out_key, info.dtype, shape)

    def produce(key: str) -> torch.Tensor:
        import torch

        in_key, how = plan[key]
        t = lora.get(in_key)
        if isinstance(how, tuple):
            t = t.reshape(how).contiguous()
        elif isinstance(how, float) and how != 1.0:
            t = (t.float() * how).to(t.dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            if isinstance(how, float) and bool(torch.isfinite(lora.get(in_key)).all()):
                raise ModelkitError(f"{ad.label}: {in_key} overflows {lora.infos[in_key].dtype} "
                                    f"(or holds NaN/Inf) once alpha/rank = {how:g} is folded "
                                    "in for PEFT; convert --to kohya or comfy, which keep alpha")
            raise ModelkitError(f"{ad.label}: {in_key} holds NaN or Inf values; the adapter "
                                "is broken (nothing written)")
        return t

    meta = dict(lora.metadata)
    if naming == "peft":
        meta.pop("lora_adapter_metadata", None)  # scales are folded into lora_B
        meta["format"] = "pt"
    label = f"lora_convert({Path(source_label(lora)).name})"
    out = DerivedSource(label, infos, meta, produce, lora.input_paths)
    report = {"from": ad.naming, "to": to, "arch": use, "n_modules": len(ad.modules),
              "n_tensors": len(infos), "read_by": READERS[naming]}
    origins = {k: (None if isinstance(how, tuple) else (0, in_key))
               for k, (in_key, how) in plan.items()}
    return PlannedStep(out, _ConvertReport(report), "lora_convert", {"to": to}, origins)


def _convert_table(lora: Source, ad: Adapter, arch: str, naming: str, to: str
                   ) -> PlannedStep:
    """Convert an adapter of a family with its own module table, weight by
    weight (:func:`modelkit.lora.table.convert_path`): exact, fused q/k/v
    split or split ones fused as the output naming needs."""
    by_path: dict[str, list[AdapterModule]] = {}
    for mod in ad.modules.values():
        by_path.setdefault(path_of(mod), []).append(mod)
    plan: dict[str, PlannedTensor] = {}
    ranks: dict[str, str] = {}
    for path, mods in by_path.items():
        convert_path(ad, arch, naming, path, mods, plan, ranks)
    infos = {k: tensor_info(k, p.dtype, p.shape) for k, p in plan.items()}

    def produce(key: str) -> torch.Tensor:
        import torch

        t = plan[key].make()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelkitError(f"{ad.label}: {key} would hold NaN or Inf (the input holds "
                                "them, or alpha/rank folded in overflows its dtype); "
                                "nothing written")
        return t

    meta = dict(lora.metadata)
    if ad.naming == "peft" or naming == "peft":
        meta.pop("lora_adapter_metadata", None)  # scales are folded or written as alpha
    if naming == "peft":
        meta["format"] = "pt"
    if ranks:
        for k in ("ss_network_dim", "ss_network_alpha"):
            if k in meta:
                meta[k] = "Dynamic"
    label = f"lora_convert({Path(source_label(lora)).name})"
    out = DerivedSource(label, infos, meta, produce, lora.input_paths)
    report = {"from": ad.naming, "to": to, "arch": arch, "n_modules": len(ad.modules),
              "n_tensors": len(infos), "read_by": table_readers(arch, naming),
              "rank_changes": ranks}
    return PlannedStep(out, _ConvertReport(report), "lora_convert", {"to": to},
                       dict.fromkeys(infos))


class _ConvertReport(dict):
    """A plain dict report with ``to_dict``."""

    def to_dict(self) -> JSONDict:
        return dict(self)


__all__ = ["convert"]

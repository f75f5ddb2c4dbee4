"""``inspect``: what a model file is, from its header alone.

:func:`inspect_model` returns a :class:`ModelReport`; its :meth:`to_dict` is
the stable ``modelkit inspect --json`` schema (docs/inspect-json.md).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.arch import encoders, parts, registry
from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.detect import EMBEDDING_WIDTH_ARCH, TE_FAMILY_ARCH
from modelkit.arch.keys import Shape
from modelkit.inspect.components import (
    TE_PREFIXES,
    ComponentReport,
    analyse_standalone,
    analyse_text_encoder,
    analyse_unet,
    analyse_vae,
    checkpoint_components,
    count_ema,
    split_prefix,
)
from modelkit.inspect.prediction import Prediction, ValueReader, detect_prediction
from modelkit.io.header import TensorInfo
from modelkit.io.suffixes import COMFYUI_DIFFUSION_MODELS
from modelkit.wording import plural

SCHEMA = "modelkit.inspect/1"
UNKNOWN_LIST_LIMIT = 50
SMALL_VALUES = 1 << 17  # values read from a pickle for a detail (alphas, one bias)
# extra_keys names of the parts outside the components (modelkit.arch.parts)
EXTRA_KEY_NAMES = {parts.SCHEDULE: "schedule_buffers", parts.EMA: "ema",
                   parts.MARKER: "prediction_markers", parts.AUX_MODEL: "aux_model",
                   parts.JUNK: "training_leftovers"}
DEPTH_MODEL_PREFIX = "depth_model."  # counted as depth_model (schema 1 name)
COMPONENT_PARTS = (parts.UNET, parts.VAE, parts.TE)


@dataclass
class ModelReport:
    """Everything ``inspect`` says about one file."""

    path: str
    file_format: str
    size_bytes: int
    n_tensors: int
    n_params: int
    dtypes: dict[str, int]
    kind: str = "unknown"
    arch: str = "unknown"
    arch_evidence: list[str] = field(default_factory=list)
    variant: str | None = None
    layout: str | None = None
    prediction: Prediction = field(default_factory=Prediction)
    components: dict[str, ComponentReport] = field(default_factory=dict)
    has_ema: bool = False
    n_ema_tensors: int = 0
    extra_keys: dict[str, int] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    adapter: dict[str, Any] | None = None
    embedding: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    gguf: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    # a standalone text encoder or VAE of the registry's component table
    # (modelkit.arch.encoders): name, label, families that use it
    component: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (schema ``modelkit.inspect/1``)."""
        return {
            "schema": SCHEMA,
            "path": self.path,
            "file_format": self.file_format,
            "kind": self.kind,
            "arch": self.arch,
            "arch_evidence": self.arch_evidence,
            "variant": self.variant,
            "layout": self.layout,
            "prediction": self.prediction.to_dict(),
            "components": {k: c.to_dict() for k, c in self.components.items()},
            "has_ema": self.has_ema,
            "n_ema_tensors": self.n_ema_tensors,
            "dtypes": self.dtypes,
            "n_tensors": self.n_tensors,
            "n_params": self.n_params,
            "size_bytes": self.size_bytes,
            "extra_keys": self.extra_keys,
            "unknown_keys": self.unknown_keys,
            "adapter": self.adapter,
            "embedding": self.embedding,
            "notes": self.notes,
            "metadata": self.metadata,
            "gguf": self.gguf,
            "quantization": self.quantization,
            "component": self.component,
        }


def _census(infos: dict[str, TensorInfo]) -> tuple[dict[str, int], int]:
    counts = Counter(i.dtype for i in infos.values())
    return dict(sorted(counts.items())), sum(i.numel for i in infos.values())


def _base_report(path: Path, infos: dict[str, TensorInfo], meta: dict[str, str],
                 file_format: str) -> ModelReport:
    dtypes, params = _census(infos)
    # a model computed by a recipe step has no file yet: count its tensor bytes
    size = path.stat().st_size if path.is_file() else sum(i.nbytes for i in infos.values())
    return ModelReport(str(path), file_format, size, len(infos), params,
                       dtypes, metadata=dict(meta))


# --- kinds --------------------------------------------------------------------


def _embedding(shapes: dict[str, Shape], meta: dict[str, str]) -> dict[str, Any] | None:
    keys = set(shapes)
    if keys == {"emb_params"} or (keys and all(k.startswith("string_to_param.")
                                               for k in keys)):
        shape = next(iter(shapes.values()))
        if len(shape) not in (1, 2):
            return None
        width = shape[-1]
        arch = EMBEDDING_WIDTH_ARCH.get(width, "unknown")
        return {"format": "a1111", "vectors": shape[0] if len(shape) == 2 else 1,
                "width": width, "arch": arch, "name": meta.get("name")}
    if keys == {"clip_l", "clip_g"}:
        if len(shapes["clip_l"]) != 2 or len(shapes["clip_g"]) != 2:
            return None
        return {"format": "sdxl", "vectors": shapes["clip_l"][0],
                "width": [shapes["clip_l"][-1], shapes["clip_g"][-1]],
                "arch": "sdxl", "name": meta.get("name")}
    return None


def _fill_embedding(rep: ModelReport, emb: dict[str, Any]) -> None:
    rep.kind, rep.embedding, rep.arch = "embedding", emb, emb["arch"]
    width = emb["width"]
    if emb["arch"] == "sdxl":
        rep.arch_evidence = ["clip_l and clip_g vectors: SDXL embedding"]
    elif emb["arch"] != "unknown":
        rep.arch_evidence = [f"vector width {width} matches the "
                             f"{'CLIP-L' if width == 768 else 'OpenCLIP-H'} text encoder"]
    else:
        rep.arch_evidence = [f"vector width {width} matches no SD text encoder"]
    rep.notes.append(f"used by name in prompts: {emb.get('name') or Path(rep.path).stem}")


def _fill_controlnet(rep: ModelReport, shapes: dict[str, Shape]) -> None:
    prefix = "control_model." if any(k.startswith("control_model.") for k in shapes) else ""
    found = split_prefix(shapes, prefix) if prefix else dict(shapes)
    unet = {k: s for k, s in found.items()
            if not k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    comp, arch, evidence, _ = analyse_unet(unet, prefix)
    comp.name, comp.family = "controlnet", f"{arch} ControlNet"
    comp.complete = None  # checked against a UNet table, so only the arch is reliable
    rep.kind, rep.arch, rep.arch_evidence = "controlnet", arch, evidence
    rep.components = {"controlnet": comp}
    hint = found.get("input_hint_block.0.weight")
    if hint and len(hint) >= 2:
        rep.notes.append(f"hint input has {hint[1]} channels")


def _fill_adapter(rep: ModelReport, adapter: Any, read: ValueReader | None,
                  infos: dict[str, TensorInfo]) -> None:
    info = adapter.to_dict()
    if info.get("alphas") is None and read is not None:
        from modelkit.inspect.adapters import read_alphas

        info["alphas"] = read_alphas(infos, read)
    rep.kind, rep.adapter = "lora", info
    rep.arch, rep.arch_evidence = info["arch"], list(info["arch_evidence"])


def _denoiser_family(shapes: dict[str, Shape], prefix: str) -> registry.Detection | None:
    """A transformer family the registry's key rules recognise under ``prefix``."""
    inner = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    return registry.detect_denoiser(inner) if inner else None


def _fill_denoiser(rep: ModelReport, found: registry.Detection, where: str) -> None:
    rep.arch, rep.variant, rep.layout = found.arch, found.variant, found.layout
    rep.arch_evidence = [e + where for e in found.evidence]
    if found.arch in registry.names(support=registry.DETECT):
        rep.notes.append(f"{registry.label(found.arch)} is recognised only: the other "
                         "commands do not handle it yet")
    elif found.arch in registry.names(support=registry.PARTIAL):
        commands = tuple(sorted(registry.REGISTRY[found.arch].commands))
        verb = "handles" if len(commands) == 1 else "handle"
        rep.notes.append(f"{registry.label(found.arch)}: {registry.listed(commands)} {verb} "
                         "it; the other commands do not yet")


def _declared_components(rep: ModelReport, shapes: dict[str, Shape], bare: bool = False
                         ) -> None:
    """Count the components the registry declares for ``rep.arch`` in an
    all-in-one file, or its denoiser in a standalone (``bare``) one (not
    checked against key tables: no table yet)."""
    arch = registry.REGISTRY[rep.arch]
    for comp in (arch.denoiser,) if bare else arch.components:
        found = split_prefix(shapes, comp.standalone if bare else comp.prefix)
        if not found:
            continue
        name = "unet" if comp.role == registry.DENOISER else comp.name
        family = f"{arch.label} {comp.name}"
        prefix = comp.standalone if bare else comp.prefix
        rep.components[name] = ComponentReport(name, prefix, family, len(found),
                                               sum(math.prod(s) for s in found.values()),
                                               None)


def _fill_checkpoint(rep: ModelReport, shapes: dict[str, Shape]) -> tuple[bool, int | None]:
    comps, arch, evidence, in_ch = checkpoint_components(shapes)
    rep.components, rep.arch, rep.arch_evidence = comps, arch, evidence
    other = _denoiser_family(shapes, UNET_PREFIX)
    if other:
        _fill_denoiser(rep, other, f" under {UNET_PREFIX}")
        _declared_components(rep, shapes)
    has_unet = "unet" in comps
    rep.kind = "checkpoint" if has_unet and len(comps) > 1 else (
        "unet" if has_unet else _only_component_kind(comps))
    return has_unet, in_ch


def _only_component_kind(comps: dict[str, ComponentReport]) -> str:
    if set(comps) == {"vae"}:
        return "vae"
    if comps and all(c.startswith("te") for c in comps):
        return "text_encoder"
    return "unknown"


def _fill_bare(rep: ModelReport, all_shapes: dict[str, Shape]) -> tuple[bool, int | None]:
    """Files without single-file prefixes: UNet-only, VAE, text encoder. Root
    buffers, markers and EMA keys are not part of the component."""
    shapes = {k: s for k, s in all_shapes.items() if parts.part_of(k) == parts.OTHER}
    other = _denoiser_family(shapes, "")
    if other:
        rep.kind = "unet"
        _fill_denoiser(rep, other, "")
        _declared_components(rep, shapes, bare=True)
        return True, None
    found = encoders.recognise(shapes)
    if found is not None:
        _fill_standalone(rep, found)
        return False, None
    if "input_blocks.0.0.weight" in shapes:
        comp, arch, evidence, in_ch = analyse_unet(dict(shapes), "")
        rep.kind, rep.arch, rep.arch_evidence = "unet", arch, evidence
        rep.components = {"unet": comp}
        return True, in_ch
    if "encoder.conv_in.weight" in shapes and "decoder.conv_in.weight" in shapes:
        rep.kind, rep.components = "vae", {"vae": analyse_vae(dict(shapes), "")}
        return False, None
    for layout, marker in (("hf", "text_model."), ("open_clip", "transformer.resblocks.")):
        if any(k.startswith(marker) for k in shapes):
            rep.kind = "text_encoder"
            rep.components = {"te": analyse_text_encoder("te", "", layout, dict(shapes),
                                                         "unknown")}
            return False, None
    return False, None


def _fill_standalone(rep: ModelReport, found: encoders.Match) -> None:
    """A standalone text encoder or VAE the component table recognises:
    kind, the family the library files it under, its variant, the families
    that use it, and its completeness against its key table."""
    entry = found.entry
    comp = analyse_standalone(found)
    rep.kind, rep.arch, rep.variant = entry.kind, entry.arch, found.variant
    rep.layout = found.layout
    rep.components = {comp.name: comp}
    users = registry.listed(tuple(registry.label(a) for a in entry.used_by))
    rep.arch_evidence = [*found.evidence, f"{entry.label} is used by {users}"]
    rep.component = {"name": entry.name, "label": entry.label, "used_by": list(entry.used_by)}
    rep.notes.extend(entry.notes)
    if comp.complete is False:
        rep.notes.append(f"{entry.label} is incomplete: {plural(comp.n_missing, 'missing key')}, "
                         f"{plural(comp.n_shape_mismatches, 'shape mismatch')}")


# --- compatibility and notes -----------------------------------------------


def _component_arch(rep: ModelReport) -> None:
    """For lone VAEs and text encoders: which archs they fit (those of the
    component table say it themselves)."""
    if rep.component is not None:
        return
    if rep.kind == "vae":
        vae = rep.components["vae"]
        z = 16 if "16 latent" in vae.family else 4
        rep.arch_evidence = [f"{vae.family}: SD1, SD2 and SDXL VAEs share keys and "
                             "shapes; which one it is cannot be told from the header"
                             if z == 4 else f"{vae.family}: SD3/Flux VAE"]
    elif rep.kind == "text_encoder":
        fam = next(iter(rep.components.values())).family
        arch = TE_FAMILY_ARCH.get(fam)
        if arch:
            rep.arch = arch
        rep.arch_evidence = [f"text encoder family {fam}"]


def _classify_extra(rep: ModelReport, shapes: dict[str, Shape], bare: bool) -> None:
    """Count the keys outside the components by part (the one classification
    prune, quantize and merge use too) and list the unknown ones. In a
    ``bare`` (standalone component) file, unprefixed keys are the component's."""
    bare = bare and rep.kind != "unknown"
    declared = tuple(c.prefix for c in rep.components.values() if c.prefix)
    extra: Counter[str] = Counter()
    unknown: list[str] = []
    n_unknown = 0
    for k in shapes:
        part = parts.part_of(k)
        if part in COMPONENT_PARTS or (part == parts.OTHER and bare):
            continue  # inside a component (a standalone one has no prefix)
        if part == parts.OTHER and k.startswith(declared):
            continue  # inside a component the registry declares (Flux's vae.)
        if part in EXTRA_KEY_NAMES:
            depth = part == parts.AUX_MODEL and k.startswith(DEPTH_MODEL_PREFIX)
            extra["depth_model" if depth else EXTRA_KEY_NAMES[part]] += 1
            continue
        n_unknown += 1
        if len(unknown) < UNKNOWN_LIST_LIMIT:
            unknown.append(k)
    rep.extra_keys = dict(sorted(extra.items()))
    rep.unknown_keys = unknown
    if n_unknown > UNKNOWN_LIST_LIMIT:
        rep.notes.append(f"{n_unknown} unknown keys (first {UNKNOWN_LIST_LIMIT} listed)")


def _position_id_notes(rep: ModelReport, infos: dict[str, TensorInfo],
                       read: ValueReader | None) -> None:
    for prefix, (layout, _) in TE_PREFIXES.items():
        key = prefix + "text_model.embeddings.position_ids"
        info = infos.get(key)
        if layout != "hf" or info is None:
            continue
        if info.dtype != "I64":
            rep.notes.append(f"{key} is stored as {info.dtype}, not int64: CLIP token "
                             "positions may be off by one after rounding; rewrite them "
                             "as int64 0..76")
        elif read is not None:
            values = read(key)
            if values is not None and values != [float(i) for i in range(len(values))]:
                rep.notes.append(f"{key} is not 0..{len(values) - 1}: broken CLIP "
                                 "position ids")
    if any(k.startswith("cond_stage_model.transformer.embeddings.") for k in infos):
        rep.notes.append("NovelAI-style CLIP key names (no text_model.); most loaders "
                         "rename them on load")


def diffusion_model_note(file_format: str) -> str:
    """Where ComfyUI loads a diffusion-model-only file from (one declaration:
    :data:`modelkit.io.suffixes.COMFYUI_DIFFUSION_MODELS`)."""
    node = ("ComfyUI-GGUF's Unet Loader (GGUF)" if file_format == "gguf"
            else "Load Diffusion Model")
    return (f"diffusion-model-only file: ComfyUI loads it from {COMFYUI_DIFFUSION_MODELS} "
            f"({node}), not checkpoints/")


def _general_notes(rep: ModelReport) -> None:
    if rep.kind == "unet":
        rep.notes.append(diffusion_model_note(rep.file_format))
    if rep.kind == "checkpoint":
        for comp in ("vae",):
            if comp not in rep.components:
                rep.notes.append("no VAE baked in: select a VAE in your UI")
        for c in rep.components.values():
            if c.complete is False:
                rep.notes.append(f"{c.name} is incomplete: "
                                 f"{plural(c.n_missing, 'missing key')}, "
                                 f"{plural(c.n_shape_mismatches, 'shape mismatch')}")
    if rep.has_ema:
        rep.notes.append(f"carries EMA weights ({plural(rep.n_ema_tensors, 'tensor')}) that UIs "
                         "ignore; pruning them saves space")
    if rep.dtypes.get("F32", 0) > rep.n_tensors // 2 and rep.kind in ("checkpoint",
                                                                        "unet"):
        rep.notes.append("stored mostly in fp32: fp16 halves the size with no visible "
                         "change for inference")


def _variant(arch: str, in_ch: int | None, shapes: dict[str, Shape]) -> str | None:
    if in_ch is None or in_ch == 4:
        return None
    if in_ch == 5 and any(k.startswith("depth_model.") for k in shapes):
        return "depth"
    return {9: "inpaint", 8: "pix2pix", 5: "depth"}.get(in_ch)


def build_report(path: Path, infos: dict[str, TensorInfo], meta: dict[str, str],
                 file_format: str, read: ValueReader | None) -> ModelReport:
    """Assemble the report from tensor infos, metadata and an optional reader
    of small tensor values."""
    from modelkit.inspect.adapters import detect_adapter

    rep = _base_report(path, infos, meta, file_format)
    shapes = {k: i.shape for k, i in infos.items()}
    has_unet, in_ch, bare = False, None, False
    adapter = detect_adapter(infos, meta)
    emb = _embedding(shapes, meta) if adapter is None else None
    if adapter is not None:
        _fill_adapter(rep, adapter, read, infos)
    elif emb is not None:
        _fill_embedding(rep, emb)
    elif any(k.startswith(("control_model.", "input_hint_block.")) for k in shapes):
        _fill_controlnet(rep, shapes)
    elif any(k.startswith(p) for k in shapes
             for p in (UNET_PREFIX, "first_stage_model.", *TE_PREFIXES)):
        has_unet, in_ch = _fill_checkpoint(rep, shapes)
    else:
        has_unet, in_ch = _fill_bare(rep, shapes)
        bare = True
    _component_arch(rep)
    rep.variant = _variant(rep.arch, in_ch, shapes) or rep.variant
    if rep.layout is None and has_unet and rep.arch in registry.REGISTRY:
        rep.layout = registry.ORIGINAL  # LDM/SGM key names
    rep.n_ema_tensors = count_ema(shapes)
    rep.has_ema = rep.n_ema_tensors > 0
    if rep.kind in ("checkpoint", "unet", "vae", "text_encoder", "unknown"):
        _classify_extra(rep, shapes, bare)
    rep.prediction = detect_prediction(path, set(shapes), meta, rep.arch, has_unet, read)
    _position_id_notes(rep, infos, read)
    _general_notes(rep)
    return rep


def inspect_model(path: str | os.PathLike[str]) -> ModelReport:
    """Inspect a ``.safetensors`` file (header only, plus a few small tensors
    decoded without torch) or a legacy pickle (loaded safely, memory-mapped).

    Raises:
        BadFileError: unreadable, truncated, not a model file, unsafe pickle.
    """
    from modelkit.io.formats import input_format

    p = Path(path)
    fmt = input_format(p)
    if fmt.name == "pickle":
        return _inspect_pickle(p)
    if fmt.name == "gguf":
        from modelkit.inspect.gguf import inspect_gguf

        return inspect_gguf(p)
    from modelkit.io.header import UndecodableTensorError, read_header, read_small_tensor
    from modelkit.io.quantized import modelkit_int8_layers, quant_view, view_layers

    header = read_header(p)
    view = quant_view(header)

    def read(key: str) -> list[float] | None:
        if view is not None and key in view.layers:
            return None
        try:
            return read_small_tensor(header, key)
        except UndecodableTensorError:
            return None

    if view is None:
        rep = build_report(p, header.tensors, header.metadata, "safetensors", read)
        int8 = modelkit_int8_layers(header)
        if int8 is not None:
            rep.quantization = quantization_section("modelkit-int8", int8)
        return rep
    # a quantized file is analysed as the float model it stands for
    rep = build_report(p, view.infos, header.metadata, "safetensors", read)
    rep.dtypes = _census(header.tensors)[0]
    rep.quantization = quantization_section(view.spelling, view_layers(view))
    return rep


def quantization_section(spelling: str, layers: dict[str, str]) -> dict[str, Any]:
    """The ``quantization`` section of the report: the spelling (``gguf``,
    ``comfy``, ``comfy-legacy``, ``bitsandbytes``), tensors per storage, and
    each tensor's storage by key."""
    from modelkit.io.quantized import quantization_summary

    return {"spelling": spelling, "counts": quantization_summary(layers),
            "layers": dict(layers)}


def _inspect_pickle(p: Path) -> ModelReport:
    from modelkit.io.reader import open_model

    with open_model(p) as src:
        def read(key: str) -> list[float] | None:
            t = src.get(key)
            if t.is_complex() or t.numel() > SMALL_VALUES:
                return None
            return [float(x) for x in t.detach().reshape(-1).double().tolist()]

        return build_report(p, src.infos, src.metadata, "pickle", read)

"""Original-layout checkpoint -> diffusers folder: the plan (which file holds
which tensor under which name, the configs, the scheduler, the extras file).
:func:`modelkit.io.write.write` writes the planned folder atomically.

Keys with no diffusers home (schedule buffers, ``model_ema.*``, markers,
``logit_scale``, SD2's last text-encoder layer) and the source metadata go to
``modelkit_extra.safetensors`` at the folder root, and
:func:`modelkit.io.diffusers.open_diffusers` puts them back, so both round
trips are lossless.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.arch.configs import ARCHS, EMA_PREFIX, UNET_PREFIX, VAE_PREFIX, ArchSpec
from modelkit.arch.detect import (
    VARIANTS_BY_IN_CHANNELS,
    expected_text_encoder,
    expected_unet_config,
    expected_vae_config,
    unet_family,
    unet_features,
)
from modelkit.arch.diffusers_names import (
    RESHAPE,
    SPLIT,
    TRANSPOSE,
    UNET,
    VAE,
    WEIGHT_STEMS,
    DiffusersLayout,
    diffusers_layout,
    guess_te_heads,
    guess_unet_heads,
    model_index,
    scheduler_config,
    te_folder,
    text_encoder_config,
    unet_config,
    vae_config,
)
from modelkit.arch.keys import PREDICTION_MARKERS, SCHEDULE_BUFFERS, Shape
from modelkit.errors import ModelkitError
from modelkit.io.diffusers import (
    EXTRA_FILE,
    MODEL_INDEX,
    SCHEDULER_DIR,
    TOKENIZER_NOTE,
    TORCH_DTYPE_NAMES,
    diffusers_version,
)
from modelkit.io.source import DerivedSource, Source, source_label, tensor_info
from modelkit.io.write import FolderFile, FolderPayload
from modelkit.wording import plural

if TYPE_CHECKING:
    import torch


@dataclass
class _Plan:
    """What :func:`write_diffusers` will write."""

    arch: ArchSpec
    variant: str | None
    layout: DiffusersLayout
    components: list[str]
    extras: list[str]
    prediction: str = "epsilon"
    zero_snr: bool = False
    notes: list[str] = field(default_factory=list)


def _split(shapes: dict[str, Shape], prefix: str) -> dict[str, Shape]:
    n = len(prefix)
    return {k[n:]: s for k, s in shapes.items() if k.startswith(prefix)}


def _source_arch(label: str, shapes: dict[str, Shape]) -> tuple[ArchSpec, bool]:
    """The ArchSpec of an original-layout model at its own widths, with only
    the text encoders it has, and whether it has a VAE."""
    feats = unet_features(_split(shapes, UNET_PREFIX))
    if feats is None:
        raise ModelkitError(f"{label}: no LDM UNet under {UNET_PREFIX}; only SD1/SD2/SDXL "
                            "checkpoints can be written as diffusers folders (a transformer "
                            "file takes the diffusers layout with --layout diffusers and a "
                            ".safetensors output)")
    name = unet_family(feats)[0]
    ucfg = expected_unet_config(name, feats)
    if ucfg is None:
        raise ModelkitError(f"{label}: the UNet layout matches no SD1/SD2/SDXL "
                            "architecture; cannot write a diffusers folder")
    base = ARCHS[name]
    vae_found = _split(shapes, VAE_PREFIX)
    vae = expected_vae_config(vae_found) if vae_found else base.vae
    if vae is None:
        raise ModelkitError(f"{label}: the VAE under {VAE_PREFIX} has no "
                            "encoder/decoder conv_in; cannot convert it")
    slots = []
    for slot in base.text_encoders:
        found = _split(shapes, slot.prefix)
        te = expected_text_encoder(found, slot.config.layout, slot.config.layers)
        if te is not None:
            te = guess_te_heads(name, slot.name, replace(
                te, has_projection=slot.config.has_projection))
            slots.append(replace(slot, config=te))
    arch = replace(base, unet=guess_unet_heads(name, ucfg), vae=vae,
                   text_encoders=tuple(slots))
    return arch, bool(vae_found)


def _check_complete(label: str, layout: DiffusersLayout, components: list[str],
                    shapes: dict[str, Shape]) -> None:
    for key, home in layout.homes.items():
        if home.component not in components:
            continue
        shape = shapes.get(key)
        if shape is None:
            if key in layout.optional:
                continue
            raise ModelkitError(f"{label}: lacks {key}, part of its {layout.arch.name} "
                                f"{home.component}; a diffusers folder needs complete "
                                "components")
        ok = (math.prod(shape) == math.prod(home.shape) if home.op == RESHAPE
              else tuple(shape) == home.shape)
        if not ok:
            raise ModelkitError(f"{label}: {key} has shape {list(shape)}, the "
                                f"{layout.arch.name} layout needs {list(home.shape)}")


def _prediction(source: Source, arch: ArchSpec, plan: _Plan) -> None:
    from modelkit.inspect.prediction import detect_prediction

    # the path only serves A1111's sidecar .yaml lookup; devnull has none
    path = source.input_paths[0] if source.input_paths else Path(os.devnull)

    def read(key: str) -> list[float]:
        return [float(x) for x in source.get(key).float().flatten().tolist()]

    pred = detect_prediction(path, set(source.infos), source.metadata, arch.name, True, read)
    plan.zero_snr = pred.zero_terminal_snr
    if pred.type == "v":
        plan.prediction = "v_prediction"
    plan.notes.append(f"scheduler prediction_type {plan.prediction} ("
                      + "; ".join(pred.evidence) + ")")
    if pred.type == "unknown":
        plan.notes.append("prediction type unknown: edit scheduler/scheduler_config.json "
                          "if the model is v-prediction")


def _extras_note(extras: list[str]) -> str:
    groups = {"EMA": 0, "schedule buffers": 0, "markers": 0, "other": 0}
    for k in extras:
        if k.startswith(EMA_PREFIX):
            groups["EMA"] += 1
        elif k in SCHEDULE_BUFFERS:
            groups["schedule buffers"] += 1
        elif k in PREDICTION_MARKERS:
            groups["markers"] += 1
        else:
            groups["other"] += 1
    parts = ", ".join(f"{n} {g}" for g, n in groups.items() if n)
    return (f"{plural(len(extras), 'tensor')} with no diffusers home kept in {EXTRA_FILE} "
            f"({parts}); modelkit restores them when converting back")


def _plan(source: Source) -> _Plan:
    label = source_label(source)
    shapes = {k: tuple(i.shape) for k, i in source.infos.items()}
    arch, has_vae = _source_arch(label, shapes)
    layout = diffusers_layout(arch)
    components = [UNET] + ([VAE] if has_vae else []) + [te_folder(s)
                                                         for s in arch.text_encoders]
    _check_complete(label, layout, components, shapes)
    extras = [k for k in source.infos
              if k not in layout.homes or layout.homes[k].component not in components]
    plan = _Plan(arch, VARIANTS_BY_IN_CHANNELS.get(arch.unet.in_channels), layout,
                 components, extras)
    _prediction(source, arch, plan)
    if extras:
        plan.notes.append(_extras_note(extras))
    if not has_vae:
        plan.notes.append("the source has no VAE: vae/ is not written")
    if len(arch.text_encoders) < len(ARCHS[arch.name].text_encoders):
        plan.notes.append("the source lacks a text encoder: only those present are written")
    plan.notes.append(TOKENIZER_NOTE)
    return plan


def _component_producer(plan: _Plan, source: Source, comp: str
                        ) -> Callable[[str], torch.Tensor]:
    names = plan.layout.by_component[comp]
    last: list[Any] = [None, None]  # q, k and v come one after another: read once

    def produce(name: str) -> torch.Tensor:
        original, part = names[name]
        home = plan.layout.homes[original]
        if last[0] != original:
            last[0], last[1] = original, source.get(original)
        t = last[1]
        if home.op == SPLIT:
            rows = home.part_shape[0]
            return t[part * rows:(part + 1) * rows]
        if home.op == RESHAPE:
            return t.reshape(home.part_shape)
        if home.op == TRANSPOSE:
            return t.t()
        return t

    return produce


def _component_config(plan: _Plan, comp: str, specs: list[tuple[str, str]], version: str
                      ) -> dict[str, Any]:
    if comp == UNET:
        return unet_config(plan.arch, version)
    if comp == VAE:
        return vae_config(plan.arch, version)
    slot = next(s for s in plan.arch.text_encoders if te_folder(s) == comp)
    dtype = TORCH_DTYPE_NAMES.get(specs[0][1], "float32") if specs else "float32"
    return text_encoder_config(plan.arch, slot, dtype, _transformers_version())


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "4.40.0"


def _component_source(plan: _Plan, source: Source, comp: str) -> DerivedSource:
    specs = []
    for home in plan.layout.homes.values():
        if home.component == comp and home.original in source.infos:
            dtype = source.infos[home.original].dtype
            specs += [(n, dtype, home.part_shape) for n in home.names]
    infos = {n: tensor_info(n, d, s) for n, d, s in specs}
    return DerivedSource(f"{comp}({source_label(source)})", infos, {"format": "pt"},
                         _component_producer(plan, source, comp), source.input_paths)


def plan_folder(source: Source) -> FolderPayload:
    """The diffusers folder of an original-layout SD1/SD2/SDXL model: each
    component's ``config.json`` (loadable offline) and weights (dtypes kept),
    ``model_index.json``, ``scheduler/scheduler_config.json`` and
    ``modelkit_extra.safetensors`` (tensors with no diffusers home; it also
    receives the metadata). Tokenizers are not written.

    Raises:
        ModelkitError: not an SD1/SD2/SDXL checkpoint, incomplete component.
    """
    plan = _plan(source)
    version = diffusers_version()
    files: list[FolderFile] = []
    for comp in plan.components:
        tensors = _component_source(plan, source, comp)
        specs = [(k, i.dtype) for k, i in tensors.infos.items()]
        files.append(FolderFile(f"{comp}/config.json",
                                json=_component_config(plan, comp, specs, version)))
        files.append(FolderFile(f"{comp}/{WEIGHT_STEMS[comp]}.safetensors", tensors=tensors))
    extra = DerivedSource(f"extra({source_label(source)})",
                          {k: source.infos[k] for k in plan.extras}, dict(source.metadata),
                          source.get, source.input_paths)
    # always written (possibly empty): it marks a folder modelkit wrote
    files.append(FolderFile(EXTRA_FILE, tensors=extra, holds_metadata=True))
    files.append(FolderFile(f"{SCHEDULER_DIR}/scheduler_config.json",
                            json=scheduler_config(plan.prediction, plan.zero_snr, version)))
    files.append(FolderFile(MODEL_INDEX, json=model_index(plan.arch, plan.variant,
                                                         plan.components, version)))
    return FolderPayload(files, plan.notes)


@dataclass
class ConfigFolder:
    """What :func:`write_diffusers_configs` wrote: enough for diffusers'
    ``from_single_file(config=path, local_files_only=True)`` to build the
    pipeline offline."""

    path: Path
    pipeline_class: str
    arch: str
    variant: str | None
    prediction: str
    zero_snr: bool
    components: list[str]
    notes: list[str] = field(default_factory=list)


def write_diffusers_configs(source: Source, out_dir: str | os.PathLike[str]) -> ConfigFolder:
    """Write the configs of a diffusers folder for an original-layout model,
    without weights or tokenizers (a scratch folder for loading it offline,
    not a model output): ``model_index.json`` (tokenizers listed as absent;
    pass them as objects), each component's ``config.json`` at the model's
    own widths, and the scheduler config. ``out_dir`` must be new or empty.

    Raises:
        ModelkitError: not an SD1/SD2/SDXL checkpoint, incomplete component.
    """
    import json

    plan = _plan(source)
    version = diffusers_version()
    root = Path(out_dir)
    files = {f"{c}/config.json": _component_config(plan, c, [], version)
             for c in plan.components}
    files[f"{SCHEDULER_DIR}/scheduler_config.json"] = scheduler_config(
        plan.prediction, plan.zero_snr, version)
    index = model_index(plan.arch, plan.variant, plan.components, version)
    files[MODEL_INDEX] = index
    for rel, obj in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    notes = [n for n in plan.notes if n != TOKENIZER_NOTE]
    return ConfigFolder(root, str(index["_class_name"]), plan.arch.name, plan.variant,
                        plan.prediction, plan.zero_snr, list(plan.components), notes)

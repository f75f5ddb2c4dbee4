"""Diffusers folders <-> single original-layout checkpoints (SD1, SD2, SDXL,
SDXL refiner).

:func:`open_diffusers` presents a diffusers folder as one original-layout
model whose tensors are computed on demand; :func:`write_diffusers` writes an
original-layout model as a diffusers folder. The key maps are data in
:mod:`modelkit.arch.diffusers_names`.

Keys with no diffusers home (schedule buffers, ``model_ema.*``, markers,
``logit_scale``, SD2's last text-encoder layer) and the source
``__metadata__`` go to ``modelkit_extra.safetensors`` at the folder root, and
:func:`open_diffusers` puts them back, so both round trips are lossless.
"""

from __future__ import annotations

import json
import math
import os
import time
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
    KeyHome,
    diffusers_layout,
    guess_te_heads,
    guess_unet_heads,
    model_index,
    scheduler_config,
    te_config_from_diffusers,
    te_folder,
    text_encoder_config,
    unet_config,
    unet_config_from_diffusers,
    vae_config,
    vae_config_from_diffusers,
)
from modelkit.arch.keys import PREDICTION_MARKERS, SCHEDULE_BUFFERS, Shape, unet_keys
from modelkit.errors import BadFileError, ModelkitError
from modelkit.io.header import TensorInfo
from modelkit.io.reader import ModelSource, open_model
from modelkit.io.source import DerivedSource, Source, source_label, tensor_info
from modelkit.io.stream import stream_pass
from modelkit.io.writer import TensorSpec, atomic_dir
from modelkit.progress import Progress, ProgressFn, no_progress

if TYPE_CHECKING:
    import torch

EXTRA_FILE = "modelkit_extra.safetensors"
MODEL_INDEX = "model_index.json"
SCHEDULER_DIR = "scheduler"
TORCH_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32",
                     "F64": "float64"}
TE_WRAPPER = "text_model."
BIN_STEMS = {"model": "pytorch_model", "diffusion_pytorch_model": "diffusion_pytorch_model"}
TOKENIZER_NOTE = ("tokenizers are not written (they cannot be downloaded here): pass "
                  "tokenizer= (and tokenizer_2= for SDXL) to DiffusionPipeline.from_pretrained, "
                  "or copy them from the base model's repo and name them in model_index.json")


@dataclass
class DiffusersResult:
    """What :func:`write_diffusers` wrote."""

    path: Path
    n_tensors: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def is_diffusers_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder laid out like a diffusers pipeline
    (``model_index.json`` or ``unet/config.json``)."""
    p = Path(path)
    return p.is_dir() and ((p / MODEL_INDEX).is_file() or (p / UNET / "config.json").is_file())


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.30.0"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadFileError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFileError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadFileError(f"{path}: not a JSON object")
    return obj


def _write_json(path: Path, obj: dict[str, Any]) -> int:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    path.write_text(text)
    return len(text)


# --- reading a folder -----------------------------------------------------------


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """The weight file(s) of one component: plain, ``.fp16`` variant, sharded
    (``.index.json``) or a legacy ``.bin``, in that order of preference."""
    for variant in ("", ".fp16"):
        single = folder / f"{stem}{variant}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{variant}.safetensors.index.json"
        if index.is_file():
            shards = _read_json(index).get("weight_map", {})
            return [folder / name for name in dict.fromkeys(shards.values())]
    legacy = folder / f"{BIN_STEMS[stem]}.bin"
    if legacy.is_file():
        return [legacy]
    raise BadFileError(f"{folder}: no weights ({stem}.safetensors); the diffusers "
                       "folder is incomplete, download or copy that component again")


def _te_key(key: str) -> str:
    """transformers >= 5 saves CLIPTextModel without the ``text_model.`` prefix
    that diffusers folders (and CLIPTextModelWithProjection) use."""
    if key.startswith(TE_WRAPPER) or key == "text_projection.weight":
        return key
    return TE_WRAPPER + key


class _Component:
    """One component's weight files as a single key -> tensor map, under
    the key names of :mod:`modelkit.arch.diffusers_names`."""

    def __init__(self, folder: Path, name: str, device: str) -> None:
        self.folder = folder
        self.sources: list[ModelSource] = [open_model(p, device)
                                           for p in _weight_files(folder, WEIGHT_STEMS[name])]
        rename = _te_key if name.startswith("text_encoder") else str
        # our key name -> (source, the key in its file)
        self.where = {rename(k): (s, k) for s in self.sources for k in s.infos}

    def info(self, key: str) -> TensorInfo | None:
        hit = self.where.get(key)
        return None if hit is None else hit[0].infos[hit[1]]

    def file_of(self, key: str) -> Path:
        hit = self.where.get(key)
        return hit[0].path if hit is not None else self.sources[0].path

    def get(self, key: str) -> torch.Tensor:
        src, name = self.where[key]
        return src.get(name)


def _folder_arch(root: Path) -> tuple[ArchSpec, list[str], list[str]]:
    """The ArchSpec a folder's configs describe, the components present and notes."""
    unet_json = root / UNET / "config.json"
    if not unet_json.is_file():
        raise BadFileError(f"{root}: no unet/config.json; not a diffusers Stable "
                           "Diffusion folder (expected unet/, vae/, text_encoder/)")
    ucfg = unet_config_from_diffusers(_read_json(unet_json), str(unet_json))
    feats = unet_features(dict(unet_keys(ucfg)))
    name = unet_family(feats)[0] if feats else "unknown"
    if name not in ARCHS:
        raise ModelkitError(f"{unet_json}: the UNet layout matches no SD1/SD2/SDXL "
                            "architecture; modelkit cannot convert it")
    base = ARCHS[name]
    components, notes = [UNET], []
    vae = base.vae
    if (root / VAE / "config.json").is_file():
        vae = vae_config_from_diffusers(_read_json(root / VAE / "config.json"),
                                        str(root / VAE / "config.json"))
        components.append(VAE)
    else:
        notes.append(f"{root}: no vae/; the checkpoint has no VAE")
    slots = []
    for slot in base.text_encoders:
        cfg_path = root / te_folder(slot) / "config.json"
        if cfg_path.is_file():
            cfg = te_config_from_diffusers(name, slot, _read_json(cfg_path))
            slots.append(replace(slot, config=cfg))
            components.append(te_folder(slot))
        else:
            notes.append(f"{root}: no {te_folder(slot)}/; the checkpoint lacks that "
                         "text encoder")
    arch = replace(base, unet=ucfg, vae=vae, text_encoders=tuple(slots))
    return arch, components, notes


def _check_part(comp: _Component, home: KeyHome, name: str, info: TensorInfo) -> None:
    ok = (info.numel == math.prod(home.part_shape) if home.op == RESHAPE
          else tuple(info.shape) == home.part_shape)
    if not ok:
        raise BadFileError(f"{comp.file_of(name)}: {name} has shape {list(info.shape)}, "
                           f"config.json implies {list(home.part_shape)}; the weights do "
                           "not match the config")


def _home_info(home: KeyHome, comp: _Component) -> TensorInfo | None:
    """The original-layout info of ``home`` from its diffusers parts, None
    when none of them is there; a partial fused q/k/v is an error."""
    parts = [comp.info(n) for n in home.names]
    if all(p is None for p in parts):
        return None
    for name, info in zip(home.names, parts, strict=True):
        if info is None:
            raise BadFileError(f"{comp.file_of(name)}: lacks {name}, one of the q/k/v "
                               f"parts of fused {home.original}; the folder is incomplete")
        _check_part(comp, home, name, info)
    dtypes = {p.dtype for p in parts if p is not None}
    if len(dtypes) > 1:
        raise BadFileError(f"{comp.folder}: q/k/v parts of {home.original} have "
                           f"different dtypes {sorted(dtypes)}; cast the folder first")
    return tensor_info(home.original, dtypes.pop(), home.shape)


def _mapped_infos(layout: DiffusersLayout, comps: dict[str, _Component]
                  ) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for key, home in layout.homes.items():
        comp = comps.get(home.component)
        if comp is None:
            continue
        info = _home_info(home, comp)
        if info is not None:
            infos[key] = info
        elif key not in layout.optional:
            raise BadFileError(f"{comp.folder}: lacks {home.names[0]} (original "
                               f"{key}); the folder is incomplete or not an "
                               f"{layout.arch.name} layout")
    return infos


def _ignored_notes(layout: DiffusersLayout, comps: dict[str, _Component]) -> list[str]:
    notes = []
    for name, comp in comps.items():
        known = layout.by_component.get(name, {})
        extra = [k for k in comp.where if k not in known]
        if extra:
            notes.append(f"{comp.folder}: {len(extra)} tensors have no original-layout "
                         f"home and were left out (first: {extra[0]})")
    return notes


def _absent_notes(arch: ArchSpec) -> list[str]:
    """What a folder without modelkit's extras file cannot give back."""
    notes = [f"no {EXTRA_FILE}: the checkpoint has no keys diffusers does not store"]
    if arch.has_schedule_buffers:
        notes.append("schedule buffers (betas, alphas_cumprod, ...) are absent; LDM "
                     "loaders rebuild them from their config")
    for slot in arch.text_encoders:
        if slot.config.layout == "open_clip":
            notes.append(f"{slot.prefix}logit_scale is absent (unused for generation)")
        if arch.name == "sd2":
            notes.append(f"SD2's last text-encoder layer and {slot.prefix}text_projection "
                         "are absent: diffusers drops them (SD2 uses the penultimate layer)")
    return notes


def _scheduler_markers(root: Path) -> dict[str, str]:
    """Marker keys (``v_pred``, ``ztsnr``) that a folder's scheduler implies."""
    path = root / SCHEDULER_DIR / "scheduler_config.json"
    if not path.is_file():
        return {}
    cfg = _read_json(path)
    out = {}
    if cfg.get("prediction_type") == "v_prediction":
        out["v_pred"] = f"{path}: prediction_type v_prediction"
    if cfg.get("rescale_betas_zero_snr"):
        out["ztsnr"] = f"{path}: rescale_betas_zero_snr"
    return out


def open_diffusers(path: str | os.PathLike[str], device: str = "cpu") -> DerivedSource:
    """Open a diffusers SD1/SD2/SDXL folder as one original-layout
    single-file model: ``infos`` carry original key names, dtypes and shapes,
    and ``get(key)`` builds each tensor on demand (fused q/k/v concatenated,
    projections transposed, VAE attention reshaped to 1x1 convs).

    Keys kept in ``modelkit_extra.safetensors`` and its metadata come back as
    they were. Without that file, a ``v_prediction``/zero-SNR scheduler adds
    the ``v_pred``/``ztsnr`` marker keys.

    Raises:
        BadFileError: missing configs or weights, incomplete components.
        ModelkitError: a layout that is not SD1/SD2/SDXL.
    """
    root = Path(path)
    if not root.is_dir():
        raise BadFileError(f"{root}: not a folder; a diffusers model is a folder with "
                           "model_index.json, unet/, vae/ and text_encoder/")
    arch, names, notes = _folder_arch(root)
    layout = diffusers_layout(arch)
    comps = {n: _Component(root / n, n, device) for n in names}
    infos = _mapped_infos(layout, comps)
    notes += _ignored_notes(layout, comps)
    extra_path = root / EXTRA_FILE
    extras = open_model(extra_path, device) if extra_path.is_file() else None
    markers: dict[str, str] = {}
    if extras is not None:
        infos.update({k: tensor_info(k, i.dtype, i.shape) for k, i in extras.infos.items()
                      if k not in infos})
    else:
        notes += _absent_notes(arch)
        markers = _scheduler_markers(root)
        infos.update({k: tensor_info(k, "F32", (0,)) for k in markers})
        notes += [f"added marker key {k} ({why})" for k, why in markers.items()]
    produce = _folder_producer(layout, comps, extras, set(markers))
    inputs = [p.path for c in comps.values() for p in c.sources]
    if extras is not None:
        inputs.append(extras.path)
    return DerivedSource(f"diffusers({root})", infos,
                         dict(extras.metadata) if extras else {}, produce,
                         tuple(inputs), notes)


def _folder_producer(layout: DiffusersLayout, comps: dict[str, _Component],
                     extras: ModelSource | None, markers: set[str]
                     ) -> Callable[[str], torch.Tensor]:
    def produce(key: str) -> torch.Tensor:
        import torch

        home = layout.homes.get(key)
        if home is None or home.component not in comps:
            if key in markers:
                return torch.zeros(0, dtype=torch.float32)
            assert extras is not None, key
            return extras.get(key)
        comp = comps[home.component]
        if home.op == SPLIT:
            return torch.cat([comp.get(n) for n in home.names], 0)
        t = comp.get(home.names[0])
        if home.op == RESHAPE:
            return t.reshape(home.shape)
        if home.op == TRANSPOSE:
            return t.t().contiguous()
        return t

    return produce


# --- writing a folder -----------------------------------------------------------


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
                            "checkpoints can be written as diffusers folders")
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
    return (f"{len(extras)} tensors with no diffusers home kept in {EXTRA_FILE} "
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


def _component_specs(plan: _Plan, source: Source, comp: str) -> list[TensorSpec]:
    specs = []
    for home in plan.layout.homes.values():
        if home.component == comp and home.original in source.infos:
            dtype = source.infos[home.original].dtype
            specs += [TensorSpec(n, dtype, home.part_shape) for n in home.names]
    return specs


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


def _component_config(plan: _Plan, comp: str, specs: list[TensorSpec], version: str
                      ) -> dict[str, Any]:
    if comp == UNET:
        return unet_config(plan.arch, version)
    if comp == VAE:
        return vae_config(plan.arch, version)
    slot = next(s for s in plan.arch.text_encoders if te_folder(s) == comp)
    dtype = TORCH_DTYPE_NAMES.get(specs[0].dtype, "float32") if specs else "float32"
    return text_encoder_config(plan.arch, slot, dtype, _transformers_version())


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "4.40.0"


class _Progress:
    """Turns per-file byte progress into progress over the whole folder."""

    def __init__(self, progress: ProgressFn, total: int) -> None:
        self.progress, self.total, self.offset = progress, total, 0

    def file(self, label: str) -> ProgressFn:
        start = self.offset

        def report(p: Progress) -> None:
            self.offset = start + p.done
            self.progress(Progress("diffusers", self.offset, self.total, "bytes",
                                   f"{label}/{p.item}" if p.item else label))

        return report


def write_diffusers(source: Source, out_dir: str | os.PathLike[str], *,
                    progress: ProgressFn = no_progress) -> DiffusersResult:
    """Write an original-layout SD1/SD2/SDXL model as a diffusers folder.

    Each component gets a ``config.json`` diffusers/transformers can load
    offline and its weights (dtypes kept); the folder also gets
    ``model_index.json``, ``scheduler/scheduler_config.json`` and
    ``modelkit_extra.safetensors`` (tensors with no diffusers home plus the
    source metadata). Tokenizers are not written. The folder appears
    atomically: ``out_dir`` must not exist or be empty, and nothing is left
    behind on error.

    Raises:
        ModelkitError: not an SD1/SD2/SDXL checkpoint, incomplete component.
        OutputError: ``out_dir`` is non-empty, a file, or holds an input.
    """
    start = time.perf_counter()
    plan = _plan(source)
    version = _diffusers_version()
    specs = {c: _component_specs(plan, source, c) for c in plan.components}
    extra_specs = [TensorSpec(k, source.infos[k].dtype, tuple(source.infos[k].shape))
                   for k in plan.extras]
    total = sum(s.nbytes for group in [*specs.values(), extra_specs] for s in group)
    tracker = _Progress(progress, total)
    inputs = source.input_paths
    n_tensors = size = 0
    with atomic_dir(Path(out_dir), inputs) as tmp:
        for comp in plan.components:
            (tmp / comp).mkdir()
            size += _write_json(tmp / comp / "config.json",
                                _component_config(plan, comp, specs[comp], version))
            res = stream_pass(tmp / comp / f"{WEIGHT_STEMS[comp]}.safetensors", specs[comp],
                              _component_producer(plan, source, comp),
                              metadata={"format": "pt"}, inputs=inputs,
                              progress=tracker.file(comp), task="diffusers")
            n_tensors, size = n_tensors + res.n_tensors, size + res.bytes_written
        # always written (possibly empty): it marks a folder modelkit wrote
        res = stream_pass(tmp / EXTRA_FILE, extra_specs, source.get,
                          metadata=dict(source.metadata), inputs=inputs,
                          progress=tracker.file("extra"), task="diffusers")
        n_tensors, size = n_tensors + res.n_tensors, size + res.bytes_written
        (tmp / SCHEDULER_DIR).mkdir()
        size += _write_json(tmp / SCHEDULER_DIR / "scheduler_config.json",
                            scheduler_config(plan.prediction, plan.zero_snr, version))
        size += _write_json(tmp / MODEL_INDEX, model_index(plan.arch, plan.variant,
                                                           plan.components, version))
    return DiffusersResult(Path(out_dir), n_tensors, size, time.perf_counter() - start,
                           plan.notes)


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
    without weights or tokenizers: ``model_index.json`` (tokenizers listed as
    absent; pass them as objects), each component's ``config.json`` (at the
    model's own widths) and the scheduler config. ``out_dir`` must be an
    empty or new folder.

    Raises:
        ModelkitError: not an SD1/SD2/SDXL checkpoint, incomplete component.
    """
    plan = _plan(source)
    version = _diffusers_version()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for comp in plan.components:
        (root / comp).mkdir()
        _write_json(root / comp / "config.json", _component_config(plan, comp, [], version))
    (root / SCHEDULER_DIR).mkdir()
    _write_json(root / SCHEDULER_DIR / "scheduler_config.json",
                scheduler_config(plan.prediction, plan.zero_snr, version))
    index = model_index(plan.arch, plan.variant, plan.components, version)
    _write_json(root / MODEL_INDEX, index)
    notes = [n for n in plan.notes if n != TOKENIZER_NOTE]
    return ConfigFolder(root, str(index["_class_name"]), plan.arch.name, plan.variant,
                        plan.prediction, plan.zero_snr, list(plan.components), notes)

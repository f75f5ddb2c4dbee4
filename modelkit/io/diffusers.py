"""Reading diffusers folders (SD1, SD2, SDXL, SDXL refiner) as single
original-layout checkpoints, and a transformer family's ``transformer/``
(shards included) as one diffusers-layout file.

:func:`open_diffusers` presents a diffusers folder as one original-layout
model whose tensors are computed on demand. Writing one is planned in
:mod:`modelkit.convert.diffusers` and done by :func:`modelkit.io.write.write`.
The key maps are data in :mod:`modelkit.arch.diffusers_names`.

Keys with no diffusers home (schedule buffers, ``model_ema.*``, markers,
``logit_scale``, SD2's last text-encoder layer) and the source
``__metadata__`` go to ``modelkit_extra.safetensors`` at the folder root, and
:func:`open_diffusers` puts them back, so both round trips are lossless.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.arch.configs import ARCHS, ArchSpec
from modelkit.arch.detect import (
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
    te_config_from_diffusers,
    te_folder,
    unet_config_from_diffusers,
    vae_config_from_diffusers,
)
from modelkit.arch.keys import unet_keys
from modelkit.errors import BadFileError, ModelkitError
from modelkit.io.header import TensorInfo
from modelkit.io.reader import ModelSource, open_model
from modelkit.io.source import DerivedSource, tensor_info

if TYPE_CHECKING:
    import torch

    from modelkit.io.writer import TensorSink

EXTRA_FILE = "modelkit_extra.safetensors"
TRANSFORMER = "transformer"  # a transformer family's denoiser in a pipeline folder
MODEL_INDEX = "model_index.json"
SCHEDULER_DIR = "scheduler"
TORCH_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32",
                     "F64": "float64"}
TE_WRAPPER = "text_model."
BIN_STEMS = {"model": "pytorch_model", "diffusion_pytorch_model": "diffusion_pytorch_model"}
TOKENIZER_NOTE = ("tokenizers are not written (they cannot be downloaded here): pass "
                  "tokenizer= (and tokenizer_2= for SDXL) to DiffusionPipeline.from_pretrained, "
                  "or copy them from the base model's repo and name them in model_index.json")


def is_diffusers_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder laid out like a diffusers pipeline
    (``model_index.json`` or ``unet/config.json``) or is a pipeline's
    ``transformer/`` folder."""
    p = Path(path)
    return p.is_dir() and ((p / MODEL_INDEX).is_file() or (p / UNET / "config.json").is_file()
                           or _is_transformer(p) or _is_transformer(p / TRANSFORMER))


def _is_transformer(folder: Path) -> bool:
    """Whether ``folder`` holds a diffusers transformer model (its config's
    class is a ``...Transformer2DModel``/``...Transformer3DModel``)."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    name = _read_json(cfg).get("_class_name")
    return isinstance(name, str) and "Transformer" in name


def diffusers_version() -> str:
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
            names = list(dict.fromkeys(shards.values())) if isinstance(shards, dict) else [None]
            for name in names:
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".."):
                    raise BadFileError(f"{index}: weight_map names {name!r}, not a file of "
                                       "this folder; download the component again")
            return [folder / str(name) for name in names]
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
    """The ArchSpec a folder's configs describe, the components present and
    warnings (a component that is absent)."""
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
        notes.append(f"{root}: no vae/; the result has no VAE")
    slots = []
    for slot in base.text_encoders:
        cfg_path = root / te_folder(slot) / "config.json"
        if cfg_path.is_file():
            cfg = te_config_from_diffusers(name, slot, _read_json(cfg_path))
            slots.append(replace(slot, config=cfg))
            components.append(te_folder(slot))
        else:
            notes.append(f"{root}: no {te_folder(slot)}/; the result lacks that text "
                         "encoder")
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
    _check_links(root)
    if _is_transformer(root):
        return _open_transformer(root.parent, device, root)
    if not (root / UNET / "config.json").is_file() and (root / TRANSFORMER).is_dir():
        return _open_transformer(root, device, root / TRANSFORMER)
    arch, names, warnings = _folder_arch(root)
    notes: list[str] = []
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
                         tuple(inputs), notes, warnings)


def _open_transformer(root: Path, device: str, folder: Path) -> DerivedSource:
    """The transformer ``folder`` of a diffusers pipeline folder ``root``
    (Flux, SD3, Qwen-Image, Wan, ...: one file or shards named in its
    ``.index.json``) as one diffusers-layout model; each tensor is copied
    from its shard. The other components are not read (a note says which)."""
    sources = [open_model(p, device)
               for p in _weight_files(folder, WEIGHT_STEMS[UNET])]
    where: dict[str, ModelSource] = {}
    for src in sources:
        for key in src.infos:
            if key in where:
                raise BadFileError(f"{src.path}: tensor {key!r} is also in "
                                   f"{where[key].path.name}; the shards overlap, download "
                                   "the transformer again")
            where[key] = src
    infos = {k: s.infos[k] for s in sources for k in s.infos}
    others = sorted(p.name + "/" for p in root.iterdir()
                    if p.is_dir() and p != folder and (p / "config.json").is_file())
    notes = [f"read {folder.name}/ ({len(sources)} file{'s' * (len(sources) > 1)}); "
             f"{', '.join(others)} not included: give those components as files"] \
        if others else []

    def stream(key: str, sink: TensorSink) -> bool:
        sink.copy_from(where[key], key)  # file to file, in the kernel
        return True

    return DerivedSource(f"diffusers({folder})", infos, {}, lambda k: where[k].get(k),
                         tuple(s.path for s in sources), notes,
                         stream=stream if device == "cpu" else None)


def _check_links(root: Path) -> None:
    """Refuse a symlink inside the folder that points outside it (a
    downloaded folder must not make modelkit read, and embed, other files)."""
    real_root = Path(os.path.realpath(root))
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if not path.is_symlink():
                continue
            target = Path(os.path.realpath(path))
            if target != real_root and real_root not in target.parents:
                from modelkit.textsafe import shown

                raise BadFileError(f"{shown(path)}: a symlink pointing outside the diffusers "
                                   f"folder {shown(root)}; copy the file in instead")


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

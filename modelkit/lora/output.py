"""Building kohya-format LoRA outputs: module tensors, kohya and ModelSpec
metadata, and the tensor-data hash A1111 shows (``sshs_model_hash``).

The output is a :class:`DerivedSource` whose tensors are computed in a
``prepare`` step (ranks chosen by energy are only known after each SVD), so
the source starts empty and :meth:`LoraBuilder.finish` fills its infos and
metadata in place.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch.registry import REGISTRY
from modelkit.io.source import DerivedSource, tensor_info

if TYPE_CHECKING:
    import torch

_LORA_NAMES = {a.name: a.lora for a in REGISTRY.values() if a.lora and a.lora.adapters}
BASE_MODEL_VERSION = {n: lora.base_model_version for n, lora in _LORA_NAMES.items()}
MODELSPEC_ARCH = {n: f"{lora.modelspec_arch}/lora" if lora.modelspec_arch else None
                  for n, lora in _LORA_NAMES.items()}
MODELSPEC_VERSION = "1.0.1"
# ``ss_network_module`` the trainers write per kohya UNet naming: kohya
# sd-scripts ``networks.lora_flux`` (Flux.1 and Chroma: flux_train_network.py),
# ``networks.lora_sd3``; musubi-tuner ``networks.lora_wan``,
# ``networks.lora_qwen_image``, ``networks.lora_flux_2``, ``networks.lora_zimage``
# (their ``--network_module``); the SD families write networks.lora
NETWORK_MODULE = {"flux": "networks.lora_flux", "chroma": "networks.lora_flux",
                  "sd3": "networks.lora_sd3", "wan": "networks.lora_wan",
                  "qwen_image": "networks.lora_qwen_image", "flux2": "networks.lora_flux_2",
                  "z_image": "networks.lora_zimage"}
# ``modelspec.implementation`` per kohya UNet naming: kohya sd-scripts
# ``library/sai_model_spec.py`` (IMPL_FLUX, IMPL_CHROMA, IMPL_STABILITY_AI) and
# musubi-tuner ``utils/sai_model_spec.py`` (IMPL_WAN, IMPL_QWEN_IMAGE,
# IMPL_Z_IMAGE); the rest "diffusers"
IMPLEMENTATION = {"flux": "https://github.com/black-forest-labs/flux",
                  "chroma": "https://huggingface.co/lodestones/Chroma",
                  "ldm": "https://github.com/Stability-AI/generative-models",
                  "wan": "https://github.com/Wan-Video/Wan2.1",
                  "qwen_image": "https://github.com/QwenLM/Qwen-Image",
                  "z_image": "https://github.com/Tongyi-MAI/Z-Image"}
# LoRA factor suffixes per output naming (PEFT files carry no alpha: scale 1)
FACTOR_SUFFIXES = {"kohya": ("lora_down.weight", "lora_up.weight"),
                   "comfyui": ("lora_down.weight", "lora_up.weight"),
                   "peft": ("lora_A.weight", "lora_B.weight")}
ERRORS_KEY = "modelkit.lora.layer_errors"
OVERALL_KEY = "modelkit.lora.relative_error"
SKIPPED_KEY = "modelkit.lora.skipped"
LORA_THREADS = 1  # torch threads for LoRA work (see torch_threads)


def storage_dtype(name: str) -> str:
    """A float storage type from a user name (``fp16``, ``bf16``, ``fp32``)
    or a safetensors one (``F16``...)."""
    from modelkit.errors import ModelkitError
    from modelkit.io.dtypes import parse_user_dtype
    from modelkit.vocab import FLOAT_STORAGE_DTYPES

    st = name.upper() if name.upper() in FLOAT_STORAGE_DTYPES else parse_user_dtype(name)
    if st not in FLOAT_STORAGE_DTYPES:
        raise ModelkitError(f"dtype {name!r}: LoRA tensors are stored as fp16, bf16 or fp32")
    return st


def kohya_shapes(target_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...],
                                                                     tuple[int, ...]]:
    """``(up, down)`` shapes kohya stores for a weight of ``target_shape``:
    Linear ``[out, r]``/``[r, in]``; conv ``[out, r, 1, 1]``/``[r, in, kh, kw]``."""
    out = target_shape[0]
    if len(target_shape) == 4:
        return (out, rank, 1, 1), (rank, *target_shape[1:])
    return (out, rank), (rank, math.prod(target_shape[1:]))


class LoraBuilder:
    """Collect module tensors, then expose them as a source."""

    def __init__(self, label: str, dtype: torch.dtype,
                 input_paths: Iterable[Path] = (), naming: str = "kohya") -> None:
        self.dtype = dtype
        self.naming = naming
        self.tensors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}
        self.source = DerivedSource(label, {}, {}, self._produce, tuple(input_paths))

    def _produce(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def add_lora(self, name: str, up: torch.Tensor, down: torch.Tensor,
                 target_shape: tuple[int, ...], alpha: float | None = None) -> None:
        """One LoRA module: ``up [out, r]``, ``down [r, cols]``; alpha
        defaults to the rank (scale 1; a PEFT module has no alpha tensor)."""
        import torch

        r = up.shape[1]
        up_shape, down_shape = kohya_shapes(target_shape, r)
        down_suffix, up_suffix = FACTOR_SUFFIXES[self.naming]
        self.tensors[f"{name}.{down_suffix}"] = down.reshape(down_shape).to(
            self.dtype).contiguous()
        self.tensors[f"{name}.{up_suffix}"] = up.reshape(up_shape).to(
            self.dtype).contiguous()
        if self.naming != "peft":
            self.tensors[f"{name}.alpha"] = torch.tensor(
                float(r if alpha is None else alpha), dtype=self.dtype)
        self.ranks[name] = r

    def add(self, key: str, t: torch.Tensor) -> None:
        """Any other tensor (e.g. a ``diff``)."""
        self.tensors[key] = t.contiguous()

    def finish(self, metadata: dict[str, str]) -> None:
        """Fix the source's infos and metadata (with the tensor-data hash)."""
        from modelkit.io.dtypes import from_torch

        infos = {k: tensor_info(k, from_torch(t.dtype), tuple(t.shape))
                 for k, t in self.tensors.items()}
        self.source.infos.clear()
        self.source.infos.update(infos)
        digest = data_hash(infos, self.tensors)
        meta = {**metadata, "sshs_model_hash": digest}
        if "modelspec.architecture" in metadata:
            meta["modelspec.hash_sha256"] = "0x" + digest
        self.source.metadata.clear()
        self.source.metadata.update(meta)


def data_hash(infos: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the bytes after the header of the file the modelkit writer
    produces for these tensors (kohya's ``sshs_model_hash``, A1111's LoRA
    hash): the writer's layout order, tensor after tensor."""
    from modelkit.io.writer import TensorSpec, build_header, tensor_bytes

    specs = [TensorSpec(k, i.dtype, tuple(i.shape)) for k, i in infos.items()]
    _, offsets = build_header(specs, None)
    h = hashlib.sha256()
    for key in sorted(offsets, key=offsets.__getitem__):
        h.update(tensor_bytes(tensors[key]))
    return h.hexdigest()


def _dim_text(values: Iterable[float]) -> str:
    vals = set(values)
    if len(vals) == 1:
        v = vals.pop()
        return str(int(v)) if float(v).is_integer() else str(v)
    return "Dynamic"


def lora_metadata(arch: str, ranks: dict[str, int], conv_names: set[str], title: str,
                  extra: dict[str, str] | None = None) -> dict[str, str]:
    """kohya ``ss_*`` (the minimum keys every tool writes) and ModelSpec
    metadata (for a family a trainer names one) for a LoRA whose alpha
    equals each module's rank; a value no trainer defines is left out."""
    linear = [r for n, r in ranks.items() if n not in conv_names] or [0]
    conv = [r for n, r in ranks.items() if n in conv_names]
    args: dict[str, str] = {}
    if conv:
        args = {"conv_dim": _dim_text(conv), "conv_alpha": _dim_text(conv)}
    style = _LORA_NAMES[arch].kohya_unet
    meta = {
        "ss_network_module": NETWORK_MODULE.get(style, "networks.lora"),
        "ss_network_dim": _dim_text(linear),
        "ss_network_alpha": _dim_text(linear),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": str(_LORA_NAMES[arch].kohya_v2),
    }
    if MODELSPEC_ARCH[arch]:  # no trainer names SD3 or Flux.2 LoRAs' ModelSpec architecture
        meta.update({
            "modelspec.sai_model_spec": MODELSPEC_VERSION,
            "modelspec.architecture": MODELSPEC_ARCH[arch],
            "modelspec.implementation": IMPLEMENTATION.get(style, "diffusers"),
            "modelspec.title": title,
            "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        })
    meta.update(extra or {})
    return {k: v for k, v in meta.items() if v is not None}


def error_metadata(errors: dict[str, float], overall: float,
                   skipped: list[str] | None = None) -> dict[str, str]:
    """Per-layer and overall relative errors as metadata strings."""
    meta = {ERRORS_KEY: json.dumps({k: round(v, 6) for k, v in errors.items()}),
            OVERALL_KEY: f"{overall:.6g}"}
    if skipped is not None:
        meta[SKIPPED_KEY] = json.dumps(skipped)
    return meta


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run a block with ``n`` torch threads (restored afterwards). LoRA work
    is many small SVDs and row-chunk matmuls: with two threads on a busy
    2-core machine the OpenMP workers wait on each other and small SVDs got
    15-40x slower (measured), with one thread the time holds."""
    import torch

    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["LoraBuilder", "data_hash", "error_metadata", "kohya_shapes", "lora_metadata",
           "storage_dtype", "torch_threads"]

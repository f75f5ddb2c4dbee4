"""``export-gguf``: the UNet of an SD1/SD2/SDXL model as a GGUF file that
ComfyUI-GGUF's ``Unet Loader (GGUF)`` loads.

The policy follows city96/ComfyUI-GGUF's own tools (``tools/convert.py`` and
the llama.cpp patch ``tools/lcpp.patch`` that quantizes its output):

* only the UNet goes in, unprefixed (``input_blocks.0.0.weight``...);
* ``general.architecture`` is ``sd1`` for SD1 *and* SD2 (the loader accepts
  ``sd1``/``sdxl`` and ComfyUI tells SD1 from SD2 by key shapes) and ``sdxl``
  for SDXL base and refiner;
* 1-D tensors and tensors of at most 1024 elements stay float; conv_in and
  conv_out (``input_blocks.0.0.weight``, ``out.2.weight``) stay F32, and
  ``time_embed.``, ``label_emb.``, ``proj_in.``, ``proj_out.`` stay in their
  float type;
* a tensor whose last dimension is not a multiple of the quant block (conv
  kernels ``[O, I, 3, 3]`` and ``[O, I, 1, 1]``) is stored flattened as
  ``(n / 256, 256)`` with its real shape in the INT32 array
  ``comfy.gguf.orig_shape.<name>``; the loader reshapes after dequantizing.
  Tensors that cannot be flattened so stay float.

stable-diffusion.cpp ignores ``comfy.gguf.orig_shape.*`` and checks shapes
exactly, so it loads only files written with ``flatten=False`` (conv kernels
then stay F16, about 1.5x the size for SD1).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.registry import REGISTRY
from modelkit.errors import ModelkitError
from modelkit.io.header import TensorInfo
from modelkit.wording import plural

if TYPE_CHECKING:
    from modelkit.inspect.report import ModelReport
    from modelkit.io.gguf import GGUFPayload, TensorPlan
    from modelkit.io.source import DerivedSource, Source

# modelkit arch -> general.architecture (loader.py IMG_ARCH_LIST has sd1, sdxl)
GGUF_ARCH = {a.name: a.gguf.arch for a in REGISTRY.values() if a.gguf is not None}
_LDM_GGUF = REGISTRY["sd1"].gguf  # the LDM UNet policy SD1, SD2 and SDXL share
assert _LDM_GGUF is not None
UNET_PARTS = _LDM_GGUF.parts
SMALL_ELEMENTS = 1024  # convert.py QUANTIZATION_THRESHOLD: this many or fewer stay float
FLATTEN_MIN_ELEMENTS = 512  # convert.py REARRANGE_THRESHOLD
FLATTEN_ROW = 256
KEEP_F32 = _LDM_GGUF.keep_f32  # conv_in, conv_out
KEEP_FLOAT_PARTS = _LDM_GGUF.keep_float_parts

_WHAT_TO_GIVE = "give a full SD1/SD2/SDXL checkpoint or a UNet-only file"


def unet_key(key: str, prefixed: bool) -> str | None:
    """The unprefixed UNet name of ``key``, or None when it is not a UNet
    weight (VAE, text encoder, EMA copy, schedule buffer, marker)."""
    if prefixed:
        if not key.startswith(UNET_PREFIX):
            return None
        key = key[len(UNET_PREFIX):]
    return key if key.startswith(UNET_PARTS) else None


def unet_source(source: Source) -> DerivedSource:
    """The UNet of ``source`` alone, unprefixed, as a source (tensors are read
    from ``source`` on demand). Works on full checkpoints (keys under
    ``model.diffusion_model.``) and on unprefixed UNet-only files.

    Raises:
        ModelkitError: ``source`` holds no UNet weights.
    """
    from modelkit.io.source import DerivedSource, source_label, tensor_info

    prefixed = any(k.startswith(UNET_PREFIX) for k in source.infos)
    names = {k: n for k in source.infos if (n := unet_key(k, prefixed)) is not None}
    label = source_label(source)
    if not names:
        raise ModelkitError(f"{label}: has no UNet weights; {_WHAT_TO_GIVE}")
    infos = {n: tensor_info(n, source.infos[k].dtype, source.infos[k].shape)
             for k, n in names.items()}
    original = {n: k for k, n in names.items()}
    dropped = len(source.infos) - len(names)
    notes = [f"left out {dropped} non-UNet tensors"] if dropped else []
    return DerivedSource(f"unet({label})", infos, dict(source.metadata),
                         lambda n: source.get(original[n]), source.input_paths, notes)


def tensor_plan(key: str, info: TensorInfo, ggml_type: str, *,
                flatten: bool = True) -> TensorPlan:
    """How the UNet tensor ``key`` is stored when quantizing to ``ggml_type``."""
    from modelkit.io.gguf import GGML_SIZES, TensorPlan, kept_float_type

    shape = tuple(info.shape)
    keep = TensorPlan(key, "F32" if key in KEEP_F32 else kept_float_type(info.dtype),
                      shape)
    if (len(shape) < 2 or info.numel <= SMALL_ELEMENTS or key in KEEP_F32
            or any(p in key for p in KEEP_FLOAT_PARTS)):
        return keep
    if shape[-1] % GGML_SIZES[ggml_type][0] == 0:
        return TensorPlan(key, ggml_type, shape)
    n = info.numel
    if flatten and n >= FLATTEN_MIN_ELEMENTS and n % FLATTEN_ROW == 0:
        return TensorPlan(key, ggml_type, (n // FLATTEN_ROW, FLATTEN_ROW), shape)
    return keep


def gguf_arch(path: Path, report: ModelReport) -> str:
    """The ``general.architecture`` for a checked model, or a ModelkitError
    saying why ``path`` cannot be exported."""
    kind = report.kind
    if kind in ("lora", "embedding", "controlnet"):
        name = {"lora": "a LoRA", "embedding": "a textual inversion embedding",
                "controlnet": "a ControlNet"}[kind]
        raise ModelkitError(f"{path}: is {name}, not a model; {_WHAT_TO_GIVE}"
                            + (" (bake the LoRA into a checkpoint first: 'modelkit lora "
                               "bake')" if kind == "lora" else ""))
    if kind not in ("checkpoint", "unet"):
        what = {"vae": "a VAE", "text_encoder": "a text encoder"}.get(kind, "not a model "
                                                                      "modelkit knows")
        raise ModelkitError(f"{path}: is {what} with no UNet; {_WHAT_TO_GIVE}")
    if report.arch not in GGUF_ARCH:
        raise ModelkitError(f"{path}: UNet architecture {report.arch!r} is not supported "
                            "by export-gguf (SD1, SD2 and SDXL only)")
    return GGUF_ARCH[report.arch]


def _notes(report: ModelReport, plans: list[TensorPlan]) -> list[str]:
    notes = [f"{report.arch} {report.kind} -> general.architecture "
             f"{GGUF_ARCH[report.arch]}"]
    n_quant = sum(p.quantized for p in plans)
    notes.append(f"{plural(n_quant, 'tensor')} quantized, {len(plans) - n_quant} kept float")
    n_flat = sum(p.orig_shape is not None for p in plans)
    if n_flat:
        notes.append(f"{n_flat} conv kernels stored flattened with comfy.gguf.orig_shape.* "
                     "records: ComfyUI-GGUF loads this file, stable-diffusion.cpp does not "
                     "(use --keep-shapes for it)")
    if report.prediction.type == "v":
        notes.append("the source is v-prediction; a GGUF UNet carries no marker, so "
                     "set v_prediction in ComfyUI (ModelSamplingDiscrete)")
    return notes


def plan_gguf(source: Source, *, qtype: str = "q8_0", flatten: bool = True) -> GGUFPayload:
    """The GGUF output of the UNet of an open checkpoint or UNet-only source:
    which tensors are quantized, kept float or flattened (see the module
    docstring). ``flatten=False`` keeps conv kernels in their own shape
    (float), for loaders that ignore ``comfy.gguf.orig_shape``
    (stable-diffusion.cpp).

    Raises:
        ModelkitError: not an exportable model (LoRA, VAE, unknown
            architecture, no UNet), or an unknown qtype.
    """
    from modelkit.inspect.describe import describe
    from modelkit.io.gguf import ggml_type_for, gguf_payload

    target = ggml_type_for(qtype)
    report = describe(source)
    arch = gguf_arch(Path(report.path), report)
    unet = unet_source(source)
    plan = partial(tensor_plan, flatten=flatten)
    payload = gguf_payload(unet, qtype=qtype, arch=arch, plan=plan,
                           kv={"modelkit.source_arch": report.arch,
                               "modelkit.prediction": report.prediction.type})
    payload.notes = unet.notes + _notes(report, [plan(k, i, target)
                                                 for k, i in unet.infos.items()])
    return payload

"""``export-gguf``: the denoiser of an SD1/SD2/SDXL, Flux.1, Chroma, Flux.2,
SD3, Qwen-Image, Wan or Z-Image model as a GGUF file that ComfyUI-GGUF's
``Unet Loader (GGUF)`` loads.

The policy is the family's :class:`~modelkit.arch.gguf.GgufPolicy` (data in
the architecture registry), following city96/ComfyUI-GGUF's own tools
(``tools/convert.py`` and the llama.cpp patch ``tools/lcpp.patch`` that
quantizes its output):

* only the denoiser goes in, unprefixed (``input_blocks.0.0.weight``,
  ``double_blocks.0.img_attn.qkv.weight``...);
* ``general.architecture`` is ``sd1`` for SD1 *and* SD2 (the loader accepts
  ``sd1``/``sdxl`` and ComfyUI tells SD1 from SD2 by key shapes), ``sdxl``
  for SDXL base and refiner, ``flux`` (Flux.1, Chroma and Flux.2: the
  loader's model detection tells them apart by their keys), ``sd3``,
  ``qwen_image``, ``wan``, ``lumina2`` (Z-Image);
* 1-D tensors, tensors of at most 1024 elements and the family's
  high-precision keys (``convert.py`` ``keys_hiprec``: Wan's modulation,
  Z-Image's pad tokens)
  stay float (F16 as F16, F32 and BF16 as F32); the family's keep-list
  (``lcpp.patch``: embedders, final layers; SD's conv_in/conv_out in F32)
  keeps its float type;
* the ``_S``/``_M`` file types raise some tensors (``img_tensor_get_type``
  in ``lcpp.patch``: attention v projections, fused qkv, feed-forward down
  projections; :data:`modelkit.arch.gguf.MIX_RULES`);
* SD1/SD2/SDXL (``shape_fix``): a tensor whose last dimension is not a
  multiple of the quant block (conv kernels ``[O, I, 3, 3]``, 320-wide
  linears under k-quants) is stored flattened as ``(n / 256, 256)`` with its
  real shape in the INT32 array ``comfy.gguf.orig_shape.<name>``; the loader
  reshapes after dequantizing. Tensors that cannot be flattened so stay float;
* the other families quantize 2-D tensors only (``lcpp.patch``: ``ggml_n_dims
  == 2``), and a k-quant tensor whose rows are not a multiple of 256 falls
  back to F16, as the patch does (SD3.5-large's 2432-wide layers);
* a tensor of more than 4 dimensions (Wan's ``patch_embedding.weight``, a
  ``[dim, in, 1, 2, 2]`` Conv3d kernel) is stored F32, as ComfyUI-GGUF's
  ``tools/fix_5d_tensors.py`` adds it, but as 2-D ``[dim, in*1*2*2]`` with
  ``comfy.gguf.orig_shape``, so that GGML readers (at most 4 dimensions)
  read the file and ComfyUI-GGUF's loader (``loader.py``: F32/F16 data is
  viewed as the recorded shape) restores the kernel: no side file.

stable-diffusion.cpp ignores ``comfy.gguf.orig_shape.*`` and checks shapes
exactly, so it loads only files written with ``flatten=False`` (conv kernels
then stay F16, about 1.5x the size for SD1).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch import gguf as policies
from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.gguf import GgufPolicy
from modelkit.arch.registry import REGISTRY
from modelkit.errors import ModelkitError
from modelkit.io.header import TensorInfo
from modelkit.wording import plural

if TYPE_CHECKING:
    from modelkit.inspect.report import ModelReport
    from modelkit.io.gguf import GGUFPayload, TensorPlan
    from modelkit.io.source import DerivedSource, Source

# modelkit arch -> general.architecture (loader.py IMG_ARCH_LIST)
GGUF_ARCH = {a.name: a.gguf.arch for a in REGISTRY.values() if a.gguf is not None}
POLICIES: dict[str, GgufPolicy] = {a.name: a.gguf for a in REGISTRY.values()
                                   if a.gguf is not None}
_LDM_GGUF = POLICIES["sd1"]  # the LDM UNet policy SD1, SD2 and SDXL share
UNET_PARTS = _LDM_GGUF.parts
SMALL_ELEMENTS = 1024  # convert.py QUANTIZATION_THRESHOLD: this many or fewer stay float
FLATTEN_MIN_ELEMENTS = 512  # convert.py REARRANGE_THRESHOLD
FLATTEN_ROW = 256
KEEP_F32 = _LDM_GGUF.keep_f32  # conv_in, conv_out
KEEP_FLOAT_PARTS = _LDM_GGUF.keep_float_parts
MAX_DIMS = 4  # GGML's GGML_MAX_DIMS

_WHAT_TO_GIVE = ("give a full checkpoint or a denoiser-only file (SD1, SD2, SDXL, Flux.1, "
                 "Chroma, Flux.2, SD3, Qwen-Image, Wan or Z-Image)")

# why a tensor got its type (TensorPlan.why)
QUANTIZED, MIXED, FALLBACK, FLATTENED, KEPT, FIVE_D = ("quantized", "mix", "fallback",
                                                       "flattened", "kept", "5-d")


def denoiser_key(key: str, prefixed: bool, parts: tuple[str, ...] = UNET_PARTS) -> str | None:
    """The unprefixed denoiser name of ``key``, or None when it is not a
    denoiser weight (VAE, text encoder, EMA copy, schedule buffer, marker);
    ``parts`` (empty: any) are the denoiser's own key prefixes."""
    if prefixed:
        if not key.startswith(UNET_PREFIX):
            return None
        key = key[len(UNET_PREFIX):]
    return key if not parts or key.startswith(parts) else None


def unet_key(key: str, prefixed: bool) -> str | None:
    """The unprefixed UNet name of ``key`` (see :func:`denoiser_key`)."""
    return denoiser_key(key, prefixed, UNET_PARTS)


def unet_source(source: Source, policy: GgufPolicy = _LDM_GGUF) -> DerivedSource:
    """The denoiser of ``source`` alone, unprefixed, as a source (tensors are
    read from ``source`` on demand). Works on full checkpoints (keys under
    ``model.diffusion_model.``) and on unprefixed denoiser-only files.

    Raises:
        ModelkitError: ``source`` holds no denoiser weights.
    """
    from modelkit.io.source import DerivedSource, source_label, tensor_info

    prefixed = any(k.startswith(UNET_PREFIX) for k in source.infos)
    names = {k: n for k in source.infos
             if (n := denoiser_key(k, prefixed, policy.parts)) is not None}
    label = source_label(source)
    if not names:
        raise ModelkitError(f"{label}: has no denoiser weights; {_WHAT_TO_GIVE}")
    infos = {n: tensor_info(n, source.infos[k].dtype, source.infos[k].shape)
             for k, n in names.items()}
    original = {n: k for k, n in names.items()}
    dropped = len(source.infos) - len(names)
    notes = [f"left out {dropped} tensors outside the denoiser"] if dropped else []
    return DerivedSource(f"denoiser({label})", infos, dict(source.metadata),
                         lambda n: source.get(original[n]), source.input_paths, notes)


def tensor_plan(key: str, info: TensorInfo, ggml_type: str, *,
                flatten: bool = True) -> TensorPlan:
    """How the SD UNet tensor ``key`` is stored when quantizing to
    ``ggml_type`` (no mix: see :func:`plan_tensors`)."""
    from modelkit.io.gguf import QTYPES

    qtype = next(q for q, (t, _) in QTYPES.items() if t == ggml_type)
    return _plan(key, info, _LDM_GGUF, qtype, ggml_type, {}, flatten)


def plan_tensors(infos: Mapping[str, TensorInfo], policy: GgufPolicy, qtype: str, *,
                 flatten: bool = True) -> list[TensorPlan]:
    """Every tensor's plan under ``policy`` and user type ``qtype``, in the
    order of ``infos``. A mix's counted rules (the first n attention-v
    tensors) count in sorted name order: ``llama-quantize`` counts in its
    input's order, which is ``convert.py``'s state dict from safetensors'
    ``load_file``, whose keys come sorted."""
    from modelkit.io.gguf import ggml_type_for

    default = ggml_type_for(qtype)
    counts: dict[str, int] = {}
    plans = {k: _plan(k, infos[k], policy, qtype.lower(), default, counts, flatten)
             for k in sorted(infos)}
    return [plans[k] for k in infos]


def _kept(key: str, info: TensorInfo, policy: GgufPolicy) -> TensorPlan | None:
    """The plan of a tensor the policy never quantizes, or None."""
    from modelkit.io.gguf import TensorPlan, kept_float_type, source_float_type

    shape = tuple(info.shape)
    if key in policy.keep_f32:
        return TensorPlan(key, "F32", shape, why=KEPT)
    if (len(shape) < 2 or info.numel <= SMALL_ELEMENTS
            or any(p in key for p in policy.hiprec_parts)):
        return TensorPlan(key, kept_float_type(info.dtype), shape, why=KEPT)
    if key in policy.keep_float_names or any(p in key for p in policy.keep_float_parts):
        return TensorPlan(key, source_float_type(info.dtype), shape, why=KEPT)
    return None


def mixed_type(key: str, qtype: str, default: str, counts: dict[str, int]) -> str:
    """The type ``img_tensor_get_type`` gives tensor ``key`` under ``qtype``
    (``counts``: how many tensors each counted rule has seen so far)."""
    for rule in policies.MIX_RULES:
        if not any(p in key for p in rule.parts):
            continue
        seen = counts.get(rule.name, 0)
        counts[rule.name] = seen + 1
        r = dict(rule.raises).get(qtype)
        if r is None:
            return default
        if r.first is None or seen < r.first:
            return r.to
        return r.after or default
    return default


def _plan(key: str, info: TensorInfo, policy: GgufPolicy, qtype: str, default: str,
          counts: dict[str, int], flatten: bool) -> TensorPlan:
    from modelkit.io.gguf import FLOAT_TYPES, GGML_SIZES, TensorPlan, source_float_type

    shape, n = tuple(info.shape), info.numel
    if len(shape) > MAX_DIMS:
        return TensorPlan(key, "F32", (shape[0], n // shape[0]), shape, why=FIVE_D)
    kept = _kept(key, info, policy)
    if kept is not None:
        return kept
    if default in FLOAT_TYPES:
        return TensorPlan(key, default, shape, why=QUANTIZED)
    target = mixed_type(key, qtype, default, counts)
    why = QUANTIZED if target == default else MIXED
    block = GGML_SIZES[target][0]
    if policy.shape_fix:
        if shape[-1] % block == 0:
            return TensorPlan(key, target, shape, why=why)
        if flatten and n >= FLATTEN_MIN_ELEMENTS and n % FLATTEN_ROW == 0:
            return TensorPlan(key, target, (n // FLATTEN_ROW, FLATTEN_ROW), shape,
                              why=FLATTENED)
        return TensorPlan(key, source_float_type(info.dtype), shape, why=KEPT)
    if len(shape) != 2:
        return TensorPlan(key, source_float_type(info.dtype), shape, why=KEPT)
    if shape[-1] % block:
        return TensorPlan(key, policies.K_FALLBACK, shape, why=FALLBACK)
    return TensorPlan(key, target, shape, why=why)


def gguf_arch(path: Path, report: ModelReport) -> str:
    """The ``general.architecture`` for a checked model, or a ModelkitError
    saying why ``path`` cannot be exported."""
    from modelkit.arch import registry

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
        raise ModelkitError(f"{path}: is {what} with no UNet or transformer; {_WHAT_TO_GIVE}")
    if report.arch not in GGUF_ARCH:
        raise ModelkitError(f"{path}: architecture {report.arch!r} is not supported by "
                            f"export-gguf; {_WHAT_TO_GIVE}")
    arch = REGISTRY[report.arch]
    # ComfyUI-GGUF's convert.py refuses these layouts (keys_banned): its loader
    # expects the original names (Flux's fused qkv)
    if (arch.spec is None and len(arch.layouts) > 1
            and report.layout == registry.DIFFUSERS):
        raise ModelkitError(f"{path}: is {arch.label} in the diffusers layout; export-gguf "
                            "writes the original layout ComfyUI-GGUF loads: give the "
                            "original (ComfyUI diffusion_models) file")
    return GGUF_ARCH[report.arch]


def _notes(report: ModelReport, qtype: str, plans: list[TensorPlan]) -> list[str]:
    from collections import Counter

    notes = [f"{report.arch} {report.kind} -> general.architecture "
             f"{GGUF_ARCH[report.arch]}"]
    n_quant = sum(p.quantized for p in plans)
    types = Counter(p.ggml_type for p in plans)
    notes.append(f"{plural(n_quant, 'tensor')} quantized, {len(plans) - n_quant} kept float "
                 f"({', '.join(f'{t} {n}' for t, n in types.most_common())})")
    why = Counter(p.why for p in plans)
    if why[MIXED]:
        notes.append(f"{qtype}: {plural(why[MIXED], 'tensor')} raised by the mix "
                     "(llama.cpp's attention-v, qkv and feed-forward rules as "
                     "ComfyUI-GGUF's patch applies them)")
    if why[FALLBACK]:
        notes.append(f"{plural(why[FALLBACK], 'tensor')} stored F16: rows not a multiple "
                     "of 256, which k-quants need (ComfyUI-GGUF's fallback)")
    if why[FLATTENED]:
        notes.append(f"{why[FLATTENED]} conv kernels stored flattened with "
                     "comfy.gguf.orig_shape.* records: ComfyUI-GGUF loads this file, "
                     "stable-diffusion.cpp does not (use --keep-shapes for it)")
    if why[FIVE_D]:
        notes.append(f"{plural(why[FIVE_D], 'tensor')} of more than 4 dimensions stored F32 "
                     "as 2-D with comfy.gguf.orig_shape (ComfyUI-GGUF restores the shape; "
                     "no fix_5d_tensors side file needed)")
    if report.prediction.type == "v":
        notes.append("the source is v-prediction; a GGUF UNet carries no marker, so "
                     "set v_prediction in ComfyUI (ModelSamplingDiscrete)")
    return notes


def plan_gguf(source: Source, *, qtype: str = "q8_0", flatten: bool = True) -> GGUFPayload:
    """The GGUF output of the denoiser of an open checkpoint or denoiser-only
    source: which tensors are quantized (and to which type, under a mix),
    kept float or flattened (see the module docstring). ``flatten=False``
    keeps SD conv kernels in their own shape (float), for loaders that
    ignore ``comfy.gguf.orig_shape`` (stable-diffusion.cpp).

    Raises:
        ModelkitError: not an exportable model (LoRA, VAE, unknown
            architecture, diffusers layout, no denoiser), or an unknown qtype.
    """
    from modelkit.inspect.describe import describe
    from modelkit.io.gguf import ggml_type_for, planned_payload

    ggml_type_for(qtype)
    report = describe(source)
    arch = gguf_arch(Path(report.path), report)
    policy = POLICIES[report.arch]
    denoiser = unet_source(source, policy)
    plans = plan_tensors(denoiser.infos, policy, qtype, flatten=flatten)
    payload = planned_payload(denoiser, plans, qtype=qtype, arch=arch,
                              kv={"modelkit.source_arch": report.arch,
                                  "modelkit.prediction": report.prediction.type})
    payload.notes = denoiser.notes + _notes(report, qtype.lower(), plans)
    return payload

"""The convert operations, registered as transforms: what ``modelkit prune``,
``ema``, ``quantize``, ``dequantize``, ``swap``, ``extract`` and ``convert``
(``layout``: ``convert --layout``) run, and what a recipe's ``op:`` steps
name. Each is a thin declaration over the operation's module: the signature
gives the inputs and parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelkit.arch.layouts import LAYOUTS
from modelkit.convert.base import passthrough
from modelkit.core.registry import (
    DROPPED,
    NEW,
    RENAMED,
    SAME,
    Anything,
    Checkpoint,
    Model,
    transform,
)
from modelkit.core.step import PlannedStep, same_origins
from modelkit.vocab import (
    COMPONENTS,
    EXTRACTABLE,
    FLOAT_STORAGE,
    KEEP,
    MERGE_OUTPUT_DTYPES,
    QUANT_FORMATS,
    QUANT_TARGETS,
)

if TYPE_CHECKING:
    from modelkit.io.source import Source


def _storage_dtype(value: str) -> str | None:
    """A safetensors float dtype for ``fp16``/``bf16``/``fp32``, None for keep."""
    from modelkit.io.dtypes import parse_user_dtype

    return None if value == KEEP else parse_user_dtype(value)


@transform("prune", summary="keep UNet, VAE, text encoders and markers; drop EMA, "
           "schedule buffers and leftovers; repair CLIP position ids",
           keys=(SAME, RENAMED, DROPPED), choices={"dtype": MERGE_OUTPUT_DTYPES},
           help={"keep_ema": "Keep the model_ema.* weights.",
                 "dtype": "Float dtype of the kept tensors."})
def prune(model: Checkpoint, *, keep_ema: bool = False, dtype: str = KEEP) -> PlannedStep:
    """Drop what inference does not need; ``dtype`` casts the kept float
    tensors (markers and integer tensors keep theirs)."""
    from modelkit.convert.prune import prune as plan_prune

    return plan_prune(model, keep_ema=keep_ema, dtype=_storage_dtype(dtype))


@transform("ema", summary="put the EMA weights in place of the UNet weights",
           keys=(SAME, RENAMED, DROPPED), choices={"dtype": MERGE_OUTPUT_DTYPES},
           help={"dtype": "Float dtype of the output tensors."})
def ema(model: Checkpoint, *, dtype: str = KEEP) -> PlannedStep:
    """The EMA copy of every UNet tensor under the UNet's own names;
    ``dtype`` casts the float tensors (markers keep theirs)."""
    from modelkit.convert.ema import select_ema

    return select_ema(model, dtype=_storage_dtype(dtype))


@transform("quantize", summary="store components at fp16/bf16/fp32/fp8 or int8",
           keys=(SAME, NEW), choices={"dtype": QUANT_TARGETS, "components": COMPONENTS,
                                      "format": QUANT_FORMATS},
           help={"dtype": "Storage type for the chosen components.",
                 "components": "Comma list of unet,te,vae. Default: all of them for "
                               "fp16/bf16/fp32; the UNet only for fp8 and int8 (text "
                               "encoders and VAE then kept at 16 bits).",
                 "format": "How 8-bit weights are stored: modelkit (plain fp8, "
                           "modelkit's int8), comfy (ComfyUI's scaled fp8 / int8_blockwise "
                           "with _quantization_metadata) or comfy-legacy (scaled_fp8 "
                           "marker, fp8_e4m3fn only)."})
def quantize(model: Model, *, dtype: str, components: tuple[str, ...] | None = None,
             format: str = "modelkit") -> PlannedStep:
    """Storage precision per component (fp8/int8 default to the UNet only)."""
    from modelkit.convert.quantize import quantize as plan_quantize

    return plan_quantize(model, dtype, components=components, fmt=format)


@transform("dequantize", summary="restore an int8/fp8 file to fp16/bf16/fp32",
           keys=(SAME, DROPPED), choices={"dtype": FLOAT_STORAGE},
           help={"dtype": "Float dtype of the restored tensors."})
def dequantize(model: Model, *, dtype: str = "fp16") -> PlannedStep:
    """int8 weights times their scales; other float tensors cast to ``dtype``."""
    from modelkit.convert.quantize import dequantize as plan_dequantize

    return plan_dequantize(model, dtype)


@transform("swap", summary="replace a component with the second model's",
           keys=(SAME, RENAMED, DROPPED), choices={"component": COMPONENTS},
           help={"component": "The component taken from the donor."})
def swap(model: Checkpoint, donor: Anything, *, component: str = "vae") -> PlannedStep:
    """``model`` with ``component`` taken from ``donor`` (shapes checked; the
    donor's kind is checked by the operation itself, with a precise message)."""
    from modelkit.convert.components import swap as plan_swap

    return plan_swap(model, donor, component)


@transform("extract", summary="keep one component only",
           keys=(SAME, RENAMED, DROPPED), choices={"component": EXTRACTABLE},
           help={"component": "The component to keep."})
def extract(model: Checkpoint, *, component: str) -> PlannedStep:
    """One component of ``model`` (VAE and UNet unprefixed)."""
    from modelkit.convert.components import extract as plan_extract

    return plan_extract(model, component)


@transform("convert", summary="copy every tensor as it is (change the file format)",
           ends=(({}, 0),))
def convert(model: Anything) -> PlannedStep:
    """The model unchanged: with an output format, a format conversion."""
    from modelkit.io.source import DerivedSource, source_label

    src: Source = model
    out = DerivedSource(f"convert({source_label(src)})", dict(src.infos),
                        dict(src.metadata), src.get, src.input_paths,
                        stream=passthrough({k: (src, k) for k in src.infos}))
    return PlannedStep(out, None, "convert", {}, same_origins(src.infos))


@transform("layout", summary="a transformer between the original and the diffusers key "
           "layout (fused qkv/linear1 split or joined), bit for bit",
           keys=(SAME, RENAMED, NEW, DROPPED), choices={"to": LAYOUTS},
           help={"to": "The layout to write: original (BFL/Stability/ComfyUI names) or "
                       "diffusers."})
def layout(model: Anything, *, to: str) -> PlannedStep:
    """``model``'s transformer in layout ``to``; other components of an
    all-in-one file unchanged."""
    from modelkit.convert.layout import convert_layout

    return convert_layout(model, to)

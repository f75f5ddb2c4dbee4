"""``quantize`` and ``dequantize``: storage precision per component.

Float targets (``fp32``, ``fp16``, ``bf16``, ``fp8_e4m3fn``, ``fp8_e5m2``)
cast each component's float tensors. Values beyond the target's largest
finite number would become inf (fp16) or NaN (fp8 e4m3fn has no inf); they
are saturated to the largest finite value instead, and counted per tensor.

``int8`` is modelkit's own weight-only scheme, named and versioned in the
metadata (``modelkit.quantization``):

* ``modelkit.int8.per_channel`` version 1: symmetric, per output channel.
  For a weight ``W`` of shape ``[O, ...]`` (Linear ``[O, I]`` or conv
  ``[O, I, kh, kw]``) with at least :data:`INT8_MIN_ELEMENTS` elements,
  ``s[o] = max|W[o]| / 127`` and ``Q[o] = round(W[o] / s[o])`` in [-127, 127].
  ``Q`` (I8) is stored under the weight's name and ``s`` (F32, shape ``[O]``)
  under ``<name>_scale``. Norms, biases, embeddings' small tensors and
  everything 1-D stay in float.
* Error bound: every element is restored within ``s[o] / 2`` (rounding to
  the nearest step), i.e. within ``max|W[o]| / 254`` of the original row's
  largest magnitude; for Gaussian-like weights that is a relative L2 error
  around 0.3-1 % (SNR 40-50 dB). ``quantize`` measures the real figures.
* No UI loads this scheme directly: ``dequantize`` restores a normal
  checkpoint. It is for archiving and shipping models at half the fp16 size.

``format="comfy"`` / ``"comfy-legacy"`` spell fp8 and int8 as ComfyUI's
scaled checkpoints instead (:mod:`modelkit.convert.comfy_quant`).

By default an fp8 or int8 target applies to the UNet only; the text
encoders and the VAE are stored at fp16 (fp32 tensors) or left as they are
(16-bit ones). The VAE decodes every image and fp8 VAEs show banding, so it
only goes below fp16 when named in ``components``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelkit.arch import parts
from modelkit.convert.base import chunked_apply, passthrough
from modelkit.core.step import PlannedStep, same_origins
from modelkit.errors import ModelkitError
from modelkit.inspect.describe import describe, require_handled
from modelkit.io.header import DTYPE_BITS
from modelkit.io.source import DerivedSource, Source, source_label, tensor_info
from modelkit.numeric import relative_l2, snr_db
from modelkit.vocab import COMPONENTS, QUANT_FORMATS, QUANT_TARGETS, UNET
from modelkit.wording import with_article

if TYPE_CHECKING:
    import torch

QUANT_KEY = "modelkit.quantization"
INT8_SCHEME = "modelkit.int8.per_channel"
INT8_VERSION = 1
INT8_MIN_ELEMENTS = 4096
SCALE_SUFFIX = "_scale"
# safetensors dtype -> largest finite value, for overflow checks
FLOAT_RANGE = {"F32": 3.4028234663852886e38, "F16": 65504.0, "BF16": 3.3895313892515355e38,
               "F8_E4M3": 448.0, "F8_E5M2": 57344.0}
CHUNK = 1 << 20
MAX16 = "max16"
MODELKIT = "modelkit"  # the default --format


@dataclass
class TensorError:
    """Round-trip error of one int8 tensor."""

    key: str
    relative_l2: float
    snr_db: float


@dataclass
class QuantizeReport:
    """What quantize did per component, saturated values, int8 error and size."""

    target: str
    policy: dict[str, str] = field(default_factory=dict)  # component -> dtype
    n_cast: int = 0
    n_int8: int = 0
    overflow: dict[str, int] = field(default_factory=dict)  # key -> saturated values
    errors: list[TensorError] = field(default_factory=list)
    err_sq: float = 0.0
    ref_sq: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    format: str = "modelkit"  # or comfy, comfy-legacy (modelkit.convert.comfy_quant)
    n_scaled: int = 0  # weights stored with a ComfyUI scale
    kept: dict[str, int] = field(default_factory=dict)  # why denoiser weights stay -> count

    @property
    def measured(self) -> bool:
        """Whether the rounding error was measured (int8 and fp8 targets;
        16- and 32-bit casts are not measured)."""
        return self.n_int8 > 0 or bool(self.errors)

    @property
    def relative_l2(self) -> float | None:
        """``||restored - original|| / ||original||`` over the measured
        tensors, or None when nothing was measured."""
        return relative_l2(self.err_sq, self.ref_sq) if self.measured else None

    @property
    def snr_db(self) -> float | None:
        return snr_db(self.err_sq, self.ref_sq) if self.measured else None

    def worst(self, n: int = 5) -> list[TensorError]:
        return sorted(self.errors, key=lambda e: -e.relative_l2)[:n]


def component_policy(target: str, components: tuple[str, ...] | None) -> dict[str, str]:
    """Storage per component: a safetensors dtype, ``keep`` (unchanged) or
    ``max16`` (fp32 goes to fp16, 16-bit and narrower stay). With
    ``components`` None: a 16- or 32-bit target applies to everything; an
    fp8 or int8 target to the UNet only, the text encoders and VAE ``max16``."""
    from modelkit.io.dtypes import parse_user_dtype

    if target not in QUANT_TARGETS:
        raise ModelkitError(f"unknown target {target!r}; choose one of "
                            f"{', '.join(QUANT_TARGETS)}")
    dtype = parse_user_dtype(target)
    if components is None:
        if DTYPE_BITS[dtype] >= 16:
            return dict.fromkeys(COMPONENTS, dtype)
        return {c: (dtype if c == UNET else MAX16) for c in COMPONENTS}
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise ModelkitError(f"unknown component {bad[0]!r}; choose from {', '.join(COMPONENTS)}")
    return {c: (dtype if c in components else "keep") for c in COMPONENTS}


def _component(key: str) -> str | None:
    part = parts.part_of(key)
    if part == parts.EMA:
        return "unet"
    return part if part in COMPONENTS else None


def int8_eligible(key: str, shape: tuple[int, ...]) -> bool:
    """Whether a weight gets int8 storage: a ``.weight`` matrix or conv
    kernel with enough elements (norms, biases, small tensors stay float)."""
    return key.endswith("weight") and len(shape) >= 2 and math.prod(shape) >= INT8_MIN_ELEMENTS


def _saturating_cast(report: QuantizeReport, key: str, t: torch.Tensor,
                     dtype: str) -> torch.Tensor:
    import torch

    from modelkit.io.dtypes import from_torch, to_torch
    from modelkit.io.reader import cast

    limit = FLOAT_RANGE[dtype]
    target = to_torch(dtype)
    if DTYPE_BITS[dtype] == 8:  # fp8 loses enough to be worth measuring
        return _fp8_cast(report, key, t, target, limit)
    if FLOAT_RANGE.get(from_torch(t.dtype), math.inf) <= limit:
        return cast(t, target)  # every value fits
    count = 0

    def clip(x: torch.Tensor) -> torch.Tensor:
        nonlocal count
        lo, hi = torch.aminmax(x)
        if not (-limit <= float(lo) and float(hi) <= limit):  # NaN fails both
            over = x.abs() > limit
            count += int(over.sum())
            return torch.where(over, x.sign() * limit, x)
        return x

    out = chunked_apply(t, target, clip, CHUNK)
    if count:
        report.overflow[key] = count
    return out


def _fp8_cast(report: QuantizeReport, key: str, t: torch.Tensor, target: torch.dtype,
              limit: float) -> torch.Tensor:
    """``t`` rounded to fp8 ``target`` (saturated), its error measured on
    each chunk as it is stored: the stored codes decoded by table, in reused
    buffers (decoding with torch's fp8 cast cost more than the cast itself)."""
    import torch

    from modelkit.convert.comfy_quant import CHUNK as FP8_CHUNK
    from modelkit.convert.comfy_quant import fp8_buffers

    out = torch.empty(t.shape, dtype=target, device=t.device)
    src, dst = t.reshape(-1), out.view(-1)
    bufs = fp8_buffers(target, t.device)
    err = ref = 0.0
    count = 0
    for i in range(0, src.numel(), FP8_CHUNK):
        e, r, c = bufs.round(src[i:i + FP8_CHUNK], dst[i:i + FP8_CHUNK], None, 1.0, limit)
        err, ref, count = err + e, ref + r, count + c
    if count:
        report.overflow[key] = count
    report.err_sq += err
    report.ref_sq += ref
    report.errors.append(TensorError(key, relative_l2(err, ref), snr_db(err, ref)))
    return out


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Per-output-channel symmetric int8 of ``w``: ``(Q int8, scale float32
    [O], err_sq, ref_sq)`` where the sums give the restored tensor's error
    ``||Q s - W||^2`` and ``||W||^2``.

    Rows go through in blocks of about 1M elements, each step writing into
    buffers reused across blocks (the fp32 copy, ``|W|``, ``W / s`` rounded
    and clamped, then restored in place to measure the error), so a block
    costs a few passes over memory and no temporaries."""
    import torch

    rows = w.reshape(w.shape[0], -1)
    n_rows, cols = rows.shape
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(n_rows, dtype=torch.float32, device=w.device)
    step = max(1, CHUNK // max(1, cols))
    size = min(n_rows, step) * cols
    x_buf = torch.empty(size, dtype=torch.float32, device=w.device)
    a_buf = torch.empty(size, dtype=torch.float32, device=w.device)
    err = ref = 0.0
    for i in range(0, n_rows, step):
        j = min(i + step, n_rows)
        x = x_buf[:(j - i) * cols].view(j - i, cols)
        a = a_buf[:(j - i) * cols].view(j - i, cols)
        x.copy_(rows[i:j])
        s = torch.abs(x, out=a).amax(dim=1).div_(127.0)
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row stays zero
        torch.div(x, s[:, None], out=a).round_().clamp_(-127, 127)
        q[i:j] = a
        scale[i:j] = s
        a.mul_(s[:, None]).sub_(x)  # restored minus original
        err += float(torch.dot(a.view(-1), a.view(-1)))
        ref += float(torch.dot(x.view(-1), x.view(-1)))
    return q.reshape(w.shape), scale, err, ref


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
                    ) -> torch.Tensor:
    """Undo :func:`int8_quantize` into ``dtype``."""
    import torch

    rows = q.reshape(q.shape[0], -1)
    out = torch.empty(rows.shape, dtype=dtype, device=q.device)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = rows[i:i + step].to(torch.float32) * scale[i:i + step, None].to(
            torch.float32)
    return out.reshape(q.shape)


def _plan_key(key: str, dtype: str, shape: tuple[int, ...], target: str,
              infos: dict[str, Any], actions: dict[str, tuple[str, str]]) -> None:
    if target == "I8" and int8_eligible(key, shape):
        infos[key] = tensor_info(key, "I8", shape)
        infos[key + SCALE_SUFFIX] = tensor_info(key + SCALE_SUFFIX, "F32", (shape[0],))
        actions[key] = ("int8", key)
        actions[key + SCALE_SUFFIX] = ("scale", key)
        return
    if target == MAX16:
        target = "F16" if DTYPE_BITS.get(dtype, 32) > 16 else "keep"
    out = dtype if target in ("keep", "I8") else target
    infos[key] = tensor_info(key, out, shape)
    actions[key] = ("cast" if out != dtype else "copy", key)


def quantize(src: Source, target: str, *, components: tuple[str, ...] | None = None,
             fmt: str = MODELKIT) -> PlannedStep:
    """Plan ``src`` stored at ``target`` (one of :data:`modelkit.vocab.QUANT_TARGETS`) for the
    chosen components (default: all, VAE not below fp16), its 8-bit weights
    spelled as ``fmt`` (:data:`modelkit.vocab.QUANT_FORMATS`: modelkit's
    own, or ComfyUI's scaled formats, :mod:`modelkit.convert.comfy_quant`).

    Raises:
        ModelkitError: unknown target, component or format, a target the
            format cannot store, an already-quantized file.
    """
    name = source_label(src)
    _refuse_quantized(src, name)
    rep0 = describe(src)
    if rep0.kind not in ("checkpoint", "unet", "vae", "text_encoder"):
        raise ModelkitError(f"{name}: is {with_article(rep0.kind)}; quantize takes "
                            "checkpoints and single components")
    require_handled(rep0, name, "quantize")
    policy = component_policy(target, components)
    if fmt not in QUANT_FORMATS:
        raise ModelkitError(f"unknown format {fmt!r}; choose one of {', '.join(QUANT_FORMATS)}")
    if fmt != MODELKIT:
        return _comfy_plan(src, rep0, target, fmt, components, policy)
    report = QuantizeReport(target, policy, bytes_in=sum(i.nbytes for i in src.infos.values()))
    infos: dict[str, Any] = {}
    actions: dict[str, tuple[str, str]] = {}
    for key, info in src.infos.items():
        want = _wanted(rep0, key, policy)
        if not info.is_float or want == "keep" or parts.part_of(key) == parts.MARKER:
            infos[key], actions[key] = info, ("copy", key)
            continue
        _plan_key(key, info.dtype, info.shape, want, infos, actions)
    report.bytes_out = sum(i.nbytes for i in infos.values())
    return _quantized_source(src, report, infos, actions, target)


def _wanted(rep0: Any, key: str, policy: dict[str, str]) -> str:
    """What the policy wants for ``key``: its component's entry."""
    comp = rep0.kind if rep0.kind != "checkpoint" else _component(key)
    comp = {"text_encoder": "te"}.get(comp or "", comp)
    return policy.get(comp or "", "keep")


def _refuse_quantized(src: Source, name: str) -> None:
    """Refuse a file that is quantized already (modelkit's int8, ComfyUI's
    scaled formats): its scales would be dropped."""
    if src.metadata.get(QUANT_KEY):
        raise ModelkitError(f"{name}: is already quantized ({src.metadata[QUANT_KEY]}); "
                            "dequantize it first")
    what = _comfy_scaled(src)
    if what:
        raise ModelkitError(f"{name}: is already a ComfyUI scaled checkpoint ({what}); "
                            "quantize a 16- or 32-bit original instead")
    from modelkit.io.quantized import dequantized_on_read

    what = dequantized_on_read(src)
    if what:
        raise ModelkitError(f"{name}: is already quantized ({what}); quantize a 16- or "
                            "32-bit original instead, or write it at 16 bits with "
                            "'modelkit dequantize'")


def _comfy_scaled(src: Source) -> str | None:
    """What marks ``src`` as a ComfyUI scaled checkpoint (its metadata entry,
    or a scale, comfy_quant or scaled_fp8 tensor), or None."""
    from modelkit.convert import comfy_quant as cq

    if cq.METADATA_KEY in src.metadata:
        return f"metadata {cq.METADATA_KEY!r}"
    # modelkit's int8 names its scales <weight key>_scale: "....weight_scale" too
    names = (cq.CONF, cq.LEGACY_SCALE, cq.LEGACY_MARKER) + (
        () if src.metadata.get(QUANT_KEY) else (cq.SCALE,))
    key = next((k for k in src.infos if k.rsplit(".", 1)[-1] in names), None)
    return f"tensor {key!r}" if key else None


def _refuse_comfy_scaled(src: Source, name: str) -> None:
    """dequantize casts fp8 weights as stored: a ComfyUI scaled file's
    weights would come out without their scales, so it is refused."""
    what = _comfy_scaled(src)
    if what:
        raise ModelkitError(f"{name}: is a ComfyUI scaled checkpoint ({what}); dequantize "
                            "restores modelkit's int8 and plain fp8 files only, and would drop "
                            "its per-layer scales")


def _comfy_plan(src: Source, rep0: Any, target: str, fmt: str,
                components: tuple[str, ...] | None, policy: dict[str, str]) -> PlannedStep:
    """ComfyUI's scaled format: the denoiser's Linear weights at ``target``
    with their scales, its other float tensors at 16 bits (fp32 -> fp16),
    the other components as the policy says."""
    from modelkit.arch import registry
    from modelkit.convert import comfy_quant as cq
    from modelkit.io.dtypes import parse_user_dtype

    name = source_label(src)
    dtype = parse_user_dtype(target)
    cq.layer_format(dtype, fmt, name)
    if components not in (None, (UNET,)):
        raise ModelkitError(f"{name}: --format {fmt} quantizes the denoiser (unet) only; "
                            "leave out --components")
    fp8 = next((k for k, i in src.infos.items() if i.dtype.startswith("F8")), None)
    if fp8:
        raise ModelkitError(f"{name}: holds fp8 tensors already ({fp8!r}); quantize a 16- "
                            "or 32-bit original instead")
    arch = registry.get(rep0.arch)
    keep = arch.quant_keep if arch else ()
    report = QuantizeReport(target, policy, bytes_in=sum(i.nbytes for i in src.infos.values()),
                            format=fmt)
    infos: dict[str, Any] = {}
    actions: dict[str, tuple[str, str]] = {}
    layers: dict[str, dict[str, Any]] = {}
    for key, info in src.infos.items():
        want = _wanted(rep0, key, policy)
        if not info.is_float or want == "keep" or parts.part_of(key) == parts.MARKER:
            infos[key], actions[key] = info, ("copy", key)
            continue
        if want == dtype:  # the denoiser
            why = cq.keep_reason(key, info.shape, dtype, keep)
            if why is None:
                cq.plan_layer(key, info.shape, dtype, fmt, infos, actions, layers)
                continue
            report.kept[why] = report.kept.get(why, 0) + 1
            want = MAX16
        _plan_key(key, info.dtype, info.shape, want, infos, actions)
    if not layers:
        raise ModelkitError(f"{name}: has no denoiser Linear weight that ComfyUI's scaled "
                            f"format quantizes ({with_article(rep0.kind)}); use the default "
                            "--format modelkit")
    meta = dict(src.metadata)
    if fmt == cq.COMFY:
        meta[cq.METADATA_KEY] = cq.metadata_entry(layers)
    else:
        marker = cq.marker_key(list(src.infos))
        infos[marker] = tensor_info(marker, dtype, (0,))
        actions[marker] = ("marker", marker)
    report.bytes_out = sum(i.nbytes for i in infos.values())
    return _quantized_source(src, report, infos, actions, target, meta=meta)


def _quantized_source(src: Source, report: QuantizeReport, infos: dict[str, Any],
                      actions: dict[str, tuple[str, str]], target: str,
                      meta: dict[str, str] | None = None) -> PlannedStep:
    pending: dict[str, Any] = {}  # int8 key -> its scale, until the scale is written

    def produce(key: str) -> torch.Tensor:
        action, origin = actions[key]
        if action == "copy":
            return src.get(origin)
        if action == "cast":
            report.n_cast += 1
            return _saturating_cast(report, key, src.get(origin), infos[key].dtype)
        if action in ("conf", "marker"):
            return _constant(action, infos[key].dtype, infos[origin].dtype)
        if action == "scale":
            if origin not in pending:
                produce(origin)
            return pending.pop(origin)
        if action == "scaled":
            return produce_scaled(key)
        return produce_int8(key)

    def produce_scaled(key: str) -> torch.Tensor:
        from modelkit.convert import comfy_quant as cq
        from modelkit.io.dtypes import to_torch

        w = src.get(key)
        dtype = infos[key].dtype
        if dtype == "I8":
            q, scale, err, ref = cq.int8_blockwise(w)
        else:
            q, scale, err, ref = cq.fp8_scaled(w, to_torch(dtype), key)
        report.err_sq += err
        report.ref_sq += ref
        report.errors.append(TensorError(key, relative_l2(err, ref), snr_db(err, ref)))
        report.n_scaled += 1
        pending[key] = scale
        return q

    def produce_int8(key: str) -> torch.Tensor:
        w = src.get(key)
        q, scale, err, ref = int8_quantize(w)
        report.err_sq += err
        report.ref_sq += ref
        report.errors.append(TensorError(key, relative_l2(err, ref), snr_db(err, ref)))
        report.n_int8 += 1
        pending[key] = scale
        return q

    if meta is None:
        meta = dict(src.metadata)
        if target == "int8":
            meta[QUANT_KEY] = json.dumps({"scheme": INT8_SCHEME, "version": INT8_VERSION,
                                          "scale_suffix": SCALE_SUFFIX, "scale_dtype": "F32",
                                          "min_elements": INT8_MIN_ELEMENTS})
    name = source_label(src)
    unchanged = {k: (src, o) for k, (a, o) in actions.items() if a == "copy"}
    out = DerivedSource(f"quantize({name})", infos, meta, produce, src.input_paths,
                        stream=passthrough(unchanged))
    params: dict[str, Any] = {"dtype": target, "policy": report.policy}
    if report.format != MODELKIT:
        params["format"] = report.format
    origins = {k: (None if a in ("scale", "conf", "marker") else (0, o))
               for k, (a, o) in actions.items()}
    return PlannedStep(out, report, "quantize", params, origins)


def _constant(action: str, dtype: str, weight_dtype: str) -> torch.Tensor:
    """A ``comfy_quant`` JSON tensor (``dtype`` U8, for a weight of
    ``weight_dtype``) or the empty legacy ``scaled_fp8`` marker."""
    import torch

    from modelkit.convert import comfy_quant as cq
    from modelkit.io.dtypes import to_torch

    if action == "marker":
        return torch.empty((0,), dtype=to_torch(dtype))
    return cq.conf_tensor(cq.layer_conf(cq.LAYER_FORMATS[weight_dtype]))


@dataclass
class DequantizeReport:
    """What dequantize restored."""

    dtype: str
    scheme: str | None
    n_int8: int = 0
    n_cast: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def dequantize(src: Source, dtype: str = "fp16") -> PlannedStep:
    """Plan a normal checkpoint from an int8 (or fp8) one: int8 weights times
    their scales, every other float tensor cast to ``dtype``.

    Raises:
        ModelkitError: unknown scheme or version, a weight without its scale,
            a file with no int8 or fp8 tensor.
    """
    from modelkit.io.dtypes import parse_user_dtype, to_torch
    from modelkit.io.reader import cast

    st_dtype = parse_user_dtype(dtype)
    if st_dtype not in ("F32", "F16", "BF16"):
        raise ModelkitError(f"dequantize writes fp32, fp16 or bf16, not {dtype}")
    name = source_label(src)
    scheme = _check_scheme(src)
    _refuse_comfy_scaled(src, name)
    from modelkit.io.quantized import dequantized_on_read

    if (not scheme and not dequantized_on_read(src)
            and not any(i.dtype.startswith("F8") for i in src.infos.values())):
        raise ModelkitError(f"{name}: holds no int8 or fp8 tensors, so there is nothing to "
                            "dequantize; use 'modelkit quantize --dtype fp16' (or bf16, fp32) "
                            "to change its precision")
    report = DequantizeReport(dtype, scheme, bytes_in=sum(i.nbytes for i in src.infos.values()))
    infos: dict[str, Any] = {}
    scaled: set[str] = set()
    for key, info in src.infos.items():
        if key.endswith(SCALE_SUFFIX) and key[:-len(SCALE_SUFFIX)] in src.infos and scheme:
            continue
        if info.dtype == "I8" and scheme:
            if key + SCALE_SUFFIX not in src.infos:
                raise ModelkitError(f"{name}: int8 tensor {key!r} has no "
                                    f"{key + SCALE_SUFFIX!r}; the file is damaged")
            scaled.add(key)
            infos[key] = tensor_info(key, st_dtype, info.shape)
        elif info.is_float and parts.part_of(key) != parts.MARKER:
            infos[key] = tensor_info(key, st_dtype, info.shape)
        else:
            infos[key] = info
    report.bytes_out = sum(i.nbytes for i in infos.values())
    target = to_torch(st_dtype)

    def produce(key: str) -> torch.Tensor:
        t = src.get(key)
        if key in scaled:
            report.n_int8 += 1
            return int8_dequantize(t, src.get(key + SCALE_SUFFIX), target)
        if t.is_floating_point() and infos[key].dtype != src.infos[key].dtype:
            report.n_cast += 1
        return cast(t, target)

    meta = {k: v for k, v in src.metadata.items() if k != QUANT_KEY}
    unchanged = {k: (src, k) for k, i in infos.items()
                 if k not in scaled and i.dtype == src.infos[k].dtype}
    out = DerivedSource(f"dequantize({name})", infos, meta, produce, src.input_paths,
                        stream=passthrough(unchanged))
    return PlannedStep(out, report, "dequantize", {"dtype": dtype}, same_origins(infos))


def _check_scheme(src: Source) -> str | None:
    raw = src.metadata.get(QUANT_KEY)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        info = {}
    if info.get("scheme") != INT8_SCHEME or info.get("version") != INT8_VERSION:
        raise ModelkitError(f"{source_label(src)}: quantization {raw!r} is not one this "
                            f"modelkit reads ({INT8_SCHEME} v{INT8_VERSION}); use the "
                            "modelkit version that wrote it")
    return str(info["scheme"])

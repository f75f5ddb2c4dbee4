"""ComfyUI's scaled checkpoints: ``quantize --format comfy`` and ``comfy-legacy``.

What ComfyUI reads (Comfy-Org/ComfyUI):

* ``comfy/utils.py`` ``convert_old_quants``: the safetensors metadata entry
  ``_quantization_metadata`` (JSON ``{"format_version": "1.0", "layers":
  {"<layer>": {"format": ...}}}``) becomes one ``<layer>.comfy_quant`` uint8
  JSON tensor per layer; without it, a ``<prefix>scaled_fp8`` marker tensor
  turns every ``<layer>.scale_weight`` into ``<layer>.weight_scale`` with
  format ``float8_e4m3fn`` (the legacy spelling; a 2-element marker would ask
  for full-precision matmuls). Layer names are the file's own keys without
  ``.weight``: a checkpoint's carry ``model.diffusion_model.``, which
  ``load_state_dict_guess_config`` passes as the prefix.
* ``comfy/ops.py`` ``mixed_precision_ops``: only ``Linear`` (and
  ``Embedding``) layers read ``comfy_quant``; such a layer pops
  ``<layer>.weight`` (cast to the format's ``storage_t``) and
  ``<layer>.weight_scale``, and its bias loads as a normal compute-dtype
  parameter. A layer without ``comfy_quant`` loads its weight cast to the
  compute dtype, so kept layers may stay in any float type. Conv layers are
  plain ``manual_cast`` ops that would use an fp8 weight unscaled: they stay
  in high precision here.
* ``comfy/quant_ops.py`` ``QUANT_ALGOS`` and ``QUANTIZATION.md``:
  ``float8_e4m3fn``/``float8_e5m2`` store the weight in that dtype with a
  float32 scalar ``weight_scale``; dequantized ``W = q.to(dtype) * scale``;
  the scale is ``amax(|W|) / finfo(fp8).max`` (``TensorCoreFP8Layout``).
* ``int8_blockwise`` (``group_size`` 128): ``W[i, j] = q[i, j] *
  scale[i // 128, j // 128]``, ``q`` int8 in [-127, 127], ``scale`` float32
  ``(M/128, N/128)`` = block ``amax / 127`` (the ``BlockWiseINT8Layout`` of
  Comfy-Org/ComfyUI pull request #10864 and Comfy-Org/comfy-kitchen
  ``comfy_kitchen/tensor/int8.py``; written by silveroxides/convert_to_quant).
  Released ComfyUI does not list it in ``QUANT_ALGOS`` (issue #12830:
  "Unsupported quantization format: int8_blockwise"); it loads with
  silveroxides/ComfyUI-QuantOps. Both dimensions must be multiples of 128
  (the layout asserts it); other layers stay in high precision.

modelkit writes both spellings of the per-layer format: the metadata entry
and the ``comfy_quant`` tensors ComfyUI's own ``state_dict()`` saves, so a
loader that skips ``convert_old_quants`` (custom operations) reads it too.
Which layers stay in high precision is the architecture's ``quant_keep``
(:mod:`modelkit.arch.registry`); 1-D tensors (norms, biases) and weights
under :data:`MIN_ELEMENTS` always stay.
"""

from __future__ import annotations

import json
import math
import threading
from typing import TYPE_CHECKING, Any

from modelkit.arch.configs import UNET_PREFIX
from modelkit.errors import ModelkitError
from modelkit.io.source import tensor_info

if TYPE_CHECKING:
    import torch

COMFY = "comfy"
COMFY_LEGACY = "comfy-legacy"
METADATA_KEY = "_quantization_metadata"
FORMAT_VERSION = "1.0"
# safetensors dtype of the weight -> ComfyUI's format name (QUANT_ALGOS)
LAYER_FORMATS = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8_blockwise"}
GROUP = 128  # int8_blockwise block edge
SCALE = "weight_scale"
CONF = "comfy_quant"
LEGACY_SCALE = "scale_weight"
LEGACY_MARKER = "scaled_fp8"
MIN_ELEMENTS = 4096  # smaller matrices gain nothing from 8 bits
CHUNK = 1 << 20


def layer_format(target: str, fmt: str, name: str) -> str:
    """ComfyUI's format name for safetensors dtype ``target`` in ``fmt``.

    Raises:
        ModelkitError: a target the format has no spelling for.
    """
    if fmt == COMFY_LEGACY and target != "F8_E4M3":
        raise ModelkitError(f"{name}: --format comfy-legacy stores fp8_e4m3fn only (ComfyUI's "
                            "scaled_fp8 marker reads every .scale_weight as float8_e4m3fn); "
                            "use --format comfy for fp8_e5m2 and int8")
    if target not in LAYER_FORMATS:
        raise ModelkitError(f"{name}: --format {fmt} stores fp8_e4m3fn, fp8_e5m2 or int8 "
                            "weights; use the default --format modelkit for 16- and 32-bit "
                            "targets")
    return LAYER_FORMATS[target]


def keep_reason(key: str, shape: tuple[int, ...], target: str,
                keep: tuple[str, ...]) -> str | None:
    """Why the denoiser tensor ``key`` stays in high precision, or None when
    it is quantized: not a 2-D ``.weight`` (ComfyUI quantizes Linear layers
    only), small, on the architecture's keep list, or (int8 blockwise) not
    a whole number of 128x128 blocks."""
    rel = key[len(UNET_PREFIX):] if key.startswith(UNET_PREFIX) else key
    if not key.endswith(".weight") or len(shape) != 2:
        return "not a Linear weight"
    if math.prod(shape) < MIN_ELEMENTS:
        return "small"
    if rel.startswith(keep):
        return "first/last layer or embedding"
    if target == "I8" and (shape[0] % GROUP or shape[1] % GROUP):
        return f"not a multiple of {GROUP}x{GROUP} blocks"
    return None


def layer_conf(fmt_name: str) -> dict[str, Any]:
    """One layer's entry in ``_quantization_metadata`` (and its
    ``comfy_quant`` tensor)."""
    return {"format": fmt_name, "group_size": GROUP} if fmt_name == "int8_blockwise" else {
        "format": fmt_name}


def conf_tensor(conf: dict[str, Any]) -> torch.Tensor:
    """A layer's ``comfy_quant`` tensor: its JSON as uint8 bytes, as
    ComfyUI's ``convert_old_quants`` builds it."""
    import torch

    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def plan_layer(key: str, shape: tuple[int, ...], target: str, fmt: str,
               infos: dict[str, Any], actions: dict[str, tuple[str, str]],
               layers: dict[str, dict[str, Any]]) -> None:
    """Add the output tensors of quantized weight ``key``: the weight, its
    scale and (``comfy``) its ``comfy_quant`` tensor."""
    layer = key[:-len(".weight")]
    conf = layer_conf(LAYER_FORMATS[target])
    infos[key] = tensor_info(key, target, shape)
    actions[key] = ("scaled", key)
    scale_shape = (shape[0] // GROUP, shape[1] // GROUP) if target == "I8" else ()
    scale_key = f"{layer}.{LEGACY_SCALE if fmt == COMFY_LEGACY else SCALE}"
    infos[scale_key] = tensor_info(scale_key, "F32", scale_shape)
    actions[scale_key] = ("scale", key)
    if fmt == COMFY:
        conf_key = f"{layer}.{CONF}"
        n_bytes = len(json.dumps(conf).encode("utf-8"))
        infos[conf_key] = tensor_info(conf_key, "U8", (n_bytes,))
        actions[conf_key] = ("conf", key)
    layers[layer] = conf


def marker_key(keys: list[str]) -> str:
    """Where the legacy ``scaled_fp8`` marker goes: beside the denoiser
    (``model.diffusion_model.scaled_fp8`` in a checkpoint)."""
    return UNET_PREFIX + LEGACY_MARKER if any(k.startswith(UNET_PREFIX) for k in keys) else (
        LEGACY_MARKER)


def metadata_entry(layers: dict[str, dict[str, Any]]) -> str:
    """The ``_quantization_metadata`` value."""
    return json.dumps({"format_version": FORMAT_VERSION, "layers": layers})


def decode_table(dtype: torch.dtype) -> torch.Tensor:
    """float32 value of each of the 256 codes of fp8 ``dtype``: decoding by
    table lookup runs about 5x faster on a CPU than torch's fp8 -> float32
    cast (measured 0.65 vs 3.2 ms per 1M values, one thread)."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)


class Fp8Buffers:
    """Reused per-chunk buffers for fp8 rounding with its error measured on
    the same chunk (no allocation per chunk, one decode by table)."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        import torch

        self.dtype = dtype
        self.table = decode_table(dtype).to(device)
        self.x = torch.empty(CHUNK, dtype=torch.float32, device=device)
        self.y = torch.empty(CHUNK, dtype=torch.float32, device=device)
        self.idx = torch.empty(CHUNK, dtype=torch.int32, device=device)

    def amax(self, flat: torch.Tensor) -> float:
        """``max |flat|`` over 1M-element chunks copied to float32 (torch's
        half-precision reductions measured 2-3x slower than copy + float32
        ``aminmax``); NaN when ``flat`` holds one."""
        import torch

        top = 0.0
        for i in range(0, flat.numel(), CHUNK):
            x = self.x[:min(CHUNK, flat.numel() - i)]
            lo, hi = torch.aminmax(x.copy_(flat[i:i + CHUNK]))
            top = max(top, -float(lo), float(hi)) if not (lo.isnan() or hi.isnan()) else (
                math.nan)
            if math.isnan(top):
                break
        return top

    def round(self, src: torch.Tensor, dst: torch.Tensor, inv: float | None, scale: float,
              limit: float) -> tuple[float, float, int]:
        """Store ``src`` (a flat chunk, any float dtype) times ``inv`` in
        ``dst`` (fp8), saturated to ``limit``; return ``(||restored -
        src||^2, ||src||^2, saturated count)`` with restored = ``dst *
        scale``. Saturated values are counted for a plain cast (``inv``
        None); a scaled chunk fits by construction, so its clamp only
        catches the product's last-bit rounding."""
        import torch

        n = src.numel()
        x, y = self.x[:n], self.y[:n]
        x.copy_(src)
        count = 0
        stored = x
        if inv is not None:  # |x| * inv <= limit but for the product's last-bit rounding
            stored = torch.mul(x, inv, out=y).clamp_(-limit, limit)
        else:
            lo, hi = torch.aminmax(x)
            if not (-limit <= float(lo) and float(hi) <= limit):
                count = int((x.abs() > limit).sum())
                stored = y.copy_(x).clamp_(-limit, limit)
        dst.copy_(stored)
        idx = self.idx[:n]
        idx.copy_(dst.view(torch.uint8))
        torch.index_select(self.table, 0, idx, out=y)  # restored, before the scale
        if scale != 1.0:
            y.mul_(scale)
        y.sub_(x)
        return float(torch.dot(y, y)), float(torch.dot(x, x)), count


_LOCAL = threading.local()


def fp8_buffers(dtype: torch.dtype, device: torch.device | str = "cpu") -> Fp8Buffers:
    """This thread's :class:`Fp8Buffers` for ``dtype`` on ``device``, made
    once (a conversion rounds hundreds of tensors: no fresh 12 MB of
    buffers, page faults included, per tensor)."""
    cache: dict[tuple[str, str], Fp8Buffers] = _LOCAL.__dict__.setdefault("fp8", {})
    key = (str(dtype), str(device))
    if key not in cache:
        cache[key] = Fp8Buffers(dtype, device)
    return cache[key]


def fp8_scaled(w: torch.Tensor, dtype: torch.dtype, name: str
               ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Per-tensor scaled fp8 of ``w`` as ComfyUI's ``TensorCoreFP8Layout``:
    ``scale = amax(|w|) / finfo(dtype).max`` (float32 scalar; 1 for an
    all-zero tensor), ``q = fp8(w * (1 / scale))``. Returns ``(q, scale,
    err_sq, ref_sq)``, the sums for ``||q * scale - w||`` and ``||w||``,
    measured on the chunks as they are stored.

    Raises:
        ModelkitError: ``w`` holds NaN or inf (no scale can store it).
    """
    import torch

    flat = w.reshape(-1)
    limit = float(torch.finfo(dtype).max)
    bufs = fp8_buffers(dtype, w.device)
    top = bufs.amax(flat)
    if not math.isfinite(top):
        raise ModelkitError(f"tensor {name!r} holds NaN or inf; a scaled fp8 weight cannot "
                            "store it (repair or drop the tensor first)")
    amax = torch.tensor(top, dtype=torch.float32)
    scale = amax / limit if top > 0 else torch.ones((), dtype=torch.float32)
    s = float(scale)
    inv = float(torch.ones((), dtype=torch.float32) / scale)
    q = torch.empty(w.shape, dtype=dtype, device=w.device)
    out = q.view(-1)
    err = ref = 0.0
    for i in range(0, flat.numel(), CHUNK):
        e, r, _ = bufs.round(flat[i:i + CHUNK], out[i:i + CHUNK], inv, s, limit)
        err, ref = err + e, ref + r
    return q, scale.reshape(()), err, ref


def int8_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``int8_blockwise`` of a 2-D ``w`` whose sides are multiples of 128:
    per 128x128 block ``s = amax / 127`` (1 for an all-zero block), ``q =
    round(w / s)`` in [-127, 127]. Returns ``(q int8, scale float32 (M/128,
    N/128), err_sq, ref_sq)`` with the sums for ``||q * s - w||`` and
    ``||w||``. Rows go through one band of 128 at a time in reused
    buffers."""
    import torch

    m, n = w.shape
    nb = n // GROUP
    q = torch.empty((m, n), dtype=torch.int8, device=w.device)
    scale = torch.empty((m // GROUP, nb), dtype=torch.float32, device=w.device)
    x = torch.empty((GROUP, n), dtype=torch.float32, device=w.device)
    a = torch.empty((GROUP, n), dtype=torch.float32, device=w.device)
    err = ref = 0.0
    for b in range(m // GROUP):
        x.copy_(w[b * GROUP:(b + 1) * GROUP])
        blocks = x.view(GROUP, nb, GROUP)
        ab = a.view(GROUP, nb, GROUP)
        s = torch.abs(blocks, out=ab).amax(dim=(0, 2)).div_(127.0)
        s = torch.where(s > 0, s, torch.ones_like(s))
        torch.div(blocks, s[None, :, None], out=ab).round_().clamp_(-127, 127)
        q[b * GROUP:(b + 1) * GROUP] = a
        scale[b] = s
        ab.mul_(s[None, :, None]).sub_(blocks)  # restored minus original
        err += float(torch.dot(a.view(-1), a.view(-1)))
        ref += float(torch.dot(x.view(-1), x.view(-1)))
    return q, scale, err, ref

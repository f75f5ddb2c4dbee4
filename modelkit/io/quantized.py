"""Quantized safetensors files, read as the float model they stand for.

Three spellings are recognised from the header alone (:func:`quant_view`,
no torch) and dequantized one tensor at a time on read
(:func:`open_safetensors`):

* ComfyUI's current mixed-precision format: ``_quantization_metadata`` JSON
  in the safetensors metadata (``{"layers": {"<layer>": {"format": ...}}}``)
  or a per-layer ``<layer>.comfy_quant`` uint8 JSON tensor, with
  ``<layer>.weight`` stored quantized and ``<layer>.weight_scale`` beside it
  (optional ``weight_scale_2``, ``input_scale``, ``pre_quant_scale``).
  Names from Comfy-Org/ComfyUI ``comfy/quant_ops.py`` (``QUANT_ALGOS``) and
  ``comfy/ops.py`` (``_load_quantized_module``: ``pop_scale("weight_scale")``);
  ``int8_blockwise`` (a ``weight_scale`` of ``(N/128, K/128)``) as
  silveroxides/convert_to_quant writes it.
* ComfyUI's legacy "scaled fp8": a ``scaled_fp8`` marker tensor (under the
  model prefix) and ``<layer>.scale_weight`` (+ ``.scale_input``) beside an
  fp8 ``<layer>.weight``; ComfyUI's ``comfy/utils.py convert_old_quants``
  maps it to the current format (``scale_weight`` -> ``weight_scale``,
  format ``float8_e4m3fn``).
* bitsandbytes 4-bit (NF4/FP4) as diffusers and transformers save it: the
  packed uint8 ``<name>`` with ``<name>.absmax``, ``<name>.quant_map`` and a
  ``<name>.quant_state.bitsandbytes__nf4`` uint8 JSON tensor (quant_type,
  blocksize, dtype, shape; with double quantization ``nested_blocksize``,
  ``nested_offset`` and the tensors ``<name>.nested_absmax``,
  ``<name>.nested_quant_map``): bitsandbytes ``functional.py``
  ``QuantState.as_dict(packed=True)`` / ``from_dict``.

The dequantized source presents the original keys (no scale, absmax or
marker keys), the original shapes and **float32** values: every reference
computes the product in float32 before any cast (ComfyUI multiplies in the
compute dtype, bitsandbytes' kernels in float then cast), so float32 is the
exact value of ``q * scale`` and the command's own output dtype (a merge's
``fp16`` default) decides the rounding once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import BadFileError
from modelkit.io.header import Header, TensorInfo, read_header
from modelkit.textsafe import quoted, shown

if TYPE_CHECKING:
    import torch

    from modelkit.io.source import Source

QUANT_METADATA_KEY = "_quantization_metadata"
COMFY_QUANT_SUFFIX = ".comfy_quant"
LEGACY_MARKER = "scaled_fp8"
BNB_STATE = ".quant_state.bitsandbytes__"
CHUNK = 1 << 20  # values dequantized per step
MAX_JSON_TENSOR = 1 << 16  # bytes of a .comfy_quant / quant_state JSON tensor
# ComfyUI format -> the stored weight dtypes it allows
COMFY_FORMATS = {"float8_e4m3fn": ("F8_E4M3",), "float8_e5m2": ("F8_E5M2",),
                 "int8_tensorwise": ("I8",), "int8_blockwise": ("I8",)}
# formats ComfyUI names that modelkit reports but does not dequantize
COMFY_UNSUPPORTED = ("nvfp4", "mxfp8", "convrot_w4a4", "asym_w4a8_int8")
COMFY_EXTRA = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale",
               "comfy_quant")
# modelkit's own int8 scheme (modelkit.convert.quantize writes it)
INT8_METADATA_KEY = "modelkit.quantization"
INT8_SCHEME = "modelkit.int8.per_channel"
LEGACY_FORMATS = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8"}


@dataclass(frozen=True)
class QuantLayer:
    """One quantized tensor: its presented key and shape and where its parts are.

    Args:
        key: the presented (original) key, e.g. ``x.weight``.
        scheme: what the layer is, for reports (``float8_e4m3fn scaled``,
            ``int8_blockwise``, ``nf4``).
        shape: the original shape.
        data: the stored key of the quantized values.
        scale: the stored key of the scale (``absmax`` for bitsandbytes).
        block: elements per scale block (bitsandbytes; 128 for int8_blockwise).
        state: bitsandbytes' quant_state values (nested offset and block).
        supported: whether modelkit dequantizes it.
    """

    key: str
    scheme: str
    shape: tuple[int, ...]
    data: str
    scale: str
    block: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    supported: bool = True


@dataclass
class QuantView:
    """A quantized file seen as its float model (header only).

    ``infos`` are the presented tensors (original keys, float32 for the
    quantized ones, everything else as stored); ``layers`` the quantized
    ones by presented key; ``spelling`` is ``comfy``, ``comfy-legacy`` or
    ``bitsandbytes``.
    """

    spelling: str
    infos: dict[str, TensorInfo]
    layers: dict[str, QuantLayer]


DEQUANTIZED_NOTE = "quantized layers dequantized on read"
DAMAGED = "; the file is damaged or not in that layout: re-download or re-export it"


def _bad(path: Path, problem: str) -> BadFileError:
    return BadFileError(f"{shown(path, 300)}: {problem}")


def _raw(header: Header, key: str) -> bytes:
    """The stored bytes of a small tensor (a JSON tensor, a scalar)."""
    from modelkit.io.files import open_input_file

    info = header.tensors[key]
    if info.nbytes > MAX_JSON_TENSOR:
        raise _bad(header.path, f"tensor {quoted(key)} is {info.nbytes} bytes; a "
                   "quantization record is at most 64 KiB")
    with open_input_file(header.path) as f:
        f.seek(header.data_start + info.begin)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise _bad(header.path, f"truncated inside tensor {quoted(key)}")
    return raw


def _json_tensor(header: Header, key: str) -> dict[str, Any]:
    info = header.tensors[key]
    if info.dtype not in ("U8", "I8"):
        raise _bad(header.path, f"tensor {quoted(key)} is {info.dtype}; a quantization "
                   "record is a uint8 JSON tensor")
    try:
        value = json.loads(_raw(header, key).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(header.path, f"tensor {quoted(key)} is not JSON text{DAMAGED}") from None
    if not isinstance(value, dict):
        raise _bad(header.path, f"tensor {quoted(key)} is not a JSON object{DAMAGED}")
    return value


def _float_info(key: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(key, "F32", shape, 0, 4 * math.prod(shape))


def _view(header: Header, spelling: str, layers: dict[str, QuantLayer],
          hidden: set[str]) -> QuantView:
    infos: dict[str, TensorInfo] = {}
    for key, info in header.tensors.items():
        if key in hidden:
            continue
        layer = layers.get(key)
        infos[key] = _float_info(key, layer.shape) if layer else info
    return QuantView(spelling, infos, layers)


def _need(header: Header, key: str, what: str) -> TensorInfo:
    info = header.tensors.get(key)
    if info is None:
        raise _bad(header.path, f"{what} needs tensor {quoted(key)}, which is missing; "
                   "the file is incomplete: re-download or re-export it")
    return info


def _check_scale(header: Header, layer: QuantLayer) -> None:
    """Refuse a scale whose size does not fit its weight (hostile files)."""
    data, scale = header.tensors[layer.data], _need(header, layer.scale, layer.key)
    if not scale.is_float:
        raise _bad(header.path, f"scale {quoted(layer.scale)} is {scale.dtype}; a scale "
                   "is a float tensor")
    n = scale.numel
    rows = data.shape[0] if data.shape else 1
    if n == 1 or (n == rows and len(data.shape) >= 1):
        return
    if layer.block and len(data.shape) == 2:
        b = layer.block
        want = (-(-data.shape[0] // b), -(-data.shape[1] // b))
        if tuple(scale.shape) == want:
            return
    raise _bad(header.path, f"scale {quoted(layer.scale)} has shape {list(scale.shape)}, "
               f"which does not fit weight {quoted(layer.data)} {list(data.shape)}{DAMAGED}")


def _comfy_layer_formats(header: Header) -> dict[str, dict[str, Any]] | None:
    raw = header.metadata.get(QUANT_METADATA_KEY)
    confs: dict[str, dict[str, Any]] = {}
    if raw is not None:
        try:
            meta = json.loads(raw)
        except ValueError:
            raise _bad(header.path, f"metadata {QUANT_METADATA_KEY} is not JSON") from None
        layers = meta.get("layers") if isinstance(meta, dict) else None
        if not isinstance(layers, dict):
            raise _bad(header.path, f"metadata {QUANT_METADATA_KEY} has no \"layers\" object")
        for name, conf in layers.items():
            confs[str(name)] = conf if isinstance(conf, dict) else {"format": conf}
    for key in header.tensors:
        name = key[:-len(COMFY_QUANT_SUFFIX)]
        if key.endswith(COMFY_QUANT_SUFFIX) and name not in confs:
            confs[name] = _json_tensor(header, key)
    return confs or None


def _group_size(header: Header, name: str, conf: dict[str, Any]) -> int:
    size = conf.get("group_size", 128)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1 << 20:
        raise _bad(header.path, f"layer {quoted(name)}: group_size {quoted(str(size))} is "
                   f"not a block size{DAMAGED}")
    return size


def _comfy(header: Header, confs: dict[str, dict[str, Any]]) -> QuantView:
    layers: dict[str, QuantLayer] = {}
    hidden: set[str] = set()
    for name, conf in confs.items():
        fmt = str(conf.get("format"))
        weight = f"{name}.weight"
        if weight not in header.tensors:
            if f"{name}.comfy_quant" in header.tensors:
                hidden.add(f"{name}.comfy_quant")
            continue  # ComfyUI skips a layer without weight too
        info = header.tensors[weight]
        supported = fmt in COMFY_FORMATS
        if not supported and fmt not in COMFY_UNSUPPORTED:
            raise _bad(header.path, f"layer {quoted(name)} has quantization format "
                       f"{quoted(fmt)}, which ComfyUI does not name; modelkit reads "
                       f"{', '.join(COMFY_FORMATS)}")
        if supported and info.dtype not in COMFY_FORMATS[fmt]:
            raise _bad(header.path, f"weight {quoted(weight)} is {info.dtype} but its "
                       f"layer says {fmt}")
        block = _group_size(header, name, conf) if fmt == "int8_blockwise" else 0
        layer = QuantLayer(weight, fmt, tuple(info.shape), weight, f"{name}.weight_scale",
                           block, supported=supported)
        if supported:
            _check_scale(header, layer)
        layers[weight] = layer
        hidden |= {f"{name}.{e}" for e in COMFY_EXTRA} & set(header.tensors)
    return _view(header, "comfy", layers, hidden)


def _legacy(header: Header, marker: str) -> QuantView:
    prefix = marker[:-len(LEGACY_MARKER)]
    layers: dict[str, QuantLayer] = {}
    hidden = {marker}
    for key in header.tensors:
        if key.startswith(prefix) and key.endswith((".scale_weight", ".scale_input")):
            hidden.add(key)
        if not key.startswith(prefix) or not key.endswith(".scale_weight"):
            continue
        name = key[:-len(".scale_weight")]
        weight = _need(header, f"{name}.weight", f"scale {quoted(key)}")
        fmt = LEGACY_FORMATS.get(weight.dtype)
        if fmt is None:
            raise _bad(header.path, f"weight {quoted(weight.name)} is {weight.dtype}; a "
                       "scaled_fp8 file stores fp8 or int8 weights beside .scale_weight")
        layer = QuantLayer(weight.name, f"{fmt} scaled", tuple(weight.shape), weight.name, key)
        _check_scale(header, layer)
        layers[weight.name] = layer
    return _view(header, "comfy-legacy", layers, hidden)


def _bnb_layer(header: Header, state_key: str) -> tuple[QuantLayer, set[str]]:
    base = state_key[:state_key.index(BNB_STATE)]
    state = _json_tensor(header, state_key)
    quant_type = str(state.get("quant_type", state_key.rsplit("__", 1)[-1]))
    data = _need(header, base, f"bitsandbytes state {state_key!r}")
    shape_value, block = state.get("shape"), state.get("blocksize")
    if not (isinstance(shape_value, list) and all(isinstance(d, int) and d >= 0
                                                  for d in shape_value)) \
            or not isinstance(block, int) or block <= 0 or block % 2:
        raise _bad(header.path, f"bitsandbytes state {quoted(state_key)} lacks a valid "
                   f"shape or blocksize{DAMAGED}")
    shape = tuple(shape_value)
    n = math.prod(shape)
    absmax, qmap = _need(header, f"{base}.absmax", base), _need(header, f"{base}.quant_map",
                                                                base)
    nested = f"{base}.nested_absmax" in header.tensors
    ok = (data.dtype == "U8" and data.numel == -(-n // 2) and qmap.numel == 16
          and qmap.dtype == "F32" and absmax.numel == -(-n // block)
          and absmax.dtype == ("U8" if nested else "F32"))
    if nested:
        nblock = state.get("nested_blocksize")
        nabs = header.tensors[f"{base}.nested_absmax"]
        nmap = _need(header, f"{base}.nested_quant_map", base)
        ok = ok and isinstance(nblock, int) and nblock > 0 \
            and isinstance(state.get("nested_offset"), (int, float)) \
            and nabs.dtype == "F32" and nabs.numel == -(-absmax.numel // nblock) \
            and nmap.dtype == "F32" and nmap.numel == 256
    if not ok:
        raise _bad(header.path, f"bitsandbytes tensor {quoted(base)}: the packed data, "
                   "absmax or quant_map do not fit its quant_state (shape "
                   f"{list(shape)}, blocksize {block}){DAMAGED}")
    parts = {state_key, f"{base}.absmax", f"{base}.quant_map", f"{base}.nested_absmax",
             f"{base}.nested_quant_map"} & set(header.tensors)
    return QuantLayer(base, quant_type, shape, base, f"{base}.absmax", block, state), parts


def _bnb(header: Header, states: list[str]) -> QuantView:
    layers: dict[str, QuantLayer] = {}
    hidden: set[str] = set()
    for key in states:
        layer, parts = _bnb_layer(header, key)
        layers[layer.key] = layer
        hidden |= parts
    return _view(header, "bitsandbytes", layers, hidden)


def quant_view(header: Header) -> QuantView | None:
    """The float model a quantized safetensors file stands for, from its
    header (and its small JSON records), or None for a plain file.

    Raises:
        BadFileError: a quantized file whose records do not fit its tensors.
    """
    states = [k for k in header.tensors if BNB_STATE in k]
    if states:
        return _bnb(header, states)
    confs = _comfy_layer_formats(header)
    if confs is not None:
        return _comfy(header, confs)
    markers = [k for k in header.tensors if k == LEGACY_MARKER
               or k.endswith("." + LEGACY_MARKER)]
    if markers:
        return _legacy(header, min(markers, key=len))
    return None


def modelkit_int8_layers(header: Header) -> dict[str, str] | None:
    """Storage per key of a file in modelkit's own int8 scheme
    (``modelkit.int8.per_channel``, written by ``modelkit quantize --dtype
    int8``; the ``dequantize`` operation restores it): ``int8 per_channel``
    for each I8 weight with its ``<key>_scale``, the dtype for the others,
    the scales left out. None for any other file."""
    raw = header.metadata.get(INT8_METADATA_KEY)
    try:
        info = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("scheme") != INT8_SCHEME:
        return None
    suffix = str(info.get("scale_suffix", "_scale"))
    tensors = header.tensors
    scales = {k + suffix for k, i in tensors.items() if i.dtype == "I8" and k + suffix in tensors}
    return {k: "int8 per_channel" if k + suffix in scales else i.dtype
            for k, i in tensors.items() if k not in scales}


def layer_quantization(path: str | os.PathLike[str]) -> dict[str, str]:
    """How each tensor of a model file is stored, by its presented key:
    the quantization (``Q4_K``, ``float8_e4m3fn scaled``, ``int8_blockwise``,
    ``nf4``) or the plain dtype (``F32``, ``BF16``...). For any input the
    format table opens: safetensors (quantized or not), GGUF, pickles,
    diffusers folders.

    Raises:
        BadFileError: unreadable or inconsistent file.
    """
    from modelkit.io.formats import input_format

    p = Path(path)
    fmt = input_format(p)
    if fmt.name == "gguf":
        from modelkit.io.gguf_header import read_gguf_header

        return {k: t.ggml_type for k, t in read_gguf_header(p).tensors.items()}
    if fmt.name == "safetensors":
        header = read_header(p)
        view = quant_view(header)
        if view is not None:
            return view_layers(view)
        return modelkit_int8_layers(header) or {k: i.dtype for k, i in header.tensors.items()}
    infos, _ = fmt.read_header(p)
    return {k: i.dtype for k, i in infos.items()}


def view_layers(view: QuantView) -> dict[str, str]:
    """Storage per presented key of a quantized file."""
    return {k: view.layers[k].scheme if k in view.layers else i.dtype
            for k, i in view.infos.items()}


def quantization_summary(layers: dict[str, str]) -> dict[str, int]:
    """Tensors per storage (``{"Q4_K": 412, "F32": 88}``), most first."""
    counts: dict[str, int] = {}
    for scheme in layers.values():
        counts[scheme] = counts.get(scheme, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --- dequantization (torch) ---------------------------------------------------


def _broadcast_scale(scale: torch.Tensor, shape: tuple[int, ...], block: int
                     ) -> torch.Tensor:
    """A scale shaped to multiply a weight of ``shape``: a scalar, one per
    row, or one per ``block`` x ``block`` tile (int8_blockwise)."""
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.dim() == 2 and block and len(shape) == 2 and \
            tuple(scale.shape) != (shape[0], 1):
        return scale.repeat_interleave(block, 0)[:shape[0]] \
            .repeat_interleave(block, 1)[:, :shape[1]]
    return scale.reshape((shape[0],) + (1,) * (len(shape) - 1))


def dequantize_scaled(weight: torch.Tensor, scale: torch.Tensor, block: int = 0
                      ) -> torch.Tensor:
    """ComfyUI's dequantization ``weight * scale`` in float32 (fp8 or int8
    weight; scalar, per-row or per-block scale)."""
    import torch

    w = weight.to(torch.float32)
    s = _broadcast_scale(scale.to(torch.float32), tuple(w.shape), block)
    return w.mul_(s)


def _blockwise(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, block: int,
               n: int) -> torch.Tensor:
    """``code[codes[i]] * absmax[i // block]`` for ``i < n``, in float32,
    :data:`CHUNK` values at a time (the index temporaries stay small)."""
    import torch

    table = code.to(torch.float32)
    scales = absmax.to(torch.float32).reshape(-1)
    flat = codes.reshape(-1)
    out = torch.empty(n, dtype=torch.float32)
    step = max(1, CHUNK // block) * block
    for start in range(0, n, step):
        stop = min(start + step, n)
        part = table[flat[start:stop].long()]
        first, whole = start // block, (stop - start) // block
        body = part[:whole * block].view(whole, block)
        body.mul_(scales[first:first + whole].reshape(-1, 1))
        if whole * block < stop - start:  # the last, partial block
            part[whole * block:].mul_(scales[first + whole])
        out[start:stop] = part
    return out


def dequantize_bnb4(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                    block: int, shape: tuple[int, ...],
                    nested: tuple[torch.Tensor, torch.Tensor, int, float] | None = None
                    ) -> torch.Tensor:
    """bitsandbytes ``dequantize_4bit`` in torch: two codes per byte, the
    high nibble first, each ``quant_map[code] * absmax[block]``; with double
    quantization the absmax is itself ``nested_quant_map[byte] *
    nested_absmax[i // nested_block] + offset`` (bitsandbytes
    ``functional.py dequantize_4bit`` / ``dequantize_blockwise``)."""
    import torch

    n = math.prod(shape)
    if nested is not None:
        nabs, nmap, nblock, offset = nested
        absmax = _blockwise(absmax, nmap, nabs, nblock, absmax.numel())
        absmax += torch.tensor(offset, dtype=torch.float32)
    b = packed.reshape(-1).to(torch.uint8)
    codes = torch.stack([b >> 4, b & 0x0F], dim=1).reshape(-1)
    return _blockwise(codes, quant_map, absmax, block, n).reshape(shape)


def _produce(src: Any, layer: QuantLayer) -> torch.Tensor:
    if layer.state:  # bitsandbytes
        base = layer.data
        nested = None
        if f"{base}.nested_absmax" in src.infos:
            nested = (src.get(f"{base}.nested_absmax"), src.get(f"{base}.nested_quant_map"),
                      int(layer.state["nested_blocksize"]), float(layer.state["nested_offset"]))
        return dequantize_bnb4(src.get(base), src.get(layer.scale), src.get(f"{base}.quant_map"),
                               layer.block, layer.shape, nested)
    return dequantize_scaled(src.get(layer.data), src.get(layer.scale), layer.block)


def dequantized_source(src: Any, view: QuantView) -> Source:
    """``src`` (an open quantized safetensors file) presented as ``view``:
    each quantized tensor dequantized to float32 when it is read.

    Raises:
        BadFileError: a layer in a format modelkit does not dequantize.
    """
    from modelkit.io.source import DerivedSource

    for layer in view.layers.values():
        if not layer.supported:
            raise _bad(src.path, f"layer {quoted(layer.key)} is {layer.scheme}, which "
                       "modelkit does not dequantize; it reads "
                       f"{', '.join(COMFY_FORMATS)}, scaled fp8 and bitsandbytes nf4/fp4")
    device = src.device

    def produce(key: str) -> torch.Tensor:
        layer = view.layers.get(key)
        if layer is None:
            return src.get(key)
        return _produce(src, layer).to(device)

    # the record of which layers are quantized goes: the tensors are float now
    meta = {k: v for k, v in src.metadata.items() if k != QUANT_METADATA_KEY}
    note = f"{DEQUANTIZED_NOTE} ({view.spelling}, {len(view.layers)} layers)"
    out = DerivedSource(str(src.path), dict(view.infos), meta, produce, (src.path,), [note],
                        quantized_layers={k: layer.scheme for k, layer in view.layers.items()})
    out.close = src.close  # type: ignore[attr-defined]
    return out


def dequantized_on_read(src: Source) -> str | None:
    """What :func:`dequantized_source` dequantizes on read in ``src``
    (``quantized layers dequantized on read: float8_e4m3fn scaled 300``), or
    None for a source with no quantized layers."""
    layers: dict[str, str] = getattr(src, "quantized_layers", {})
    if not layers:
        return None
    counts = quantization_summary(layers)
    return f"{DEQUANTIZED_NOTE}: " + ", ".join(f"{k} {n}" for k, n in counts.items())


def open_safetensors(path: Path, device: str = "cpu") -> Source:
    """Open a safetensors file; a quantized one (see the module docstring)
    is dequantized on read.

    Raises:
        BadFileError: unreadable, truncated or inconsistent file.
    """
    from modelkit.io.reader import open_model

    src = open_model(path, device)
    view = quant_view(read_header(path))
    if view is None:
        return src
    try:
        return dequantized_source(src, view)
    except BaseException:
        src.close()
        raise

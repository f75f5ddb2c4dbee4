"""The convert operations by name, with their parameters: what the CLI
commands and recipe ``op:`` steps both call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelkit.convert.base import Converted
from modelkit.errors import ModelkitError
from modelkit.io.source import Source

REQUIRED = object()


@dataclass(frozen=True)
class OpSpec:
    """A convert operation: how many models it takes and its parameters
    (name -> (allowed types, default or :data:`REQUIRED`))."""

    name: str
    n_models: int
    params: dict[str, tuple[tuple[type, ...], Any]]
    build: Callable[[list[Source], dict[str, Any]], Converted]
    doc: str


def _dtype_or_none(value: str | None) -> str | None:
    from modelkit.io.dtypes import parse_user_dtype

    if value is None or value == "keep":
        return None
    st = parse_user_dtype(value)
    if st not in ("F32", "F16", "BF16"):
        raise ModelkitError(f"dtype {value!r}: prune writes fp32, fp16 or bf16; use "
                            "quantize for fp8 and int8")
    return st


def _prune(src: list[Source], p: dict[str, Any]) -> Converted:
    from modelkit.convert.prune import prune

    return prune(src[0], keep_ema=p["keep_ema"], dtype=_dtype_or_none(p["dtype"]))


def _ema(src: list[Source], p: dict[str, Any]) -> Converted:
    from modelkit.convert.ema import select_ema

    return select_ema(src[0])


def _components(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [c.strip() for c in value.split(",") if c.strip()]
    return tuple(value)


def _quantize(src: list[Source], p: dict[str, Any]) -> Converted:
    from modelkit.convert.quantize import quantize

    return quantize(src[0], p["dtype"], components=_components(p["components"]))


def _dequantize(src: list[Source], p: dict[str, Any]) -> Converted:
    from modelkit.convert.quantize import dequantize

    return dequantize(src[0], p["dtype"])


def _swap(src: list[Source], p: dict[str, Any]) -> Converted:
    from modelkit.convert.components import swap

    return swap(src[0], src[1], p["component"])


def _extract(src: list[Source], p: dict[str, Any]) -> Converted:
    from modelkit.convert.components import extract

    return extract(src[0], p["component"])


OPS: dict[str, OpSpec] = {
    "prune": OpSpec("prune", 1, {"keep_ema": ((bool,), False), "dtype": ((str,), None)},
                    _prune, "keep UNet, VAE, text encoders and markers; drop the rest"),
    "ema": OpSpec("ema", 1, {}, _ema, "put the EMA weights in place of the UNet weights"),
    "quantize": OpSpec("quantize", 1, {"dtype": ((str,), REQUIRED),
                                       "components": ((list, str), None)},
                       _quantize, "store components at fp16/bf16/fp32/fp8/int8"),
    "dequantize": OpSpec("dequantize", 1, {"dtype": ((str,), "fp16")}, _dequantize,
                         "restore an int8/fp8 file to fp16/bf16/fp32"),
    "swap": OpSpec("swap", 2, {"component": ((str,), "vae")}, _swap,
                   "replace a component with the second model's"),
    "extract": OpSpec("extract", 1, {"component": ((str,), REQUIRED)}, _extract,
                      "keep one component only"),
}


def get_op(name: str) -> OpSpec:
    """The operation called ``name``."""
    try:
        return OPS[name]
    except KeyError:
        raise ModelkitError(f"unknown operation {name!r}; known: {', '.join(OPS)}") from None


def check_op_params(spec: OpSpec, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with defaults filled in; a one-line error names a missing,
    unknown or wrongly typed parameter."""
    out: dict[str, Any] = {}
    for key in params:
        if key not in spec.params:
            allowed = ", ".join(spec.params) or "none"
            raise ModelkitError(f"{spec.name} has no parameter {key!r} (allowed: {allowed})")
    for key, (types, default) in spec.params.items():
        if key not in params or params[key] is None:
            if default is REQUIRED:
                raise ModelkitError(f"{spec.name} needs parameter {key!r}")
            out[key] = default
            continue
        value = params[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in types)
            raise ModelkitError(f"{spec.name} parameter {key!r} must be a {names}, "
                                f"got {value!r}")
        out[key] = value
    return out


def apply_op(name: str, sources: list[Source], params: dict[str, Any]) -> Converted:
    """Plan operation ``name`` over ``sources`` (no tensor is read yet)."""
    spec = get_op(name)
    if len(sources) != spec.n_models:
        raise ModelkitError(f"{name} takes {spec.n_models} model(s), got {len(sources)}")
    return spec.build(sources, check_op_params(spec, params))

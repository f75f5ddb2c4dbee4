"""Completeness of families without an LDM key table: the file's keys
against the table the architecture declares, at the widths and depths the
file shows (``static.keys.transformer``).

Flux.1 (original/BFL layout): the width from ``img_in``, the head width
from the q/k norms, the MLP ratio, the text input widths and the depths
from the block numbers; the key table is :func:`modelkit.arch.flux.transformer_keys`
(the guidance embedder when the file has any of its keys). A dropped key
or a block with a missing tensor fails by name.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from modelkit.arch.configs import UNET_PREFIX
from modelkit.core.verify_thresholds import FAIL, PASS, WARN
from modelkit.verify.report import Check

if TYPE_CHECKING:
    from modelkit.arch.flux import FluxConfig
    from modelkit.io.header import TensorInfo
    from modelkit.verify.models import ModelUnderTest

LIST = 5
NAME = "static.keys.transformer"


def _depth(keys: dict[str, tuple[int, ...]], block: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(rf"{block}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def flux_config_of(keys: dict[str, tuple[int, ...]]) -> FluxConfig | None:
    """The Flux.1 config the (unprefixed, original-layout) keys show."""
    from modelkit.arch import flux

    img_in = keys.get("img_in.weight")
    norm = keys.get("double_blocks.0.img_attn.norm.query_norm.scale")
    mlp = keys.get("double_blocks.0.img_mlp.0.weight")
    vec = keys.get("vector_in.in_layer.weight")
    txt = keys.get("txt_in.weight")
    if img_in is None or norm is None or mlp is None or vec is None or txt is None:
        return None
    hidden = img_in[0]
    out = keys.get("final_layer.linear.weight")
    return replace(flux.FluxConfig(), in_channels=img_in[1], hidden_size=hidden,
                   out_channels=out[0] if out else 64, num_heads=hidden // norm[0],
                   mlp_ratio=mlp[0] / hidden, vec_in_dim=vec[1], context_in_dim=txt[1],
                   depth=_depth(keys, "double_blocks"),
                   depth_single_blocks=_depth(keys, "single_blocks"),
                   guidance_embed=any(k.startswith("guidance_in.") for k in keys))


def _denoiser_keys(infos: dict[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    prefixed = any(k.startswith(UNET_PREFIX) for k in infos)
    if prefixed:
        return {k[len(UNET_PREFIX):]: tuple(i.shape) for k, i in infos.items()
                if k.startswith(UNET_PREFIX)}
    return {k: tuple(i.shape) for k, i in infos.items()}


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - LIST} more" if len(keys) > LIST else ""
    return ", ".join(keys[:LIST]) + more


def flux_keys_check(model: ModelUnderTest) -> Check:
    """The Flux.1 transformer's keys and shapes against the declared table."""
    from modelkit.arch import flux

    have = _denoiser_keys(model.render_source.infos)
    cfg = flux_config_of(have)
    if cfg is None:
        return Check(NAME, FAIL, "Flux.1 transformer: the embedders or the first double "
                     "block are missing, so its widths are unknown", "incomplete")
    want = flux.transformer_keys(cfg)
    missing = [k for k in want if k not in have]
    wrong = [k for k, s in want.items() if k in have and have[k] != tuple(s)]
    extra = [k for k in have if k not in want]
    value = {"tensors": len(have), "missing": len(missing), "wrong_shape": len(wrong)}
    if missing or wrong:
        parts = ([f"{len(missing)} missing: {_names(missing)}"] if missing else []) + \
                ([f"{len(wrong)} wrong shape: {_names(wrong)}"] if wrong else [])
        return Check(NAME, FAIL, "Flux.1 transformer: " + "; ".join(parts), value)
    if extra:
        return Check(NAME, WARN, f"Flux.1 transformer: {len(extra)} unexpected: "
                     f"{_names(extra)}", value)
    return Check(NAME, PASS, f"Flux.1 transformer, complete (depth {cfg.depth}+"
                 f"{cfg.depth_single_blocks}, width {cfg.hidden_size})", value)


CHECKS = {"flux": flux_keys_check}


def family_checks(model: ModelUnderTest) -> list[Check]:
    """The completeness checks of the model's family (none when it has none,
    or the file is a standalone VAE or text encoder the family uses: inspect
    checks those against their own tables)."""
    if model.report.kind not in ("checkpoint", "unet"):
        return []
    fn = CHECKS.get(model.report.arch)
    return [fn(model)] if fn is not None else []

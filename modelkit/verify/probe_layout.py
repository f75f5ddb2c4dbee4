"""A diffusers-layout Flux.1 transformer seen in the original (BFL) layout,
one tensor at a time, so that the probe compares a conversion with its
source block by block: the fused ``qkv`` and ``linear1`` weights are
concatenated back from diffusers' split ones, the final adaLN halves
swapped back (the inverse of :func:`modelkit.arch.to_diffusers.flux_map`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from modelkit.arch.flux import FluxConfig
from modelkit.arch.to_diffusers import Piece, flux_map

if TYPE_CHECKING:
    import torch

    from modelkit.io.source import DerivedSource, Source

Shape = tuple[int, ...]


def _count(keys: Mapping[str, Shape], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def flux_config_from_diffusers(keys: Mapping[str, Shape]) -> FluxConfig:
    """The Flux.1 config of a diffusers-layout transformer (unprefixed keys)."""
    h, in_ch = keys["x_embedder.weight"]
    head = keys["transformer_blocks.0.attn.norm_q.weight"][0]
    t = "time_text_embed"
    return FluxConfig(in_channels=in_ch, out_channels=keys["proj_out.weight"][0],
                      vec_in_dim=keys[f"{t}.text_embedder.linear_1.weight"][1],
                      context_in_dim=keys["context_embedder.weight"][1], hidden_size=h,
                      num_heads=h // head,
                      depth=_count(keys, r"transformer_blocks\.(\d+)\."),
                      depth_single_blocks=_count(keys, r"single_transformer_blocks\.(\d+)\."),
                      guidance_embed=f"{t}.guidance_embedder.linear_1.weight" in keys)


def original_view(source: Source, prefix: str = "") -> DerivedSource:
    """``source`` (a diffusers-layout Flux.1 transformer under ``prefix``) as
    the BFL layout, unprefixed; each tensor is built when read."""
    from modelkit.io.source import DerivedSource, source_label, tensor_info

    keys = {k[len(prefix):]: tuple(i.shape) for k, i in source.infos.items()
            if k.startswith(prefix)}
    key_map = flux_map(flux_config_from_diffusers(keys))
    parts: dict[str, list[tuple[str, Piece]]] = {}
    for target, piece in key_map.items():
        parts.setdefault(piece.source, []).append((target, piece))
    infos = {}
    for original, pieces in parts.items():
        first = keys[pieces[0][0]]
        rows = sum(keys[t][0] for t, _ in pieces)
        dtype = source.infos[prefix + pieces[0][0]].dtype
        infos[original] = tensor_info(original, dtype, (rows, *first[1:]))

    def produce(key: str) -> torch.Tensor:
        import torch

        pieces = sorted(parts[key], key=lambda tp: tp[1].rows[0] if tp[1].rows else 0)
        tensors = [source.get(prefix + t) for t, _ in pieces]
        out = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if pieces[0][1].swap:
            first, second = out.chunk(2, 0)
            out = torch.cat([second, first], 0)
        return out

    return DerivedSource(f"{source_label(source)} (BFL layout)", infos,
                         dict(source.metadata), produce, source.input_paths)


def as_original(source: Source, layout: str | None) -> Source:
    """``source`` itself, or its original-layout view when it is a
    diffusers-layout Flux.1 transformer (bare or under
    ``model.diffusion_model.``)."""
    from modelkit.arch.configs import UNET_PREFIX

    if layout != "diffusers":
        return source
    prefix = UNET_PREFIX if f"{UNET_PREFIX}x_embedder.weight" in source.infos else ""
    return original_view(source, prefix) if f"{prefix}x_embedder.weight" in source.infos \
        else source


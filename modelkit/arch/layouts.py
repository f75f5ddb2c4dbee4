"""The original <-> diffusers layout of a transformer, both ways, from one map.

Each family with two layouts has one original -> diffusers key map
(:mod:`modelkit.arch.to_diffusers`: for every diffusers key, the original
key, the row slice it takes and whether its two halves swap). A
:class:`Plan` says, for every output key, its shape and the row ranges of
input tensors whose concatenation it is:

* original -> diffusers: a diffusers tensor is one row range of an original
  tensor, or (``swap``) its second half followed by its first;
* diffusers -> original (the inverse, derived from the same map): an
  original tensor is the concatenation of its pieces in row order, each
  piece's halves swapped back where the map swaps them.

Rows are the first axis, so every range is a contiguous run of bytes: a
writer streams it without loading the tensor. The config each map is built
for is read from the file's own key names and shapes (:func:`family_map`).
Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from modelkit.arch import chroma, flux, flux2, sd3, wan, z_image
from modelkit.arch import to_diffusers as td
from modelkit.errors import ModelkitError

ORIGINAL, DIFFUSERS = "original", "diffusers"
LAYOUTS = (ORIGINAL, DIFFUSERS)
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of input tensor ``key``."""

    key: str
    start: int
    stop: int


@dataclass(frozen=True)
class Target:
    """One output tensor: its shape and the input rows it is made of, in order."""

    shape: Shape
    segments: tuple[Segment, ...]


Plan = dict[str, Target]


def rows_of(shape: Shape) -> int:
    """The rows of a tensor of ``shape`` (its first axis; a scalar is one row)."""
    return shape[0] if shape else 1


# --- the config of a file, from its keys ----------------------------------------


def _count(keys: Mapping[str, Shape], pattern: str) -> int:
    """How many of ``pattern.format(0)``, ``pattern.format(1)``... are keys."""
    n = 0
    while pattern.format(n) in keys:
        n += 1
    return n


def _dim(keys: Mapping[str, Shape], key: str, where: str) -> int:
    shape = keys.get(key)
    if not shape:
        raise ModelkitError(f"{where}: has no {key!r}; it is not a complete transformer")
    return shape[0]


def _flux(keys: Mapping[str, Shape], layout: str, where: str) -> td.KeyMap:
    if layout == ORIGINAL:
        h = _dim(keys, "img_in.weight", where)
        single = _count(keys, "single_blocks.{}.linear1.weight")
        mlp = _dim(keys, "single_blocks.0.linear1.weight", where) - 3 * h if single else 4 * h
        names = ("double_blocks.{}.img_attn.qkv.weight", "guidance_in.in_layer.weight")
    else:
        h = _dim(keys, "x_embedder.weight", where)
        single = _count(keys, "single_transformer_blocks.{}.proj_mlp.weight")
        mlp = _dim(keys, "single_transformer_blocks.0.proj_mlp.weight", where) if single \
            else 4 * h
        names = ("transformer_blocks.{}.attn.to_q.weight",
                 "time_text_embed.guidance_embedder.linear_1.weight")
    cfg = replace(flux.FluxConfig(), hidden_size=h, mlp_ratio=mlp / h,
                  depth=_count(keys, names[0]), depth_single_blocks=single,
                  guidance_embed=names[1] in keys)
    return td.flux_map(cfg)


def _sd3(keys: Mapping[str, Shape], layout: str, where: str) -> td.KeyMap:
    b, x = (("joint_blocks.{}.x_block", "attn.ln_q") if layout == ORIGINAL
            else ("transformer_blocks.{}", "attn.norm_q"))
    qkv = ".attn.qkv.weight" if layout == ORIGINAL else ".attn.to_q.weight"
    qkv2 = qkv.replace("attn.", "attn2.")
    depth = _count(keys, b + qkv)
    if not depth:
        _dim(keys, b.format(0) + qkv, where)
    cfg = sd3.SD3Config(depth=depth, qk_norm=f"{b.format(0)}.{x}.weight" in keys,
                        attn2_layers=_count(keys, b + qkv2))
    return td.sd3_map(cfg)


def _chroma(keys: Mapping[str, Shape], layout: str, where: str) -> td.KeyMap:
    g = "distilled_guidance_layer.layers.{}"
    if layout == ORIGINAL:
        h = _dim(keys, "img_in.weight", where)
        names = ("double_blocks.{}.img_attn.qkv.weight", "single_blocks.{}.linear1.weight",
                 g + ".in_layer.weight")
    else:
        h = _dim(keys, "x_embedder.weight", where)
        names = ("transformer_blocks.{}.attn.to_q.weight",
                 "single_transformer_blocks.{}.proj_mlp.weight", g + ".linear_1.weight")
    cfg = replace(chroma.ChromaConfig(), hidden_size=h, depth=_count(keys, names[0]),
                  depth_single_blocks=_count(keys, names[1]),
                  approximator_layers=_count(keys, names[2]))
    return td.chroma_map(cfg)


def _flux2(keys: Mapping[str, Shape], layout: str, where: str) -> td.KeyMap:
    if layout == ORIGINAL:
        h = _dim(keys, "img_in.weight", where)
        names = ("double_blocks.{}.img_attn.qkv.weight", "single_blocks.{}.linear1.weight")
    else:
        h = _dim(keys, "x_embedder.weight", where)
        names = ("transformer_blocks.{}.attn.to_q.weight",
                 "single_transformer_blocks.{}.attn.to_qkv_mlp_proj.weight")
    cfg = replace(flux2.Flux2Config(), hidden_size=h, depth=_count(keys, names[0]),
                  depth_single_blocks=_count(keys, names[1]))
    return td.flux2_map(cfg)


def _z_image(keys: Mapping[str, Shape], layout: str, where: str) -> td.KeyMap:
    embed, qkv = (("x_embedder.weight", "attention.qkv") if layout == ORIGINAL
                  else ("all_x_embedder.2-1.weight", "attention.to_q"))
    cfg = replace(z_image.ZImageConfig(), dim=_dim(keys, embed, where),
                  num_layers=_count(keys, "layers.{}." + qkv + ".weight"),
                  num_refiner_layers=_count(keys, "noise_refiner.{}." + qkv + ".weight"))
    return td.z_image_map(cfg)


def _wan(keys: Mapping[str, Shape], layout: str, where: str) -> td.KeyMap:
    q, img, vace = (("blocks.{}.self_attn.q.weight", "img_emb.proj.1.weight",
                     "vace_blocks.{}.after_proj.weight") if layout == ORIGINAL
                    else ("blocks.{}.attn1.to_q.weight",
                          "condition_embedder.image_embedder.ff.net.0.proj.weight",
                          "vace_blocks.{}.proj_out.weight"))
    # the VACE blocks' count is all the map needs (which blocks take their
    # hints is the model's config, not a key)
    cfg = replace(wan.WanConfig(), dim=_dim(keys, "patch_embedding.weight", where),
                  num_layers=_count(keys, q), i2v=img in keys,
                  vace_layers=tuple(range(_count(keys, vace))))
    return td.wan_map(cfg)


# family -> map of a file in a layout (the families with two layouts; Qwen-Image
# has one: its single files keep diffusers' names)
MAPS: dict[str, Callable[[Mapping[str, Shape], str, str], td.KeyMap]] = {
    "flux": _flux, "sd3": _sd3, "chroma": _chroma, "flux2": _flux2, "z_image": _z_image,
    "wan": _wan}
# original keys a family's files may carry that the model never reads and
# diffusers' converter drops: left out of the diffusers file
UNUSED: dict[str, tuple[str, ...]] = {"z_image": td.Z_IMAGE_UNUSED}


def family_map(family: str, keys: Mapping[str, Shape], layout: str, where: str
               ) -> td.KeyMap:
    """The original -> diffusers map for ``family`` at the size of ``keys``
    (a transformer's keys and shapes, unprefixed, in ``layout``).

    Raises:
        ModelkitError: a key the sizes are read from is missing.
    """
    return MAPS[family](keys, layout, where)


# --- plans ------------------------------------------------------------------------


def _unknown(keys: Iterable[str], known: Mapping[str, object] | set[str], where: str,
             layout: str) -> None:
    extra = next((k for k in keys if k not in known), None)
    if extra is not None:
        raise ModelkitError(f"{where}: key {extra!r} is not part of this transformer's "
                            f"{layout} layout; remove it (or extract the transformer) and "
                            "convert again")


def _mismatch(where: str, key: str, shape: Shape) -> ModelkitError:
    return ModelkitError(f"{where}: {key!r} has shape {list(shape)}, which does not fit "
                         "the transformer its other keys describe; the file is damaged or "
                         "of another model")


def _tiles(where: str, key: str, shape: Shape, ranges: list[tuple[int, int]]) -> None:
    """``ranges`` must cover rows 0..n of ``key`` once each, in order."""
    stop = 0
    for start, end in sorted(ranges):
        if start != stop or end <= start:
            raise _mismatch(where, key, shape)
        stop = end
    if stop != rows_of(shape):
        raise _mismatch(where, key, shape)


def _halves(key: str, start: int, stop: int, swap: bool) -> tuple[Segment, ...]:
    if not swap:
        return (Segment(key, start, stop),)
    half = start + (stop - start) // 2
    return Segment(key, half, stop), Segment(key, start, half)


def to_diffusers(key_map: td.KeyMap, shapes: Mapping[str, Shape], where: str,
                 unused: tuple[str, ...] = ()) -> Plan:
    """The diffusers tensors of an original-layout transformer (``shapes``:
    its keys, unprefixed); ``unused`` keys are left out.

    Raises:
        ModelkitError: a key outside the map, a missing key, or a shape that
            does not split as the map says.
    """
    used = set(td.sources(key_map))
    _unknown((k for k in shapes if k not in unused), used, where, ORIGINAL)
    missing = next((k for k in used if k not in shapes), None)
    if missing is not None:
        raise ModelkitError(f"{where}: has no {missing!r}; it is not a complete transformer")
    plan: Plan = {}
    ranges: dict[str, list[tuple[int, int]]] = {}
    for target, piece in key_map.items():
        shape = shapes[piece.source]
        start, stop = piece.rows or (0, rows_of(shape))
        if piece.swap and (stop - start) % 2:
            raise _mismatch(where, piece.source, shape)
        ranges.setdefault(piece.source, []).append((start, stop))
        plan[target] = Target((stop - start, *shape[1:]) if shape else shape,
                              _halves(piece.source, start, stop, piece.swap))
    for key, found in ranges.items():
        _tiles(where, key, shapes[key], found)
    return plan


def to_original(key_map: td.KeyMap, shapes: Mapping[str, Shape], where: str) -> Plan:
    """The original tensors of a diffusers-layout transformer (``shapes``: its
    keys, unprefixed), the inverse of :func:`to_diffusers` for the same map.

    Raises:
        ModelkitError: a key outside the map, a missing key, or pieces that do
            not join (other widths, rows not as the map says).
    """
    _unknown(shapes, key_map, where, DIFFUSERS)
    missing = next((k for k in key_map if k not in shapes), None)
    if missing is not None:
        raise ModelkitError(f"{where}: has no {missing!r}; it is not a complete transformer")
    pieces: dict[str, list[tuple[int, str]]] = {}
    for target, piece in key_map.items():
        pieces.setdefault(piece.source, []).append(
            (piece.rows[0] if piece.rows else 0, target))
    plan: Plan = {}
    for source, parts in pieces.items():
        parts.sort()
        first = shapes[parts[0][1]]
        segments: list[Segment] = []
        rows = 0
        for start, target in parts:
            piece, shape = key_map[target], shapes[target]
            n = rows_of(shape)
            if start != rows or shape[1:] != first[1:] or (
                    piece.rows is not None and piece.rows[1] - piece.rows[0] != n) or (
                    piece.swap and n % 2) or (not shape and len(parts) > 1):
                raise _mismatch(where, target, shape)
            segments += _halves(target, 0, n, piece.swap)
            rows += n
        plan[source] = Target((rows, *first[1:]) if first else first, tuple(segments))
    return plan


def plan(family: str, shapes: Mapping[str, Shape], layout: str, to: str, where: str) -> Plan:
    """The plan that takes a ``family`` transformer (``shapes``: its keys,
    unprefixed) from ``layout`` to ``to``."""
    key_map = family_map(family, shapes, layout, where)
    if to == DIFFUSERS:
        return to_diffusers(key_map, shapes, where, UNUSED.get(family, ()))
    return to_original(key_map, shapes, where)

"""LoRA block weights in the conventions users know (sd-webui-lora-block-weight,
SuperMerger's LoRA tab, kohya ``--lbws``), as data.

Two list lengths per architecture:

* the full lists of :func:`modelkit.arch.blocks.block_names`: 26 values for
  SD1/SD2 (``BASE, IN00..IN11, M00, OUT00..OUT11``), 20 for SDXL;
* the short lists that name only the blocks holding a Transformer2D (what a
  plain kohya LoRA patches): 17 values for SD1/SD2 (``BASE, IN01, IN02, IN04,
  IN05, IN07, IN08, M00, OUT03..OUT11``), 12 for SDXL (``BASE, IN04, IN05,
  IN07, IN08, M00, OUT00..OUT05``). They are derived from the UNet configs
  (levels whose ``transformer_depth`` is non-zero).

``BASE`` is the text encoder(s). Blocks a short list does not name (IN00,
down/upsampler blocks, SD1's OUT00..OUT02) hold only ResBlocks, stems and
samplers, which only LoCon/LyCORIS modules patch; they keep weight 1, as
the LoRA Block Weight extension does when it widens a short list. Give a
full list (or a mapping) to weight them.

Named presets are the LoRA Block Weight extension's defaults for the 17-block
list (``NONE``, ``ALL``, ``INS``, ``IND``, ``INALL``, ``MIDD``, ``OUTD``,
``OUTS``, ``OUTALL``, ``ALL0.5``). For SDXL modelkit defines the same names by
the same rule over its 12 blocks (IN shallow/deep halves, the first OUT level
as "OUT deep", the last as "OUT shallow").

Keys map to blocks with :func:`modelkit.arch.blocks.block_of` (SuperMerger's
map): text encoders -> BASE, ``time_embed``/``label_emb`` -> IN00, ``out.*``
-> the last OUT block.
"""

from __future__ import annotations

from functools import lru_cache

from modelkit.arch.blocks import BASE, MID, block_names, parse_blocks
from modelkit.arch.configs import ARCHS
from modelkit.arch.registry import lora_archs
from modelkit.errors import ModelkitError

LBW_ARCHS = lora_archs(block_weights=True)

# preset -> values over the short list; one row per architecture family
_PRESETS_17: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
_PRESETS_12: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
PRESET_NAMES = tuple(_PRESETS_17)


def _check(arch: str) -> None:
    if arch not in LBW_ARCHS:
        raise ModelkitError(f"no LoRA block weights for {arch!r}; known: "
                            f"{', '.join(LBW_ARCHS)}")


def _check_own(arch: str) -> None:
    from modelkit.arch import registry

    entry = registry.get(arch)
    if entry is None or entry.lora is None or not entry.lora.block_weights:
        own = registry.names(where=lambda a: a.lora is not None and a.lora.block_weights
                             and a.spec is None)
        raise ModelkitError(f"no LoRA block weights for {arch!r}; known: "
                            f"{', '.join(LBW_ARCHS + own)}")


@lru_cache(maxsize=8)
def attention_blocks(arch: str) -> tuple[str, ...]:
    """The short block list of ``arch``: BASE, the IN and OUT blocks that hold
    a Transformer2D, and M00 (17 names for SD1/SD2, 12 for SDXL)."""
    _check(arch)
    unet = ARCHS[arch].unet
    per_level = unet.num_res_blocks
    ins, outs = [], []
    idx = 1
    for depth in unet.transformer_depth:
        for _ in range(per_level):
            if depth:
                ins.append(f"IN{idx:02d}")
            idx += 1
        idx += 1  # the downsampler block
    idx = 0
    for level in range(len(unet.transformer_depth) - 1, -1, -1):
        for _ in range(per_level + 1):
            if unet.transformer_depth[level]:
                outs.append(f"OUT{idx:02d}")
            idx += 1
    return (BASE, *ins, MID, *outs)


def lbw_presets(arch: str) -> dict[str, list[float]]:
    """Preset name -> values over :func:`attention_blocks` for ``arch``."""
    _check(arch)
    table = _PRESETS_12 if arch == "sdxl" else _PRESETS_17
    return {name: [float(v) for v in row.split(",")] for name, row in table.items()}


def _widen(values: list[float], arch: str) -> dict[str, float]:
    out = dict.fromkeys(block_names(arch), 1.0)
    out.update(zip(attention_blocks(arch), values, strict=True))
    return out


def _as_list(spec: object) -> list[object] | None:
    if isinstance(spec, list | tuple):
        return list(spec)
    if isinstance(spec, str) and "," in spec and "=" not in spec and ":" not in spec:
        return [s.strip() for s in spec.split(",")]
    return None


def _unknown_word(spec: str) -> bool:
    """A single word that is neither a number nor a block preset."""
    from modelkit.arch.blocks import PRESET_DOCS

    text = spec.strip()
    if any(c in text for c in ",=:") or text.lower() in PRESET_DOCS:
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False


def parse_lora_blocks(spec: object, arch: str) -> dict[str, float]:
    """Per-block LoRA weights for ``arch`` (every name of
    :func:`modelkit.arch.blocks.block_names`), from:

    * a preset name (case-insensitive): ``NONE``, ``ALL``, ``INS``, ``IND``,
      ``INALL``, ``MIDD``, ``OUTD``, ``OUTS``, ``OUTALL``, ``ALL0.5``;
    * a short list (17 values for SD1/SD2, 12 for SDXL; blocks it does not
      name keep 1) or a full list (26 / 20), as a list or comma string;
    * anything :func:`modelkit.arch.blocks.parse_blocks` accepts (a number,
      a mapping such as ``"BASE=0,IN=0.5,default=1"``).

    A transformer family with its own block map (every one the registry
    declares ``block_weights`` for: Flux.1, Chroma, Flux.2, SD3, Qwen-Image,
    Wan, Z-Image) takes its merge block specs: its block names (the original
    layout's; a diffusers-layout key maps to the same block), groups and
    presets (``double_only``, ``gradient_in_to_out``...).
    """
    from modelkit.arch.blocks import has_own_map

    if has_own_map(arch):
        _check_own(arch)
        return parse_blocks(spec, arch)
    _check(arch)
    if isinstance(spec, str) and spec.strip().upper() in PRESET_NAMES:
        return _widen(lbw_presets(arch)[spec.strip().upper()], arch)
    if isinstance(spec, str) and _unknown_word(spec):
        raise ModelkitError(f"unknown LoRA block weight preset '{spec.strip()}'; known: "
                            f"{', '.join(PRESET_NAMES)} (or {len(attention_blocks(arch))}/"
                            f"{len(block_names(arch))} values, or NAME=VALUE,...)")
    items = _as_list(spec)
    if items is not None and len(items) == len(attention_blocks(arch)):
        from modelkit.arch.blocks import _number

        values = [_number(v, f"block value {i + 1} ({n})")
                  for i, (v, n) in enumerate(zip(items, attention_blocks(arch), strict=True))]
        return _widen(values, arch)
    if items is not None and len(items) != len(block_names(arch)):
        short, full = len(attention_blocks(arch)), len(block_names(arch))
        raise ModelkitError(f"LoRA block list for {arch} has {len(items)} values; expected "
                            f"{short} ({', '.join(attention_blocks(arch))}) or {full} "
                            f"(BASE, IN.., M00, OUT..), or a preset: {', '.join(PRESET_NAMES)}")
    return parse_blocks(spec, arch)


__all__ = ["PRESET_NAMES", "attention_blocks", "lbw_presets", "parse_lora_blocks"]

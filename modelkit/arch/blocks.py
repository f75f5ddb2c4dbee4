"""Per-block weights ("MBW") for SD1, SD2, SDXL and the SDXL refiner, as data.

Block lists
    * SD1, SD2 and the SDXL refiner: 26 blocks ``BASE, IN00..IN11, M00,
      OUT00..OUT11``. The refiner UNet has four resolution levels with two
      res-blocks each, so it has 12 input and 12 output blocks like SD1; it
      uses the 26-block list (SuperMerger has no refiner table; this is the
      list its key structure implies).
    * SDXL: 20 blocks ``BASE, IN00..IN08, M00, OUT00..OUT08``.
    * These are the weights A1111's SuperMerger counts (26 and 20 UNet-side
      weights). Merges add an optional ``VAE`` entry last (``vae_slot=True``;
      27 values for the 26-block list, 21 for SDXL, as in SuperMerger's and
      sd-mecha's extended SDXL tables; modelkit allows it for every
      architecture). When no value is given for ``VAE`` it takes the ``BASE``
      value, which is what a list without the entry means anyway (the VAE is
      then part of BASE). Every text that counts blocks says so the same way:
      :func:`count_text` ("26 weights (27 with the optional VAE entry)").

The counts come from the UNet configs in :mod:`modelkit.arch.configs`
(``len(channel_mult) * (num_res_blocks + 1)`` input and output blocks).

Key -> block maps (hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py``
``blockfromkey``; ljleb/sd-mecha ``sd_mecha/extensions/builtin/model_configs/``
``convert_sd1_blocks.py`` and ``convert_sdxl_blocks.py``)
    Keys are parsed structurally: ``model.diffusion_model.<part>[.<N>].`` where
    ``<part>`` is the first dotted component, so ``out.`` is never confused
    with ``to_out.``, ``proj_out.`` or ``out_layers``, and ``input_blocks.10``
    is never read as ``input_blocks.1``.

    ======================================  ===============  ===============
    key (after ``model.diffusion_model.``)  ``supermerger``  ``mecha``
    ======================================  ===============  ===============
    ``time_embed.*``, ``label_emb.*``       IN00             BASE
    ``input_blocks.N.*``                    INnn             INnn
    ``middle_block.*``                      M00              M00
    ``output_blocks.N.*``                   OUTnn            OUTnn
    ``out.*`` (final norm and conv)         last OUT         last OUT
    any other UNet key                      BASE             last OUT
    ======================================  ===============  ===============

    Outside the UNet both maps agree: ``first_stage_model.*`` (the VAE) goes
    to ``VAE`` when the list has that slot, else to ``BASE``; everything else
    (text encoders, EMA copies, schedule buffers, ...) goes to ``BASE``.

    ``"supermerger"`` (default) follows SuperMerger's ``blockfromkey`` (sd-meh
    is identical for SD1). ``"mecha"`` follows sd-mecha's block conversion
    configs, which send the embeddings to BASE and unmatched UNet keys to the
    last OUT block. Only single-file (LDM/SGM) key names are recognised.

Families without an LDM UNet declare their own block map in the registry
(:class:`~modelkit.arch.registry.BlockMap`: names, key -> block function,
no VAE entry) from one :class:`~modelkit.arch.family_blocks.PrefixBlocks`
each (ComfyUI's block-merge names, both layouts, groups and generated
presets: Flux.1, SD3, Qwen-Image, Wan, Chroma, Flux.2, Z-Image); the
functions here use it for those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from modelkit.arch.configs import ARCHS, UNET_PREFIX, VAE_PREFIX
from modelkit.errors import ModelkitError

MAPS = ("supermerger", "mecha")
DEFAULT_MAP = "supermerger"
BASE = "BASE"
MID = "M00"
VAE = "VAE"
DEFAULT_KEY = "default"


# --- block lists --------------------------------------------------------------


def _own(arch: str) -> Any:
    """The registry's BlockMap of a family that declares its own (no LDM UNet
    config), or None."""
    if arch in ARCHS:
        return None
    from modelkit.arch import registry

    entry = registry.get(arch)
    return entry.blocks if entry is not None and entry.spec is None else None


def has_own_map(arch: str) -> bool:
    """Whether ``arch`` declares its own block map (Flux.1's 63 names)."""
    return _own(arch) is not None


def _table(arch: str) -> Any:
    """The :class:`~modelkit.arch.family_blocks.PrefixBlocks` of a family
    with its own block map, or None."""
    own = _own(arch)
    return None if own is None else own.table


def _own_presets(arch: str) -> dict[str, str] | None:
    """Preset docs of a family with its own block map (generated from its
    groups), or None."""
    table = _table(arch)
    return None if table is None else table.preset_docs()


def presets_of(arch: str) -> dict[str, str]:
    """Preset names and docs for ``arch``'s block list."""
    return _own_presets(arch) or PRESET_DOCS


def any_preset(name: str) -> bool:
    """Whether ``name`` is a preset of some block list (a recipe is checked
    against the inputs' own list when they are read)."""
    from modelkit.arch.family_blocks import FAMILIES

    return name in PRESET_DOCS or any(name in t.preset_docs() for t in FAMILIES.values())


@lru_cache(maxsize=16)
def _n_io(arch: str) -> int:
    """Number of input (= output) blocks of ``arch``'s UNet."""
    if arch not in ARCHS:
        known = ", ".join(ARCHS)
        raise ModelkitError(f"unknown architecture '{arch}' for block weights; known: {known}")
    unet = ARCHS[arch].unet
    return len(unet.channel_mult) * (unet.num_res_blocks + 1)


def _ins(arch: str) -> list[str]:
    return [f"IN{i:02d}" for i in range(_n_io(arch))]


def _outs(arch: str) -> list[str]:
    return [f"OUT{i:02d}" for i in range(_n_io(arch))]


def block_names(arch: str, vae_slot: bool = False) -> list[str]:
    """Block names of ``arch`` in list order: ``BASE``, the IN blocks, ``M00``,
    the OUT blocks and, with ``vae_slot``, ``VAE`` (a family with its own map:
    its names, never a VAE entry)."""
    own = _own(arch)
    if own is not None:
        return list(own.names)
    names = [BASE, *_ins(arch), MID, *_outs(arch)]
    return [*names, VAE] if vae_slot else names


def _describe(arch: str, vae_slot: bool) -> str:
    """A compact description of the block list, for error messages."""
    own = _own(arch)
    if own is not None:
        return _describe_own(list(own.names))
    n = _n_io(arch) - 1
    text = f"BASE, IN00..IN{n:02d}, M00, OUT00..OUT{n:02d}"
    return text + ", VAE" if vae_slot else text


def _describe_own(names: list[str]) -> str:
    """``img_in, ..., double_blocks.0..18, single_blocks.0..37, final_layer``."""
    out: list[str] = []
    for name in names:
        head, _, idx = name.rpartition(".")
        if head and idx.isdigit() and out and out[-1].startswith(head + "."):
            first = out[-1].split("..")[0]
            out[-1] = f"{first}..{idx}"
        else:
            out.append(name)
    return ", ".join(out)


def count_text(arch: str, vae_slot: bool = True) -> str:
    """How many block weights ``arch`` takes, in the one wording every
    message and document uses: ``26 weights (BASE, IN00..IN11, M00,
    OUT00..OUT11; 27 with the optional VAE entry last)``."""
    n = len(block_names(arch))
    if _own(arch) is not None:
        return f"{n} weights ({_describe(arch, False)})"
    text = f"{n} weights ({_describe(arch, False)}"
    return f"{text}; {n + 1} with the optional VAE entry last)" if vae_slot else text + ")"


def group_text(arch: str) -> str:
    """``DOUBLE (double_blocks.0..18), SINGLE (...), ...``: the groups a
    transformer family's ``--blocks`` mapping may name ("" for the SD lists,
    whose groups are IN, OUT and MID)."""
    table = _table(arch)
    if table is None:
        return ""
    return ", ".join(f"{g} ({_describe_own(names)})" for g, names in table.groups().items()
                     if names)


def weights_title(weights: Mapping[str, float]) -> str:
    """``26 blocks`` or ``26 blocks + the VAE entry``: the size of a resolved
    block-weight table, counted the way the block lists are."""
    n = len(weights) - int(VAE in weights)
    return f"{n} blocks" + (" + the VAE entry" if VAE in weights else "")


# --- key -> block -------------------------------------------------------------


def _unet_block(rest: str, arch: str, map_name: str) -> str:
    """Block of a UNet key given without the ``model.diffusion_model.`` prefix."""
    parts = rest.split(".")
    head = parts[0]
    last_out = f"OUT{_n_io(arch) - 1:02d}"
    if head in ("time_embed", "label_emb"):
        return "IN00" if map_name == "supermerger" else BASE
    if head == "middle_block":
        return MID
    if head == "out":
        return last_out
    if head in ("input_blocks", "output_blocks") and len(parts) > 2 and parts[1].isdigit():
        n = int(parts[1])
        if n < _n_io(arch):
            return f"{'IN' if head == 'input_blocks' else 'OUT'}{n:02d}"
    return BASE if map_name == "supermerger" else last_out


def block_of(key: str, arch: str, map_name: str = DEFAULT_MAP, vae_slot: bool = False) -> str:
    """The block a checkpoint key belongs to under block map ``map_name``
    (``"supermerger"`` or ``"mecha"``; see the module docstring). VAE keys go
    to ``VAE`` only when ``vae_slot`` is set, else to ``BASE``."""
    own = _own(arch)
    if own is not None:
        return own.key_to_block(key, arch, map_name, vae_slot)
    if map_name not in MAPS:
        raise ModelkitError(f"unknown block map '{map_name}'; known: {', '.join(MAPS)}")
    _n_io(arch)  # validates arch
    if key.startswith(UNET_PREFIX):
        return _unet_block(key[len(UNET_PREFIX):], arch, map_name)
    if vae_slot and key.startswith(VAE_PREFIX):
        return VAE
    return BASE


# --- presets ------------------------------------------------------------------

PRESET_DOCS: dict[str, str] = {
    "flat_0": "0 everywhere (keep model A)",
    "flat_1": "1 everywhere (take model B)",
    "flat_half": "0.5 everywhere",
    "unet_only": "1 on every UNet block (IN, M00, OUT), 0 on BASE",
    "base_only": "1 on BASE (the text encoders, and the VAE unless its own entry is given), "
                 "0 elsewhere",
    "in_only": "1 on the IN blocks, 0 elsewhere",
    "mid_only": "1 on M00, 0 elsewhere",
    "out_only": "1 on the OUT blocks, 0 elsewhere",
    "in_half": "0.5 on the IN blocks, 0 elsewhere",
    "out_half": "0.5 on the OUT blocks, 0 elsewhere",
    "in_mid": "1 on the IN blocks and M00, 0 elsewhere",
    "mid_out": "1 on M00 and the OUT blocks, 0 elsewhere",
    "gradient_in_to_out": "0 at IN00 rising linearly (by UNet block position) to 1 at the "
                          "last OUT block; BASE 0",
    "gradient_out_to_in": "1 at IN00 falling linearly to 0 at the last OUT block; BASE 0",
    "gradient_v": "1 at IN00 falling linearly to 0 at M00, rising back to 1 at the last OUT "
                  "block; BASE 0",
    "gradient_a": "0 at IN00 rising linearly to 1 at M00, falling back to 0 at the last OUT "
                  "block; BASE 0",
}
"""Preset names and what their values mean. Values are the weight of the
method parameter (for ``weighted_sum``'s alpha: how much of model B). Presets
are generated from a rule for each block list; the UNet position runs over
IN00..M00..last OUT (25 positions for SD1, 19 for SDXL). ``VAE``, when the
entry exists, takes the BASE value like any spec that does not name it."""


def _unet_shape(name: str, pos: int, n_unet: int, mid: int) -> float:
    """The value of preset ``name`` at UNet position ``pos`` (0 = IN00)."""
    frac = pos / (n_unet - 1)
    dist = abs(pos - mid) / mid
    rules = {
        "flat_0": 0.0, "flat_1": 1.0, "flat_half": 0.5, "unet_only": 1.0, "base_only": 0.0,
        "in_only": float(pos < mid), "mid_only": float(pos == mid),
        "out_only": float(pos > mid), "in_half": 0.5 * (pos < mid),
        "out_half": 0.5 * (pos > mid), "in_mid": float(pos <= mid),
        "mid_out": float(pos >= mid), "gradient_in_to_out": frac,
        "gradient_out_to_in": 1.0 - frac, "gradient_v": dist, "gradient_a": 1.0 - dist,
    }
    return rules[name]


_BASE_VALUE = {"flat_1": 1.0, "flat_half": 0.5, "base_only": 1.0}


def preset_names() -> list[str]:
    """Names of the built-in presets."""
    return list(PRESET_DOCS)


def preset(name: str, arch: str, *, vae_slot: bool = False) -> dict[str, float]:
    """The block weights of preset ``name`` for ``arch``."""
    own = _own_presets(arch)
    if own is not None:
        if name not in own:
            raise ModelkitError(f"unknown block preset '{name}' for {arch}; known: "
                                f"{', '.join(own)}")
        return dict(_table(arch).preset(name))
    if name not in PRESET_DOCS:
        raise ModelkitError(f"unknown block preset '{name}'; known: {', '.join(PRESET_DOCS)}")
    unet = block_names(arch)[1:]
    mid = unet.index(MID)
    out = {BASE: _BASE_VALUE.get(name, 0.0)}
    for pos, block in enumerate(unet):
        out[block] = float(_unet_shape(name, pos, len(unet), mid))
    if vae_slot:
        out[VAE] = out[BASE]
    return out


# --- parsing ------------------------------------------------------------------


def _number(value: object, what: str) -> float:
    """``value`` as a finite float, or a ModelkitError naming ``what``."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ModelkitError(f"{what}: '{value}' is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelkitError(f"{what}: {value!r} is not a number")
    if not math.isfinite(value):
        raise ModelkitError(f"{what}: {value} is not a finite number")
    return float(value)


def _from_list(values: Sequence[object], arch: str, vae_slot: bool) -> dict[str, float]:
    names = block_names(arch, vae_slot)
    vae_slot = vae_slot and VAE in names
    lengths = {len(names), len(names) - 1} if vae_slot else {len(names)}
    if len(values) not in lengths:
        hint = ""
        if len(values) == len(names) - 1 - int(vae_slot) and BASE in names:
            hint = " (the first value is BASE; did you leave it out?)"
        raise ModelkitError(f"block list for {arch} has {len(values)} values; expected "
                            f"{count_text(arch, vae_slot)}{hint}")
    out = {n: _number(v, f"block value {i + 1} ({n})")
           for i, (n, v) in enumerate(zip(names, values, strict=False))}
    if vae_slot:
        out.setdefault(VAE, out[BASE])
    return out


def _range(item: str, names: list[str], arch: str, vae_slot: bool) -> list[str]:
    """Blocks selected by one mapping key: a name, a group or a range."""
    key = item.strip().upper()
    upper = {n.upper(): n for n in names}
    table = _table(arch)
    if table is not None:
        groups = table.groups()
        hint = table.group_hint()
    else:
        groups = {"IN": _ins(arch), "OUT": _outs(arch), "MID": [MID], "M": [MID]}
        hint = "groups IN, OUT, MID, ranges like 'IN00-IN05'"
    if key in groups:
        return groups[key]
    if key in upper:
        return [upper[key]]
    if "-" in key:
        lo, hi = (upper.get(s.strip(), s.strip()) for s in key.split("-", 1))
        if table is not None and hi.isdigit() and "." in lo:  # double_blocks.0-5
            hi = f"{lo.rpartition('.')[0]}.{int(hi)}"
        if lo in names and hi in names:
            i, j = names.index(lo), names.index(hi)
            if i > j:
                raise ModelkitError(f"block range '{item}' is reversed; write "
                                    f"'{hi}-{lo}'")
            return names[i:j + 1]
    raise ModelkitError(f"unknown block '{item}' for {arch}; use names from "
                        f"{_describe(arch, vae_slot)}, {hint} or '{DEFAULT_KEY}'")


def _specificity(item: str, names: list[str]) -> int:
    """2 for single names, 1 for ranges, 0 for groups (higher wins)."""
    key = item.strip().upper()
    if key in {n.upper() for n in names}:
        return 2
    return 1 if "-" in key else 0


def _from_mapping(spec: Mapping[Any, object], arch: str, vae_slot: bool
                  ) -> dict[str, float]:
    names = block_names(arch, vae_slot)
    chosen: dict[str, tuple[int, float, str]] = {}
    default = None
    for raw_key, raw_value in spec.items():
        item = str(raw_key)
        value = _number(raw_value, f"block '{item}'")
        if item.strip().lower() in (DEFAULT_KEY, "*"):
            default = value
            continue
        level = _specificity(item, names)
        for block in _range(item, names, arch, vae_slot):
            prev = chosen.get(block)
            if prev and prev[0] == level and prev[1] != value:
                raise ModelkitError(f"blocks '{prev[2]}' and '{item}' both set {block} "
                                    f"with different values")
            if prev is None or level > prev[0]:
                chosen[block] = (level, value, item)
    return _fill(names, {b: v for b, (_, v, _) in chosen.items()}, default, arch, vae_slot)


def _fill(names: list[str], given: dict[str, float], default: float | None, arch: str,
          vae_slot: bool) -> dict[str, float]:
    """Complete a partial block map with ``default`` (VAE follows BASE)."""
    out: dict[str, float] = {}
    for name in names:
        if name in given:
            out[name] = given[name]
        elif name == VAE and BASE in out:
            out[name] = out[BASE]
        elif default is not None:
            out[name] = default
    missing = [n for n in names if n not in out]
    if missing:
        raise ModelkitError(f"no value for blocks {', '.join(missing)} of {arch}; give them "
                            f"or a '{DEFAULT_KEY}' value")
    return out


def _from_string(spec: str, arch: str, vae_slot: bool) -> dict[str, float]:
    text = spec.strip()
    if text.lower() in presets_of(arch):
        return preset(text.lower(), arch, vae_slot=vae_slot)
    items = [s.strip() for s in text.split(",")]
    if any(("=" in s or ":" in s) for s in items):
        pairs: dict[str, str] = {}
        for s in items:
            sep = "=" if "=" in s else ":"
            if sep not in s:
                raise ModelkitError(f"block item '{s}' must be NAME=VALUE like the others")
            k, v = s.split(sep, 1)
            pairs[k.strip()] = v
        return _from_mapping(pairs, arch, vae_slot)
    if len(items) == 1:
        try:
            value = _number(items[0], "block value")
        except ModelkitError:
            raise ModelkitError(f"unknown block preset '{text}'; known: "
                                f"{', '.join(presets_of(arch))}") from None
        return flat(value, arch, vae_slot=vae_slot)
    return _from_list(items, arch, vae_slot)


def flat(value: float, arch: str, *, vae_slot: bool = False) -> dict[str, float]:
    """The same value for every block."""
    return dict.fromkeys(block_names(arch, vae_slot), float(value))


def parse_blocks(spec: object, arch: str, *, vae_slot: bool = False) -> dict[str, float]:
    """Per-block values for ``arch`` from any accepted spec, in list order.

    Accepted forms:

    * a number: the same value for every block;
    * a list or tuple of ``len(block_names(arch, vae_slot))`` numbers in list
      order (BASE, IN.., M00, OUT.., [VAE]); with ``vae_slot`` the VAE value
      may be left off (it then takes BASE's value);
    * a comma-separated string of the same (``"0,0.1,0.2,..."``);
    * a preset name (:data:`PRESET_DOCS`);
    * a mapping (or a string ``"IN=1,OUT00-OUT03=0.5,default=0"``; ``:`` works
      as well as ``=``) whose keys are block names (``M00``), inclusive
      ranges in list order (``IN00-IN05``, ``IN08-OUT02``), groups (``IN``,
      ``OUT``, ``MID``) or ``default`` for every block not otherwise given.
      Names are case-insensitive. A single name beats a range, which beats a
      group, which beats ``default``, so ``{"OUT": 0.5, "OUT11": 1}`` works.
      Without ``default`` every block must be covered (except ``VAE``, which
      follows BASE).

    Errors (one line, naming the offending item): wrong list length, a
    non-number, an unknown block or preset name, a reversed range, two
    equally specific entries that disagree, uncovered blocks.
    """
    if isinstance(spec, bool):
        raise ModelkitError(f"block weights: {spec!r} is not a number, list or preset")
    if isinstance(spec, int | float):
        return flat(_number(spec, "block value"), arch, vae_slot=vae_slot)
    if isinstance(spec, str):
        return _from_string(spec, arch, vae_slot)
    if isinstance(spec, Mapping):
        return _from_mapping(spec, arch, vae_slot)
    if isinstance(spec, list | tuple):
        return _from_list(spec, arch, vae_slot)
    raise ModelkitError(f"block weights: cannot read {type(spec).__name__}; give a list, a "
                        "comma-separated string, a mapping or a preset name")

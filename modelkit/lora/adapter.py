"""Open an adapter file: group its tensors into modules, tell the algorithm of
each module and find the checkpoint weight it patches.

Every naming is resolved by table lookup (:mod:`modelkit.arch.lora_names`):
kohya/LyCORIS (``lora_unet_``, ``lora_te_``/``lora_te1_``/``lora_te2_``; SD1/SD2
with diffusers paths, SDXL with LDM paths, either style accepted), PEFT and
diffusers (``unet.``/``text_encoder.``/``text_encoder_2.`` with ``lora_A``/
``lora_B``, ``.lora.down``, ``lora_linear_layer``, the old
``processor.to_q_lora`` spelling, ``base_model.model.``) and ComfyUI-native
(``diffusion_model.``, ``text_encoders.clip_l|clip_h|clip_g.transformer.``).
A kohya ``lora_te_`` name on SDXL means the first text encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit.arch import registry
from modelkit.arch.adapter_keys import ALGO_SUFFIXES, split_key
from modelkit.arch.configs import ARCHS, ArchSpec
from modelkit.arch.lora_modules import lookup, table_of
from modelkit.arch.lora_names import (
    NAMINGS,
    ModuleTarget,
    lora_module_targets,
    norm_module_targets,
)
from modelkit.errors import ModelkitError
from modelkit.io.source import Source, source_label

if TYPE_CHECKING:
    import torch

LORA_ARCHS = registry.lora_archs()
NORM_SUFFIXES = ("w_norm", "b_norm")
# suffix aliases: every LoRA spelling -> kohya's
DOWN = "lora_down.weight"
UP = "lora_up.weight"
MID = "lora_mid.weight"
LORA_ALIASES = {
    "lora_A.weight": DOWN, "lora.down.weight": DOWN, "lora_linear_layer.down.weight": DOWN,
    "lora_B.weight": UP, "lora.up.weight": UP, "lora_linear_layer.up.weight": UP,
    "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
}


@dataclass
class AdapterModule:
    """One adapter module: its tensors (canonical suffix -> file key), its
    algorithm and the checkpoint weight it patches (None when not found)."""

    name: str
    algo: str  # lora, loha, lokr, full, norm, ia3
    keys: dict[str, str]
    target: ModuleTarget | None = None
    peft_scale: float | None = None  # lora_alpha / r from diffusers' adapter metadata

    @property
    def is_text(self) -> bool:
        """True for a text-encoder module."""
        return self.target is not None and self.target.component != "unet"


@dataclass
class Adapter:
    """An adapter file read as modules."""

    source: Source
    arch: str  # sd1, sd2, sdxl or unknown
    format: str  # as :func:`modelkit.inspect.adapters.detect_adapter` says
    naming: str
    modules: dict[str, AdapterModule]
    unmatched: list[str] = field(default_factory=list)  # tensor keys with no target
    evidence: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The file name, for messages."""
        return Path(source_label(self.source)).name

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor of the adapter."""
        return self.source.get(key)

    def alpha_source(self, mod: AdapterModule) -> str:
        """Where the module's alpha comes from: its ``alpha`` tensor (or a
        ``scale`` tensor), the header metadata (lora_alpha / r), or none
        (alpha = rank: scale 1)."""
        if "scale" in mod.keys:
            return "scale tensor"
        if "alpha" in mod.keys:
            return "tensor"
        return "header metadata" if mod.peft_scale is not None else "none (alpha = rank)"

    def alpha(self, mod: AdapterModule) -> float | None:
        """The module's stored alpha (None when absent)."""
        key = mod.keys.get("alpha")
        if key is None:
            return None
        return float(self.get(key).reshape(-1)[0])


def _algo(suffixes: set[str]) -> str | None:
    if suffixes & set(NORM_SUFFIXES) and not suffixes & {"diff"}:
        return "norm"
    if "on_input" in suffixes:
        return "ia3"
    for algo, known in ALGO_SUFFIXES.items():
        if algo != "ia3" and suffixes & {LORA_ALIASES.get(s, s) for s in known}:
            return algo
    return None


def _group(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Module name -> {canonical suffix: key}, and the keys that fit no module."""
    groups: dict[str, dict[str, str]] = {}
    loose: list[str] = []
    for key in keys:
        parts = split_key(key)
        if parts is None:
            loose.append(key)
            continue
        name, suffix = parts
        groups.setdefault(name, {})[LORA_ALIASES.get(suffix, suffix)] = key
    rest = []
    for key in loose:  # IA3 scales: <module>.weight beside <module>.on_input
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and "on_input" in groups.get(name, {}):
            groups[name]["weight"] = key
        else:
            rest.append(key)
    return groups, rest


@lru_cache(maxsize=8)
def _name_table(arch: str) -> dict[str, ModuleTarget]:
    spec = ARCHS[arch]
    table: dict[str, ModuleTarget] = {}
    for naming in NAMINGS:
        for style in ("diffusers", "ldm"):
            for finder in (norm_module_targets, lora_module_targets):
                table.update(finder(spec, naming, style))
    return table


def _aliases(name: str, spec: ArchSpec) -> list[str]:
    out = [name]
    if name.startswith("base_model.model."):
        out.append("unet." + name.removeprefix("base_model.model."))
    if name.startswith("lora_te_") and any(s.name == "te1" for s in spec.text_encoders):
        out.append("lora_te1_" + name.removeprefix("lora_te_"))
    return out


@lru_cache(maxsize=8)
def _own_table(arch: str) -> dict[str, ModuleTarget]:
    """Module name -> target for a family that declares its own LoRA module
    table in the registry (the transformer families: every spelling of
    :mod:`modelkit.arch.lora_modules`)."""
    from modelkit.arch.configs import UNET_PREFIX

    out = {}
    for name, m in table_of(arch).items():
        out[name] = ModuleTarget(name=name, component="unet", path=m.path, group="transformer",
                                 key=f"{UNET_PREFIX}{m.path}.weight", shape=(),
                                 rows=m.rows, bias_key=f"{UNET_PREFIX}{m.path}.bias", of=m.of,
                                 swap=m.swap)
    return out


def _own_names(arch: str) -> bool:
    entry = registry.get(arch)
    return entry is not None and entry.lora is not None and entry.lora.modules is not None


def resolve_target(arch: str, name: str) -> ModuleTarget | None:
    """The checkpoint weight adapter module ``name`` patches in ``arch``
    (``sd1``, ``sd2``, ``sdxl``; a transformer family with its own module
    table), under any naming; None when unknown. A transformer target's key
    is under ``model.diffusion_model.`` (bake finds it in a bare
    transformer file too)."""
    if _own_names(arch):
        return lookup(_own_table(arch), name)
    if arch not in LORA_ARCHS:
        return None
    table = _name_table(arch)
    for alias in _aliases(name, ARCHS[arch]):
        hit = table.get(alias)
        if hit is not None:
            return hit
    return None


def _swapped_if_pre_only(target: ModuleTarget, name: str, keys: dict[str, str],
                         source: Source) -> ModuleTarget:
    """``target`` marked swapped when a diffusers-named LoRA module acts on
    SD3's pre-only context adaLN, which the module table (made for one depth)
    cannot mark: its ΔW rows are in diffusers' swapped order."""
    from dataclasses import replace

    from modelkit.arch.lora_modules import swapped_by_shape

    if target.swap or UP not in keys or DOWN not in keys:
        return target
    up, down = source.infos[keys[UP]].shape, source.infos[keys[DOWN]].shape
    if not up or not down:  # malformed: validate_adapter names it
        return target
    return replace(target, swap=True) if swapped_by_shape(name, target.path, up[0],
                                                          down[-1]) else target


PEFT_COMPONENTS = ("unet", "transformer", "text_encoder_2", "text_encoder")


def _peft_scales(metadata: dict[str, str]) -> dict[str, tuple[float, float, dict, dict]]:
    """Component prefix -> (r, lora_alpha, rank_pattern, alpha_pattern) from
    diffusers' ``lora_adapter_metadata`` (a LoraConfig per component)."""
    import json

    try:
        cfg = json.loads(metadata.get("lora_adapter_metadata", "") or "{}")
    except ValueError:
        return {}
    if not isinstance(cfg, dict):
        return {}
    out = {}
    for comp in PEFT_COMPONENTS:
        r, alpha = cfg.get(f"{comp}.r"), cfg.get(f"{comp}.lora_alpha")
        if isinstance(r, int | float) and isinstance(alpha, int | float) and r:
            out[comp] = (float(r), float(alpha), cfg.get(f"{comp}.rank_pattern") or {},
                         cfg.get(f"{comp}.alpha_pattern") or {})
    return out


def _plain_scale(metadata: dict[str, str]) -> float | None:
    """``lora_alpha / r`` from plain header metadata (``lora_alpha`` and
    ``r``, or one namespace's ``transformer.lora_alpha`` and
    ``transformer.r``), as Comfy-Org/ComfyUI PR #15830 reads it: only when
    exactly one complete, valid pair is there."""
    pairs = set()
    for key, text in metadata.items():
        ns, _, field = key.rpartition(".")
        if field != "lora_alpha":
            continue
        r_text = metadata.get(f"{ns}.r" if ns else "r")
        try:
            alpha, r = float(text), float(r_text) if r_text is not None else 0.0
        except ValueError:
            continue
        if r > 0 and math.isfinite(alpha):
            pairs.add(alpha / r)
    return pairs.pop() if len(pairs) == 1 else None


def _pattern(table: dict, path: str, default: float) -> float:
    for pattern, value in table.items():
        if path == pattern or path.endswith("." + pattern):
            return float(value)
    return default


def _peft_scale(name: str, scales: dict[str, tuple[float, float, dict, dict]]
                ) -> float | None:
    for comp in PEFT_COMPONENTS:
        if name.startswith(comp + ".") and comp in scales:
            r, alpha, ranks, alphas = scales[comp]
            path = name[len(comp) + 1:]
            return _pattern(alphas, path, alpha) / _pattern(ranks, path, r)
    return None


def _refuse_control_lora(source: Source, name: str) -> None:
    """A BFL Flux control LoRA (Canny, Depth) carries full ``query_norm`` /
    ``key_norm`` scales and an ``img_in`` LoRA that widens the input beside
    its LoRA modules; ComfyUI (comfy/lora_convert.py
    ``convert_lora_bfl_control``) replaces those weights and reshapes
    ``img_in``, which a bake into a checkpoint of the plain width cannot do."""
    keys = source.infos
    if "img_in.lora_A.weight" in keys and any(k.endswith(("query_norm.scale", "key_norm.scale"))
                                              for k in keys):
        raise ModelkitError(f"{name}: is a BFL Flux control LoRA (Canny/Depth: it replaces "
                            "the query_norm/key_norm scales and widens img_in); lora bake "
                            "does not apply it, load it in ComfyUI instead")


UNAPPLIED_SUFFIXES = ("bias_indices", "bias_values", "bias_size")


def open_adapter(source: Source, arch: str | None = None) -> Adapter:
    """Read ``source`` as an adapter. ``arch`` overrides the detected
    architecture (e.g. the checkpoint's, for an adapter whose arch is unknown).

    Raises:
        ModelkitError: ``source`` is not an adapter file, or a module is
            malformed (:mod:`modelkit.lora.validate`).
    """
    from modelkit.inspect.adapters import detect_adapter

    name = Path(source_label(source)).name
    _refuse_control_lora(source, name)
    info = detect_adapter(source.infos, source.metadata)
    if info is None:
        raise ModelkitError(f"{name}: is not a LoRA/LyCORIS/PEFT adapter (no adapter "
                            "tensor names found)")
    use = arch or info.arch
    groups, loose = _group(list(source.infos))
    modules: dict[str, AdapterModule] = {}
    unmatched = list(loose)
    scales = _peft_scales(source.metadata)
    plain = None if scales else _plain_scale(source.metadata)
    for mod_name, keys in groups.items():
        # LyCORIS sparse bias: read as adapter keys, but not applied; listed, never dropped
        unmatched += [keys.pop(s) for s in UNAPPLIED_SUFFIXES if s in keys]
        algo = _algo(set(keys))
        target = resolve_target(use, mod_name) if algo else None
        if algo is None or target is None:
            unmatched += keys.values()
            continue
        target = _swapped_if_pre_only(target, mod_name, keys, source)
        scale = _peft_scale(mod_name, scales)
        modules[mod_name] = AdapterModule(mod_name, algo, keys, target,
                                          plain if scale is None else scale)
    ad = Adapter(source, info.arch, info.format, info.naming, modules, sorted(unmatched),
                 info.arch_evidence)
    from modelkit.lora.validate import validate_adapter

    validate_adapter(ad)  # every module's parts and shapes, before any command computes
    return ad


__all__ = ["Adapter", "AdapterModule", "open_adapter", "resolve_target"]

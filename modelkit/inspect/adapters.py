"""Header-only adapter detection: which LoRA/LyCORIS/PEFT/ComfyUI format a
safetensors file holds, its ranks, what it patches and for which architecture.

Only names, shapes and ``__metadata__`` are used; tensor values (alphas) can be
read separately and cheaply with :func:`read_alphas`.

Rank conventions: LoRA/LoCon/PEFT/ComfyUI ``lora_down``/``lora_A`` rows; LoHa
``hada_w1_b`` rows; LoKr the rows of its low-rank factors (``lokr_w1_b``,
``lokr_w2_b``). A LoKr module stored with full ``w1`` and ``w2`` has no rank
and contributes nothing to ``ranks`` (an all-full LoKr reports ``[]``); full
diffs and IA3 have no rank either.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from modelkit.arch import registry
from modelkit.arch.adapter_keys import (
    ALGO_SUFFIXES,
    CONTEXT_DIMS,
    DORA_SUFFIXES,
    DOWN_SUFFIXES,
    LDM_UNET_NAMES,
    NAME_PREFIXES,
    TE_WIDTHS,
    split_key,
)
from modelkit.arch.configs import ARCHS
from modelkit.arch.lora_modules import known_name, resolved_counts
from modelkit.arch.lora_names import resolve_module
from modelkit.io.header import TensorInfo
from modelkit.jsontypes import JSONDict

# the families with LDM key tables (a family with its own module table, e.g.
# Flux.1, is told by its module-name prefixes instead)
ARCH_CANDIDATES = tuple(a for a in registry.lora_archs() if a in ARCHS)
TARGET_ORDER = ("unet", "te", "te1", "te2")

@dataclass
class AdapterInfo:
    """What :func:`detect_adapter` found in an adapter file's header."""

    format: str  # lora, locon, loha, lokr, ia3, full, dora, peft, comfyui
    naming: str  # kohya, peft, comfyui
    n_modules: int
    ranks: list[int]  # sorted distinct ranks
    alphas: list[float] | None  # from metadata; None when not known from the header
    targets: list[str]  # subset of unet, te, te1, te2
    arch: str  # sd1, sd2, sdxl, unknown
    arch_evidence: list[str]
    conv_modules: int  # modules patching conv weights (4-D, 1x1 included)
    algos: dict[str, int] = field(default_factory=dict)  # modules per algorithm

    def to_dict(self) -> JSONDict:
        """A JSON-ready dict of every field."""
        return asdict(self)


@dataclass
class _Module:
    name: str
    naming: str
    component: str
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def first(self, suffixes: Iterable[str]) -> tuple[int, ...] | None:
        for s in suffixes:
            if s in self.tensors:
                return self.tensors[s]
        return None


# --- parsing ---------------------------------------------------------------------


def _classify(module: str) -> tuple[str, str] | None:
    for prefix, naming, component in NAME_PREFIXES:
        if module.startswith(prefix):
            return naming, component
    if ".processor." in module and known_name(module):
        return "xlabs", "unet"
    if known_name(module):  # a transformer family's own path, bare (DiffSynth, BFL)
        return "native", "unet"
    return None


def _group_modules(infos: dict[str, TensorInfo]) -> dict[str, _Module]:
    modules: dict[str, _Module] = {}
    for key, info in infos.items():
        parts = split_key(key)
        if parts is None:
            continue
        name, suffix = parts
        kind = _classify(name)
        if kind is None:
            continue
        mod = modules.setdefault(name, _Module(name, *kind))
        mod.tensors[suffix] = info.shape
    for key, info in infos.items():  # IA3 scales: <module>.weight beside <module>.on_input
        scaled = modules.get(key.removesuffix(".weight"))
        if key.endswith(".weight") and scaled is not None and "on_input" in scaled.tensors:
            scaled.tensors["weight"] = info.shape
    return {n: m for n, m in modules.items() if _algo(m) is not None}


def _algo(mod: _Module) -> str | None:
    for algo, suffixes in ALGO_SUFFIXES.items():
        if any(s in mod.tensors for s in suffixes):
            return algo
    return None


# --- ranks, shapes -------------------------------------------------------------


def _dim(shape: tuple[int, ...] | None, i: int) -> int | None:
    """Dimension ``i`` of ``shape``, or None when the tensor has fewer (any
    shape is legal in a file, so a malformed adapter must not crash)."""
    return shape[i] if shape is not None and len(shape) > i else None


def _module_rank(mod: _Module) -> list[int]:
    down = mod.first(DOWN_SUFFIXES)
    if down is not None:
        ranks = [_dim(down, 0)]
    elif "hada_w1_b" in mod.tensors:
        ranks = [_dim(mod.tensors["hada_w1_b"], 0)]
    else:
        ranks = [_dim(mod.tensors[s], 0) for s in ("lokr_w1_b", "lokr_w2_b")
                 if s in mod.tensors]
    return [r for r in ranks if r is not None]


def _lokr_in(mod: _Module) -> int | None:
    w1 = mod.first(("lokr_w1", "lokr_w1_b"))
    w2 = mod.first(("lokr_w2", "lokr_w2_b"))
    if "lokr_t2" in mod.tensors:
        return None
    a, b = _dim(w1, 1), _dim(w2, 1)
    return a * b if a is not None and b is not None else None


def _in_features(mod: _Module) -> int | None:
    """Input width of the patched Linear, when the header shows it."""
    shape = mod.first((*DOWN_SUFFIXES, "hada_w1_b", "diff"))
    if shape is not None and len(shape) >= 2:
        return shape[1]
    return _lokr_in(mod)


def _has_4d(mod: _Module) -> bool:
    return any(len(s) == 4 for s in mod.tensors.values())


def _has_kernel(mod: _Module) -> bool:
    if "lora_mid.weight" in mod.tensors:
        return True
    return any(len(s) == 4 and math.prod(s[2:]) > 1 for s in mod.tensors.values())


# --- architecture evidence -------------------------------------------------------

Clue = tuple[frozenset[str], str]


def _name_clues(modules: dict[str, _Module]) -> list[Clue]:
    names = list(modules)
    comps = {m.component for m in modules.values()}
    clues: list[Clue] = []
    sdxl = frozenset({"sdxl"})
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        clues.append((sdxl, "kohya lora_te1_/lora_te2_ names: SDXL's two text encoders"))
    if any(n.startswith(LDM_UNET_NAMES) for n in names):
        clues.append((sdxl, "kohya LDM-style UNet names (lora_unet_input_blocks_...): "
                            "kohya writes these for SDXL only"))
    if "te2" in comps and not any(n.startswith("lora_te2_") for n in names):
        clues.append((sdxl, "a second text encoder (text_encoder_2 / clip_g)"))
    if any(n.startswith("text_encoders.clip_h.") for n in names):
        clues.append((frozenset({"sd2"}), "ComfyUI clip_h text encoder: SD2's OpenCLIP-H"))
    return clues


def _metadata_clues(meta: dict[str, str]) -> list[Clue]:
    clues: list[Clue] = []
    version = meta.get("ss_base_model_version", "")
    lora_names = [(a, lora) for a in ARCH_CANDIDATES if (lora := registry.REGISTRY[a].lora)]
    for arch, lora in lora_names:
        if lora.base_model_prefix and version.startswith(lora.base_model_prefix):
            clues.append((frozenset({arch}), f"metadata ss_base_model_version={version}"))
    v2 = meta.get("ss_v2")
    if v2 in ("True", "False"):
        archs = frozenset(a for a, lora in lora_names if lora.kohya_v2 == (v2 == "True"))
        clues.append((archs, "metadata ss_v2=True" if v2 == "True"
                      else "metadata ss_v2=False (not SD2)"))
    spec = meta.get("modelspec.architecture", "")
    for arch, lora in lora_names:
        if lora.modelspec_prefix and spec.startswith(lora.modelspec_prefix):
            clues.append((frozenset({arch}), f"metadata modelspec.architecture={spec}"))
    return clues


def _width_clues(modules: dict[str, _Module]) -> list[Clue]:
    clues: list[Clue] = []
    contexts = {_in_features(m) for n, m in modules.items()
                if m.component == "unet" and n.replace("_", ".").endswith(
                    ("attn2.to.k", "attn2.to.v"))}
    for width in sorted(w for w in contexts if w in CONTEXT_DIMS):
        arch = CONTEXT_DIMS[width]
        clues.append((frozenset({arch}), f"cross-attention to_k/to_v input width {width} "
                                         f"(context dim of {arch})"))
    te_widths = {_in_features(m) for n, m in modules.items()
                 if m.component == "te" and n.endswith(("q_proj", "fc1"))}
    for width in sorted(w for w in te_widths if w in TE_WIDTHS):
        archs = TE_WIDTHS[width]
        clues.append((archs, f"text encoder width {width} ({'/'.join(sorted(archs))})"))
    return clues


def _layout_clues(modules: dict[str, _Module]) -> list[Clue]:
    ndims = {len(s) for n, m in modules.items() if n.endswith(("proj_in", "proj_out"))
             for s in [m.first((*DOWN_SUFFIXES, "diff"))] if s is not None}
    if ndims == {4}:
        return [(_PROJ_ARCHS[False], "proj_in/proj_out patched as 1x1 convs "
                                     "(SD1; SD2/SDXL use Linear)")]
    if ndims == {2}:
        return [(_PROJ_ARCHS[True], "proj_in/proj_out patched as Linear "
                                    "(SD2/SDXL; SD1 uses 1x1 convs)")]
    return []


# use_linear_in_transformer -> the LoRA architectures with that UNet projection
_PROJ_ARCHS = {linear: frozenset(a for a in ARCH_CANDIDATES
                                 if ARCHS[a].unet.use_linear_in_transformer == linear)
               for linear in (False, True)}


def _resolution_clue(modules: dict[str, _Module]) -> list[Clue]:
    counts = {a: sum(resolve_module(ARCHS[a], n) is not None for n in modules)
              for a in ARCH_CANDIDATES}
    best = max(counts.values())
    if best == 0 or len(set(counts.values())) == 1:
        return []
    archs = frozenset(a for a, c in counts.items() if c == best)
    found = ", ".join(f"{a} {c}/{len(modules)}" for a, c in counts.items())
    return [(archs, f"module names found in the key tables: {found}")]


def _decide_arch(clues: list[Clue]) -> tuple[str, list[str]]:
    evidence = [why for _, why in clues]
    candidates = set(ARCH_CANDIDATES)
    for archs, _ in clues:
        candidates &= archs
    if len(candidates) == 1 and clues:
        return candidates.pop(), evidence
    if not candidates:
        evidence.append("evidence conflicts; architecture left unknown")
    return "unknown", evidence


def _prefix_hits(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The names matching a family's module prefixes (``*``: a block number)."""
    globs = [p + "*" for p in prefixes]
    return [n for n in names if any(fnmatchcase(n, g) for g in globs)]


def _own_names_arch(names: list[str]) -> tuple[str, list[str]] | None:
    """A family with its own module table (the transformer families): the one
    whose table resolves most of ``names``, ties going to the one whose
    distinctive prefixes match most, then to registry order; None when no
    table resolves any and no prefix matches."""
    counts = resolved_counts(names)
    scored = []
    for i, arch in enumerate(registry.REGISTRY.values()):
        prefixes = arch.lora.module_prefixes if arch.lora else ()
        hits = _prefix_hits(names, prefixes) if prefixes else []
        if counts.get(arch.name, 0) or hits:
            scored.append((counts.get(arch.name, 0), len(hits), -i, arch, hits))
    if not scored:
        return None
    n, _, _, arch, hits = max(scored, key=lambda t: t[:3])
    why = [f"{n} of {len(names)} module names are {arch.label} transformer modules"]
    if hits:
        why.append(f"module names like {hits[0]}: {arch.label} transformer blocks")
    return arch.name, why


def guess_arch(modules: dict[str, _Module], metadata: dict[str, str]) -> tuple[
        str, list[str]]:
    """The architecture the adapter's modules and metadata agree on, with reasons."""
    own = _own_names_arch(list(modules))
    if own is not None:
        return own
    clues = (_name_clues(modules) + _metadata_clues(metadata) + _width_clues(modules)
             + _layout_clues(modules) + _resolution_clue(modules))
    return _decide_arch(clues)


# --- alphas ----------------------------------------------------------------------


def _float(text: object) -> float | None:
    if not isinstance(text, str | int | float):  # metadata JSON: lists, maps, null
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _json(text: str | None) -> dict[str, Any]:
    try:
        obj = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def metadata_alphas(metadata: dict[str, str]) -> list[float] | None:
    """Alphas recorded in metadata: kohya ``ss_network_alpha`` (and
    ``conv_alpha`` in ``ss_network_args``) or diffusers' ``lora_alpha`` in
    ``lora_adapter_metadata``. None when none is recorded (or "Dynamic")."""
    found = [_float(metadata.get("ss_network_alpha"))]
    if found[0] is not None:
        found.append(_float(_json(metadata.get("ss_network_args")).get("conv_alpha")))
    peft = _json(metadata.get("lora_adapter_metadata"))
    found += [_float(v) for k, v in peft.items() if k.split(".")[-1] == "lora_alpha"]
    values = sorted({v for v in found if v is not None})
    return values or None


def _first_value(value: Any) -> float | None:
    """The first element of a tensor or a flat list of values, if any."""
    if value is None:
        return None
    flat = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
    return float(flat[0]) if flat else None


def read_alphas(keys: Iterable[str], get: Callable[[str], Any]) -> list[float]:
    """Sorted distinct finite values of the ``<module>.alpha`` tensors among
    ``keys``, read with ``get(key)``: a tensor or a flat list of floats
    (scalars or 1-element tensors, so this is cheap). Empty, NaN or infinite
    alphas and ones ``get`` returns None for (not readable) are left out."""
    values = set()
    for key in keys:
        if key.endswith(".alpha"):
            v = _first_value(get(key))
            if v is not None and math.isfinite(v):
                values.add(round(v, 6))
    return sorted(values)


# --- detection -------------------------------------------------------------------


def _format(modules: dict[str, _Module], naming: str, algos: Counter[str]) -> str:
    if any(DORA_SUFFIXES & m.tensors.keys() for m in modules.values()):
        return "dora"
    if naming in ("peft", "comfyui"):
        return naming
    main = [a for a, _ in algos.most_common() if a != "full"]
    if not main:
        return "full"
    if main[0] == "lora" and any(_has_kernel(m) for m in modules.values()):
        return "locon"
    return main[0]


def _targets(modules: dict[str, _Module], arch: str) -> list[str]:
    comps = {m.component for m in modules.values()}
    if arch == "sdxl" and "te" in comps:
        comps = (comps - {"te"}) | {"te1"}
    return [t for t in TARGET_ORDER if t in comps]


def _is_conv(mod: _Module, arch: str) -> bool:
    if _has_4d(mod):
        return True
    if arch not in ARCHS:
        return False
    spec = ARCHS[arch]
    name = mod.name.removeprefix("base_model.model.")
    target = resolve_module(spec, name) or resolve_module(spec, "unet." + name)
    return target is not None and target.is_conv


def detect_adapter(infos: dict[str, TensorInfo], metadata: dict[str, str],
                   ) -> AdapterInfo | None:
    """Describe the adapter whose header is ``infos``/``metadata``, or return
    None when the file is not an adapter (e.g. a checkpoint)."""
    modules = _group_modules(infos)
    n_keys = sum(len(m.tensors) for m in modules.values())
    if not modules or n_keys * 2 < len(infos):
        return None
    naming = Counter(m.naming for m in modules.values()).most_common(1)[0][0]
    algos = Counter(_algo(m) or "" for m in modules.values())
    arch, evidence = guess_arch(modules, metadata)
    ranks = sorted({r for m in modules.values() for r in _module_rank(m)})
    return AdapterInfo(
        format=_format(modules, naming, algos), naming=naming, n_modules=len(modules),
        ranks=ranks, alphas=metadata_alphas(metadata), targets=_targets(modules, arch),
        arch=arch, arch_evidence=evidence,
        conv_modules=sum(_is_conv(m, arch) for m in modules.values()),
        algos=dict(sorted(algos.items())),
    )


__all__ = [
    "AdapterInfo",
    "detect_adapter",
    "guess_arch",
    "metadata_alphas",
    "read_alphas",
    "split_key",
]

"""Find the components of a model file and check each against the key/shape
table its configuration implies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from modelkit.arch.configs import ARCHS, EMA_PREFIX, TE_PREFIXES, UNET_PREFIX, VAE_PREFIX
from modelkit.arch.detect import (
    expected_text_encoder,
    expected_unet_config,
    expected_vae_config,
    text_encoder_family,
    unet_family,
    unet_features,
)
from modelkit.arch.encoders import Match, is_optional
from modelkit.arch.keys import (
    POSITION_IDS,
    Shape,
    n_params,
    text_encoder_keys,
    unet_keys,
    vae_keys,
)
from modelkit.arch.registry import ORIGINAL, VAE
from modelkit.jsontypes import JSONDict

LIST_LIMIT = 20  # keys listed per problem; the counts are always exact

TE_LAYERS = {"CLIP-L": 12, "OpenCLIP-H": 24, "OpenCLIP-bigG": 32}


@dataclass
class ComponentReport:
    """One component (unet, vae, te, te1, te2, controlnet) of a file."""

    name: str
    prefix: str
    family: str
    n_tensors: int
    n_params: int
    complete: bool | None
    n_missing: int = 0
    n_unexpected: int = 0
    n_shape_mismatches: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)

    def to_dict(self) -> JSONDict:
        return asdict(self)


def split_prefix(shapes: dict[str, Shape], prefix: str) -> dict[str, Shape]:
    """The keys under ``prefix``, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: s for k, s in shapes.items() if k.startswith(prefix)}


def compare(name: str, prefix: str, family: str, found: dict[str, Shape],
            expected: dict[str, Shape] | None, optional: frozenset[str] = frozenset()
            ) -> ComponentReport:
    """Check ``found`` (relative keys) against ``expected``; ``optional`` keys
    may be absent or present."""
    rep = ComponentReport(name, prefix, family, len(found), n_params(found), None)
    if expected is None:
        return rep
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected and k not in optional]
    bad = [f"{prefix}{k}: {list(found[k])}, expected {list(s)}"
           for k, s in expected.items() if k in found and tuple(found[k]) != s]
    rep.complete = not missing and not bad
    rep.n_missing, rep.n_unexpected, rep.n_shape_mismatches = (
        len(missing), len(unexpected), len(bad))
    rep.missing = [prefix + k for k in missing[:LIST_LIMIT]]
    rep.unexpected = [prefix + k for k in unexpected[:LIST_LIMIT]]
    rep.shape_mismatches = bad[:LIST_LIMIT]
    return rep


def analyse_unet(found: dict[str, Shape], prefix: str
                 ) -> tuple[ComponentReport, str, list[str], int | None]:
    """Report, arch, evidence and UNet input channels for unprefixed UNet keys."""
    feats = unet_features(found)
    if feats is None:
        rep = compare("unet", prefix, "unknown denoiser", found, None)
        return rep, "unknown", ["no input_blocks.0.0.weight conv"], None
    arch, evidence = unet_family(feats)
    cfg = expected_unet_config(arch, feats)
    expected = dict(unet_keys(cfg)) if cfg else None
    family = f"{arch} UNet" if arch != "unknown" else "LDM UNet (unknown layout)"
    return compare("unet", prefix, family, found, expected), arch, evidence, \
        feats.in_channels


def analyse_vae(found: dict[str, Shape], prefix: str) -> ComponentReport:
    """Check a VAE's keys (unprefixed) against the KL VAE table at its widths."""
    cfg = expected_vae_config(found)
    if cfg is None:
        return compare("vae", prefix, "unknown VAE", found, None)
    family = f"KL-f8 VAE, {cfg.z_channels} latent channels"
    return compare("vae", prefix, family, found, dict(vae_keys(cfg)))


def analyse_text_encoder(slot: str, prefix: str, layout: str, found: dict[str, Shape],
                         arch: str) -> ComponentReport:
    """Check a text encoder against the layer count its arch uses."""
    layers = _te_layers(slot, layout, arch, found)
    cfg = expected_text_encoder(found, layout, layers)
    if cfg is None:
        return compare(slot, prefix, f"{layout} text encoder", found, None)
    family = text_encoder_family(layout, cfg.width)
    optional = frozenset({POSITION_IDS}) if layout == "hf" else frozenset()
    return compare(slot, prefix, family, found, dict(text_encoder_keys(cfg)), optional)


def _te_layers(slot: str, layout: str, arch: str, found: dict[str, Shape]) -> int:
    spec = ARCHS.get(arch)
    if spec is not None:
        for s in spec.text_encoders:
            if s.name == slot and s.config.layout == layout:
                return s.config.layers
    # unknown arch: count the layers that are there
    marker = "text_model.encoder.layers." if layout == "hf" else "transformer.resblocks."
    parts = (k[len(marker):].split(".")[0] for k in found if k.startswith(marker))
    idx = {int(p) for p in parts if p.isdecimal()}
    # at most one layer a key: a forged layers.999999999 key makes no huge table
    return min(max(idx) + 1, len(found)) if idx else 0


def analyse_standalone(found: Match) -> ComponentReport:
    """Check a standalone text encoder or VAE (:mod:`modelkit.arch.encoders`)
    against its key table at the widths in the file; keys the entry calls
    optional (a vision tower, ``position_ids``) may be there or not."""
    entry = found.entry
    inner = dict(found.keys)
    # the tables are of the original names; a diffusers-named file is named only
    expected = entry.table(inner) if found.layout == ORIGINAL else None
    optional = frozenset(k for k in (*inner, *(expected or ())) if is_optional(entry, k))
    slot = "vae" if entry.kind == VAE else "te"
    return compare(slot, found.prefix, entry.label, inner, expected, optional)


def checkpoint_components(shapes: dict[str, Shape]
                          ) -> tuple[dict[str, ComponentReport], str, list[str], int | None]:
    """Analyse every component of a single-file checkpoint."""
    comps: dict[str, ComponentReport] = {}
    arch, in_ch = "unknown", None
    evidence: list[str] = []
    unet = split_prefix(shapes, UNET_PREFIX)
    if unet:
        comps["unet"], arch, evidence, in_ch = analyse_unet(unet, UNET_PREFIX)
    vae = split_prefix(shapes, VAE_PREFIX)
    if vae:
        comps["vae"] = analyse_vae(vae, VAE_PREFIX)
    for prefix, (layout, slot) in TE_PREFIXES.items():
        found = split_prefix(shapes, prefix)
        if found:
            comps[slot] = analyse_text_encoder(slot, prefix, layout, found, arch)
    return comps, arch, evidence, in_ch


def count_ema(shapes: dict[str, Shape]) -> int:
    """Number of LitEma weight buffers (``model_ema.*`` minus decay/num_updates)."""
    return sum(1 for k in shapes if k.startswith(EMA_PREFIX)
               and k not in (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"))

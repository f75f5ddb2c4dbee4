"""The LoRA operations, registered as transforms: what ``modelkit lora
bake|extract|resize|merge|convert`` run, and what recipe ``op:`` steps name
(``lora_bake`` takes a checkpoint and any number of adapters)."""

from __future__ import annotations

from typing import Any

from modelkit.arch import registry
from modelkit.core.registry import (
    DROPPED,
    NEW,
    RENAMED,
    SAME,
    Adapter,
    Checkpoint,
    PerModel,
    transform,
)
from modelkit.core.step import PlannedStep
from modelkit.vocab import FLOAT_STORAGE, KEEP, MERGE_OUTPUT_DTYPES

NAMINGS = ("kohya", "peft", "comfy", "comfyui")
# families whose LoRA commands write every naming (those with their own module table)
_TABLE_ARCHS = registry.names(where=lambda a: a.lora is not None and a.lora.modules is not None
                              and a.lora.adapters)
# the family of an adapter whose module names do not tell it: PEFT names of
# SD3, Flux.1 and Chroma are the same (transformer.transformer_blocks.N.attn.to_q)
ARCH_CHOICES = registry.lora_archs()
ARCH_HELP = ("The adapters' family, when their names do not tell it (SD3 and Flux.1 "
             "PEFT names are the same; default: detected).")
FORMAT_HELP = (f"Key naming of the output: kohya; for {registry.listed(_TABLE_ARCHS)} also "
               "peft (diffusers/ai-toolkit, split q/k/v) or comfy/comfyui.")


def _dtype_or_none(value: str | None) -> str | None:
    return None if value in (None, KEEP) else value


def _per_adapter(value: Any, n: int, what: str) -> list[Any]:
    """One value per adapter: a single value applies to all."""
    from modelkit.errors import ModelkitError

    if isinstance(value, list | tuple) and not (value and isinstance(value[0], int | float)
                                                and what == "blocks"):
        values = list(value)
        if len(values) not in (1, n):
            raise ModelkitError(f"{what}: give one value, or one per adapter ({n}), not "
                                f"{len(values)}")
        return values * n if len(values) == 1 else values
    return [value] * n


@transform("lora_bake", summary="add adapters' weighted delta-W into a checkpoint",
           keys=(SAME, DROPPED), ends=(({"weights": (0.0,), "te_weights": (0.0,)}, 0),),
           choices={"dtype": MERGE_OUTPUT_DTYPES},
           help={"weights": "Strength of each adapter on the UNet.",
                 "te_weights": "Strength of each adapter on the text encoders (default: "
                               "its UNet weight).",
                 "blocks": "LoRA block weights for every adapter: a preset (ALL, NONE, INS, "
                           "IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5), 17/26 values "
                           "(SD1/SD2), 12/20 values (SDXL), or NAME=VALUE,...; a "
                           "transformer family takes the block names, groups and presets "
                           "of merge --blocks (blocks.3=0.5,default=1; double_only).",
                 "dtype": "Float dtype of the output.",
                 "allow_unmatched": "Bake what matches and list adapter keys that patch "
                                    "nothing, instead of failing."})
def lora_bake(checkpoint: Checkpoint, *adapters: Adapter, weights: PerModel = (1.0,),
              te_weights: PerModel | None = None, blocks: Any = None, dtype: str = KEEP,
              allow_unmatched: bool = False, device: str = "cpu") -> PlannedStep:
    """Every adapter's delta-W (its weight on the UNet, ``te_weights`` on the
    text encoders, optional LoRA block weights: one spec for all adapters or
    a list with one per adapter) added to the checkpoint, key by key."""
    from modelkit.lora.bake import AdapterUse, bake

    te = te_weights or [None] * len(adapters)
    specs = _per_adapter(blocks, len(adapters), "blocks")
    uses = [AdapterUse(a, w, t, b) for a, w, t, b in
            zip(adapters, weights, te, specs, strict=True)]
    return bake(checkpoint, uses, dtype=_dtype_or_none(dtype),
                allow_unmatched=allow_unmatched, device=device)


@transform("lora_extract", summary="a LoRA approximating TUNED - BASE, per layer",
           keys=(NEW, DROPPED), choices={"dtype": FLOAT_STORAGE, "format": NAMINGS},
           help={"rank": "Rank cap of Linear and 1x1 layers.",
                 "conv_rank": "Rank cap of 3x3 convs (adds ResBlocks; default: none).",
                 "energy": "Per layer, the smallest rank keeping this share of ||ΔW||² "
                           "(capped).",
                 "te": "Extract text encoders.",
                 "dtype": "Storage type of the factors.",
                 "format": FORMAT_HELP})
def lora_extract(base: Checkpoint, tuned: Checkpoint, *, rank: int,
                 conv_rank: int | None = None, energy: float | None = None, te: bool = True,
                 dtype: str = "fp16", format: str = "kohya", device: str = "cpu"
                 ) -> PlannedStep:
    """Low-rank factors of each layer's difference (randomized SVD; ``energy``
    picks each layer's rank, capped by ``rank``); errors per layer reported."""
    from modelkit.lora.extract import extract

    return extract(base, tuned, rank, conv_rank, energy, te, device, dtype=dtype,
                   naming=format)


@transform("lora_resize", summary="re-factorise an adapter at a new rank (exact SVD)",
           keys=(NEW, DROPPED), choices={"dtype": MERGE_OUTPUT_DTYPES, "format": NAMINGS,
                                         "arch": ARCH_CHOICES},
           help={"rank": "New rank (cap with --energy).",
                 "energy": "Per module, the smallest rank keeping this share of ||ΔW||².",
                 "conv_rank": "New rank of 3x3 convs.",
                 "dtype": "Storage type of the factors (keep: the input's).",
                 "format": FORMAT_HELP, "arch": ARCH_HELP})
def lora_resize(lora: Adapter, *, rank: int | None = None, energy: float | None = None,
                conv_rank: int | None = None, dtype: str = KEEP, format: str = "kohya",
                arch: str | None = None) -> PlannedStep:
    """The adapter's dense delta-W re-factorised at ``rank`` and/or ``energy``."""
    from modelkit.lora.merge import resize

    return resize(lora, rank, energy, conv_rank, dtype=_dtype_or_none(dtype), naming=format,
                  arch=arch)


@transform("lora_merge", summary="the weighted sum of adapters' delta-W, re-factorised",
           keys=(NEW, DROPPED), choices={"dtype": FLOAT_STORAGE, "format": NAMINGS,
                                         "arch": ARCH_CHOICES},
           min_models=1,
           help={"weights": "Weight of each adapter's delta-W.",
                 "rank": "Rank of the merged LoRA.",
                 "conv_rank": "Rank of 3x3 convs.",
                 "energy": "Per module, the smallest rank keeping this share of ||ΔW||².",
                 "blocks": "Block weights applied to every input (see 'lora bake --help').",
                 "dtype": "Storage type of the factors.",
                 "format": FORMAT_HELP, "arch": ARCH_HELP})
def lora_merge(*loras: Adapter, weights: PerModel = (1.0,), rank: int | None = None,
               conv_rank: int | None = None, energy: float | None = None,
               blocks: Any = None, dtype: str = "fp16", format: str = "kohya",
               arch: str | None = None) -> PlannedStep:
    """Exact: the dense delta-W are summed with their weights (and block
    weights), then factorised again, never up/down averaged."""
    from modelkit.lora.merge import merge

    specs = _per_adapter(blocks, len(loras), "blocks")
    items = list(zip(loras, weights, specs, strict=True))
    return merge(items, rank, conv_rank, energy, dtype=dtype, naming=format, arch=arch)


@transform("lora_convert", summary="an adapter under another tool's keys (kohya, PEFT, "
                                   "ComfyUI), exact",
           keys=(SAME, RENAMED, NEW, DROPPED), choices={"to": NAMINGS, "arch": ARCH_CHOICES},
           help={"to": "Key naming of the output.", "arch": ARCH_HELP})
def lora_convert(lora: Adapter, *, to: str, arch: str | None = None) -> PlannedStep:
    """The same delta-W under another tool's key names (alpha kept, folded
    into ``lora_B`` for PEFT; a fused q/k/v module (Flux.1, SD3, Chroma, Flux.2,
    Z-Image) split into PEFT's to_q/to_k/to_v or those fused, rank
    r_q+r_k+r_v)."""
    from modelkit.lora.convert import convert

    return convert(lora, to, arch=arch)

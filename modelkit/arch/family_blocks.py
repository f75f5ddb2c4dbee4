"""Per-block weights of the transformer families, as data.

A :class:`PrefixBlocks` declares one family's block list: named blocks
before the numbered stacks (the embedders, ``IN``), blocks shared by every
block of a stack (Flux.2's modulations, ``MOD``), the numbered stacks
themselves (``double_blocks.0..18``: one group each, ``DOUBLE``) and the
blocks after them (``OUT``). Each name lists the key prefixes that belong to
it in every layout the family is saved in (BFL/ComfyUI and diffusers), so a
user writes ``double_blocks.3=0.5`` whatever the file's layout; keys are
matched with or without ``model.diffusion_model.``. A key that no block
claims takes the first block's value, as ComfyUI's ``ModelMergeBlocks``
gives unmatched keys its first argument.

The names are those of ComfyUI's block-merge nodes
(``comfy_extras/nodes_model_merging_model_specific.py``: ModelMergeFlux1,
ModelMergeSD3_2B / ModelMergeSD35_Large, ModelMergeQwenImage,
ModelMergeWAN2_1). ComfyUI has no node for Chroma, Flux.2 or Z-Image
(Lumina 2): their blocks are named by the model's own top-level modules in
the same style (ComfyUI ``comfy/ldm/chroma/model.py``, ``comfy/ldm/flux/
model.py``, ``comfy/ldm/lumina/model.py``). The diffusers names come from
``diffusers/models/transformers/transformer_*.py``.

Presets are generated from the groups (:meth:`PrefixBlocks.preset_docs`).
Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

DENOISER_PREFIX = "model.diffusion_model."
IN, OUT, MOD = "IN", "OUT", "MOD"


@dataclass(frozen=True)
class Block:
    """One named block and the key prefixes (dotted module paths relative to
    the denoiser root, in any layout) whose keys belong to it."""

    name: str
    prefixes: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.name, *self.prefixes)


@dataclass(frozen=True)
class Stack:
    """A numbered run of blocks ``stem.0 .. stem.{count-1}``; keys under
    ``<alias>.<N>.`` for any alias (other layouts' names) belong to
    ``stem.N``. ``group`` is the name a ``--blocks`` mapping uses for all of
    them (``DOUBLE``); ``what`` how a preset's description names them."""

    group: str
    stem: str
    count: int
    aliases: tuple[str, ...] = ()
    what: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{self.stem}.{i}" for i in range(self.count))


def _blocks(*items: str | tuple[str, ...]) -> tuple[Block, ...]:
    """``"img_in"`` or ``("img_in", "x_embedder")``: a block and its other names."""
    return tuple(Block(i) if isinstance(i, str) else Block(i[0], i[1:]) for i in items)


@dataclass(frozen=True)
class PrefixBlocks:
    """One family's block list (see the module docstring)."""

    family: str
    source: str  # where the names come from, for documents
    ins: tuple[Block, ...]
    stacks: tuple[Stack, ...]
    outs: tuple[Block, ...]
    shared: tuple[Block, ...] = ()

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Every block name in list order."""
        return (*(b.name for b in self.ins), *(b.name for b in self.shared),
                *(n for s in self.stacks for n in s.names), *(b.name for b in self.outs))

    @cached_property
    def _prefixes(self) -> tuple[tuple[str, str], ...]:
        """(module path, block) for the named blocks, longest path first."""
        pairs = [(p, b.name) for b in (*self.ins, *self.shared, *self.outs) for p in b.paths]
        return tuple(sorted(pairs, key=lambda pb: -len(pb[0])))

    def block_of(self, key: str) -> str:
        """The block of a transformer key (bare or under
        ``model.diffusion_model.``); the first block for a key none claims."""
        return self.claims(key) or self.names[0]

    def claims(self, key: str) -> str | None:
        """The block whose prefix or stack ``key`` is under, or None."""
        rest = key.removeprefix(DENOISER_PREFIX)
        for stack in self.stacks:
            for stem in (stack.stem, *stack.aliases):
                if rest.startswith(stem + "."):
                    idx = rest[len(stem) + 1:].split(".", 1)[0]
                    if idx.isdigit() and int(idx) < stack.count:
                        return f"{stack.stem}.{int(idx)}"
        for path, block in self._prefixes:
            if rest == path or rest.startswith(path + "."):
                return block
        return None

    def key_to_block(self, key: str, arch: str = "", map_name: str | None = None,
                     vae_slot: bool = False) -> str:
        """:meth:`block_of` with the registry's block-map signature (one map,
        no VAE entry)."""
        return self.block_of(key)

    def groups(self) -> dict[str, list[str]]:
        """Groups a ``--blocks`` mapping may name (upper case): ``IN``, ``OUT``,
        ``MOD`` when there are shared blocks, ``BLOCKS`` (every numbered
        block) and one per stack (``DOUBLE``, ``SINGLE``, ``JOINT``...)."""
        out = {IN: [b.name for b in self.ins], OUT: [b.name for b in self.outs]}
        if self.shared:
            out[MOD] = [b.name for b in self.shared]
        out["BLOCKS"] = [n for s in self.stacks for n in s.names]
        out.update((s.group, list(s.names)) for s in self.stacks)
        return out

    def group_hint(self) -> str:
        """How an error message names the groups and a range."""
        stack = self.stacks[0]
        return (f"groups {', '.join(self.groups())}, ranges like '{stack.stem}.0-"
                f"{stack.stem}.5' or '{stack.stem}.0-5'")

    def _stack_text(self, stack: Stack) -> str:
        return f"the {stack.count} {stack.what or stack.stem} blocks"

    def preset_docs(self) -> dict[str, str]:
        """Preset names and what their values mean (values are the method
        parameter; for ``weighted_sum``'s alpha: how much of model B)."""
        first, last = self.names[0], self.names[-1]
        docs = {"flat_0": "0 everywhere (keep model A)",
                "flat_1": "1 everywhere (take model B)",
                "flat_half": "0.5 everywhere"}
        if len(self.stacks) > 1:
            docs.update((f"{s.group.lower()}_only", f"1 on {self._stack_text(s)}, 0 elsewhere")
                        for s in self.stacks)
        outside = ", ".join(b.name for b in (*self.ins, *self.shared, *self.outs))
        docs["blocks_only"] = (f"1 on every numbered block "
                               f"({' and '.join(self._stack_text(s) for s in self.stacks)}), "
                               f"0 on {outside}")
        docs["io_only"] = f"1 on {outside}, 0 on the numbered blocks"
        docs["gradient_in_to_out"] = (f"0 at {first} rising linearly (by list position) to 1 "
                                      f"at {last}")
        docs["gradient_out_to_in"] = f"1 at {first} falling linearly to 0 at {last}"
        return docs

    def preset(self, name: str) -> dict[str, float]:
        """The block weights of preset ``name`` (a name of :meth:`preset_docs`)."""
        numbered = set(self.groups()["BLOCKS"])
        top = len(self.names) - 1
        stacks = {f"{s.group.lower()}_only": set(s.names) for s in self.stacks}

        def value(pos: int, block: str) -> float:
            if name in stacks:
                return float(block in stacks[name])
            return {"flat_0": 0.0, "flat_1": 1.0, "flat_half": 0.5,
                    "blocks_only": float(block in numbered),
                    "io_only": float(block not in numbered),
                    "gradient_in_to_out": pos / top,
                    "gradient_out_to_in": 1.0 - pos / top}[name]

        return {b: value(i, b) for i, b in enumerate(self.names)}


# --- the families ---------------------------------------------------------------------

# ComfyUI's ModelMergeFlux1; diffusers' FluxTransformer2DModel names map to the
# same blocks (transformer_flux.py; diffusers single_file_utils.py
# convert_flux_transformer_checkpoint_to_diffusers)
FLUX = PrefixBlocks(
    "flux", "ComfyUI's ModelMergeFlux1",
    ins=_blocks(("img_in", "x_embedder"), ("time_in", "time_text_embed.timestep_embedder"),
                ("guidance_in", "time_text_embed.guidance_embedder"),
                ("vector_in", "time_text_embed.text_embedder"), ("txt_in", "context_embedder")),
    stacks=(Stack("DOUBLE", "double_blocks", 19, ("transformer_blocks",), "double"),
            Stack("SINGLE", "single_blocks", 38, ("single_transformer_blocks",), "single")),
    outs=_blocks(("final_layer", "norm_out", "proj_out")))

# Chroma: Flux.1's blocks without vector_in/time_in/guidance_in, plus the
# distilled guidance approximator (comfy/ldm/chroma/model.py; diffusers
# transformer_chroma.py keeps distilled_guidance_layer). No ComfyUI merge node.
CHROMA = PrefixBlocks(
    "chroma", "Chroma's own modules (no ComfyUI merge node; ModelMergeFlux1's style)",
    ins=_blocks(("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                "distilled_guidance_layer"),
    stacks=(Stack("DOUBLE", "double_blocks", 19, ("transformer_blocks",), "double"),
            Stack("SINGLE", "single_blocks", 38, ("single_transformer_blocks",), "single")),
    outs=_blocks(("final_layer", "norm_out", "proj_out")))

# Flux.2: 8 double and 48 single blocks with shared modulations
# (comfy/ldm/flux/model.py; diffusers transformer_flux2.py). No ComfyUI node.
FLUX2 = PrefixBlocks(
    "flux2", "Flux.2's own modules (no ComfyUI merge node; ModelMergeFlux1's style)",
    ins=_blocks(("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                ("time_in", "time_guidance_embed.timestep_embedder"),
                ("guidance_in", "time_guidance_embed.guidance_embedder")),
    shared=_blocks("double_stream_modulation_img", "double_stream_modulation_txt",
                   "single_stream_modulation"),
    stacks=(Stack("DOUBLE", "double_blocks", 8, ("transformer_blocks",), "double"),
            Stack("SINGLE", "single_blocks", 48, ("single_transformer_blocks",), "single")),
    outs=_blocks(("final_layer", "norm_out", "proj_out")))

# ComfyUI's ModelMergeSD3_2B (24 joint blocks) and ModelMergeSD35_Large (38):
# one list of 38 covers every variant. Diffusers' SD3Transformer2DModel keeps the
# patch conv in pos_embed.proj (the longer prefix wins over pos_embed).
SD3 = PrefixBlocks(
    "sd3", "ComfyUI's ModelMergeSD3_2B / ModelMergeSD35_Large",
    ins=_blocks(("pos_embed", "pos_embed.pos_embed"), ("x_embedder", "pos_embed.proj"),
                "context_embedder", ("y_embedder", "time_text_embed.text_embedder"),
                ("t_embedder", "time_text_embed.timestep_embedder")),
    stacks=(Stack("JOINT", "joint_blocks", 38, ("transformer_blocks",), "joint"),),
    outs=_blocks(("final_layer", "norm_out", "proj_out")))

# ComfyUI's ModelMergeQwenImage, less pos_embeds (a rotary table with no
# weights in the file); norm_out goes with proj_out (ComfyUI would give it
# the first argument's value)
QWEN_IMAGE = PrefixBlocks(
    "qwen_image", "ComfyUI's ModelMergeQwenImage",
    ins=_blocks("img_in", "txt_norm", "txt_in", "time_text_embed"),
    stacks=(Stack("TRANSFORMER", "transformer_blocks", 60, (), "transformer"),),
    outs=_blocks(("proj_out", "norm_out")))

# ComfyUI's ModelMergeWAN2_1 (40 blocks for 14B, 30 for 1.3B and 5B; img_emb
# for image-to-video); diffusers' WanTransformer3DModel condition_embedder
# parts map to the original embedders, its output layers to head
WAN = PrefixBlocks(
    "wan", "ComfyUI's ModelMergeWAN2_1",
    ins=_blocks("patch_embedding", ("time_embedding", "condition_embedder.time_embedder"),
                ("time_projection", "condition_embedder.time_proj"),
                ("text_embedding", "condition_embedder.text_embedder"),
                ("img_emb", "condition_embedder.image_embedder")),
    stacks=(Stack("BLOCKS", "blocks", 40, (), "transformer"),),
    outs=_blocks(("head", "proj_out", "norm_out", "scale_shift_table")))

# Z-Image (Lumina 2's NextDiT, comfy/ldm/lumina/model.py; diffusers
# transformer_z_image.py: all_x_embedder.2-1, all_final_layer.2-1). No
# ComfyUI merge node. The pad tokens go with their embedders.
Z_IMAGE = PrefixBlocks(
    "z_image", "Z-Image's own modules (no ComfyUI merge node; ComfyUI's naming style)",
    ins=_blocks(("x_embedder", "all_x_embedder", "x_pad_token"), "t_embedder",
                ("cap_embedder", "cap_pad_token")),
    stacks=(Stack("NOISE_REFINER", "noise_refiner", 2, (), "noise refiner"),
            Stack("CONTEXT_REFINER", "context_refiner", 2, (), "context refiner"),
            Stack("LAYERS", "layers", 30, (), "main")),
    outs=_blocks(("final_layer", "all_final_layer")))

FAMILIES: dict[str, PrefixBlocks] = {b.family: b for b in (
    FLUX, CHROMA, FLUX2, SD3, QWEN_IMAGE, WAN, Z_IMAGE)}

"""Tiny seeded renders of Flux.1, SD3 and Qwen-Image through diffusers'
pipelines, with the transformer loaded from a modelkit single file in the
original (BFL / Stability / ComfyUI) layout through
:mod:`modelkit.arch.to_diffusers`: the loading and key mapping of each
family run end to end, offline.

The other components (VAE, text encoders) are built from tiny configs with
seeded random weights, and the tokenizers locally: the synthetic byte-level
CLIP tokenizer (:func:`modelkit.verify.tokenizer.synthetic_tokenizer`) and
a byte-level BPE with no merges for T5 and Qwen2 (the ``tokenizers``
library; no vocabulary file). These renders check that a file loads and
drives the pipeline, not what a real model draws.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.arch import to_diffusers
from modelkit.arch.configs import UNET_PREFIX
from modelkit.errors import ModelkitError

if TYPE_CHECKING:
    import os

    import numpy as np
    import torch

    from modelkit.io.source import Source

FAMILIES = ("flux", "sd3", "qwen_image")
TEXT_WIDTH = 32  # each CLIP text encoder's width (and projection)
SIZE = 32  # pixels; the tiny VAEs downsample by 2


@dataclass
class FamilyRender:
    """One render: the latents, the decoded image (H, W, 3 in [0, 1]) and
    the transformer keys loaded."""

    latents: np.ndarray
    image: np.ndarray
    loaded: int


def _shapes(source: Source) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The transformer's root prefix and its keys' shapes (unprefixed)."""
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in source.infos) else ""
    return prefix, {k[len(prefix):]: tuple(i.shape) for k, i in source.infos.items()
                    if k.startswith(prefix)}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with torch's RNG forked and seeded with ``seed`` (models built
    inside are the same every time, and the caller's RNG is left alone),
    with torch's own weight initializers (:func:`_real_init`)."""
    import torch

    with torch.random.fork_rng(), _real_init():
        torch.manual_seed(seed)
        yield


_INIT_MODULES = ("torch.nn.init", "torch.nn.modules.activation", "torch.nn.modules.linear",
                 "torch.nn.modules.conv", "torch.nn.modules.normalization",
                 "torch.nn.modules.transformer", "torch.nn.modules.batchnorm",
                 "torch.nn.modules.sparse", "torch.nn.modules.loss")


@contextmanager
def _real_init() -> Iterator[None]:
    """Build models inside with ``torch.nn.init``'s own functions.
    transformers' ``no_init_weights`` (transformers/initialization.py)
    swaps them for no-ops in ``torch.nn.init`` and ``torch.nn.modules.*``
    while it loads a model; a load that leaves it entered (seen in this
    project's suite after ``CLIPTextModel.from_pretrained``) left every
    model built later in the process with uninitialized memory as weights:
    NaN renders. Swapped functions are put back as they were afterwards."""
    import sys

    import torch.nn.init as init

    if all(getattr(init, n).__module__ == "torch.nn.init" for n in _init_names(init)):
        yield
        return
    real = _torch_init_copy()
    swapped = []
    for name in _INIT_MODULES:
        module = sys.modules.get(name)
        for fn in _init_names(init):
            now = getattr(module, fn, None)
            if now is not None and getattr(now, "__module__", None) != "torch.nn.init":
                swapped.append((module, fn, now))
                setattr(module, fn, getattr(real, fn))
    try:
        yield
    finally:
        for module, fn, now in swapped:
            setattr(module, fn, now)


@functools.cache
def _torch_init_copy() -> Any:
    """A private copy of ``torch.nn.init``, loaded once from its file (its
    functions are torch's own whatever the module's attributes now are)."""
    import importlib.util

    import torch.nn.init as init

    spec = importlib.util.spec_from_file_location("modelkit_torch_init", init.__file__)
    assert spec is not None and spec.loader is not None
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    return real


def _init_names(init: Any) -> list[str]:
    """The in-place initializers of ``torch.nn.init`` (``normal_``, ...)."""
    return [n for n in vars(init) if n.endswith("_") and not n.startswith("_")
            and callable(getattr(init, n))]


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def load_mapped(model: Any, source: Source, prefix: str,
                key_map: to_diffusers.KeyMap) -> int:
    """Load ``model`` from ``source`` through ``key_map``; every parameter
    must come from the file.

    Raises:
        ModelkitError: a key the map needs is missing from the file, or the
            model has parameters the map does not fill.
    """
    import torch

    missing = [p.source for p in key_map.values() if prefix + p.source not in source.infos]
    if missing:
        raise ModelkitError(f"{prefix + missing[0]}: missing from the file "
                            f"({len(missing)} keys); the transformer is incomplete")
    state = {}
    for target, piece in key_map.items():
        t = source.get(prefix + piece.source).to(torch.float32)
        if piece.rows is not None:
            t = t[piece.rows[0]:piece.rows[1]]
        if piece.swap:
            first, second = t.chunk(2, 0)
            t = torch.cat([second, first], 0)
        state[target] = t.contiguous()
    result = model.load_state_dict(state, strict=False)
    # SD3's position table is a buffer diffusers computes (a file may carry it too)
    left = [k for k in result.missing_keys if not k.endswith("pos_embed")]
    if left or result.unexpected_keys:
        raise ModelkitError(f"{left[:1] or result.unexpected_keys[:1]}: the key map and the "
                            "diffusers model disagree")
    return len(state)


# --- tokenizers -----------------------------------------------------------------------------


def byte_tokenizer(pad: str, eos: str, unk: str, extra: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE tokenizer with no merges (one token a byte, plus the
    special tokens), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from modelkit.verify.tokenizer import byte_alphabet

    specials = list(dict.fromkeys((pad, eos, unk, *extra)))
    vocab = {t: i for i, t in enumerate(specials + byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos,
                                   unk_token=unk, model_max_length=512)


def _clip(projection: bool = False, seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                         num_attention_heads=4, num_hidden_layers=1, vocab_size=1000,
                         projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
                         bos_token_id=512, eos_token_id=513, pad_token_id=513)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _seeded(seed):
        return cls(cfg).eval()


def _vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    with _seeded(seed):
        vae: Any = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                             block_out_channels=(8, 16), layers_per_block=1,
                             norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                             use_post_quant_conv=False, scaling_factor=0.3611,
                             shift_factor=0.1159)
    return vae.eval()


# --- per family ------------------------------------------------------------------------


def _flux(source: Source) -> tuple[Any, int]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from modelkit.arch.flux import FluxConfig
    from modelkit.verify.tokenizer import synthetic_tokenizer

    prefix, shapes = _shapes(source)
    h, in_ch = shapes["img_in.weight"]
    head = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    cfg = FluxConfig(in_channels=in_ch, out_channels=shapes["final_layer.linear.weight"][0],
                     vec_in_dim=shapes["vector_in.in_layer.weight"][1],
                     context_in_dim=shapes["txt_in.weight"][1], hidden_size=h,
                     num_heads=h // head, depth=_count(shapes, r"double_blocks\.(\d+)\."),
                     depth_single_blocks=_count(shapes, r"single_blocks\.(\d+)\."),
                     guidance_embed="guidance_in.in_layer.weight" in shapes)
    with _seeded(0):
        transformer: Any = FluxTransformer2DModel(
            patch_size=1, in_channels=in_ch, num_layers=cfg.depth,
            num_single_layers=cfg.depth_single_blocks, attention_head_dim=head,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
            axes_dims_rope=_rope_axes(head))
    loaded = load_mapped(transformer, source, prefix, to_diffusers.flux_map(cfg))
    with _seeded(1):
        t5 = T5EncoderModel(T5Config(vocab_size=300, d_model=cfg.context_in_dim, d_ff=64,
                                     d_kv=16, num_layers=1, num_heads=2,
                                     feed_forward_proj="gated-gelu")).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                        text_encoder=_clip(), tokenizer=synthetic_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=byte_tokenizer("<pad>", "</s>", "<unk>"),
                        transformer=transformer.eval())
    return pipe, loaded


def _rope_axes(head: int) -> tuple[int, int, int]:
    """Flux's RoPE axes (16, 56, 56) at 128 channels a head, scaled."""
    side = (head - head // 8) // 2 // 2 * 2
    return head - 2 * side, side, side


def _sd3(source: Source) -> tuple[Any, int]:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from modelkit.arch.sd3 import SD3Config
    from modelkit.verify.tokenizer import synthetic_tokenizer

    prefix, shapes = _shapes(source)
    depth = _count(shapes, r"joint_blocks\.(\d+)\.")
    hidden, in_ch, patch, _ = shapes["x_embedder.proj.weight"]
    pos = round(shapes["pos_embed"][1] ** 0.5)
    attn2 = _count(shapes, r"joint_blocks\.(\d+)\.x_block\.attn2\.")
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    cfg = SD3Config(depth=depth, pos_embed_max=pos, qk_norm=qk, attn2_layers=attn2,
                    in_channels=in_ch, patch=patch,
                    adm_in=shapes["y_embedder.mlp.0.weight"][1],
                    context_in=shapes["context_embedder.weight"][1])
    with _seeded(0):
        transformer: Any = SD3Transformer2DModel(
            sample_size=pos, patch_size=patch, in_channels=in_ch, num_layers=depth,
            attention_head_dim=64, num_attention_heads=hidden // 64,
            joint_attention_dim=cfg.context_in, caption_projection_dim=hidden,
            pooled_projection_dim=cfg.adm_in, out_channels=in_ch, pos_embed_max_size=pos,
            dual_attention_layers=tuple(range(attn2)), qk_norm="rms_norm" if qk else None)
    loaded = load_mapped(transformer, source, prefix, to_diffusers.sd3_map(cfg))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(), text_encoder=_clip(True, 0), tokenizer=synthetic_tokenizer(),
        text_encoder_2=_clip(True, 1), tokenizer_2=synthetic_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    return pipe, loaded


def _qwen_image(source: Source) -> tuple[Any, int]:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from modelkit.arch.qwen_image import QwenImageConfig

    prefix, shapes = _shapes(source)
    hidden, in_ch = shapes["img_in.weight"]
    head = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    text = shapes["txt_norm.weight"][0]
    cfg = QwenImageConfig(in_channels=in_ch, out_channels=shapes["proj_out.weight"][0] // 4,
                          num_layers=_count(shapes, r"transformer_blocks\.(\d+)\."),
                          head_dim=head, num_heads=hidden // head, joint_attention_dim=text)
    with _seeded(0):
        transformer: Any = QwenImageTransformer2DModel(
            patch_size=2, in_channels=in_ch, out_channels=cfg.out_channels,
            num_layers=cfg.num_layers, attention_head_dim=head, num_attention_heads=cfg.num_heads,
            joint_attention_dim=text, axes_dims_rope=_rope_axes(head))
    loaded = load_mapped(transformer, source, prefix, to_diffusers.qwen_image_map(cfg))
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    tok = byte_tokenizer("<|endoftext|>", "<|im_end|>", "<|endoftext|>", specials)
    te_cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": text, "intermediate_size": 2 * text,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": len(tok),
                     "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                     "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16,
                       "num_heads": 2, "out_hidden_size": text, "fullatt_block_indexes": [0]},
        image_token_id=len(tok) - 2, video_token_id=len(tok) - 1)
    with _seeded(2):
        te = Qwen2_5_VLForConditionalGeneration(te_cfg).eval()
        vae: Any = AutoencoderKLQwenImage(base_dim=8, z_dim=cfg.out_channels,
                                          dim_mult=[1, 2], num_res_blocks=1,
                                          temperal_downsample=[False])
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                             text_encoder=te, tokenizer=tok, transformer=transformer.eval())
    return pipe, loaded


BUILDERS = {"flux": _flux, "sd3": _sd3, "qwen_image": _qwen_image}


def render_family(path: str | os.PathLike[str], family: str, prompt: str, seed: int = 0,
                  steps: int = 1) -> FamilyRender:
    """Render ``prompt`` at :data:`SIZE` pixels with the transformer of the
    single file ``path`` (``family``: one of :data:`FAMILIES`), one thread."""
    import numpy as np
    import torch

    from modelkit.io.open import open_source
    from modelkit.verify.render import torch_threads

    if family not in BUILDERS:
        raise ModelkitError(f"no tiny render for {family!r}; choose one of "
                            f"{', '.join(FAMILIES)}")
    with torch_threads(1), torch.no_grad():
        pipe, loaded = BUILDERS[family](open_source(Path(path)))
        kwargs: dict[str, Any] = {"height": SIZE, "width": SIZE,
                                  "num_inference_steps": steps,
                                  "generator": torch.Generator().manual_seed(seed)}
        if family != "qwen_image":
            kwargs["max_sequence_length"] = 16
        pipe.set_progress_bar_config(disable=True)
        seen: dict[str, torch.Tensor] = {}

        def keep(_pipe: Any, _step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            seen["latents"] = tensors["latents"].clone()
            return tensors

        image = pipe(prompt, output_type="np", callback_on_step_end=keep, **kwargs).images
    return FamilyRender(seen["latents"].numpy().astype(np.float32),
                        np.asarray(image, dtype=np.float32).reshape(-1, SIZE, SIZE, 3)[0],
                        loaded)

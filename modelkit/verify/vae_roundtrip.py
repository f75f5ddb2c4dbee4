"""The VAE round trip: encode a fixed synthetic picture, decode it, and
compare. A txt2img render never runs the encoder; img2img, inpainting and
hires fix do, so a broken encoder passes every render check but this one.

The picture (:func:`test_picture`) is deterministic: smooth gradients, a
checkerboard, a disc and thin lines (edges at every angle a VAE must keep).
The VAE is the file's own KL autoencoder (SD's 4-channel one, or the
16-channel Flux/SD3 ``ae`` without quant convs), run by
:class:`KLAutoencoder` on the file's weights at the widths the keys show
(bench/bench_vae_roundtrip.py checks it against diffusers' ``AutoencoderKL``);
the latent is the posterior mean, so the result is deterministic.

* With a reference, the candidate's reconstruction is compared with the
  reference's (PSNR; limit ``ROUND_TRIP[family].relative``): meaningful
  for random-weight test models too. Judged when the candidate keeps the
  reference's VAE but for storage (a cast, a quantization, a rewrite:
  judged gates or such an operation); after a merge, which may bake
  another VAE in, it is reported and a full-size VAE is judged alone.
* Without one, a full-size VAE must reconstruct the picture itself
  (``ROUND_TRIP[family].absolute``); a test model's VAE is random, so its
  figure is reported only.

The check is ``vae.round_trip``; the report's ``vae_round_trip`` section
holds the figures.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelkit.core.verify_thresholds import FAIL, INFO, PASS, ROUND_TRIP, SKIP
from modelkit.errors import CancelFlag, check_cancel
from modelkit.verify.report import Check

if TYPE_CHECKING:
    import torch

    from modelkit.io.source import Source
    from modelkit.verify.models import ModelUnderTest
    from modelkit.verify.report import VerifyReport

VAE_PREFIXES = ("first_stage_model.", "vae.", "")
TINY_VAE_CHANNELS = 64  # encoder widths below this are test models (real: 128)
SIZES = {True: 64, False: 256}  # picture side: test model, full size
NAME = "vae.round_trip"
# operations that keep the reference's VAE but for its storage
SAME_VAE = ("lossless", "fp16", "bf16", "fp8", "int8")


@dataclass(frozen=True)
class VaeLayout:
    """A KL autoencoder found in a source: where and at which widths."""

    prefix: str
    channels: tuple[int, ...]
    layers: int
    latent: int
    quant_conv: bool

    @property
    def family(self) -> str:
        return f"kl{self.latent}"

    @property
    def tiny(self) -> bool:
        return self.channels[0] < TINY_VAE_CHANNELS


def find_vae(source: Source) -> VaeLayout | None:
    """The KL VAE in ``source`` (under ``first_stage_model.``, ``vae.`` or
    unprefixed), or None."""
    infos = source.infos
    for prefix in VAE_PREFIXES:
        conv_in = infos.get(prefix + "encoder.conv_in.weight")
        dec_in = infos.get(prefix + "decoder.conv_in.weight")
        if conv_in is None or dec_in is None:
            continue
        levels = sorted({int(m.group(1)) for k in infos
                         if (m := re.match(re.escape(prefix) + r"encoder\.down\.(\d+)\.block\.0"
                                                               r"\.conv1\.weight$", k))})
        blocks = {int(m.group(1)) for k in infos
                  if (m := re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", k))}
        if not levels or not blocks:
            return None
        widths = tuple(int(infos[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0])
                       for i in levels)
        return VaeLayout(prefix, widths, len(blocks), int(dec_in.shape[1]),
                         prefix + "quant_conv.weight" in infos)
    return None


def test_picture(size: int) -> torch.Tensor:
    """The fixed picture, ``[1, 3, size, size]`` in [-1, 1]: a colour
    gradient, a checkerboard of 8-pixel squares in one quadrant, a disc,
    and one-pixel lines."""
    import torch

    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size),
                          indexing="ij")
    img = torch.stack([x, y, 1 - (x + y) / 2])
    cells = ((torch.arange(size)[:, None] // 8 + torch.arange(size)[None, :] // 8) % 2).float()
    quad = (x > 0.5) & (y < 0.5)
    img = torch.where(quad, cells.expand(3, -1, -1), img)
    disc = (x - 0.3) ** 2 + (y - 0.7) ** 2 < 0.04
    img = torch.where(disc, torch.tensor([0.9, 0.2, 0.1])[:, None, None], img)
    img[:, size // 8, :] = 1.0
    img[:, :, size // 8] = 0.0
    idx = torch.arange(size)
    img[:, idx, idx] = 1.0  # a diagonal
    return (img * 2 - 1).unsqueeze(0)


class _Weights:
    """The VAE's tensors in float32, read from the source by LDM name."""

    def __init__(self, source: Source, prefix: str) -> None:
        self.source, self.prefix = source, prefix

    def __call__(self, name: str) -> torch.Tensor:
        return self.source.get(self.prefix + name).float()

    def has(self, name: str) -> bool:
        return self.prefix + name in self.source.infos


class KLAutoencoder:
    """The LDM/BFL KL autoencoder's forward pass in plain torch, on the
    file's own weights and key names (CompVis/stable-diffusion
    ``ldm/modules/diffusionmodules/model.py``: ``Encoder``, ``Decoder``,
    ``ResnetBlock``, ``AttnBlock``, ``Downsample`` with its (0, 1, 0, 1)
    padding, nearest ``Upsample``; GroupNorm eps 1e-6; black-forest-labs/flux
    ``src/flux/modules/autoencoder.py`` is the same without quant convs).
    No diffusers import: it costs seconds, the pass a fraction of one."""

    def __init__(self, source: Source, layout: VaeLayout) -> None:
        from modelkit.arch.diffusers_names import norm_groups

        self.w = _Weights(source, layout.prefix)
        self.layout = layout
        self.groups = norm_groups(list(layout.channels))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        import torch.nn.functional as F

        return F.group_norm(x, self.groups, self.w(name + ".weight"), self.w(name + ".bias"),
                            eps=1e-6)

    def _conv(self, x: torch.Tensor, name: str, stride: int = 1, padding: int = -1
              ) -> torch.Tensor:
        import torch.nn.functional as F

        weight = self.w(name + ".weight")
        pad = weight.shape[-1] // 2 if padding < 0 else padding
        return F.conv2d(x, weight, self.w(name + ".bias"), stride=stride, padding=pad)

    def _resnet(self, x: torch.Tensor, name: str) -> torch.Tensor:
        import torch.nn.functional as F

        h = self._conv(F.silu(self._norm(x, name + ".norm1")), name + ".conv1")
        h = self._conv(F.silu(self._norm(h, name + ".norm2")), name + ".conv2")
        if self.w.has(name + ".nin_shortcut.weight"):
            x = self._conv(x, name + ".nin_shortcut")
        return x + h

    def _attn(self, x: torch.Tensor, name: str) -> torch.Tensor:
        import torch

        h = self._norm(x, name + ".norm")
        b, c, hh, ww = h.shape
        q, k, v = (self._conv(h, f"{name}.{p}").reshape(b, c, hh * ww) for p in "qkv")
        attn = torch.softmax(q.transpose(1, 2) @ k * c ** -0.5, dim=-1)  # [b, hw, hw]
        out = (v @ attn.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self._conv(out, name + ".proj_out")

    def _mid(self, x: torch.Tensor, side: str) -> torch.Tensor:
        x = self._resnet(x, f"{side}.mid.block_1")
        x = self._attn(x, f"{side}.mid.attn_1")
        return self._resnet(x, f"{side}.mid.block_2")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean of ``x`` ([-1, 1] pictures)."""
        import torch.nn.functional as F

        h = self._conv(x, "encoder.conv_in")
        levels = len(self.layout.channels)
        for i in range(levels):
            for j in range(self.layout.layers):
                h = self._resnet(h, f"encoder.down.{i}.block.{j}")
            if i != levels - 1:
                h = self._conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv",
                               stride=2, padding=0)
        h = self._mid(h, "encoder")
        h = self._conv(F.silu(self._norm(h, "encoder.norm_out")), "encoder.conv_out")
        if self.layout.quant_conv:
            h = self._conv(h, "quant_conv")
        return h[:, :self.layout.latent]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The picture of latent ``z``."""
        import torch.nn.functional as F

        if self.layout.quant_conv:
            z = self._conv(z, "post_quant_conv")
        h = self._mid(self._conv(z, "decoder.conv_in"), "decoder")
        for i in reversed(range(len(self.layout.channels))):
            for j in range(self.layout.layers + 1):
                h = self._resnet(h, f"decoder.up.{i}.block.{j}")
            if i != 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self._conv(h, f"decoder.up.{i}.upsample.conv")
        return self._conv(F.silu(self._norm(h, "decoder.norm_out")), "decoder.conv_out")


def reconstruct(source: Source, layout: VaeLayout, picture: torch.Tensor) -> torch.Tensor:
    """Encode ``picture`` (posterior mean), decode, in float32: ``[1, 3, H, W]``.

    Raises:
        KeyError, RuntimeError: missing or misshapen weights.
    """
    import torch

    vae = KLAutoencoder(source, layout)
    with torch.inference_mode():
        return vae.decode(vae.encode(picture))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two pictures in [-1, 1], measured in [0, 1] (NaN when
    either is not finite; inf when equal)."""
    import torch

    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return math.nan
    x = ((a.clamp(-1, 1) + 1) / 2).double()
    y = ((b.clamp(-1, 1) + 1) / 2).double()
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _source_of(model: ModelUnderTest) -> Source | None:
    """What holds the model's own VAE (None: a UNet completed from the
    reference carries the reference's VAE, nothing of its own to test)."""
    return None if model.completed else model.render_source


def round_trip(model: ModelUnderTest, reference: ModelUnderTest | None,
               cancel: CancelFlag | None = None, *, same_vae: bool = True
               ) -> tuple[Check, dict[str, Any] | None]:
    """The ``vae.round_trip`` check and the report's figures. ``same_vae``:
    the candidate's VAE should be the reference's but for storage (a cast,
    a quantization, a rewrite); a merge may bake another VAE in, so then the
    comparison is reported and only a full-size VAE's own figure judged."""
    src = _source_of(model)
    layout = find_vae(src) if src is not None else None
    if src is None or layout is None:
        why = ("the VAE is the reference's" if model.completed else "no VAE in the file")
        return Check(NAME, SKIP, why), None
    picture = test_picture(SIZES[layout.tiny])
    check_cancel(cancel)
    try:
        cand = reconstruct(src, layout, picture)
    except (KeyError, RuntimeError) as exc:
        return Check(NAME, FAIL, f"the VAE does not run: {str(exc).splitlines()[0]}"), None
    own = psnr(cand, picture)
    limits = ROUND_TRIP.get(layout.family)
    figures: dict[str, Any] = {"family": layout.family, "size": picture.shape[-1],
                               "channels": list(layout.channels), "psnr_vs_picture": own}
    ref_layout = find_vae(reference.render_source) if reference is not None else None
    if reference is not None and ref_layout == layout:
        check_cancel(cancel)
        ref_rec = reconstruct(reference.render_source, layout, picture)
        figures["reference_psnr_vs_picture"] = psnr(ref_rec, picture)
        value = figures["psnr_vs_reference"] = psnr(cand, ref_rec)
        bound = limits.relative if limits else math.inf
        ok = value >= bound
        msg = (f"candidate vs reference reconstruction of the {picture.shape[-1]}px test "
               f"picture; each vs the picture: {own:.1f} / "
               f"{figures['reference_psnr_vs_picture']:.1f} dB")
        if same_vae or ok:
            if not ok:
                msg = "the VAE reconstructs differently from the reference's: " + msg
            return Check(NAME, PASS if ok else FAIL, msg, value, f">= {bound:g} dB"), figures
        if layout.tiny or limits is None:
            return Check(NAME, INFO, msg + " (a merge may bake another VAE in: reported)",
                         value), figures
        figures["psnr_vs_reference_reported"] = True
    if not math.isfinite(own) and own != math.inf:
        return Check(NAME, FAIL, "the reconstruction is not finite", own), figures
    if layout.tiny or limits is None:
        return Check(NAME, INFO, "test-model VAE (random weights): PSNR vs the picture "
                     "reported, not judged; give --reference to compare", own), figures
    ok = own >= limits.absolute
    msg = f"{layout.family} VAE, {picture.shape[-1]}px test picture"
    return Check(NAME, PASS if ok else FAIL, msg if ok else "poor reconstruction: " + msg,
                 own, f">= {limits.absolute:g} dB"), figures


def round_trip_check(report: VerifyReport, model: ModelUnderTest,
                     reference: ModelUnderTest | None,
                     cancel: CancelFlag | None = None) -> Check:
    """:func:`round_trip`, with its figures stored in ``report.vae``."""
    same = bool(report.gates and report.gates["judged"]) or report.operation in SAME_VAE
    check, figures = round_trip(model, reference, cancel, same_vae=same)
    report.vae = figures
    return check

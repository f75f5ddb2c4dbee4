"""One ΔW engine for every adapter format.

Notation: W is the base weight viewed as a matrix ``[out, cols]`` (a conv
kernel ``[out, in, kh, kw]`` is ``[out, in*kh*kw]``), k the user strength and
s the module scale.

* **LoRA / LoCon** (kohya, PEFT, diffusers, ComfyUI): ΔW = s·up@down with
  up ``[out, r]`` and down ``[r, cols]`` (1x1 and 3x3 kernels flatten the
  same way); Tucker ``lora_mid``: ΔW[o,i,h,w] = s·Σ up[o,a]·mid[a,b,h,w]·down[b,i].
  s = alpha / ``down.shape[0]``.
* **LoHa**: ΔW = s·(w1_a@w1_b) ⊙ (w2_a@w2_b); with Tucker each factor is
  Σ t[i,j,h,w]·w_b[j,c]·w_a[i,o]. s = alpha / ``hada_w1_b.shape[0]``, applied
  once (LyCORIS's own merge applies it twice).
* **LoKr**: ΔW = s·kron(w1, w2), each factor full or a product (w2 also in
  Tucker form); s = alpha / rank only when a factor is decomposed, else 1.
* **(IA)3**: ΔW = W ⊙ w per output row (per input channel with ``on_input``).
* **full**: ΔW = ``diff``, Δb = ``diff_b``; **norm**: ``w_norm``/``b_norm``.
* **DoRA** (``dora_scale`` / PEFT ``lora_magnitude_vector``): W_c = W + ΔW,
  W' = W + k·(m·W_c/‖W_c‖ − W): the A1111/ComfyUI strength rule (k scales
  the whole update, k = 0 leaves W alone; LyCORIS's own rule differs when
  k ≠ 1). The norm axis comes from the shape of m: ``[out, 1, ...]`` or
  ``[out]`` normalises each output row, ``[1, in, ...]`` each input channel
  (over all rows and the kernel); a 1-D ``dora_scale`` on a square layer is
  ambiguous and refused. ‖W_c‖ always includes the update (ComfyUI's
  output-axis path uses ‖W‖, a known bug). No peer computes exactly this
  for a per-output m at k ≠ 1; docs/lora.md says why it is the choice.

A missing alpha means s = 1. Every computation is float32.

The formulas are those of the formats' readers: KohakuBlueleaf/LyCORIS
``lycoris/functional/`` (``general.py``, ``loha.py``, ``lokr.py``) and
``lycoris/modules/locon.py``; comfyanonymous/ComfyUI ``comfy/weight_adapter/``
(``lora.py``, ``loha.py``, ``lokr.py``, ``base.py`` ``weight_decompose``);
AUTOMATIC1111/stable-diffusion-webui ``extensions-builtin/Lora/`` (``network.py``,
``network_hada.py``, ``network_lokr.py``, ``network_ia3.py``, ``network_full.py``);
kohya-ss/sd-scripts ``networks/merge_lora.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from modelkit.errors import ModelkitError
from modelkit.lora.adapter import DOWN, MID, UP, Adapter, AdapterModule

if TYPE_CHECKING:
    import torch

DORA = "dora_scale"
EPS = 1e-12


def _shape(ad: Adapter, mod: AdapterModule, suffix: str) -> tuple[int, ...]:
    return tuple(ad.source.infos[mod.keys[suffix]].shape)


def _prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _lokr_factor_shape(ad: Adapter, mod: AdapterModule, n: int) -> tuple[int, int]:
    k = mod.keys
    if f"lokr_w{n}" in k:
        s = _shape(ad, mod, f"lokr_w{n}")
        return s[0], _prod(s[1:])
    if n == 2 and "lokr_t2" in k:
        t, b = _shape(ad, mod, "lokr_t2"), _shape(ad, mod, "lokr_w2_b")
        return _shape(ad, mod, "lokr_w2_a")[1], b[1] * _prod(t[2:])
    a, b = _shape(ad, mod, f"lokr_w{n}_a"), _shape(ad, mod, f"lokr_w{n}_b")
    return a[0], b[1]


def delta_shape(ad: Adapter, mod: AdapterModule) -> tuple[int, int]:
    """``(out, cols)`` of the module's ΔW, from the header alone (IA3:
    the length of its scale vector and 0)."""
    k = mod.keys
    try:
        if mod.algo == "lora":
            up, down = _shape(ad, mod, UP), _shape(ad, mod, DOWN)
            if MID in k:
                return up[0], down[1] * _prod(_shape(ad, mod, MID)[2:])
            return up[0], _prod(down[1:])
        if mod.algo == "loha":
            a, b = _shape(ad, mod, "hada_w1_a"), _shape(ad, mod, "hada_w1_b")
            if "hada_t1" in k:
                return a[1], b[1] * _prod(_shape(ad, mod, "hada_t1")[2:])
            return a[0], b[1]
        if mod.algo == "lokr":
            (ra, ca), (rb, cb) = _lokr_factor_shape(ad, mod, 1), _lokr_factor_shape(ad, mod, 2)
            return ra * rb, ca * cb
        if mod.algo == "full":
            s = _shape(ad, mod, "diff") if "diff" in k else _shape(ad, mod, "diff_b")
            return s[0], _prod(s[1:]) if "diff" in k else 1
        if mod.algo == "norm":
            s = _shape(ad, mod, "w_norm") if "w_norm" in k else _shape(ad, mod, "b_norm")
            return s[0], 1
        return _prod(_shape(ad, mod, "weight")), 0  # ia3
    except KeyError as exc:
        raise ModelkitError(f"{ad.label}: module {mod.name} lacks tensor "
                            f"{exc.args[0]!r} for its {mod.algo} weights") from None


def rank_of(ad: Adapter, mod: AdapterModule) -> int | None:
    """The rank alpha is divided by (None when the module has no rank)."""
    k = mod.keys
    if mod.algo == "lora":
        return _shape(ad, mod, DOWN)[0]
    if mod.algo == "loha":
        return _shape(ad, mod, "hada_w1_b")[0]
    if mod.algo == "lokr":
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in k:
                return _shape(ad, mod, name)[0]
    return None


def module_scale(ad: Adapter, mod: AdapterModule) -> float:
    """s for the module: an explicit ``scale`` tensor, else alpha / rank,
    else diffusers' ``lora_alpha / r`` from the file's adapter metadata
    (1 without alpha, without a rank, and for full/norm/IA3 modules)."""
    if "scale" in mod.keys:
        return float(ad.get(mod.keys["scale"]).reshape(-1)[0])
    rank = rank_of(ad, mod)
    alpha = ad.alpha(mod)
    if alpha is None and mod.peft_scale is not None:
        return mod.peft_scale
    if rank is None or alpha is None:
        return 1.0
    return alpha / rank


class ModuleDelta:
    """ΔW of one module (scale s included, strength k not), float32, on
    ``device``. Row slices are computed on demand, so a LoRA's update is
    never materialised whole when the caller works in row chunks."""

    def __init__(self, ad: Adapter, mod: AdapterModule, device: str = "cpu") -> None:
        self.ad, self.mod, self.device = ad, mod, device
        self.out, self.cols = delta_shape(ad, mod)
        self.scale = module_scale(ad, mod)
        self.has_dora = DORA in mod.keys
        self.needs_base = self.has_dora or mod.algo == "ia3"
        # rows in diffusers' swapped-halves order (norm_out.linear): ΔW is put back
        self.swap = bool(mod.target is not None and mod.target.swap)
        if self.swap and self.needs_base:
            raise ModelkitError(f"{ad.label}: module {mod.name} is DoRA or (IA)3 on a weight "
                                "diffusers stores with its halves swapped; modelkit does not "
                                "reorder those: leave this module out")
        self._full: torch.Tensor | None = None
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bound: float | None = None

    def _t(self, suffix: str) -> torch.Tensor:
        import torch

        return self.ad.get(self.mod.keys[suffix]).to(self.device, torch.float32)

    def has(self, suffix: str) -> bool:
        return suffix in self.mod.keys

    # --- low-rank factors --------------------------------------------------------

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(up [out, r], down [r, cols])`` with ΔW = s·up@down for LoRA
        modules (Tucker folded into down), else None."""
        if self.mod.algo != "lora":
            return None
        if self._factors is None:
            import torch

            up = self._t(UP).reshape(self.out, -1)
            down = self._t(DOWN)
            if self.has(MID):
                mid = self._t(MID)
                down = torch.einsum("abhw,bi->aihw", mid, down.reshape(down.shape[0], -1))
            self.check_finite(up, UP)
            self.check_finite(down, DOWN if not self.has(MID) else MID)
            self._factors = (swap_halves(up) if self.swap else up,
                             down.reshape(up.shape[1], -1))
        return self._factors

    # --- dense ΔW -----------------------------------------------------------------

    def _loha_factor(self, n: int) -> torch.Tensor:
        import torch

        a, b = self._t(f"hada_w{n}_a"), self._t(f"hada_w{n}_b")
        if self.has(f"hada_t{n}"):
            t = self._t(f"hada_t{n}")
            return torch.einsum("ijhw,jc,io->ochw", t, b, a).reshape(self.out, -1)
        return a @ b

    def _lokr_factor(self, n: int) -> torch.Tensor:
        import torch

        if self.has(f"lokr_w{n}"):
            w = self._t(f"lokr_w{n}")
            return w.reshape(w.shape[0], -1)
        if n == 2 and self.has("lokr_t2"):
            t, a, b = self._t("lokr_t2"), self._t("lokr_w2_a"), self._t("lokr_w2_b")
            w = torch.einsum("ijhw,jc,io->ochw", t, b, a)
            return w.reshape(w.shape[0], -1)
        return self._t(f"lokr_w{n}_a") @ self._t(f"lokr_w{n}_b")

    def _dense(self) -> torch.Tensor:
        import torch

        algo = self.mod.algo
        if algo == "lora":
            pair = self.factors()
            if pair is None:
                raise ModelkitError(f"{self.ad.label}: module {self.mod.name}: no LoRA factors")
            up, down = pair
            return (up @ down).mul_(self.scale)
        if algo == "loha":
            return self._loha_factor(1).mul_(self._loha_factor(2)).mul_(self.scale)
        if algo == "lokr":
            w1, w2 = self._lokr_factor(1).contiguous(), self._lokr_factor(2).contiguous()
            return torch.kron(w1, w2).mul_(self.scale)
        if algo == "full":
            if not self.has("diff"):
                return torch.zeros(self.out, self.cols, device=self.device)
            return self._t("diff").reshape(self.out, -1)
        if algo == "norm":
            if not self.has("w_norm"):
                return torch.zeros(self.out, 1, device=self.device)
            return self._t("w_norm").reshape(self.out, 1)
        raise ModelkitError(f"{self.ad.label}: module {self.mod.name}: (IA)3 needs the "
                            "base weight; it has no ΔW of its own")

    def full(self) -> torch.Tensor:
        """The whole ΔW ``[out, cols]`` (cached)."""
        if self._full is None:
            dense = self._dense()
            if self.swap and self.mod.algo != "lora":  # LoRA's up rows are swapped already
                dense = swap_halves(dense)
            self._full = self.check_finite(dense, "ΔW")
        return self._full

    def bound(self) -> float:
        """An upper bound of ΔW's elements' magnitude, the scale included
        (``s·max_i Σ_r |up_ir| · max |down|`` from the factors, else
        ``max |ΔW|``); loads the factors or ΔW, once."""
        if self._bound is None:
            pair = self.factors()
            if pair is not None:
                up, down = pair
                self._bound = 0.0 if up.numel() == 0 or down.numel() == 0 else (
                    abs(self.scale) * float(up.abs().sum(1).amax()) * float(down.abs().amax()))
            else:
                full = self.full()
                self._bound = float(full.abs().amax()) if full.numel() else 0.0
        return self._bound

    def release(self) -> None:
        """Forget the loaded factors and ΔW (the bound stays; they load
        again if asked): the bake is done with the weight they patch, and
        a LoRA on every layer of a 24 GB model would otherwise stay in
        memory whole by the end."""
        self._factors = self._full = None

    def check_finite(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t``, or a one-line error naming the module when it holds NaN or
        Inf (one reduction: cheap next to the matmul that made ``t``)."""
        import torch

        if not bool(torch.isfinite(t).all()):
            suffix = self.mod.keys.get(what, what)
            part = suffix[len(self.mod.name) + 1:] if suffix.startswith(self.mod.name) \
                else suffix
            why = ("its factors or alpha are too large for float32, or hold NaN/Inf"
                   if what == "ΔW" else "the adapter is broken")
            raise ModelkitError(f"{self.ad.label}: module {self.mod.name}: {part} holds NaN "
                                f"or Inf values; {why}")
        return t

    def add_rows_(self, acc: torch.Tensor, start: int, stop: int, k: float) -> None:
        """``acc += k·ΔW[start:stop]`` (``acc`` is ``[stop-start, cols]``
        float32). Modules that need the base weight are not handled here."""
        f = self.factors()
        if f is not None:
            up, down = f
            acc.addmm_(up[start:stop], down, alpha=k * self.scale)
            return
        acc.add_(self.full()[start:stop], alpha=k)

    def bias(self) -> torch.Tensor | None:
        """Δb (``diff_b`` or ``b_norm``), or None."""
        for suffix in ("diff_b", "b_norm"):
            if self.has(suffix):
                b = self._t(suffix).reshape(-1)
                return swap_halves(b) if self.swap else b
        return None

    # --- modules that read the base weight ------------------------------------------

    def base_update(self, w: torch.Tensor, k: float, shape: tuple[int, ...]) -> torch.Tensor:
        """k·(W' − W) for (IA)3 and DoRA modules, given the base rows ``w``
        (``[out, cols]`` float32) of a weight whose own shape is ``shape``."""
        if self.mod.algo == "ia3":
            return self._ia3(w, shape).mul_(k)
        wc = w + self.full()
        m = self.check_finite(self._t(DORA), DORA)
        axis = self.dora_axis(shape)
        if axis == "out":
            norm = wc.norm(dim=1, keepdim=True)
            return (wc * (m.reshape(-1, 1) / (norm + EPS))).sub_(w).mul_(k)
        kernel = _prod(shape[2:])
        view = wc.reshape(wc.shape[0], -1, kernel)
        norm = view.norm(dim=(0, 2), keepdim=True)
        scaled = view * (m.reshape(1, -1, 1) / (norm + EPS))
        return scaled.reshape_as(w).sub_(w).mul_(k)

    def _ia3(self, w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        scale = self.check_finite(self._t("weight").reshape(-1), "weight")
        on_input = self.ia3_on_input()
        if not on_input:
            return w * scale.reshape(-1, 1)
        kernel = _prod(shape[2:])
        return (w.reshape(w.shape[0], -1, kernel) * scale.reshape(1, -1, 1)).reshape_as(w)

    def ia3_on_input(self) -> bool:
        """Whether an (IA)3 module scales input channels (else output rows)."""
        return bool(self.ad.get(self.mod.keys["on_input"]).reshape(-1)[0])

    def dora_axis(self, shape: tuple[int, ...]) -> str:
        """``out`` or ``in``: the axis DoRA normalises, from the shape of m."""
        m = tuple(self.ad.source.infos[self.mod.keys[DORA]].shape)
        out, inn = shape[0], shape[1] if len(shape) > 1 else 1
        squeezed = [d for d in m if d != 1] or [1]
        key = self.mod.keys[DORA]
        if len(m) >= 2:
            if m[0] == out and _prod(m[1:]) == 1:
                return "out"
            if m[0] == 1 and m[1] == inn and _prod(m[2:]) == 1:
                return "in"
        elif len(squeezed) == 1 and squeezed[0] in (out, inn):
            if key.endswith(("lora_magnitude_vector", "lora_magnitude_vector.weight")):
                return "out"  # PEFT's magnitude is always per output row
            if out != inn:
                return "out" if squeezed[0] == out else "in"
            raise ModelkitError(f"{self.ad.label}: {key}: a 1-D dora_scale on a square "
                                f"layer ({out}x{inn}) does not say its axis; store it as "
                                f"[{out}, 1] (per output) or [1, {inn}] (per input)")
        raise ModelkitError(f"{self.ad.label}: {key} has shape {list(m)}, which fits "
                            f"neither axis of the patched weight {list(shape)}")


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its first and second halves of rows exchanged (its own
    inverse): diffusers' scale, shift order of an adaLN output <-> the
    original shift, scale (diffusers single_file_utils ``swap_scale_shift``)."""
    import torch

    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def target_view(shape: tuple[int, ...], rows: tuple[int, int] | None,
                of: int | None = None) -> tuple[int, int, int]:
    """``(row0, out, cols)`` of the part of a weight of ``shape`` a module
    patches: all of it, a q/k/v third of a fused ``in_proj_weight`` or, with
    ``of`` (the fused weight's rows ``rows`` counts in), that slice scaled to
    ``shape``'s rows (a Flux ``qkv`` or ``linear1`` part)."""
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    if rows is None:
        return 0, shape[0], cols
    if of is not None:
        return rows[0] * shape[0] // of, (rows[1] - rows[0]) * shape[0] // of, cols
    third = rows[0] // (rows[1] - rows[0])
    width = shape[0] // 3
    return third * width, width, cols


def check_fit(delta: ModuleDelta, base: str, shape: tuple[int, ...], out: int, cols: int
              ) -> None:
    """Refuse a module whose ΔW does not fit the part ``out x cols`` of the
    weight of ``shape`` it patches in checkpoint ``base`` (an (IA)3 vector
    must be as long as the rows, or with ``on_input`` the input channels)."""
    ad, mod = delta.ad, delta.mod
    key = mod.target.key if mod.target else "?"
    if mod.algo == "ia3":
        on_input = delta.ia3_on_input()
        need = (shape[1] if len(shape) > 1 else 1) if on_input else out
        if delta.out != need:
            axis = "input channels" if on_input else "output rows"
            raise ModelkitError(f"{ad.label}: module {mod.name}: its (IA)3 vector has "
                                f"{delta.out} values but {base}: {key} {list(shape)} has "
                                f"{need} {axis}; the adapter does not fit this checkpoint")
        return
    if (delta.out, delta.cols) != (out, cols):
        raise ModelkitError(f"{ad.label}: {next(iter(mod.keys.values()))}: ΔW is "
                            f"{delta.out}x{delta.cols} but {base}: {key} {list(shape)} needs "
                            f"{out}x{cols}; the adapter does not fit this checkpoint")


__all__ = ["ModuleDelta", "check_fit", "delta_shape", "module_scale", "rank_of", "swap_halves",
           "target_view"]

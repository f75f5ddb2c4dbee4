"""Validate every adapter module once, from the header (plus its scalar
alpha/scale values), before any command computes with it.

:func:`modelkit.lora.adapter.open_adapter` calls :func:`validate_adapter`,
so bake, info, resize, merge and convert all refuse the same malformed
modules with the same one-line message naming the file and the module:
a missing half (LoRA without ``lora_down``, LoHa without ``hada_w2_b``),
factors whose ranks disagree, a rank of 0 or any zero-size tensor, a
tensor with too few dimensions (a scalar ``lora_down``), an ``alpha`` /
``scale`` / ``on_input`` that is not one value, a non-finite ``alpha`` or
``scale``, an (IA)3 scale that is not a vector and a ``dora_scale`` that
fits neither axis of the module's ΔW. Tensor values other than those
scalars are checked where they are computed (:mod:`modelkit.lora.delta`).
"""

from __future__ import annotations

import math

from modelkit.errors import ModelkitError
from modelkit.lora.adapter import DOWN, MID, UP, Adapter, AdapterModule

SCALARS = ("alpha", "scale", "on_input")
DORA = "dora_scale"


class _Check:
    def __init__(self, ad: Adapter, mod: AdapterModule) -> None:
        self.ad, self.mod = ad, mod

    def fail(self, what: str) -> ModelkitError:
        return ModelkitError(f"{self.ad.label}: module {self.mod.name}: {what}")

    def name(self, suffix: str) -> str:
        """The suffix as the file spells it (``lora_A.weight`` for PEFT)."""
        key = self.mod.keys.get(suffix)
        if key is None:
            return suffix
        return key[len(self.mod.name) + 1:] if key.startswith(self.mod.name + ".") else key

    def shape(self, suffix: str, ndim: int | tuple[int, ...] | None = None) -> tuple[int, ...]:
        if suffix not in self.mod.keys:
            raise self.fail(f"lacks {suffix} for its {self.mod.algo} weights; the file is "
                            "incomplete")
        shape = tuple(self.ad.source.infos[self.mod.keys[suffix]].shape)
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if allowed is not None and len(shape) not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise self.fail(f"{self.name(suffix)} has shape {list(shape)}; a {want} tensor "
                            "is expected")
        return shape

    def same(self, a: int, b: int, what: str) -> None:
        if a != b:
            raise self.fail(what)


def _check_sizes(c: _Check) -> None:
    for suffix in c.mod.keys:
        shape = tuple(c.ad.source.infos[c.mod.keys[suffix]].shape)
        if suffix in SCALARS:
            if math.prod(shape) != 1:
                raise c.fail(f"{c.name(suffix)} has shape {list(shape)}; it must hold one "
                             "value")
        elif 0 in shape:
            raise c.fail(f"{c.name(suffix)} has shape {list(shape)} (zero size, rank 0); "
                         "the module holds no update")


def _lora(c: _Check) -> None:
    down = c.shape(DOWN, (2, 3, 4))
    up = c.shape(UP, (2, 3, 4))
    if math.prod(up[2:]) != 1:
        raise c.fail(f"{c.name(UP)} has shape {list(up)}; its kernel must be 1x1")
    if MID in c.mod.keys:
        mid = c.shape(MID, 4)
        c.same(mid[1], down[0], f"{c.name(MID)} {list(mid)} does not take the rank "
                                f"{down[0]} of {c.name(DOWN)} {list(down)}")
        c.same(up[1], mid[0], f"{c.name(UP)} {list(up)} does not take the rank {mid[0]} "
                              f"of {c.name(MID)} {list(mid)}")
        if math.prod(down[2:]) != 1:
            raise c.fail(f"{c.name(DOWN)} has shape {list(down)}; with {c.name(MID)} its "
                         "kernel must be 1x1")
        return
    c.same(up[1], down[0], f"{c.name(UP)} {list(up)} has rank {up[1]} but {c.name(DOWN)} "
                           f"{list(down)} has rank {down[0]}; the halves must share the rank")


def _loha(c: _Check) -> None:
    factors = []
    tucker = {"hada_t1", "hada_t2"} & c.mod.keys.keys()
    for n in (1, 2):
        a, b = c.shape(f"hada_w{n}_a", 2), c.shape(f"hada_w{n}_b", 2)
        if tucker:
            t = c.shape(f"hada_t{n}", 4)
            c.same(t[0], a[0], f"hada_t{n} {list(t)} does not fit hada_w{n}_a {list(a)}")
            c.same(t[1], b[0], f"hada_t{n} {list(t)} does not fit hada_w{n}_b {list(b)}")
            factors.append((a[1], b[1] * math.prod(t[2:])))
        else:
            c.same(a[1], b[0], f"hada_w{n}_a {list(a)} has rank {a[1]} but hada_w{n}_b "
                               f"{list(b)} has rank {b[0]}")
            factors.append((a[0], b[1]))
    c.same(factors[0][0], factors[1][0],
           f"its two Hadamard factors differ in size ({factors[0][0]}x{factors[0][1]} vs "
           f"{factors[1][0]}x{factors[1][1]})")
    c.same(factors[0][1], factors[1][1],
           f"its two Hadamard factors differ in size ({factors[0][0]}x{factors[0][1]} vs "
           f"{factors[1][0]}x{factors[1][1]})")


def _lokr(c: _Check) -> None:
    for n in (1, 2):
        if f"lokr_w{n}" in c.mod.keys:
            c.shape(f"lokr_w{n}", (2, 3, 4))
            continue
        if f"lokr_w{n}_a" not in c.mod.keys and f"lokr_w{n}_b" not in c.mod.keys:
            raise c.fail(f"lacks lokr_w{n} (or lokr_w{n}_a and lokr_w{n}_b) for its lokr "
                         "weights; the file is incomplete")
        a, b = c.shape(f"lokr_w{n}_a", 2), c.shape(f"lokr_w{n}_b", 2)
        if n == 2 and "lokr_t2" in c.mod.keys:
            t = c.shape("lokr_t2", 4)
            c.same(t[0], a[0], f"lokr_t2 {list(t)} does not fit lokr_w2_a {list(a)}")
            c.same(t[1], b[0], f"lokr_t2 {list(t)} does not fit lokr_w2_b {list(b)}")
        else:
            c.same(a[1], b[0], f"lokr_w{n}_a {list(a)} has rank {a[1]} but lokr_w{n}_b "
                               f"{list(b)} has rank {b[0]}")


def _others(c: _Check) -> None:
    algo = c.mod.algo
    if algo == "full":
        if "diff_b" in c.mod.keys:
            c.shape("diff_b", 1)
    elif algo == "norm":
        for s in ("w_norm", "b_norm"):
            if s in c.mod.keys:
                c.shape(s, 1)
    elif algo == "ia3":
        shape = c.shape("weight")
        if not shape or sum(d > 1 for d in shape) > 1:
            raise c.fail(f"(IA)3 scale has shape {list(shape)}; a vector is expected")
        c.shape("on_input")


def _dora(c: _Check) -> None:
    from modelkit.lora.delta import delta_shape

    m = c.shape(DORA)
    out, cols = delta_shape(c.ad, c.mod)
    n = math.prod(m)
    if not m or sum(d > 1 for d in m) > 1 or not (n == out or (cols and cols % n == 0)):
        raise c.fail(f"{c.name(DORA)} has shape {list(m)}, which fits neither axis of its "
                     f"{out}x{cols} update; it must be [{out}, 1] (per output) or "
                     "[1, in] (per input)")


def _values(c: _Check) -> None:
    for suffix in ("alpha", "scale"):
        if suffix in c.mod.keys:
            value = float(c.ad.get(c.mod.keys[suffix]).reshape(-1)[0])
            if not math.isfinite(value):
                raise c.fail(f"{c.name(suffix)} is {value}; it must be a finite number")


CHECKS = {"lora": _lora, "loha": _loha, "lokr": _lokr}


def validate_module(ad: Adapter, mod: AdapterModule) -> None:
    """Check one module's parts and shapes (and its alpha/scale values).

    Raises:
        ModelkitError: one line naming the file, the module and the problem.
    """
    c = _Check(ad, mod)
    _check_sizes(c)
    CHECKS.get(mod.algo, _others)(c)
    if DORA in mod.keys:
        _dora(c)
    _values(c)


def validate_adapter(ad: Adapter) -> None:
    """:func:`validate_module` for every module of ``ad``."""
    for mod in ad.modules.values():
        validate_module(ad, mod)


__all__ = ["validate_adapter", "validate_module"]

"""Merge methods: small pure tensor functions over one key's tensors.

Each method takes the tensors of one key as positional arguments (model A
first) and its parameters as keyword-only arguments, and returns one tensor of
the same shape and dtype. Inputs arrive already in the compute dtype (float32
normally) and on the compute device; methods do no I/O, keep no state, never
move tensors between devices and know nothing about key names. The merge
engine picks per-key parameter values (block weights) and calls them.

Conventions:

* ``alpha`` moves toward the *later* models (A1111/SuperMerger convention):
  ``weighted_sum(a, b, alpha=0.3)`` is 70% A, 30% B.
* At the ends the result is exact: ``alpha == 0`` returns model A itself
  (and ``weighted_sum``/``slerp`` return model B itself at ``alpha == 1``).
  A result may therefore *be* one of the inputs: callers must not modify
  results in place unless they own the inputs.
* Tensors of different shapes raise :class:`ModelkitError` instead of
  broadcasting.

Each method's ``reference`` names the tool (and paper) it matches; the tools'
repositories are AUTOMATIC1111/stable-diffusion-webui (``modules/extras.py``),
hako-mikan/sd-webui-supermerger (``scripts/mergers/mergers.py``), s1dlx/meh
(``sd_meh/merge_methods.py``) and ljleb/sd-mecha
(``sd_mecha/extensions/builtin/merge_methods/*.py``). This module is written
from the published formulas, not from the tools' code.
"""

from __future__ import annotations

import math
from itertools import combinations

from modelkit.core.registry import (
    DROPPED,
    METHOD,
    SAME,
    TRANSFORMS,
    TYPE_CHECKING,
    Annotated,
    Info,
    Transform,
    check_params,
    get_transform,
    transform,
)
from modelkit.errors import ModelkitError

if TYPE_CHECKING:  # torch is imported where a method runs: the declarations stay light
    import torch
    from torch import Tensor

# every method maps the primary model's keys to the same keys; keys only in
# the other models are dropped (the merge planner reports them as ignored)
MERGE_KEYS = (SAME, DROPPED)

__all__ = ["MERGE_KEYS", "check_params", "get_method", "methods"]


def methods() -> dict[str, Transform]:
    """Every registered merge method (per-key transforms), by name."""
    return {n: t for n, t in TRANSFORMS.items() if t.kind == METHOD}


def get_method(name: str) -> Transform:
    """The merge method registered as ``name``; unknown names raise a
    :class:`ModelkitError` with a suggestion and the known methods."""
    return get_transform(name, METHOD)


# --- helpers --------------------------------------------------------------------


def _same_shape(name: str, *tensors: Tensor) -> None:
    """Refuse to broadcast tensors of different shapes."""
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ModelkitError(f"{name}: tensor shapes differ: {tuple(shape)} vs "
                                f"{tuple(t.shape)}")


def _lerp(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) * a + alpha * b``, returning ``a`` or ``b`` itself at the ends."""
    import torch

    if alpha == 0:
        return a
    if alpha == 1:
        return b
    return torch.lerp(a, b, alpha)


def _unit_range(method: str, name: str, value: float, *, closed_top: bool = True) -> None:
    ok = 0 <= value <= 1 if closed_top else 0 <= value < 1
    if not ok:
        top = "1]" if closed_top else "1)"
        raise ModelkitError(f"{method}: {name} must be in [0, {top}, not {value}")


# --- parameters several methods share (declared once) -----------------------------

A1111_ALPHA = 0.3  # A1111's checkpoint merger default multiplier
Alpha = Annotated[float, Info("Weight toward B (A1111's multiplier): 0 gives A, 1 gives B.",
                               suggested=A1111_ALPHA)]
Beta = Annotated[float, Info("Weight toward C.")]


# --- linear family ----------------------------------------------------------------


@transform(
    "weighted_sum", summary="(1-alpha)*A + alpha*B",
    reference="A1111 modules/extras.py weighted_sum; SuperMerger 'Weight sum'; "
              "sd-mecha linear.py weighted_sum",
    elementwise=True, keys=MERGE_KEYS, a1111="Weighted sum",
    ends=(({"alpha": 0.0}, 0), ({"alpha": 1.0}, 1)),
    blend=("alpha",),
)
def weighted_sum(a: Tensor, b: Tensor, *, alpha: Alpha) -> Tensor:
    """``(1 - alpha) * a + alpha * b``: alpha moves toward B (A1111 convention).

    Returns ``a`` itself when ``alpha == 0`` and ``b`` itself when
    ``alpha == 1`` (``torch.lerp`` alone is not exact at both ends for all
    values). Other values, including extrapolation outside [0, 1], use
    ``torch.lerp``.

    ComfyUI's ``ModelMergeSimple`` ratio runs the other way:
    ``out = r * M1 + (1 - r) * M2``, so a ComfyUI ratio ``r`` is
    ``alpha = 1 - r`` here.
    """
    _same_shape("weighted_sum", a, b)
    return _lerp(a, b, alpha)


@transform(
    "add_difference", summary="A + alpha*(B - C)",
    reference="A1111 modules/extras.py add_difference; sd-mecha wrappers.py add_difference",
    elementwise=True, keys=MERGE_KEYS, a1111="Add difference",
    ends=(({"alpha": 0.0}, 0),),
    blend=("alpha",),
)
def add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: Alpha) -> Tensor:
    """``a + alpha * (b - c)``. Returns ``a`` itself when ``alpha == 0`` or
    ``b`` equals ``c`` (adding an exact zero would turn ``-0.0`` into ``0.0``)."""
    import torch

    _same_shape("add_difference", a, b, c)
    if alpha == 0 or torch.equal(b, c):
        return a
    return torch.add(a, b - c, alpha=alpha)


@transform(
    "triple_sum", summary="(1-alpha-beta)*A + alpha*B + beta*C",
    reference="SuperMerger 'Triple sum'; sd-meh merge_methods.py triple_sum",
    elementwise=True, keys=MERGE_KEYS,
    ends=(({"alpha": 0.0, "beta": 0.0}, 0), ({"alpha": 1.0, "beta": 0.0}, 1),
          ({"alpha": 0.0, "beta": 1.0}, 2)),
    blend=("alpha", "beta"),
)
def triple_sum(a: Tensor, b: Tensor, c: Tensor, *, alpha: Alpha, beta: Beta) -> Tensor:
    """``(1 - alpha - beta) * a + alpha * b + beta * c``. Exact (returns the
    input) when all the weight is on one model."""
    _same_shape("triple_sum", a, b, c)
    if beta == 0:
        return _lerp(a, b, alpha)
    if alpha == 0:
        return _lerp(a, c, beta)
    return a * (1 - alpha - beta) + b * alpha + c * beta


@transform(
    "sum_twice", summary="(1-beta)*((1-alpha)*A + alpha*B) + beta*C",
    reference="SuperMerger 'Sum Twice'; sd-meh merge_methods.py sum_twice",
    elementwise=True, keys=MERGE_KEYS,
    ends=(({"alpha": 0.0, "beta": 0.0}, 0), ({"alpha": 1.0, "beta": 0.0}, 1),
          ({"alpha": 0.5, "beta": 1.0}, 2)),
    blend=("alpha", "beta"),
)
def sum_twice(a: Tensor, b: Tensor, c: Tensor, *, alpha: Alpha, beta: Beta) -> Tensor:
    """``(1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c``: two chained
    weighted sums, each exact at its ends."""
    _same_shape("sum_twice", a, b, c)
    return _lerp(_lerp(a, b, alpha), c, beta)


# --- geometric ------------------------------------------------------------------------

_PARALLEL = 1 - 1e-6


@transform(
    "slerp", summary="spherical interpolation of directions, linear of norms",
    reference="sd-mecha linear.py slerp", keys=MERGE_KEYS,
    ends=(({"alpha": 0.0}, 0), ({"alpha": 1.0}, 1)),
    blend=("alpha",),
)
def slerp(a: Tensor, b: Tensor, *, alpha: Alpha) -> Tensor:
    """Spherical interpolation of the whole tensors' directions, with the norm
    interpolated linearly:
    ``(â sin((1-α)ω) + b̂ sin(αω)) / sin ω · ((1-α)‖a‖ + α‖b‖)`` where
    ``cos ω = ⟨â, b̂⟩``. Falls back to the linear weighted sum when either
    tensor is zero or the two are (anti)parallel (|cos ω| > 1 - 1e-6).
    Exact at ``alpha`` 0 and 1."""
    import torch

    _same_shape("slerp", a, b)
    if alpha in (0, 1):
        return _lerp(a, b, alpha)
    na = torch.linalg.vector_norm(a).item()
    nb = torch.linalg.vector_norm(b).item()
    if na == 0 or nb == 0 or not math.isfinite(na * nb):
        return torch.lerp(a, b, alpha)
    cos = torch.dot(a.reshape(-1), b.reshape(-1)).item() / (na * nb)
    if abs(cos) > _PARALLEL:
        return torch.lerp(a, b, alpha)
    omega = math.acos(max(-1.0, min(1.0, cos)))
    norm = (1 - alpha) * na + alpha * nb
    wa = math.sin((1 - alpha) * omega) / math.sin(omega) / na * norm
    wb = math.sin(alpha * omega) / math.sin(omega) / nb * norm
    return a * wa + b * wb


# --- difference-aware -----------------------------------------------------------------


@transform(
    "train_difference",
    summary="A + 1.8*alpha*(B-C)*|B-A|/(|B-C|+|B-A|)",
    reference="SuperMerger mergers.py traindiff (calcmode trainDifference)",
    elementwise=True, keys=MERGE_KEYS, ends=(({"alpha": 0.0}, 0),),
)
def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: Alpha) -> Tensor:
    """``a + 1.8 * alpha * (b - c) * |b - a| / (|b - c| + |b - a|)``, with the
    fraction 0 where the denominator is 0. Like SuperMerger, a key where ``b``
    equals ``c`` is left as ``a`` (returned itself), as is ``alpha == 0``."""
    import torch

    _same_shape("train_difference", a, b, c)
    if alpha == 0 or torch.equal(b, c):
        return a
    diff = b - c
    dist_a = (b - a).abs_()
    denom = diff.abs() + dist_a
    scale = torch.where(denom == 0, torch.zeros_like(denom), dist_a / denom)
    return torch.add(a, diff * scale, alpha=1.8 * alpha)


# --- task-vector methods ---------------------------------------------------------------


def _dare(delta: Tensor, p: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """Drop each element with probability ``p``; rescale survivors by 1/(1-p)."""
    import torch

    keep = torch.rand(delta.shape, generator=generator, device=delta.device) >= p
    kept = delta / (1 - p) if rescale else delta
    return torch.where(keep, kept, torch.zeros_like(delta))


TRIM_RULES = ("round", "mecha")


def _top_k(delta: Tensor, k: float, rule: str = "round") -> Tensor:
    """Keep the ``k`` fraction of elements with the largest magnitude, plus
    any tied with the smallest kept magnitude; the rest become 0.

    ``rule`` says how many: ``round`` keeps ``round(k * n)`` (at least one);
    ``mecha`` keeps ``n - int((1 - k) * n) + 1``, sd-mecha's count (its
    threshold is the ``int((1 - k) * n)``-th smallest magnitude), for
    bit-exact parity with sd-mecha's TIES."""
    import torch

    n = delta.numel()
    if k >= 1 or n == 0:
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    if rule == "mecha":
        kth = int((1 - k) * n)
        if kth < 1:
            return delta
    else:
        kth = n - max(1, round(k * n)) + 1
    mag = delta.abs()
    threshold = mag.reshape(-1).kthvalue(kth).values
    return torch.where(mag >= threshold, delta, torch.zeros_like(delta))


def _elect(deltas: Tensor, vote_sgn: bool) -> Tensor:
    """Disjoint mean of stacked deltas over entries agreeing with the elected
    sign (0 where none agree)."""
    import torch

    signs = torch.sign(deltas)
    elected = torch.sign(deltas.sum(0) if vote_sgn else signs.sum(0))
    agree = (signs == elected) & (signs != 0)
    count = agree.sum(0)
    total = torch.where(agree, deltas, torch.zeros_like(deltas)).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


@transform(
    "ties", keys=MERGE_KEYS, ends=(({"alpha": 0.0}, 0),), choices={"trim": TRIM_RULES},
    help={"alpha": "Scale of the merged task vector added to the base.",
          "k": "Share of each task vector kept, by magnitude (0..1).",
          "vote_sgn": "Elect each sign by the sum of the deltas, not their count.",
          "dare_p": "DARE: drop probability of each delta element (0: no DARE).",
          "dare_rescale": "DARE: scale the kept elements by 1/(1-dare_p).",
          "trim": "Element count rule of k: round, or mecha (sd-mecha's)."},
    summary="TIES (optionally DARE) merge of task vectors M_i - base",
    reference="TIES-Merging (arXiv 2306.01708); DARE (arXiv 2311.03099); sd-mecha ties.py "
              "ties_sum (trim: mecha for its element count); mergekit ties",
)
def ties(base: Tensor, *models: Tensor, alpha: float = 1.0, k: float = 0.2,
         vote_sgn: bool = False, dare_p: float = 0.0, dare_rescale: bool = True,
         trim: str = "round", generator: torch.Generator | None = None) -> Tensor:
    """TIES merge of ``models`` onto ``base``, with optional DARE dropping.

    1. Task vectors ``δi = Mi - base``.
    2. DARE (only when ``dare_p > 0``): drop each element of each δi with
       probability ``dare_p`` using ``generator`` (which must live on the
       tensors' device), scaling survivors by ``1 / (1 - dare_p)`` when
       ``dare_rescale``. Models draw in order, so one seed gives one result.
    3. Trim: keep the ``k`` fraction of each δi by magnitude (``trim``
       names the count rule, see :func:`_top_k`; ``mecha`` matches
       sd-mecha's ``ties_sum`` bit for bit).
    4. Elect a sign per element: ``sign(Σ sign δi)``, or ``sign(Σ δi)`` when
       ``vote_sgn`` (the sd-mecha meaning of the flag).
    5. Disjoint mean over the nonzero entries that agree with it.
    6. ``base + alpha * merged``; ``base`` itself when ``alpha == 0``.
    """
    import torch

    if not models:
        raise ModelkitError("ties: needs a base and at least one model")
    _same_shape("ties", base, *models)
    _unit_range("ties", "k", k)
    _unit_range("ties", "dare_p", dare_p, closed_top=False)
    if alpha == 0:
        return base
    deltas = [m - base for m in models]
    if dare_p > 0:
        if generator is None:
            raise ModelkitError("ties: dare_p > 0 needs a seed (random generator)")
        deltas = [_dare(d, dare_p, dare_rescale, generator) for d in deltas]
    stacked = torch.stack([_top_k(d, k, trim) for d in deltas])
    return torch.add(base, _elect(stacked, vote_sgn), alpha=alpha)


def _rows(t: Tensor) -> Tensor:
    """``t`` as a 2-D matrix of rows: one row per output channel for weights
    of 2 or more dimensions, one row for biases, norms and scalars."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


_COS_EPS = 1e-8


@transform(
    "model_stock", keys=MERGE_KEYS, min_models=3,
    summary="base + t*mean(M_i - base), t = n cos / (1 + (n-1) cos)",
    reference="Model Stock (arXiv 2403.19522); mergekit model_stock; sd-mecha ties.py "
              "model_stock",
)
def model_stock(base: Tensor, *models: Tensor) -> Tensor:
    """Model Stock: ``base + t * mean(δi)`` with ``δi = Mi - base`` and
    ``t = n cosθ / (1 + (n - 1) cosθ)``.

    ``cosθ`` is the cosine between task vectors averaged over *all* pairs
    (as mergekit; sd-mecha averages consecutive pairs only, the same for two
    models), computed per row: per output channel for weights with 2 or more
    dimensions, over the whole tensor for 1-D and 0-D ones. Zero task
    vectors give cosθ = 0, hence ``t = 0``; a row where the denominator
    vanishes also gets ``t = 0``. Needs at least two models.
    """
    import torch

    if len(models) < 2:
        raise ModelkitError(f"model_stock: needs a base and at least 2 models, got "
                            f"{len(models)} model(s)")
    _same_shape("model_stock", base, *models)
    if base.numel() == 0:
        return base
    deltas = [_rows(m - base) for m in models]
    norms = [torch.linalg.vector_norm(d, dim=1) for d in deltas]
    cos = torch.stack([
        (deltas[i] * deltas[j]).sum(1) / (norms[i] * norms[j]).clamp(min=_COS_EPS)
        for i, j in combinations(range(len(deltas)), 2)
    ]).mean(0).clamp(-1, 1)
    n = len(models)
    denom = 1 + (n - 1) * cos
    t = torch.where(denom.abs() > _COS_EPS, n * cos / denom, torch.zeros_like(cos))
    mean = torch.stack(deltas).mean(0)
    return base + (t.unsqueeze(1) * mean).reshape(base.shape)

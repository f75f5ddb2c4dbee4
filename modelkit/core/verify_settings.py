"""What verify renders and how: prompts, seeds, size, steps, scheduler,
device and thread count, the operation class and its threshold overrides.

:class:`VerifySettings` is what callers fill in; :func:`resolve_plan` turns
it into the concrete :class:`RenderPlan` for one model (presets depend on
whether the model is a tiny test model or a full-size one) that the report
records.

Presets:

* ``tiny``: 64x64, 2 steps; for seeded tiny test models (seconds).
* ``smoke``: 256x256, 4 steps; for real full-size files on a CPU (an SD1.5
  image: 15 s on a quiet 2-core machine, 131 s under load average 5.5-8;
  bench/README.md). The default for full-size models.
* ``standard``: the architecture's own resolution (512/768/1024), 20 steps;
  for a GPU.
* ``auto`` (default): ``tiny`` for tiny models, else ``smoke``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from modelkit.errors import ModelkitError
from modelkit.jsontypes import JSONDict

DEFAULT_PROMPTS = (
    "a photo of a red fox sitting in fresh snow, detailed fur, soft morning light",
    "an isometric illustration of a lighthouse on a small rocky island, blue sky",
)
DEFAULT_NEGATIVE = "blurry, low quality, watermark, text"
DEFAULT_SEEDS = (1, 2)
PRESETS: dict[str, tuple[int | None, int]] = {  # name -> (square size or arch default, steps)
    "tiny": (64, 2),
    "smoke": (256, 4),
    "standard": (None, 20),
}
PRESET_NAMES = ("auto", *PRESETS)
SCHEDULERS = ("euler", "ddim")
OPERATIONS = ("auto", "lossless", "fp16", "bf16", "fp8", "int8", "lora_bake", "merge")
TINY_MAX_CHANNELS = 64  # UNet base widths below this are test models (real: 320/384)
NEGATIVE_PREFIX = "negative:"
MAX_THREADS = 4
PROBE_MAX_ERROR = 0.05  # --probe: a block's relative error (casts: <1e-2, broken weights: >0.2)
PROBE_MAX_ERROR_FP8 = 0.15  # fp8 storage: up to ~0.08 per block on the test fixtures


@dataclass(frozen=True)
class LoraUse:
    """A LoRA applied at render time through diffusers, at ``weight``."""

    path: Path
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem

    def to_dict(self) -> JSONDict:
        return {"file": self.path.name, "weight": self.weight}


def parse_lora_arg(text: str) -> LoraUse:
    """``FILE`` or ``FILE:WEIGHT`` (weight defaults to 1.0)."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            raise ModelkitError(f"--lora {text!r}: weight {tail!r} is not a number; "
                                "write FILE:WEIGHT, e.g. style.safetensors:0.8") from None
    p = Path(path)
    if not p.is_file():
        raise ModelkitError(f"--lora {p}: no such file")
    return LoraUse(p, weight)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``1,2,3`` -> ``(1, 2, 3)``."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ModelkitError(f"--seeds {text!r}: give whole numbers separated by commas, "
                            "e.g. 1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ModelkitError(f"--seeds {text!r}: give at least one seed >= 0")
    return seeds


def parse_size(text: str) -> tuple[int, int]:
    """``256x256`` or ``256`` -> ``(width, height)``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m:
        raise ModelkitError(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 256x256")
    w = int(m.group(1))
    h = int(m.group(2) or w)
    return w, h


def parse_threshold(text: str) -> tuple[str, float]:
    """``psnr=35`` -> ``("psnr", 35.0)``."""
    from modelkit.core.verify_thresholds import METRIC_NAMES

    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in METRIC_NAMES:
        raise ModelkitError(f"--threshold {text!r}: write NAME=VALUE with NAME one of "
                            f"{', '.join(METRIC_NAMES)}")
    try:
        return name, float(value)
    except ValueError:
        raise ModelkitError(f"--threshold {text!r}: {value!r} is not a number") from None


def load_prompts(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], str | None]:
    """Prompts from a text file: one prompt per line, ``#`` comments and blank
    lines ignored, a line ``negative: ...`` sets the negative prompt.
    Returns ``(prompts, negative or None)``."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelkitError(f"{p}: cannot read the prompts file ({exc})") from None
    prompts: list[str] = []
    negative = None
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith(NEGATIVE_PREFIX):
            negative = line[len(NEGATIVE_PREFIX):].strip()
        else:
            prompts.append(line)
    if len(prompts) < 2:
        raise ModelkitError(f"{p}: needs at least two prompts, one per line (the "
                            "prompt-sensitivity check compares two)")
    return tuple(prompts), negative


def default_threads(preset: str) -> int:
    """The fixed thread count verify renders with unless told otherwise: one
    for tiny models (their ops are too small to split, and extra threads
    spin-wait badly on a busy machine: measured 0.2 s vs 5 s per render),
    else the CPUs available, at most four."""
    if preset == "tiny":
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


RECIPE = "recipe"  # field metadata: the YAML types a recipe's ``verify:`` section may give


def _in_recipe(*types: type) -> dict[str, tuple[type, ...]]:
    return {RECIPE: types}


@dataclass
class VerifySettings:
    """What to render and how to judge it. Every field has a default, so
    ``VerifySettings()`` verifies with the built-in prompts and seeds.

    Args:
        prompts: at least two; A1111 ``<lora:name:weight>`` tags apply a LoRA
            from the library to that prompt, and textual-inversion embedding
            names from the library may be used as words.
        negative_prompt: used for every render (classifier-free guidance).
        seeds: one image per prompt and seed.
        preset: ``auto``, ``tiny``, ``smoke`` or ``standard`` (module doc).
        steps, size: override the preset (size is ``(width, height)``).
        operation: the operation class that made the model (``auto`` infers
            it); it picks the comparison thresholds.
        thresholds: metric -> value overrides (``psnr``, ``ssim``, ``latent``,
            ``max_abs``, ``lora_effect``).
        tokenizer: a tokenizer folder or CLIP BPE file to use.
        library: the model library root (LoRAs, embeddings, tokenizers);
            default: found from the model's path.
        allow_download: let the tokenizer come from the Hugging Face Hub.
        render: False runs the static checks only.
        probe: run the streamed functional probe against the reference
            instead (every block on seeded activations, :mod:`modelkit.verify.probe`);
            ``probe_max_error`` is the most a block's output may differ
            (None: :data:`PROBE_MAX_ERROR`, :data:`PROBE_MAX_ERROR_FP8` for fp8).
        work_dir: where temporary files go (config folders, dequantized
            copies); default the system temp folder.

    The fields a recipe's ``verify:`` section may set are the ones with
    ``RECIPE`` metadata (:data:`RECIPE_FIELDS`, which recipe validation reads).
    """

    prompts: tuple[str, ...] = field(default=DEFAULT_PROMPTS, metadata=_in_recipe(list))
    negative_prompt: str = field(default=DEFAULT_NEGATIVE, metadata=_in_recipe(str))
    seeds: tuple[int, ...] = field(default=DEFAULT_SEEDS, metadata=_in_recipe(list))
    preset: str = field(default="auto", metadata=_in_recipe(str))
    steps: int | None = field(default=None, metadata=_in_recipe(int))
    size: tuple[int, int] | None = field(default=None, metadata=_in_recipe(str, list))
    guidance_scale: float = field(default=7.5, metadata=_in_recipe(int, float))
    scheduler: str = field(default="euler", metadata=_in_recipe(str))
    strength: float = 0.6
    device: str = "cpu"
    threads: int | None = field(default=None, metadata=_in_recipe(int))
    operation: str = field(default="auto", metadata=_in_recipe(str))
    thresholds: dict[str, float] = field(default_factory=dict, metadata=_in_recipe(dict))
    tokenizer: Path | None = field(default=None, metadata=_in_recipe(str))
    library: Path | None = field(default=None, metadata=_in_recipe(str))
    allow_download: bool = False
    render: bool = field(default=True, metadata=_in_recipe(bool))
    work_dir: Path | None = None
    probe: bool = False  # the streamed functional probe instead of the render
    probe_max_error: float | None = None  # a probed block's rel. L2; None: by storage

    def validate(self) -> None:
        """Raise :class:`ModelkitError` naming the first bad field."""
        if len(self.prompts) < 2:
            raise ModelkitError("verify needs at least two prompts (the prompt-sensitivity "
                                "check compares two)")
        if not self.seeds:
            raise ModelkitError("verify needs at least one seed")
        if self.preset not in PRESET_NAMES:
            raise ModelkitError(f"unknown preset {self.preset!r}; choose one of "
                                f"{', '.join(PRESET_NAMES)}")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ModelkitError(f"steps {self.steps}: give 1 to 1000")
        if self.size is not None and any(d < 64 or d % 8 for d in self.size):
            raise ModelkitError(f"size {self.size[0]}x{self.size[1]}: width and height "
                                "must be multiples of 8, at least 64")
        if self.scheduler not in SCHEDULERS:
            raise ModelkitError(f"unknown scheduler {self.scheduler!r}; choose one of "
                                f"{', '.join(SCHEDULERS)}")
        if self.operation not in OPERATIONS:
            raise ModelkitError(f"unknown operation {self.operation!r}; choose one of "
                                f"{', '.join(OPERATIONS)}")
        if self.threads is not None and self.threads < 1:
            raise ModelkitError(f"threads {self.threads}: give at least 1")
        if self.probe_max_error is not None and not self.probe_max_error > 0:
            raise ModelkitError(f"probe max error {self.probe_max_error}: give a value > 0")
        if not 0 < self.strength <= 1:
            raise ModelkitError(f"strength {self.strength}: give a value in (0, 1]")
        from modelkit.core.verify_library import parse_prompt

        for prompt in self.prompts:  # <lora:NAME:WEIGHT> tags: a bad one fails here
            parse_prompt(prompt)


# field -> the YAML types a recipe may give it, from the fields' metadata
RECIPE_FIELDS: dict[str, tuple[type, ...]] = {
    f.name: f.metadata[RECIPE] for f in fields(VerifySettings) if RECIPE in f.metadata}


@dataclass(frozen=True)
class RenderPlan:
    """The concrete render settings for one verify run (recorded in the report)."""

    preset: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    strength: float
    device: str
    threads: int
    seeds: tuple[int, ...]
    prompts: tuple[str, ...]
    negative_prompt: str

    def to_dict(self) -> JSONDict:
        d = asdict(self)
        d["seeds"], d["prompts"] = list(self.seeds), list(self.prompts)
        return d


def is_tiny(model_channels: int) -> bool:
    """Whether a UNet base width belongs to a seeded tiny test model."""
    return model_channels < TINY_MAX_CHANNELS


def resolve_plan(settings: VerifySettings, *, tiny: bool, default_resolution: int,
                 device: str) -> RenderPlan:
    """The render plan for a model: the preset (``auto``: ``tiny`` or
    ``smoke``) with the settings' own steps and size on top."""
    preset = settings.preset
    if preset == "auto":
        preset = "tiny" if tiny else "smoke"
    side, steps = PRESETS[preset]
    side = side or default_resolution
    width, height = settings.size or (side, side)
    return RenderPlan(
        preset=preset, width=width, height=height, steps=settings.steps or steps,
        guidance_scale=settings.guidance_scale, scheduler=settings.scheduler,
        strength=settings.strength, device=device,
        threads=settings.threads or default_threads(preset), seeds=tuple(settings.seeds),
        prompts=tuple(settings.prompts), negative_prompt=settings.negative_prompt,
    )

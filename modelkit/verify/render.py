"""Load a checkpoint with diffusers, fully offline, and render the verify
cases (prompt x seed) into latents and images.

Loading: ``from_single_file(file, config=<folder modelkit wrote>,
local_files_only=True, torch_dtype=float32)`` with the tokenizers passed as
objects; afterwards no parameter may be left on the ``meta`` device (a text
encoder key missing from the file loads silently otherwise).

Rendering: every case uses a fresh CPU generator seeded with its seed, the
plan's fixed scheduler, steps, guidance and thread count, the negative
prompt, and the runtime adapters its prompt names (``<lora:...>`` tags,
``--lora``, embeddings). The final latents are captured from the step
callback (which also checks the cancel event) and the image comes from the
pipeline's own VAE decode. Inpainting, img2img (SDXL refiner) and
instruct-pix2pix models get a fixed synthetic input image.
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.core.verify_library import Library, PromptLora, embedding_names_in, parse_prompt
from modelkit.core.verify_settings import LoraUse, RenderPlan
from modelkit.errors import CancelFlag, Cancelled, ModelkitError, check_cancel
from modelkit.progress import VERIFY, Progress, ProgressFn, no_progress

if TYPE_CHECKING:
    import numpy as np

    from modelkit.convert.diffusers import ConfigFolder

MODES = {
    "StableDiffusionPipeline": "txt2img", "StableDiffusionXLPipeline": "txt2img",
    "StableDiffusionInpaintPipeline": "inpaint", "StableDiffusionXLInpaintPipeline": "inpaint",
    "StableDiffusionXLImg2ImgPipeline": "img2img",
    "StableDiffusionInstructPix2PixPipeline": "pix2pix",
    "StableDiffusionXLInstructPix2PixPipeline": "pix2pix",
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_SLOTS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
BIG_MODEL_PARAMS = 100_000_000


@dataclass
class Rendered:
    """One rendered case."""

    case: str
    prompt_index: int
    prompt: str
    seed: int
    latents: np.ndarray
    image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    seconds: float


@dataclass
class Renders:
    """Every render of one verify run, for metrics, the grid and image files."""

    candidate: list[Rendered] = field(default_factory=list)
    reference: list[Rendered] | None = None
    base: list[Rendered] | None = None  # the LoRA oracle's base without the LoRAs
    reference_label: str = "reference"


@dataclass
class Case:
    """What to render: prompt ``index`` (0-based) at ``seed``."""

    index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"p{self.index + 1}-s{self.seed}"


def cases_of(plan: RenderPlan) -> list[Case]:
    """Prompt x seed, prompt-major."""
    return [Case(i, p, s) for i, p in enumerate(plan.prompts) for s in plan.seeds]


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers/transformers logs, progress bars and Python warnings
    while loading and rendering; restore them afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """With accelerate installed, diffusers builds every module on the meta
    device and then loads the checkpoint into it, so random initialization
    only costs time (torch initializes meta tensors in Python: about 1 s per
    tiny pipeline, most of its load time). Skip it, with transformers' own
    switch, when both are there."""
    from importlib.util import find_spec

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        available = False
    else:
        available = find_spec("accelerate") is not None
    if not available:
        yield
        return
    with no_init_weights():
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def tokenizer_slots(config: ConfigFolder) -> list[str]:
    """The tokenizer slots a pipeline needs (one per text encoder present)."""
    return [TOKENIZER_SLOTS[c] for c in COMPONENTS if c in config.components
            and c in TOKENIZER_SLOTS]


@dataclass
class LoadedPipeline:
    """A diffusers pipeline and what verify needs to know about it."""

    pipe: Any
    mode: str
    meta_params: list[str]
    seconds: float
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA file -> adapter name
    embeddings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Drop the pipeline so its memory can be reused (a full collection,
        about 0.4 s, only for full-size models, whose gigabytes matter)."""
        big = self.pipe is not None and _n_params(self.pipe) > BIG_MODEL_PARAMS
        self.pipe = None
        if big:
            gc.collect()


def _n_params(pipe: Any) -> int:
    unet = getattr(pipe, "unet", None)
    return sum(p.numel() for p in unet.parameters()) if unet is not None else 0


def _meta_params(pipe: Any) -> list[str]:
    out = []
    for comp in COMPONENTS:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        tensors = [*module.named_parameters(), *module.named_buffers()]
        out += [f"{comp}.{n}" for n, t in tensors if t.is_meta]
    return out


def load_pipeline(model_file: Path, label: str, config: ConfigFolder,
                  tokenizers: dict[str, Any], plan: RenderPlan) -> LoadedPipeline:
    """Load ``model_file`` with ``from_single_file`` and the config folder.

    Raises:
        ModelkitError: diffusers could not load it, or the model kind cannot
            be rendered (SD2 depth).
    """
    import diffusers
    import torch

    mode = MODES.get(config.pipeline_class)
    if mode is None:
        raise ModelkitError(f"{label}: {config.pipeline_class} models cannot be rendered "
                            "by verify (no depth estimator offline); use --static-only")
    start = time.perf_counter()
    with quiet_libraries(), _skip_weight_init():
        cls = getattr(diffusers, config.pipeline_class)  # imports pipelines: noisy
        try:
            pipe = cls.from_single_file(str(model_file), config=str(config.path),
                                        local_files_only=True, torch_dtype=torch.float32,
                                        **tokenizers)
        except Exception as exc:  # diffusers raises many kinds; one line for the user
            raise ModelkitError(f"{label}: diffusers could not load it "
                                f"({_first_line(exc)})") from None
    meta = _meta_params(pipe)
    if not meta and plan.device != "cpu":  # it loads on the CPU; .to() walks every module
        pipe.to(plan.device)
    pipe.set_progress_bar_config(disable=True)
    if plan.scheduler == "ddim":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return LoadedPipeline(pipe, mode, meta, time.perf_counter() - start)


# --- runtime adapters ---------------------------------------------------------------


def _embedding_tensors(path: Path) -> dict[str, Any]:
    """``{"clip_l": t, "clip_g": t}`` (SDXL) or ``{"": t}`` (SD1/SD2) from an
    A1111 embedding file (``emb_params``, ``string_to_param.*``) or a
    one-tensor file."""
    from modelkit.io.reader import open_model

    with open_model(path) as src:
        keys = list(src.infos)
        if {"clip_l", "clip_g"} <= set(keys):
            return {"clip_l": src.get("clip_l"), "clip_g": src.get("clip_g")}
        for key in ("emb_params", *[k for k in keys if k.startswith("string_to_param")]):
            if key in src.infos:
                return {"": src.get(key)}
        if len(keys) == 1:
            return {"": src.get(keys[0])}
    raise ModelkitError(f"{path}: not a textual inversion embedding (no emb_params, "
                        "string_to_param or clip_l/clip_g)")


def _load_embedding(loaded: LoadedPipeline, name: str, path: Path) -> str | None:
    """Load one embedding into the pipeline; returns a note when it does not
    fit the model (skipped, as A1111 does)."""
    pipe = loaded.pipe
    tensors = _embedding_tensors(path)
    targets = [("clip_l" if "clip_l" in tensors else "", "tokenizer", "text_encoder"),
               ("clip_g", "tokenizer_2", "text_encoder_2")]
    done = 0
    for key, tok_slot, te_slot in targets:
        te, tok = getattr(pipe, te_slot, None), getattr(pipe, tok_slot, None)
        if key not in tensors or te is None or tok is None:
            continue
        vectors = tensors[key].float().reshape(-1, tensors[key].shape[-1])
        width = te.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            return f"embedding {name}: width {vectors.shape[1]} does not fit {te_slot} " \
                   f"({width}); skipped"
        try:
            pipe.load_textual_inversion(vectors, token=name, tokenizer=tok, text_encoder=te)
        except Exception as exc:
            raise ModelkitError(f"{path}: diffusers could not load the embedding "
                                f"({_first_line(exc)})") from None
        done += 1
    return None if done else f"embedding {name}: no matching text encoder; skipped"


def _load_lora(loaded: LoadedPipeline, path: Path) -> str:
    name = f"verify_lora_{len(loaded.adapters)}"
    try:
        loaded.pipe.load_lora_weights(str(path), adapter_name=name)
    except Exception as exc:
        text = _first_line(exc)
        if "PEFT" in text:
            raise ModelkitError("runtime LoRAs need the peft package: pip install peft "
                                "(or pip install -e '.[verify]' in the modelkit checkout)"
                                ) from None
        raise ModelkitError(f"{path}: diffusers cannot apply this LoRA at render time "
                            f"({text}); LyCORIS LoHa/LoKr are not supported there") from None
    loaded.adapters[str(path)] = name
    return name


Active = list[tuple[str, float]]  # adapter names and weights for one prompt


@dataclass
class Adapters:
    """Per prompt, the adapters to activate: with the run's LoRAs and the
    prompt's own ``<lora:...>`` tags, or with the tags only."""

    with_loras: list[Active]
    tags_only: list[Active]


def prepare_adapters(loaded: LoadedPipeline, plan: RenderPlan, library: Library,
                     loras: tuple[LoraUse, ...]) -> Adapters:
    """Load the LoRAs (``loras`` plus each prompt's ``<lora:...>`` tags) and
    the embeddings the prompts name into the pipeline."""
    tags: list[list[PromptLora]] = [parse_prompt(p)[1] for p in plan.prompts]
    if parse_prompt(plan.negative_prompt)[1]:
        raise ModelkitError("<lora:...> tags in the negative prompt are not supported; "
                            "put them in the prompts")
    out = Adapters([], [])
    with quiet_libraries():
        run_wide = [(_adapter(loaded, lu.path), lu.weight) for lu in loras]
        for prompt_tags in tags:
            own = [(_adapter(loaded, library.find_lora(t.name)), t.weight)
                   for t in prompt_tags]
            out.with_loras.append(run_wide + own)
            out.tags_only.append(own)
        texts = [parse_prompt(p)[0] for p in plan.prompts] + [plan.negative_prompt]
        available = library.embeddings()
        for name in embedding_names_in(texts, available):
            note = _load_embedding(loaded, name, available[name])
            if note:
                loaded.notes.append(note)
            else:
                loaded.embeddings.append(name)
    return out


def _adapter(loaded: LoadedPipeline, path: Path) -> str:
    """The adapter name of a LoRA file, loading it on first use."""
    return loaded.adapters.get(str(path)) or _load_lora(loaded, path)


def _activate(pipe: Any, active: list[tuple[str, float]], any_loaded: bool) -> None:
    if not any_loaded:
        return
    if not active:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    names = [n for n, _ in active]
    pipe.set_adapters(names, adapter_weights=[w for _, w in active])


# --- rendering ----------------------------------------------------------------------


def input_image(width: int, height: int) -> Any:
    """A fixed synthetic picture for img2img, inpainting and pix2pix models:
    smooth colour gradients with a disc."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    disc = ((u - 0.5) ** 2 + (v - 0.55) ** 2) < 0.08
    rgb = np.stack([u, v, 1 - u * v], axis=-1)
    rgb[disc] = (0.9, 0.6, 0.2)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def inpaint_mask(width: int, height: int) -> Any:
    """The centre half of the picture, white (repainted)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle([width // 4, height // 4, 3 * width // 4 - 1,
                                    3 * height // 4 - 1], fill=255)
    return mask


def _call_args(mode: str, plan: RenderPlan) -> dict[str, Any]:
    args: dict[str, Any] = {"num_inference_steps": plan.steps,
                            "guidance_scale": plan.guidance_scale,
                            "negative_prompt": parse_prompt(plan.negative_prompt)[0],
                            "output_type": "np"}
    if mode in ("txt2img", "inpaint"):
        args.update(height=plan.height, width=plan.width)
    if mode in ("inpaint", "img2img", "pix2pix"):
        args["image"] = input_image(plan.width, plan.height)
    if mode == "inpaint":
        args["mask_image"] = inpaint_mask(plan.width, plan.height)
    if mode == "img2img":
        args["strength"] = plan.strength
    return args


def steps_per_image(mode: str, plan: RenderPlan) -> int:
    """The denoising steps one render runs (img2img starts part way:
    ``int(steps * strength)``, as diffusers counts them)."""
    if mode == "img2img":
        return max(1, min(plan.steps, int(plan.steps * plan.strength)))
    return plan.steps


def render_case(loaded: LoadedPipeline, plan: RenderPlan, case: Case,
                active: list[tuple[str, float]], cancel: CancelFlag | None = None,
                on_step: Callable[[int], None] | None = None) -> Rendered:
    """Render one case; the latents are those after the last step.
    ``on_step(k)`` is called after each denoising step (k from 1)."""
    import numpy as np
    import torch

    pipe = loaded.pipe
    last: dict[str, Any] = {}

    def step_end(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        check_cancel(cancel)
        last["latents"] = kwargs["latents"].detach().to("cpu", torch.float32).clone()
        if on_step is not None:
            on_step(step + 1)
        return kwargs

    _activate(pipe, active, bool(loaded.adapters))
    args = _call_args(loaded.mode, plan)
    start = time.perf_counter()
    with quiet_libraries(), torch.inference_mode():
        out = pipe(prompt=parse_prompt(case.prompt)[0],
                   generator=torch.Generator("cpu").manual_seed(case.seed),
                   callback_on_step_end=step_end, **args)
    image = np.asarray(out.images[0], dtype=np.float32)
    latents = last["latents"].numpy()[0]
    return Rendered(case.name, case.index, case.prompt, case.seed, latents, image,
                    time.perf_counter() - start)


def render_all(loaded: LoadedPipeline, plan: RenderPlan, cases: list[Case],
               active: list[list[tuple[str, float]]], task: str,
               progress: ProgressFn = no_progress, cancel: CancelFlag | None = None,
               extra: int = 0) -> list[Rendered]:
    """Render ``cases``. Progress (phase ``verify``, step ``task``): after
    each denoising step (unit ``steps``, item ``p1-s1 step 2/4``) and after
    each image (unit ``images``, item the case); both count the whole task,
    so their fractions agree. ``extra`` more renders follow under the same
    task."""
    out = []
    total = len(cases) + extra
    per_image = steps_per_image(loaded.mode, plan)
    total_steps = total * per_image
    with torch_threads(plan.threads):
        for i, case in enumerate(cases, 1):
            check_cancel(cancel)

            def on_step(k: int, before: int = (i - 1) * per_image, name: str = case.name
                        ) -> None:
                k = min(k, per_image)
                progress(Progress(task, before + k, total_steps, "steps",
                                  f"{name} step {k}/{per_image}", VERIFY))

            try:
                out.append(render_case(loaded, plan, case, active[case.index], cancel,
                                       on_step))
            except Cancelled:
                raise
            except ModelkitError:
                raise
            except Exception as exc:  # a render that crashes is a load problem
                raise ModelkitError(f"{task}: rendering {case.name} failed "
                                    f"({_first_line(exc)})") from None
            progress(Progress(task, i, total, "images", case.name, VERIFY))
    return out

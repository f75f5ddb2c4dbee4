"""The CLIP tokenizer, found offline, and the check that it is a real one.

SD checkpoints hold no tokenizer, and diffusers' config-folder route builds
a silent 2-token placeholder when the tokenizer files are missing (every
prompt becomes ``[0, 2, 2, ...]``). Verify finds the tokenizer itself, in
this order:

1. ``tokenizer=`` (``--tokenizer PATH``): a folder with ``tokenizer.json``
   or ``vocab.json`` + ``merges.txt``, or the CLIP BPE file
   ``bpe_simple_vocab_16e6.txt.gz``;
2. the model library's ``models/tokenizers/clip`` (:mod:`modelkit.core.verify_library`);
   a folder holding modelkit's synthetic test tokenizer (what ``modelkit
   demo`` writes there) comes first only for the tiny test models; for a
   full-size model every real source below wins over it, and it is used only
   when none is found (the ``tokenizer.clip`` check then fails and says how
   to provide a real one);
3. the local Hugging Face cache (``openai/clip-vit-large-patch14`` or the
   ``tokenizer/`` folder of an SD1.5, SD2.1 or SDXL repo), found through
   ``huggingface_hub`` without network access;
4. the CLIP BPE vocabulary inside an installed ``open-clip-torch`` wheel,
   read as a data file (the package is never imported: it pulls
   torchvision); ``pip install --no-deps open-clip-torch`` provides it;
5. with ``allow_download``, the Hugging Face Hub.

SD1, SD2 and SDXL all use the same CLIP BPE; SD2's tokenizer and SDXL's
``tokenizer_2`` pad with ``!`` instead of the end token.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.arch.diffusers_names import te_folder
from modelkit.arch.registry import REGISTRY
from modelkit.core.verify_thresholds import FAIL, PASS, WARN
from modelkit.errors import ModelkitError
from modelkit.verify.report import Check

if TYPE_CHECKING:
    from modelkit.core.verify_library import Library

CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = 49152 - 256 - 2  # merges the CLIP vocabulary uses
CLIP_PROBE = "a photo of a cat"
CLIP_PROBE_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
CONTEXT = 77
BOS, EOS, ALT_PAD = "<|startoftext|>", "<|endoftext|>", "!"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
HF_REPOS = (
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer/"),
    ("stabilityai/stable-diffusion-2-1", "tokenizer/"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer/"),
)
FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
DOWNLOAD_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                  "special_tokens_map.json")
# OpenCLIP tokenizers pad with "!": SD2's tokenizer, SDXL's tokenizer_2
PAD_ALT_SLOTS = {(a.name, te_folder(s).replace("text_encoder", "tokenizer"))
                 for a in REGISTRY.values() if a.spec is not None
                 for s in a.spec.text_encoders if s.config.layout == "open_clip"}
HOW_TO = ("pass --tokenizer DIR (a folder with tokenizer.json, or vocab.json + merges.txt, "
          "e.g. the tokenizer/ folder of an SD1.5 diffusers repo), put one in "
          "<library>/models/tokenizers/clip, run 'pip install --no-deps open-clip-torch' "
          "(it ships the CLIP vocabulary), or allow a download with --allow-download")

# written beside the synthetic tokenizer's files, so a search can tell it
# from a real one without loading it
SYNTHETIC_MARKER = "modelkit-synthetic-tokenizer.txt"
SYNTHETIC_NOTE = ("modelkit's synthetic byte-level CLIP tokenizer for its tiny test models "
                  "(modelkit demo); verify uses it for full-size models only when no real "
                  "CLIP tokenizer is found\n")
_SYNTHETIC_VOCAB_BYTES = 64_000  # the synthetic tokenizer.json is ~11 KB, CLIP's ~2 MB

_LOADED: dict[tuple[str, str, float], Any] = {}


@dataclass(frozen=True)
class TokenizerSource:
    """Where the tokenizer comes from: ``kind`` is ``path``, ``library``,
    ``hf_cache``, ``open_clip`` or ``download``; ``location`` a folder or a
    BPE file; ``description`` says it without absolute paths."""

    kind: str
    location: Path
    description: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.kind, "description": self.description}


def byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE uses for the bytes 0..255, in CLIP's
    vocabulary order: the printable Latin-1 bytes (which stand for
    themselves) first, then the other bytes, mapped to code points from 256
    up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def _clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]],
                    pad: str = EOS) -> Any:
    from transformers import CLIPTokenizer

    # the annotation says list[str], but the value goes to tokenizers' BPE,
    # which takes (left, right) pairs
    return CLIPTokenizer(vocab=vocab, merges=merges,  # type: ignore[arg-type]
                         model_max_length=CONTEXT, pad_token=pad)


def synthetic_tokenizer() -> Any:
    """A byte-level CLIP tokenizer with no merges (514 tokens: each byte,
    each byte ending a word, start and end): a working tokenizer for seeded
    test models, not for real checkpoints."""
    return _clip_tokenizer(_vocab([]), [])


def write_synthetic_tokenizer(folder: str | os.PathLike[str]) -> Path:
    """Save :func:`synthetic_tokenizer` into ``folder`` (created), marked as
    synthetic (:data:`SYNTHETIC_MARKER`)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    synthetic_tokenizer().save_pretrained(str(out))
    (out / SYNTHETIC_MARKER).write_text(SYNTHETIC_NOTE)
    return out


def is_synthetic_dir(folder: Path) -> bool:
    """Whether ``folder`` holds :func:`synthetic_tokenizer`: its marker, or
    (a demo library written before the marker) a small ``tokenizer.json`` or
    ``vocab.json`` with the synthetic vocabulary's 514 tokens."""
    if (folder / SYNTHETIC_MARKER).is_file():
        return True
    for name in ("tokenizer.json", "vocab.json"):
        path = folder / name
        try:
            if path.stat().st_size > _SYNTHETIC_VOCAB_BYTES:
                return False
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if name == "tokenizer.json":
            model = data.get("model") if isinstance(data, dict) else None
            vocab = model.get("vocab") if isinstance(model, dict) else None
        else:
            vocab = data
        if isinstance(vocab, dict):
            return len(vocab) == 2 * 256 + 2
    return False


def tokenizer_from_bpe(path: str | os.PathLike[str]) -> Any:
    """The CLIP tokenizer from OpenAI's BPE merges file (``.txt.gz``, as in
    the open-clip-torch wheel): byte tokens, byte word-ends, 48,894 merges,
    start and end (49,408 tokens)."""
    p = Path(path)
    try:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelkitError(f"{p}: not a readable CLIP BPE file ({exc})") from None
    pairs = [line.split() for line in lines[1:CLIP_MERGES + 1]]
    merges = [(p[0], p[1]) for p in pairs if len(p) == 2]
    return _clip_tokenizer(_vocab(merges), merges)


def is_tokenizer_dir(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files transformers can load."""
    return folder.is_dir() and any(all((folder / f).is_file() for f in files)
                                   for files in FILE_SETS)


def _from_hf_cache() -> TokenizerSource | None:
    from huggingface_hub import try_to_load_from_cache

    for repo, sub in HF_REPOS:
        for files in FILE_SETS:
            hits = [try_to_load_from_cache(repo, sub + f) for f in files]
            if all(isinstance(h, str) for h in hits):
                folder = Path(hits[0]).parent  # type: ignore[arg-type]
                return TokenizerSource("hf_cache", folder,
                                       f"Hugging Face cache: {repo}/{sub}".rstrip("/"))
    return None


def open_clip_bpe() -> Path | None:
    """The BPE file inside an installed open-clip-torch, found without
    importing the package."""
    from importlib.util import find_spec

    try:
        spec = find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    return path if path.is_file() else None


def _download() -> TokenizerSource:
    from huggingface_hub import hf_hub_download

    repo = HF_REPOS[0][0]
    try:
        paths = [hf_hub_download(repo, f) for f in DOWNLOAD_FILES[:2]]
    except Exception as exc:  # network, offline mode, auth: one line for the user
        raise ModelkitError(f"tokenizer download from {repo} failed "
                            f"({type(exc).__name__}); {HOW_TO}") from None
    return TokenizerSource("download", Path(paths[0]).parent,
                           f"downloaded from the Hugging Face Hub: {repo}")


def explicit_source(path: Path) -> TokenizerSource:
    """``--tokenizer PATH`` as a source (a folder or a BPE file)."""
    if path.is_file() and path.name.endswith(".gz"):
        return TokenizerSource("path", path, f"given BPE file {path.name}")
    if is_tokenizer_dir(path):
        return TokenizerSource("path", path, f"given folder {path.name}")
    raise ModelkitError(f"--tokenizer {path}: not a tokenizer folder (tokenizer.json, or "
                        "vocab.json + merges.txt) nor a CLIP BPE .txt.gz file")


def find_tokenizer(library: Library, explicit: Path | None = None,
                   allow_download: bool = False, *, tiny: bool = False) -> TokenizerSource:
    """Find the CLIP tokenizer (module doc for the order); ``tiny``: for a
    tiny test model, which may use the library's synthetic tokenizer first.

    Raises:
        ModelkitError: none found; the message says how to provide one.
    """
    if explicit is not None:
        return explicit_source(Path(explicit))
    synthetic = None
    for folder in library.tokenizer_dirs:
        if is_tokenizer_dir(folder):
            rel = folder.relative_to(library.root) if library.root else folder.name
            if tiny or not is_synthetic_dir(folder):
                return TokenizerSource("library", folder, f"model library: {rel}")
            synthetic = synthetic or TokenizerSource(
                "library", folder, f"model library: {rel}, modelkit's synthetic test tokenizer")
    real = _real_tokenizer(allow_download)
    if real is not None:
        return real
    if synthetic is not None:
        return synthetic
    raise ModelkitError(f"no CLIP tokenizer found offline; {HOW_TO}")


def _real_tokenizer(allow_download: bool) -> TokenizerSource | None:
    """The Hugging Face cache, an open-clip-torch wheel, then a download."""
    cached = _from_hf_cache()
    if cached is not None:
        return cached
    bpe = open_clip_bpe()
    if bpe is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("open-clip-torch")
        except PackageNotFoundError:
            ver = "?"
        return TokenizerSource("open_clip", bpe, f"open-clip-torch {ver} wheel: {BPE_FILE}")
    if allow_download:
        return _download()
    return None


def load_tokenizer(source: TokenizerSource) -> Any:
    """The tokenizer of ``source`` (built once per process and location)."""
    loc = source.location
    key = (source.kind, str(loc), loc.stat().st_mtime if loc.exists() else 0.0)
    if key not in _LOADED:
        if loc.is_file():
            tok = tokenizer_from_bpe(loc)
        else:
            from transformers import CLIPTokenizer

            try:
                tok = CLIPTokenizer.from_pretrained(str(loc), local_files_only=True)
            except Exception as exc:  # transformers raises many kinds; one line
                raise ModelkitError(f"{loc}: cannot load the tokenizer "
                                    f"({type(exc).__name__}: {exc})") from None
        _LOADED[key] = tok
    return _LOADED[key]


def pipeline_tokenizers(tokenizer: Any, arch: str, slots: list[str]) -> dict[str, Any]:
    """Tokenizer objects for a pipeline's ``slots`` (``tokenizer``,
    ``tokenizer_2``), padding with ``!`` where the original configs do. Each
    is a copy: loading an embedding adds tokens to a pipeline's tokenizer."""
    out = {}
    for slot in slots:
        tok = copy.deepcopy(tokenizer)
        if (arch, slot) in PAD_ALT_SLOTS:
            tok.pad_token = ALT_PAD
        out[slot] = tok
    return out


def is_placeholder(tokenizer: Any) -> bool:
    """The 2-token tokenizer transformers builds from a folder without
    tokenizer files: every prompt becomes the start token then unknowns."""
    ids = tokenizer(CLIP_PROBE).input_ids
    return len(tokenizer) < 258 or len(set(ids[1:-1])) <= 1


def is_synthetic(tokenizer: Any) -> bool:
    """:func:`synthetic_tokenizer`'s byte-level vocabulary (514 tokens)."""
    return len(tokenizer) == 2 * 256 + 2 and not is_placeholder(tokenizer)


def tokenizer_check(tokenizer: Any, source: TokenizerSource, *, tiny: bool,
                    text_vocab: int) -> Check:
    """Real CLIP (49,408 tokens and the OpenAI ids for a probe prompt)
    passes; the silent placeholder fails; the synthetic test tokenizer passes
    for tiny models only; ids beyond the text encoder's vocabulary fail."""
    name = "tokenizer.clip"
    size = len(tokenizer)
    ids = tokenizer(CLIP_PROBE).input_ids
    value = {"size": size, "probe_ids": ids[:12]}
    where = source.description
    if is_placeholder(tokenizer):
        return Check(name, FAIL, f"placeholder tokenizer ({size} tokens, {CLIP_PROBE!r} -> "
                     f"{ids[:6]}...): prompts would not reach the model; {HOW_TO}", value)
    if size > text_vocab:
        return Check(name, FAIL, f"{size} tokens but the text encoder has {text_vocab} "
                     f"embeddings ({where})", value)
    if size == CLIP_VOCAB_SIZE:
        if ids != CLIP_PROBE_IDS:
            return Check(name, FAIL, f"49,408 tokens but {CLIP_PROBE!r} -> {ids}, not the "
                         f"CLIP ids {CLIP_PROBE_IDS} ({where})", value)
        return Check(name, PASS, f"CLIP BPE, 49,408 tokens ({where})", value)
    if is_synthetic(tokenizer):
        if tiny:
            return Check(name, PASS, f"synthetic byte-level tokenizer for test models "
                         f"({where})", value)
        return Check(name, FAIL, f"no real CLIP tokenizer found, only the synthetic "
                     f"byte-level test tokenizer ({where}), and this is a full-size "
                     f"model; {HOW_TO}", value)
    return Check(name, WARN, f"{size} tokens: not the CLIP vocabulary ({where})", value)

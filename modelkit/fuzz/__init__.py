"""Header fuzzing: mutate small real safetensors files and check that
``inspect`` and ``prune`` answer every one of them properly.

A case passes when each command either succeeds or exits 1/2 with one line
``modelkit: error: ...`` naming the file; it fails on an internal error
(exit 3), a traceback, output that would act on a terminal (an escape or
control character in ``inspect``'s text), a hang, a file left behind, or a
file ``inspect`` accepts that the safetensors library or modelkit's reader
cannot read. Used by ``tests/test_hardening_fuzz.py`` (a short seeded run in
CI) and ``bench/fuzz_headers.py`` (a long run).

The mutations work on the header JSON (numbers, types, nesting, key names,
Unicode, duplicates, metadata values), on the header bytes (length field,
encoding, byte flips, truncation) and on valid files with odd shapes and
dtypes laid out afresh (so the analysers see unusual but legal headers).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import signal
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.arch.configs import TINY, UNET_PREFIX, VAE_PREFIX
from modelkit.arch.keys import checkpoint_keys, unet_keys, vae_keys
from modelkit.io.header import DTYPE_BITS
from modelkit.textsafe import shown

# keys the detectors read: mutating these reaches the most code
PROBE_PARTS = ("input_blocks.0.0.weight", "attn2.to_k.weight", "proj_in.weight",
               "label_emb.0.0.weight", "output_blocks.11.1.transformer_blocks.0.norm1.bias",
               "conv_in.weight", "token_embedding", "position_embedding", "position_ids",
               "mlp.fc1.weight", "emb_params", ".alpha", "lora_down.weight", "v_pred",
               "model_ema.decay", "betas")
HOSTILE_STRINGS = (
    "\x1b]0;pwned\x07", "\x1b[2J\x1b[H", "\x1b]52;c;ZXZpbA==\x07", "line\rOVERWRITE",
    "a\nFAKE LINE: prune kept everything", "\u202egpj.exe", "\x00nul", "\x9b31m",
    "\ud800", "\udcff", "\U0001f600", "", " ", "__metadata__", "x" * 5000,
    "input_blocks.\u0663.0.weight", "text_model.encoder.layers.\u00b2.mlp.fc1.weight",
    "model.diffusion_model.input_blocks.0.0.weight", "lora_unet_x.alpha",
)
RAW_NUMBERS = ("1e400", "-1e400", "Infinity", "-Infinity", "NaN", "1" + "0" * 400,
               "18446744073709551616", "18446744073709551615", "-1", "-0", "1.5", "1e2",
               "0", "1", "3", "1024", "4294967296", "9223372036854775808", "true", "false",
               "null", '"3"', "[]", "{}", '["x"]', '{"a":1}')
DTYPES = (*DTYPE_BITS, "f16", "F8", "", "Q8_0", "float16")


@dataclass(frozen=True)
class Raw:
    """A JSON fragment written as is (invalid numbers, deep nesting)."""

    text: str


class Pairs(list):
    """An object written from (key, value) pairs, so keys may repeat."""


def dump(value: Any, ascii_only: bool = True) -> str:
    """JSON text of ``value``; :class:`Raw` and :class:`Pairs` pass through."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{dump(k, ascii_only)}:{dump(v, ascii_only)}"
                              for k, v in value) + "}"
    if isinstance(value, dict):
        return dump(Pairs(value.items()), ascii_only)
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Header object and data buffer of a valid safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_file(header: Any, payload: bytes, *, ascii_only: bool = True, pad: bool = True
              ) -> bytes:
    """A file from a header object (see :func:`dump`) and a data buffer."""
    raw = dump(header, ascii_only).encode("utf-8", "surrogatepass")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def relayout(header: dict[str, Any], rng: random.Random) -> bytes | None:
    """Give every well-formed entry fresh consecutive offsets; the data buffer
    (random bytes) to go with them, or None when some entry is malformed."""
    pos = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not isinstance(dtype, str) or \
                dtype not in DTYPE_BITS or any(
                not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
            return None
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits > 8 << 20:
            return None
        entry["data_offsets"] = [pos, pos + bits // 8]
        pos += bits // 8
    return rng.randbytes(pos)


# --- seeds -------------------------------------------------------------------------


SEED_MAX_ELEMENTS = 1 << 12  # keeps every seed file under about 100 KB


def _small(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with its first dimension cut so the tensor stays small (the
    32 000-row token embedding); the other dimensions, which the detectors
    read, are kept."""
    rest = math.prod(shape[1:])
    if not shape or shape[0] * rest <= SEED_MAX_ELEMENTS:
        return shape
    return (max(1, SEED_MAX_ELEMENTS // max(rest, 1)), *shape[1:])


def _subset(keys: dict[str, tuple[int, ...]], limit: int = 40) -> dict[str, tuple[int, ...]]:
    picked = {k: _small(s) for k, s in keys.items() if any(p in k for p in PROBE_PARTS)}
    return dict(list(picked.items())[:limit])


def seed_keys() -> dict[str, tuple[dict[str, tuple[int, ...]], dict[str, str]]]:
    """Key/shape tables and metadata of the seed files: small slices of real
    layouts (an SD1 and an SD2 checkpoint with EMA and buffers, a bare SDXL
    UNet with a marker, a VAE, a kohya LoRA without metadata, an embedding)."""
    from modelkit.testing.lora import lora_keys

    meta = {"modelspec.title": "fuzz seed", "ss_network_dim": "4"}
    sd1 = _subset(checkpoint_keys(TINY["sd1"], ema=True), 48)
    sd1 |= {"model_ema.diffusion_modelinput_blocks00weight": (32, 4, 3, 3)}
    sd2 = _subset(checkpoint_keys(TINY["sd2"]), 40)
    xl = _subset(dict(unet_keys(TINY["sdxl"].unet)), 30)
    xl["v_pred"] = (0,)
    vae = {k: s for k, s in vae_keys(TINY["sd1"].vae).items() if "conv_in" in k or "norm" in k}
    lora = dict(list(lora_keys("sd1").items())[:30])
    lora |= {k: s for k, s in lora_keys("sd1").items() if "attn2_to_k" in k}
    return {
        "sd1_ckpt": (sd1, meta), "sd2_ckpt": (sd2, {}),
        "sdxl_unet": (xl, {}),
        "vae": (dict(list(vae.items())[:20]), {}), "lora": (lora, {}),
        "embedding": ({"emb_params": (4, 32)}, {"name": "fuzz", "step": "10"}),
    }


def write_seeds(folder: Path) -> dict[str, Path]:
    """Write the seed files with modelkit's own writer; name -> path."""
    from modelkit.testing import write_tensors

    out = {}
    for name, (keys, meta) in seed_keys().items():
        out[name] = folder / f"seed_{name}.safetensors"
        write_tensors(out[name], keys, seed=7, metadata=meta or None)
    # a probe bias with the SD2 heuristic's key must be there for sd2
    assert any(UNET_PREFIX in k for k in seed_keys()["sd2_ckpt"][0])
    assert any(VAE_PREFIX in k for k in seed_keys()["sd1_ckpt"][0])
    return out


# --- mutations ---------------------------------------------------------------------


def _pick_key(header: dict[str, Any], rng: random.Random) -> str | None:
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return None
    probes = [k for k in names if any(p in k for p in PROBE_PARTS)]
    return rng.choice(probes if probes and rng.random() < 0.6 else names)


def _interesting(rng: random.Random) -> Any:
    choice = rng.random()
    if choice < 0.45:
        return Raw(rng.choice(RAW_NUMBERS))
    if choice < 0.6:
        return rng.choice(HOSTILE_STRINGS)
    if choice < 0.7:
        depth = rng.choice((5, 200, 5000, 100_000))
        return Raw("[" * depth + "]" * depth)
    return rng.choice((0, 1, 7, 2**32, 2**64 - 1, -5, 2.5, True, None, [], {}, [1, 2]))


def _edit_shape(h: dict[str, Any], rng: random.Random) -> str:
    key = _pick_key(h, rng)
    if key is None or not isinstance(h[key], dict):
        return "noop"
    entry = h[key]
    if rng.random() < 0.6:  # a legal but odd shape, laid out afresh
        rank = rng.choice((0, 1, 1, 2, 2, 3, 4, 5))
        entry["shape"] = [rng.choice((0, 1, 2, 3, 4, 5, 8, 9, 16, 32)) for _ in range(rank)]
        return f"shape {key!r} -> {entry['shape']}"
    shape = entry.get("shape")
    if isinstance(shape, list) and shape and rng.random() < 0.7:
        shape[rng.randrange(len(shape))] = _interesting(rng)
    else:
        entry["shape"] = _interesting(rng)
    return f"shape value {key!r}"


def _edit_dtype(h: dict[str, Any], rng: random.Random) -> str:
    key = _pick_key(h, rng)
    if key is None or not isinstance(h[key], dict):
        return "noop"
    h[key]["dtype"] = rng.choice(DTYPES) if rng.random() < 0.9 else _interesting(rng)
    return f"dtype {key!r} -> {h[key]['dtype']!r}"


def _edit_offsets(h: dict[str, Any], rng: random.Random) -> str:
    key = _pick_key(h, rng)
    if key is None or not isinstance(h[key], dict):
        return "noop"
    entry = h[key]
    offsets = entry.get("data_offsets")
    r = rng.random()
    if r < 0.4 and isinstance(offsets, list) and len(offsets) == 2:
        offsets[rng.randrange(2)] = _interesting(rng)
    elif r < 0.6 and isinstance(offsets, list):
        entry["data_offsets"] = offsets[::-1] + ([0] if rng.random() < 0.3 else [])
    elif r < 0.8 and isinstance(offsets, list) and len(offsets) == 2:
        delta = rng.choice((-8, -1, 1, 2, 8, 2**40))
        entry["data_offsets"] = [o + delta if isinstance(o, int) else o for o in offsets]
    else:
        entry["data_offsets"] = _interesting(rng)
    return f"offsets {key!r}"


def _edit_fields(h: dict[str, Any], rng: random.Random) -> str:
    key = _pick_key(h, rng)
    if key is None:
        return "noop"
    r = rng.random()
    if r < 0.3 and isinstance(h[key], dict) and h[key]:
        del h[key][rng.choice(list(h[key]))]
    elif r < 0.6 and isinstance(h[key], dict):
        h[key][rng.choice(("extra", "dtype2", "Shape"))] = _interesting(rng)
    elif r < 0.8:
        h[key] = _interesting(rng)
    else:
        del h[key]
    return f"fields {key!r}"


def _edit_key(h: dict[str, Any], rng: random.Random) -> str:
    key = _pick_key(h, rng)
    if key is None:
        return "noop"
    new = rng.choice(HOSTILE_STRINGS)
    if rng.random() < 0.5:
        new = key + new if rng.random() < 0.5 else new + key
    entry = h.pop(key)
    h[new] = entry
    return f"rename {key!r} -> {shown(new, 30)!r}"


def _edit_metadata(h: dict[str, Any], rng: random.Random) -> str:
    meta = h.get("__metadata__")
    r = rng.random()
    if r < 0.15:
        h["__metadata__"] = _interesting(rng)
        return "metadata replaced"
    if not isinstance(meta, dict):
        meta = h["__metadata__"] = {}
    key = rng.choice(("modelspec.prediction_type", "ss_network_alpha", "name",
                      "ss_network_args", "lora_adapter_metadata", "modelspec.title",
                      *HOSTILE_STRINGS[:6]))
    if r < 0.6:
        meta[key] = rng.choice((*HOSTILE_STRINGS, "v", "epsilon", "Dynamic", "1e400",
                                '{"conv_alpha": "x"}', '{"a.lora_alpha": 1}'))
    else:
        meta[key] = _interesting(rng)
    return f"metadata {shown(key, 20)!r}"


def _add_entries(h: dict[str, Any], rng: random.Random) -> str:
    names = ("v_pred", "ztsnr", "edm_mean", "model_ema.decay", "betas", "logvar",
             "lora_unet_a_b.alpha", "lora_unet_a_b.lora_down.weight",
             "input_blocks.0.0.weight", "label_emb.0.0.weight", "emb_params",
             "cond_stage_model.transformer.text_model.embeddings.position_ids",
             UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias",
             "control_model.input_hint_block.0.weight", "double_blocks.0.x", "clip_l")
    name = rng.choice(names)
    rank = rng.choice((0, 1, 2, 4))
    h[name] = {"dtype": rng.choice(list(DTYPE_BITS)), "data_offsets": [0, 0],
               "shape": [rng.choice((0, 1, 2, 3, 4, 32)) for _ in range(rank)]}
    return f"add {name!r}"


def _duplicate(h: dict[str, Any], rng: random.Random) -> Pairs:
    pairs = Pairs(h.items())
    if pairs:
        pairs.append(pairs[rng.randrange(len(pairs))])
    return pairs


JSON_EDITS: tuple[tuple[Callable[[dict[str, Any], random.Random], str], float], ...] = (
    (_edit_shape, 3), (_edit_dtype, 1.5), (_edit_offsets, 1.5), (_edit_fields, 1),
    (_edit_key, 1.5), (_edit_metadata, 2), (_add_entries, 1.5),
)


def _mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    header, payload = data[8:8 + n], data[8 + n:]
    r = rng.random()
    if r < 0.2:
        cut = rng.randrange(len(data))
        return f"truncate at {cut}", data[:cut]
    if r < 0.35:
        new_n = rng.choice((0, 1, n - 1, n + 1, n + 8, len(data), 2**63, 2**64 - 1,
                            100_000_001, rng.randrange(2 * n + 1)))
        return f"length field {new_n}", struct.pack("<Q", new_n) + data[8:]
    if r < 0.55:
        buf = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return "flip header bytes", struct.pack("<Q", n) + bytes(buf) + payload
    text = header.decode().rstrip(" ")
    variants = {
        "utf16": text.encode("utf-16"), "utf16le": text.encode("utf-16-le"),
        "bom": b"\xef\xbb\xbf" + text.encode(), "leading space": b"  " + text.encode(),
        "trailing nul": text.encode() + b"\0\0", "trailing garbage": text.encode() + b"}x",
        "trailing newline": text.encode() + b"\n", "utf32": text.encode("utf-32"),
    }
    name = rng.choice(sorted(variants))
    raw = variants[name]
    extra = rng.choice((b"", b"", b"\0", payload[:1]))
    return f"header {name}", struct.pack("<Q", len(raw)) + raw + payload + extra


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutated version of the valid safetensors file ``data`` and a short
    description of what was done."""
    if rng.random() < 0.25:
        return _mutate_bytes(data, rng)
    header, payload = split_file(data)
    steps = []
    edits, weights = zip(*JSON_EDITS, strict=True)
    for _ in range(rng.choice((1, 1, 2, 3))):
        steps.append(rng.choices(edits, weights)[0](header, rng))
    fresh = relayout(header, rng) if rng.random() < 0.85 else None
    obj: Any = header
    if rng.random() < 0.05:
        obj = _duplicate(header, rng)
        steps.append("duplicate key")
    ascii_only = rng.random() < 0.7
    return "; ".join(steps), join_file(obj, payload if fresh is None else fresh,
                                       ascii_only=ascii_only, pad=rng.random() < 0.9)


# --- checks ------------------------------------------------------------------------


class Hang(BaseException):
    """A command ran past its time limit (a BaseException, so the CLI's own
    ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds``."""
    def _alarm(_signum: int, _frame: Any) -> None:
        raise Hang(f"no answer after {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(args: list[str], seconds: float = 20.0) -> tuple[int, str, str]:
    """``modelkit.cli.main(args)`` in-process: exit code, stdout, stderr.
    stdout is strict UTF-8 and stderr backslash-replacing, as on a UTF-8
    terminal, so output a terminal could not take fails here too."""
    from modelkit.cli import main

    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", errors="strict", newline="")
    err = io.TextIOWrapper(err_b, encoding="utf-8", errors="backslashreplace", newline="")
    old_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with time_limit(seconds), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                rc = main(args)
            except UnicodeEncodeError as exc:
                rc, msg = 99, f"UnicodeEncodeError escaped: {exc}"
                err.write(msg)
    finally:
        signal.signal(signal.SIGTERM, old_sigterm)
    out.flush()
    err.flush()
    return rc, out_b.getvalue().decode("utf-8", "replace"), \
        err_b.getvalue().decode("utf-8", "replace")


_TERMINAL_UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
                              "\ud800-\udfff]")


def _error_defects(what: str, path: Path, rc: int, err: str) -> list[str]:
    defects = []
    if rc not in (1, 2):
        defects.append(f"{what}: exit {rc}: {err.strip()[:300]}")
    lines = err.rstrip("\n").split("\n")
    if len(lines) != 1 or not lines[0].startswith("modelkit: error: "):
        defects.append(f"{what}: error is not one line: {err[:300]!r}")
    if shown(path.name) not in err:
        defects.append(f"{what}: error does not name the file: {err[:300]!r}")
    if "Traceback" in err:
        defects.append(f"{what}: traceback")
    return defects


def _accepted_defects(path: Path) -> list[str]:
    """What ``inspect`` accepts, the safetensors library and modelkit's reader
    must read."""
    import safetensors

    from modelkit.io.dtypes import _TORCH_NAMES
    from modelkit.io.reader import open_model

    defects = []
    data = path.read_bytes()
    try:
        safetensors.deserialize(data)
    except Exception as exc:
        defects.append(f"inspect accepted what safetensors refuses: {str(exc)[:200]}")
    try:
        with open_model(path) as src:
            for key, info in src.infos.items():
                if info.dtype in _TORCH_NAMES and info.dtype != "F8_E8M0":
                    src.get(key)
    except Exception as exc:
        defects.append(f"inspect accepted what the reader cannot read: "
                       f"{type(exc).__name__}: {str(exc)[:200]}")
    return defects


def check_inspect(path: Path) -> tuple[bool, list[str]]:
    """Run ``inspect`` and ``inspect --json`` on ``path``; (accepted, defects)."""
    defects: list[str] = []
    try:
        rc, out, err = run_cli(["inspect", str(path)])
    except Hang as exc:
        return False, [f"inspect: hang: {exc}"]
    if rc == 0:
        if found := _TERMINAL_UNSAFE.search(out):
            bad = found.group()
            defects.append(f"inspect: raw control character {bad!r} in output")
        rc_j, out_j, err_j = run_cli(["inspect", "--json", str(path)])
        if rc_j != 0:
            defects.append(f"inspect --json: exit {rc_j} where inspect exit 0: {err_j[:200]}")
        else:
            try:
                json.loads(out_j, parse_constant=_no_constant)
            except ValueError as exc:
                defects.append(f"inspect --json: not strict JSON: {exc}")
        defects += _accepted_defects(path)
    else:
        defects += _error_defects("inspect", path, rc, err)
    return rc == 0, defects


def _no_constant(text: str) -> Any:
    raise ValueError(f"JSON constant {text} (NaN/Infinity) in output")


def check_prune(path: Path, out_dir: Path) -> tuple[bool, list[str]]:
    """Run ``prune`` on ``path`` into the empty ``out_dir``; (wrote, defects)."""
    import safetensors

    target = out_dir / "pruned.safetensors"
    try:
        rc, _out, err = run_cli(["prune", str(path), "-o", str(target), "-q"])
    except Hang as exc:
        return False, [f"prune: hang: {exc}"]
    left = sorted(p.name for p in out_dir.iterdir())
    if rc == 0:
        defects = [] if left == [target.name] else [f"prune: files after success: {left}"]
        try:
            safetensors.deserialize(target.read_bytes())
        except Exception as exc:
            defects.append(f"prune wrote a file safetensors refuses: {str(exc)[:200]}")
        return True, defects
    defects = _error_defects("prune", path, rc, err)
    if left:
        defects.append(f"prune: left files after an error: {left}")
    return False, defects


@dataclass
class FuzzStats:
    """Counts of a fuzz run and the defects found (description -> example)."""

    tried: int = 0
    clean: int = 0
    inspect_accepted: int = 0
    prune_wrote: int = 0
    defects: dict[str, str] = field(default_factory=dict)
    # files the safetensors library reads but modelkit refuses, by reason
    stricter: Counter[str] = field(default_factory=Counter)

    @property
    def n_defective(self) -> int:
        return self.tried - self.clean


def check_case(data: bytes, folder: Path, name: str = "case.safetensors",
               prune: bool = True, stats: FuzzStats | None = None) -> list[str]:
    """Write ``data`` as ``folder/name`` and check inspect (and prune) on it;
    the defects found (empty: the case is clean). ``folder`` is emptied."""
    case_dir = folder / "case"
    out_dir = folder / "out"
    for d in (case_dir, out_dir):
        d.mkdir(exist_ok=True)
        for p in d.iterdir():
            p.unlink()
    path = case_dir / name
    path.write_bytes(data)
    accepted, defects = check_inspect(path)
    wrote = False
    if prune:
        wrote, more = check_prune(path, out_dir)
        defects += more
    if stats is not None:
        stats.tried += 1
        stats.clean += not defects
        stats.inspect_accepted += accepted
        stats.prune_wrote += wrote
        if not accepted:
            _count_stricter(path, data, stats)
    return defects


def _count_stricter(path: Path, data: bytes, stats: FuzzStats) -> None:
    """Count a refused file the safetensors library would read, by reason."""
    import safetensors

    from modelkit.errors import BadFileError
    from modelkit.io.header import read_header

    try:
        safetensors.deserialize(data)
    except Exception:
        return
    try:
        read_header(path)
    except BadFileError as exc:
        reason = str(exc).split(": ", 1)[-1]
        stats.stricter[re.sub(r"'[^']*'|\d+", "_", reason)[:90]] += 1


def run_fuzz(cases: int, seed: int = 0, prune_every: int = 1,
             progress: Callable[[FuzzStats], None] | None = None) -> FuzzStats:
    """Fuzz ``cases`` mutated seed files (prune on every ``prune_every``-th)."""
    stats = FuzzStats()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="modelkit-fuzz-") as tmp:
        root = Path(tmp)
        seeds = {n: p.read_bytes() for n, p in write_seeds(root).items()}
        for i in range(cases):
            seed_name = rng.choice(sorted(seeds))
            what, data = mutate(seeds[seed_name], rng)
            found = check_case(data, root, prune=i % prune_every == 0, stats=stats)
            for d in found:
                kind = re.sub(r"'[^']*'|\d+", "_", d)[:120]
                stats.defects.setdefault(kind, f"[{seed_name}: {what}] {d}")
            if progress is not None and (i + 1) % 500 == 0:
                progress(stats)
    return stats


__all__ = ["FuzzStats", "check_case", "mutate", "run_cli", "run_fuzz", "write_seeds"]


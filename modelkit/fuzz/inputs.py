"""Hostile inputs for the long fuzz run (``bench/fuzz_long.py``), one
generator per target, deterministic per seed.

Each target mutates VALID tiny files (so the mutants get deep into the
parsers): safetensors checkpoints, LoRA adapters, GGUF files, ``.ckpt``
pickles, library folders and sweep files. A :class:`Case` is a seed file's
name and a list of mutation steps, each with its own seed, so a case can be
rebuilt from any subset of its steps (the harness minimizes a failing case by
dropping steps). :meth:`Target.build` writes the case's inputs under
``case_dir/in`` and returns the commands to run on them (paths relative to
``case_dir``, outputs under ``case_dir/out``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickletools
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit import fuzz as header_fuzz
from modelkit.io.header import DTYPE_BITS

HOSTILE_TEXT = ("\x1b]0;pwned\x07", "\x1b[2J", "line\nFAKE", "cr\rOVER", "\u202egpj.exe",
                "\x00nul", "\ud800", "", " ", "x" * 3000, "\U0001f600", "../../etc/passwd",
                "%s%n{0}", "NaN", "-1", "1e400", "null", "{\"a\":", "[" * 300)
BIG_INTS = (0, 1, -1, 2, 3, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
            2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63))
FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-45, 1e30, -1e30, 3.4e38, float("nan"), float("inf"),
          float("-inf"))
MAX_BYTES = 4 << 20


# --- cases and targets -------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command line of a case: its short name (for counts), its
    arguments after ``modelkit``, the exit codes after which files under
    ``out/`` may stay, and its own time limit (seconds; 0: the run's)."""

    name: str
    args: tuple[str, ...]
    outputs_ok: frozenset[int] = frozenset({0})
    timeout: float = 0.0
    # run only when this says so, given the (exit code, stdout) of the
    # case's commands so far
    gate: Callable[[list[tuple[int, str]]], bool] | None = None


@dataclass
class Case:
    """A seed and mutation steps ``(edit name, step seed)``; ``variant``
    picks command options."""

    target: str
    index: int
    seed_name: str
    steps: list[tuple[str, int]]
    variant: int

    def describe(self, steps: list[tuple[str, int]] | None = None) -> str:
        steps = self.steps if steps is None else steps
        return f"{self.seed_name}: " + (", ".join(f"{n}#{s}" for n, s in steps) or "(none)")


Edit = Callable[[Any, random.Random], str]


@dataclass
class Target:
    """A fuzz target: seeds built once per run, edits, commands."""

    name: str
    edits: dict[str, tuple[Edit, float]] = field(default_factory=dict)
    max_steps: int = 3
    quick: bool = False  # fewer seed files (the short CI run)

    def prepare(self, seeds: Path) -> dict[str, Any]:
        raise NotImplementedError

    def new_case(self, rng: random.Random, index: int, seeds: dict[str, Any]) -> Case:
        names = sorted(self.edits)
        weights = [self.edits[n][1] for n in names]
        n = rng.randint(1, self.max_steps)
        steps = [(rng.choices(names, weights)[0], rng.randrange(2**31)) for _ in range(n)]
        return Case(self.name, index, rng.choice(sorted(k for k in seeds if not
                                                         k.startswith("_"))),
                    steps, rng.randrange(2**31))

    def apply(self, state: Any, steps: list[tuple[str, int]]) -> Any:
        for name, step_seed in steps:
            self.edits[name][0](state, random.Random(step_seed))
        return state

    def build(self, case: Case, steps: list[tuple[str, int]], seeds: dict[str, Any],
              case_dir: Path) -> list[Command]:
        raise NotImplementedError


# --- safetensors as tensors ---------------------------------------------------------


@dataclass
class TensorFile:
    """A safetensors file as metadata and ``name -> [dtype, shape, bytes]``;
    ``header_mutation`` adds one :func:`modelkit.fuzz.mutate` of the
    header bytes after the tensor edits."""

    metadata: dict[str, str]
    tensors: dict[str, list[Any]]
    header_mutation: int | None = None

    @classmethod
    def parse(cls, data: bytes) -> TensorFile:
        header, payload = header_fuzz.split_file(data)
        meta = header.pop("__metadata__", {})
        tensors = {k: [v["dtype"], list(v["shape"]),
                       payload[v["data_offsets"][0]:v["data_offsets"][1]]]
                   for k, v in header.items()}
        return cls(dict(meta), tensors)

    def pack(self) -> bytes:
        header: dict[str, Any] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        pos, chunks = 0, []
        for k, (dtype, shape, raw) in self.tensors.items():
            header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
            pos += len(raw)
            chunks.append(raw)
        data = header_fuzz.join_file(header, b"".join(chunks))
        if self.header_mutation is not None:
            _, data = header_fuzz.mutate(data, random.Random(self.header_mutation))
        return data


def _nbytes(dtype: str, shape: list[int]) -> int:
    return (math.prod(shape) * DTYPE_BITS.get(dtype, 8) + 7) // 8


def _pick(tf: TensorFile, rng: random.Random, want: Callable[[str, list[Any]], bool]
          = lambda k, v: True) -> str | None:
    names = [k for k, v in tf.tensors.items() if want(k, v)]
    return rng.choice(names) if names else None


_FLOAT_BYTES = {"F16": lambda x: struct.pack("<e", x) if math.isfinite(x) and abs(x) < 65504
                else struct.pack("<H", 0x7E00 if math.isnan(x) else (0x7C00 if x > 0 else
                                                                      0xFC00)),
                "F32": lambda x: struct.pack("<f", x) if not math.isfinite(x) or abs(x) < 3.4e38
                else struct.pack("<f", math.copysign(math.inf, x)),
                "F64": lambda x: struct.pack("<d", x)}


def _bf16(x: float) -> bytes:
    return struct.pack("<f", x if not math.isfinite(x) or abs(x) < 3.3e38 else
                       math.copysign(math.inf, x))[2:]


def _encode(dtype: str, x: float) -> bytes:
    if dtype == "BF16":
        return _bf16(x)
    return _FLOAT_BYTES[dtype](x)


def edit_values(tf: TensorFile, rng: random.Random) -> str:
    """NaN, inf, huge or tiny values into a float tensor (some or all)."""
    key = _pick(tf, rng, lambda k, v: v[0] in ("F16", "F32", "BF16", "F64") and v[2])
    if key is None:
        return "noop"
    dtype, _shape, raw = tf.tensors[key]
    x = rng.choice(FLOATS)
    size = DTYPE_BITS[dtype] // 8
    buf = bytearray(raw)
    n = len(buf) // size
    where = range(n) if rng.random() < 0.3 else [rng.randrange(n) for _ in range(3)]
    for i in where:
        buf[i * size:(i + 1) * size] = _encode(dtype, x)
    tf.tensors[key][2] = bytes(buf)
    return f"value {x} in {key}"


def edit_shape(tf: TensorFile, rng: random.Random) -> str:
    """A legal but odd shape (fresh bytes), or a zero-size one with huge dims."""
    key = _pick(tf, rng)
    if key is None:
        return "noop"
    dtype, shape, _ = tf.tensors[key]
    r = rng.random()
    if r < 0.35 and shape:  # one dimension off (a LoRA rank mismatch, a wrong width)
        i = rng.randrange(len(shape))
        shape = list(shape)
        shape[i] = max(0, shape[i] + rng.choice((-1, 1, 3, -shape[i], shape[i])))
    elif r < 0.5:
        shape = list(reversed(shape))
    elif r < 0.6:
        shape = [0, rng.choice((2**31, 2**40, 2**62))]
    else:
        shape = [rng.choice((0, 1, 2, 3, 4, 8, 9, 16, 32, 320)) for _ in
                 range(rng.choice((0, 1, 2, 2, 3, 4, 5)))]
    n = _nbytes(dtype, shape)
    if n > MAX_BYTES:
        return "noop"
    tf.tensors[key][1:] = [shape, rng.randbytes(n)]
    return f"shape {shape} for {key}"


def edit_dtype(tf: TensorFile, rng: random.Random) -> str:
    key = _pick(tf, rng)
    if key is None:
        return "noop"
    dtype = rng.choice(sorted(DTYPE_BITS))
    shape = tf.tensors[key][1]
    n = _nbytes(dtype, shape)
    if n > MAX_BYTES:
        return "noop"
    tf.tensors[key] = [dtype, shape, rng.randbytes(n)]
    return f"dtype {dtype} for {key}"


def edit_drop(tf: TensorFile, rng: random.Random) -> str:
    if rng.random() < 0.1:
        tf.tensors.clear()
        return "no tensors"
    key = _pick(tf, rng)
    if key is not None:
        del tf.tensors[key]
    return f"drop {key}"


RENAMES = (("lora_down", "lora_up"), ("lora_up", "lora_down"), ("lora_unet", "lora_te"),
           ("lora_te", "lora_unet"), ("alpha", "lora_down.weight"), (".weight", ".alpha"),
           ("model.diffusion_model.", ""), ("input_blocks", "output_blocks"),
           ("hada_w1", "hada_w2"),
           ("lokr_w1", "lokr_w2"), ("_0_", "_99_"), ("1", "１"), ("attn", "\x1b[31mattn"))


def edit_rename(tf: TensorFile, rng: random.Random) -> str:
    key = _pick(tf, rng)
    if key is None:
        return "noop"
    old, new = rng.choice(RENAMES)
    if rng.random() < 0.2:
        name = rng.choice(HOSTILE_TEXT) + key[rng.randrange(len(key) + 1):]
    elif rng.random() < 0.15:
        name = _pick(tf, rng) or key  # onto another key: one of the two is gone
    else:
        name = key.replace(old, new, 1)
    tf.tensors[name] = tf.tensors.pop(key)
    return f"rename {key}"


def edit_scalar(tf: TensorFile, rng: random.Random) -> str:
    """An alpha (or any tensor) becomes a scalar with a hostile value."""
    key = _pick(tf, rng, lambda k, v: k.endswith("alpha")) if rng.random() < 0.7 else None
    key = key or _pick(tf, rng)
    if key is None:
        return "noop"
    dtype = rng.choice(("F16", "F32", "BF16", "F64"))
    x = rng.choice(FLOATS)
    shape = rng.choice(([], [1], [2]))
    tf.tensors[key] = [dtype, shape, _encode(dtype, x) * max(1, math.prod(shape))]
    return f"scalar {x} {dtype}{shape} for {key}"


METADATA_KEYS = ("ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_network_args",
                 "ss_base_model_version", "ss_v2", "modelspec.architecture",
                 "modelspec.prediction_type", "sshs_model_hash", "sd_merge_recipe",
                 "sd_merge_models", "modelkit.recipe", "modelkit.history", "modelkit.inputs",
                 "format", "ss_tag_frequency", "ss_dataset_dirs", "lora_alpha", "r")


def _json_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return rng.choice(HOSTILE_TEXT)
    if r < 0.5:
        d = rng.choice((10, 1000, 100_000))
        return "[" * d + "]" * d
    if r < 0.7:
        return json.dumps(rng.choice(([], {}, 5, -5, 1e308, True, None, "x",
                                      {"a": [1, {"b": None}]}, [{"x": math.nan}])))
    return rng.choice(('{"version": 1, "steps": 5}', '{"a":1e400}', '{"a": NaN}',
                       '{"0": {"name": 5, "sha256": []}}', '[{"op": null}]',
                       '{"ss_network_dim": "4"', '"\\ud800"', '{"a": "\\u0000"}'))


def edit_metadata(tf: TensorFile, rng: random.Random) -> str:
    key = rng.choice(METADATA_KEYS) if rng.random() < 0.8 else rng.choice(HOSTILE_TEXT)
    if not isinstance(tf.metadata, dict):
        tf.metadata = {}
    tf.metadata[key] = _json_text(rng)
    return f"metadata {key}"


def edit_header(tf: TensorFile, rng: random.Random) -> str:
    """One header-level mutation (JSON, numbers, length field, encoding) of
    :mod:`modelkit.fuzz` on the packed file."""
    tf.header_mutation = rng.randrange(2**31)
    return "header"


TENSOR_EDITS: dict[str, tuple[Edit, float]] = {
    "values": (edit_values, 2.0), "shape": (edit_shape, 2.0), "dtype": (edit_dtype, 1.0),
    "drop": (edit_drop, 1.0), "rename": (edit_rename, 1.5), "scalar": (edit_scalar, 1.5),
    "metadata": (edit_metadata, 1.5), "header": (edit_header, 1.5),
}


def _copy_in(case_dir: Path) -> tuple[Path, Path]:
    inp, out = case_dir / "in", case_dir / "out"
    inp.mkdir(parents=True, exist_ok=True)
    out.mkdir(exist_ok=True)
    return inp, out


class SafetensorsTarget(Target):
    """Mutated small checkpoints: inspect, hash, prune, merge, convert."""

    def __init__(self) -> None:
        super().__init__("safetensors", dict(TENSOR_EDITS))

    def prepare(self, seeds: Path) -> dict[str, Any]:
        from modelkit.testing import write_checkpoint

        paths = header_fuzz.write_seeds(seeds)
        out = {n: p.read_bytes() for n, p in paths.items() if n != "lora"}
        write_checkpoint(seeds / "sd1_full.safetensors", "sd1", seed=4)
        out["sd1_full"] = (seeds / "sd1_full.safetensors").read_bytes()
        return out

    def build(self, case: Case, steps: list[tuple[str, int]], seeds: dict[str, Any],
              case_dir: Path) -> list[Command]:
        inp, _ = _copy_in(case_dir)
        tf = self.apply(TensorFile.parse(seeds[case.seed_name]), steps)
        (inp / "m.safetensors").write_bytes(tf.pack())
        (inp / "b.safetensors").write_bytes(seeds[case.seed_name])
        v = random.Random(case.variant)
        m = "in/m.safetensors"
        return [
            Command("inspect", ("inspect", m)),
            Command("inspect --json", ("inspect", "--json", m)),
            Command("hash", ("hash", "-q", m), frozenset({0, 1})),
            Command("prune", ("prune", m, "-o", "out/p.safetensors", "-q")),
            Command("merge", ("merge", *((m, "in/b.safetensors") if v.random() < 0.5 else
                                       ("in/b.safetensors", m)),
                              "-o", "out/merged.safetensors", "-q",
                              *(("--method", "add_difference", m) if v.random() < 0.2 else ()))),
            Command("convert", ("convert", m, "-o", v.choice(("out/c.safetensors", "out/cdir")),
                                "-q")),
        ]


class LoraTarget(Target):
    """Mutated LoRA/LyCORIS adapters: info, bake, resize, convert."""

    KINDS = ("lora", "loha", "lokr", "peft", "comfyui")

    def __init__(self) -> None:
        super().__init__("lora", dict(TENSOR_EDITS))

    def prepare(self, seeds: Path) -> dict[str, Any]:
        from modelkit.testing import write_checkpoint
        from modelkit.testing.lora import write_lora

        out: dict[str, Any] = {}
        for i, kind in enumerate(self.KINDS[:2] if self.quick else self.KINDS):
            p = seeds / f"lora_{kind}.safetensors"
            write_lora(p, "sd1", kind=kind, rank=4, seed=i, conv=kind == "lora",
                       dora=kind == "peft")
            out[kind] = p.read_bytes()
        base = seeds / "lora_base.safetensors"
        write_checkpoint(base, "sd1", seed=1)
        out["_base"] = base
        return out

    def build(self, case: Case, steps: list[tuple[str, int]], seeds: dict[str, Any],
              case_dir: Path) -> list[Command]:
        inp, _ = _copy_in(case_dir)
        tf = self.apply(TensorFile.parse(seeds[case.seed_name]), steps)
        (inp / "l.safetensors").write_bytes(tf.pack())
        shutil.copyfile(seeds["_base"], inp / "base.safetensors")
        v = random.Random(case.variant)
        lo = "in/l.safetensors"
        weight = v.choice(("", ":0.5", ":-1", ":1e30", ":nan", ":0:1"))
        return [
            Command("lora info", ("lora", "info", lo)),
            Command("lora info --json", ("lora", "info", "--json", lo)),
            Command("lora bake", ("lora", "bake", "in/base.safetensors", lo + weight,
                                  "-o", "out/baked.safetensors", "-q")),
            Command("lora resize", ("lora", "resize", lo, "--rank", str(v.choice((1, 2, 3, 64))),
                                    "-o", "out/r.safetensors", "-q")),
            Command("lora convert", ("lora", "convert", lo, "--to",
                                     v.choice(("peft", "comfy", "kohya")),
                                     "-o", "out/c.safetensors", "-q")),
        ]


# --- GGUF ---------------------------------------------------------------------------

GG_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
          11: "<q", 12: "<d"}


@dataclass
class GGUFFile:
    """A GGUF file as fields; ``smash`` lists byte edits done after packing
    (seeds: each sets one count or length field to a hostile number, or
    flips bytes, or cuts the file)."""

    version: int
    kv: list[list[Any]]  # [key, vtype, value]; arrays: (elem type, [values])
    tensors: list[list[Any]]  # [name, dims, ggml type, offset]
    data: bytes
    alignment: int = 32
    smash: list[int] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> GGUFFile:
        pos = 4
        version, n_t, n_kv = struct.unpack_from("<IQQ", data, pos)
        pos += 20

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
            return data[pos - n:pos].decode()

        def value(t: int) -> Any:
            nonlocal pos
            if t == 8:
                return string()
            if t == 9:
                et, n = struct.unpack_from("<IQ", data, pos)
                pos += 12
                return (et, [value(et) for _ in range(n)])
            (x,) = struct.unpack_from(GG_FMT[t], data, pos)
            pos += struct.calcsize(GG_FMT[t])
            return x

        kv = []
        for _ in range(n_kv):
            k = string()
            (t,) = struct.unpack_from("<I", data, pos)
            pos += 4
            kv.append([k, t, value(t)])
        tensors = []
        for _ in range(n_t):
            name = string()
            (nd,) = struct.unpack_from("<I", data, pos)
            dims = list(struct.unpack_from(f"<{nd}Q", data, pos + 4))
            gt, off = struct.unpack_from("<IQ", data, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            tensors.append([name, dims, gt, off])
        align = next((v for k, _, v in kv if k == "general.alignment"), 32)
        start = pos + (-pos % align)
        return cls(version, kv, tensors, data[start:], align)

    def pack(self) -> bytes:
        out = bytearray(b"GGUF")
        counts: list[tuple[int, str]] = []  # (position, struct format) of counts/lengths

        def put(fmt: str, *x: Any, count: bool = False) -> None:
            if count:
                counts.append((len(out), fmt))
            out.extend(struct.pack(fmt, *x))

        def string(s: str) -> None:
            b = s.encode("utf-8", "surrogatepass")
            put("<Q", len(b), count=True)
            out.extend(b)

        def value(t: int, x: Any) -> None:
            if t == 8:
                string(str(x))
            elif t == 9:
                et, items = x
                put("<I", et)
                put("<Q", len(items), count=True)
                for item in items:
                    value(et, item)
            else:
                fmt = GG_FMT.get(t, "<I")
                try:
                    put(fmt, x)
                except (struct.error, TypeError):
                    put(fmt, 0)

        put("<I", self.version)
        put("<Q", len(self.tensors), count=True)
        put("<Q", len(self.kv), count=True)
        for k, t, x in self.kv:
            string(k)
            put("<I", t)
            value(t, x)
        for name, dims, gt, off in self.tensors:
            string(name)
            put("<I", len(dims), count=True)
            for d in dims:
                put("<Q", d % 2**64, count=True)
            put("<I", gt % 2**32)
            put("<Q", off % 2**64, count=True)
        align = self.alignment if isinstance(self.alignment, int) and 0 < self.alignment < 4096 \
            else 32
        out.extend(b"\0" * (-len(out) % align))
        head = len(out)
        out.extend(self.data)
        for s in self.smash:
            rng = random.Random(s)
            r = rng.random()
            if r < 0.5 and counts:
                p, fmt = rng.choice(counts)
                big = 2**32 - 1 if fmt == "<I" else 2**64 - 1
                x = rng.choice((0, 1, 2**31, big, big // 2 + 1, 100_000_001,
                                struct.unpack_from(fmt, out, p)[0] + rng.choice((1, -1, 8))))
                struct.pack_into(fmt, out, p, x % (big + 1))
            elif r < 0.8:
                for _ in range(rng.randint(1, 4)):
                    out[rng.randrange(4, max(5, head))] = rng.randrange(256)
            else:
                del out[rng.randrange(len(out)):]
        return bytes(out)


GG_KEYS = ("general.architecture", "general.alignment", "general.name", "general.file_type",
           "general.quantization_version", "comfy.gguf.orig_shape.x", "modelkit.recipe")


def _gg_hostile_value(rng: random.Random) -> tuple[int, Any]:
    r = rng.random()
    if r < 0.3:
        return 8, rng.choice((*HOSTILE_TEXT, "sd1", "sdxl", "flux", "sd3", "llama"))
    if r < 0.6:
        t = rng.choice((0, 1, 2, 3, 4, 5, 10, 11))
        return t, rng.choice(BIG_INTS)
    if r < 0.7:
        return rng.choice((6, 12)), rng.choice(FLOATS)
    if r < 0.8:
        return 7, rng.choice((True, False))
    if r < 0.95:
        et = rng.choice((4, 5, 10, 11, 8, 6))
        items = [rng.choice(BIG_INTS) if et not in (8, 6) else
                 (rng.choice(HOSTILE_TEXT) if et == 8 else rng.choice(FLOATS))
                 for _ in range(rng.choice((0, 1, 2, 4, 5, 70)))]
        return 9, (et, items)
    return rng.choice((13, 99, 2**31)), 0


def gg_kv(g: GGUFFile, rng: random.Random) -> str:
    t, x = _gg_hostile_value(rng)
    if g.kv and rng.random() < 0.6:
        entry = rng.choice(g.kv)
        entry[1:] = [t, x]
        return f"kv {entry[0]} = {t}"
    key = rng.choice(GG_KEYS)
    if key.startswith("comfy") and g.tensors:
        key = "comfy.gguf.orig_shape." + rng.choice(g.tensors)[0]
    if rng.random() < 0.2 and g.kv:
        key = rng.choice(g.kv)[0]  # a duplicate
    g.kv.append([key, t, x])
    return f"kv add {key} = {t}"


def gg_tensor(g: GGUFFile, rng: random.Random) -> str:
    if not g.tensors:
        return "noop"
    t = rng.choice(g.tensors)
    r = rng.random()
    if r < 0.3:
        nd = rng.choice((0, 1, 2, 3, 4, 5, 8))
        t[1] = [rng.choice((0, 1, 2, 3, 32, 320, 2**31, 2**63, 2**64 - 1)) for _ in range(nd)]
        return f"dims {t[1]} for {t[0]}"
    if r < 0.5:
        t[2] = rng.choice((0, 1, 2, 3, 6, 7, 8, 9, 10, 12, 14, 16, 24, 28, 30, 31, 39, 40, 99,
                           2**31))
        return f"type {t[2]} for {t[0]}"
    if r < 0.7:
        t[3] = rng.choice((1, 31, len(g.data), len(g.data) - 32, 2**62, 2**64 - 1,
                           g.tensors[0][3]))
        return f"offset {t[3]} for {t[0]}"
    if r < 0.8:
        t[0] = rng.choice((*HOSTILE_TEXT, g.tensors[0][0]))
        return "tensor name"
    if r < 0.9:
        g.tensors.remove(t)
        return f"drop {t[0]}"
    g.tensors.append(list(t))
    return f"duplicate {t[0]}"


def gg_version(g: GGUFFile, rng: random.Random) -> str:
    g.version = rng.choice((0, 1, 2, 4, 2**24 * 3, 2**32 - 1))
    return f"version {g.version}"


def gg_alignment(g: GGUFFile, rng: random.Random) -> str:
    a = rng.choice((0, 1, 3, 8, 64, 4096, 2**31, 2**32 - 1))
    g.kv = [e for e in g.kv if e[0] != "general.alignment"] + [["general.alignment", 4, a]]
    if a and a & (a - 1) == 0 and a <= 4096:
        g.alignment = a
    return f"alignment {a}"


def gg_data(g: GGUFFile, rng: random.Random) -> str:
    if rng.random() < 0.5:
        g.data = g.data[:rng.randrange(len(g.data) + 1)]
        return "cut data"
    g.data = bytes(b ^ 0xFF if rng.random() < 0.01 else b for b in g.data)
    return "flip data"


def gg_smash(g: GGUFFile, rng: random.Random) -> str:
    g.smash.append(rng.randrange(2**31))
    return "smash"


class GGUFTarget(Target):
    """Mutated GGUF exports: inspect, convert, merge, dequantize."""

    def __init__(self) -> None:
        super().__init__("gguf", {"kv": (gg_kv, 2.0), "tensor": (gg_tensor, 2.0),
                                  "version": (gg_version, 0.3),
                                  "alignment": (gg_alignment, 0.7), "data": (gg_data, 0.7),
                                  "smash": (gg_smash, 2.0)})

    def prepare(self, seeds: Path) -> dict[str, Any]:
        from modelkit.engine.api import export_gguf
        from modelkit.testing import write_checkpoint

        ckpt = seeds / "gguf_src.safetensors"
        write_checkpoint(ckpt, "sd1", seed=3)
        out: dict[str, Any] = {}
        for name, qtype, flat in (("q8_0", "q8_0", True), ("f16", "f16", True),
                                  ("q8_0_keep", "q8_0", False))[:1 if self.quick else 3]:
            p = seeds / f"seed_{name}.gguf"
            export_gguf(ckpt, p, qtype=qtype, flatten=flat)
            out[name] = p.read_bytes()
        out["_ckpt"] = ckpt
        return out

    def build(self, case: Case, steps: list[tuple[str, int]], seeds: dict[str, Any],
              case_dir: Path) -> list[Command]:
        inp, _ = _copy_in(case_dir)
        g = self.apply(GGUFFile.parse(seeds[case.seed_name]), steps)
        (inp / "m.gguf").write_bytes(g.pack())
        (inp / "b.gguf").write_bytes(seeds[case.seed_name])
        v = random.Random(case.variant)
        m = "in/m.gguf"
        return [
            Command("inspect", ("inspect", m)),
            Command("inspect --json", ("inspect", "--json", m)),
            Command("convert", ("convert", m, "-o", "out/c.safetensors", "-q")),
            Command("merge", ("merge", m, "in/b.gguf", "-o",
                              v.choice(("out/m.safetensors", "out/m.gguf")), "-q")),
            Command("dequantize", ("dequantize", m, "-o", "out/d.safetensors", "-q")),
        ]


# --- pickles ------------------------------------------------------------------------


@dataclass
class PickleFile:
    """A torch ``.ckpt``: zip records (name -> bytes) or a legacy stream
    (its pickles and the raw storages after them); ``tail`` lists byte edits
    on the packed file."""

    records: dict[str, bytes] | None
    legacy: list[bytes] | None = None
    legacy_rest: bytes = b""
    tail: list[int] = field(default_factory=list)

    def main(self) -> bytes:
        if self.records is not None:
            return self.records.get("data.pkl", b"")
        assert self.legacy is not None
        return self.legacy[3] if len(self.legacy) > 3 else self.legacy[-1]

    def set_main(self, data: bytes) -> None:
        if self.records is not None:
            self.records["data.pkl"] = data
        else:
            assert self.legacy is not None
            self.legacy[3 if len(self.legacy) > 3 else -1] = data

    @classmethod
    def parse(cls, data: bytes) -> PickleFile:
        import io
        import zipfile

        if data[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                return cls({n.split("/", 1)[1]: z.read(n) for n in z.namelist()})
        pickles, pos = [], 0
        for _ in range(5):
            end = pos
            for op, _arg, p in pickletools.genops(data[pos:]):
                end = pos + (p or 0) + 1
                if op.name == "STOP":
                    break
            pickles.append(data[pos:end])
            pos = end
        return cls(None, pickles[:5], data[pos:])

    def pack(self, path: Path) -> None:
        if self.records is not None:
            import torch

            w = torch._C.PyTorchFileWriter(str(path))
            for name, raw in self.records.items():
                if name in ("version", ".data/serialization_id"):
                    continue  # the writer adds its own
                w.write_record(name, raw, len(raw))
            w.write_end_of_file()
            del w
        else:
            assert self.legacy is not None
            path.write_bytes(b"".join(self.legacy) + self.legacy_rest)
        if self.tail:
            data = bytearray(path.read_bytes())
            for s in self.tail:
                rng = random.Random(s)
                if rng.random() < 0.5 and data:
                    del data[rng.randrange(len(data)):]
                else:
                    for _ in range(rng.randint(1, 6)):
                        if data:
                            data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data))


def _ops(data: bytes) -> list[tuple[Any, Any, int]]:
    try:
        return [(op, arg, pos or 0) for op, arg, pos in pickletools.genops(data)]
    except Exception:
        return []


def _op_end(data: bytes, ops: list[tuple[Any, Any, int]], i: int) -> int:
    return ops[i + 1][2] if i + 1 < len(ops) else len(data)


def _int_op(x: int) -> bytes:
    if 0 <= x < 256:
        return b"K" + bytes([x])
    if -(2**31) <= x < 2**31:
        return b"J" + struct.pack("<i", x)
    n = (x.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + x.to_bytes(n, "little", signed=True)


def _str_op(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return (b"\x8c" + bytes([len(b)]) if len(b) < 256 else b"X" + struct.pack("<I", len(b))) + b


GLOBALS = (("torch", "HalfStorage"), ("torch", "BFloat16Storage"), ("torch", "LongStorage"),
           ("torch", "BoolStorage"), ("torch", "FloatStorage"), ("torch", "ByteStorage"),
           ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
           ("torch._utils", "_rebuild_sparse_tensor"), ("collections", "OrderedDict"),
           ("os", "system"), ("builtins", "eval"), ("posix", "system"), ("torch", "Size"),
           ("numpy.core.multiarray", "_reconstruct"), ("torch", "device"),
           ("__builtin__", "set"), ("torch._tensor", "_rebuild_from_type_v2"),
           ("builtins", "getattr"), ("torch.nn.modules.linear", "Linear"))


def pk_int(p: PickleFile, rng: random.Random) -> str:
    """An integer argument (a shape, a stride, an offset, a step) made hostile."""
    data = p.main()
    ops = _ops(data)
    idx = [i for i, (op, _, _) in enumerate(ops) if op.name in ("BININT", "BININT1", "BININT2",
                                                                 "LONG1", "INT")]
    if not idx:
        return "noop"
    i = rng.choice(idx)
    x = rng.choice((*BIG_INTS, 10**30, -(10**30)))
    p.set_main(data[:ops[i][2]] + _int_op(x) + data[_op_end(data, ops, i):])
    return f"int {ops[i][1]} -> {x}"


def pk_str(p: PickleFile, rng: random.Random) -> str:
    """A string argument (a key, a storage id, a dtype name) changed."""
    data = p.main()
    ops = _ops(data)
    idx = [i for i, (op, _, _) in enumerate(ops) if op.name in ("SHORT_BINUNICODE",
                                                                 "BINUNICODE", "BINSTRING",
                                                                 "SHORT_BINSTRING")]
    if not idx:
        return "noop"
    i = rng.choice(idx)
    old = ops[i][1]
    new = rng.choice((*HOSTILE_TEXT, "0", "1", "99", "cpu", "cuda:0", "meta", "state_dict",
                      "model.diffusion_model.input_blocks.0.0.weight", "storage",
                      str(old) * 2))
    p.set_main(data[:ops[i][2]] + _str_op(new) + data[_op_end(data, ops, i):])
    return f"str {str(old)[:30]!r} -> {new[:30]!r}"


def pk_global(p: PickleFile, rng: random.Random) -> str:
    data = p.main()
    ops = _ops(data)
    idx = [i for i, (op, _, _) in enumerate(ops) if op.name == "GLOBAL"]
    if not idx:
        return "noop"
    i = rng.choice(idx)
    mod, name = rng.choice(GLOBALS)
    p.set_main(data[:ops[i][2]] + f"c{mod}\n{name}\n".encode() + data[_op_end(data, ops, i):])
    return f"global {ops[i][1]} -> {mod}.{name}"


def pk_ops(p: PickleFile, rng: random.Random) -> str:
    """Delete, duplicate or insert opcodes; cut the pickle; nest deeply."""
    data = p.main()
    ops = _ops(data)
    if not ops:
        return "noop"
    i = rng.randrange(len(ops))
    start, end = ops[i][2], _op_end(data, ops, i)
    r = rng.random()
    if r < 0.3:
        new, what = data[:start] + data[end:], f"delete {ops[i][0].name}"
    elif r < 0.5:
        new, what = data[:end] + data[start:end] + data[start:], f"repeat {ops[i][0].name}"
    elif r < 0.65:
        new, what = data[:rng.randrange(len(data))], "cut"
    elif r < 0.8:
        depth = rng.choice((100, 10_000, 200_000))
        ins = rng.choice((b"(" * depth, b"]" * depth, b"}" * depth, b")" * depth))
        new, what = data[:start] + ins + data[start:], f"nest {depth}"
    else:
        ins = rng.choice((b"h\xff", b"j\xff\xff\xff\x7f", b"X\xff\xff\xff\x7f", b"0", b"1",
                          b"\x8d" + struct.pack("<Q", 2**62), b"\x95" + struct.pack("<Q", 2**40),
                          b"R", b"b", b"Q", b"\x81", b"\x92"))
        new, what = data[:start] + ins + data[start:], f"insert {ins[:4]!r}"
    p.set_main(new)
    return what


def pk_records(p: PickleFile, rng: random.Random) -> str:
    """A storage record dropped, cut or grown; an extra record; bytes of the file."""
    if p.records is None or rng.random() < 0.3:
        p.tail.append(rng.randrange(2**31))
        return "file bytes"
    names = sorted(n for n in p.records if n.startswith("data/"))
    if not names:
        return "noop"
    n = rng.choice(names)
    r = rng.random()
    if r < 0.3:
        del p.records[n]
        return f"drop {n}"
    if r < 0.7:
        p.records[n] = p.records[n][:rng.randrange(len(p.records[n]) + 1)]
        return f"cut {n}"
    if r < 0.85:
        p.records[n] += rng.randbytes(rng.choice((1, 64, 4096)))
        return f"grow {n}"
    p.records[rng.choice(("byteorder", ".format_version", ".storage_alignment"))] = \
        rng.choice((b"big", b"", b"\xff" * 8, b"99", b"-1", b"little\n"))
    return "record value"


class PickleTarget(Target):
    """Mutated torch pickles (zip and legacy): inspect, convert, hash."""

    def __init__(self) -> None:
        super().__init__("pickle", {"int": (pk_int, 2.0), "str": (pk_str, 1.5),
                                    "global": (pk_global, 1.0), "ops": (pk_ops, 1.5),
                                    "records": (pk_records, 1.5)})

    def prepare(self, seeds: Path) -> dict[str, Any]:
        import torch

        from modelkit.testing import synthetic_tensor

        keys, _ = header_fuzz.seed_keys()["sd1_ckpt"]
        sd = {k: synthetic_tensor(k, s, 3).half() for k, s in list(keys.items())[:24]}
        emb = {"string_to_param": {"*": torch.randn(2, 32)}, "name": "fuzz", "step": 10,
               "string_to_token": {"*": 265}}
        out: dict[str, Any] = {}
        for name, obj, zipped in (("ckpt_zip", {"state_dict": sd, "global_step": 5}, True),
                                  ("ckpt_legacy", {"state_dict": sd}, False),
                                  ("bare_zip", sd, True), ("emb_zip", emb, True)):
            p = seeds / f"seed_{name}.ckpt"
            torch.save(obj, p, _use_new_zipfile_serialization=zipped)
            out[name] = p.read_bytes()
        return out

    def build(self, case: Case, steps: list[tuple[str, int]], seeds: dict[str, Any],
              case_dir: Path) -> list[Command]:
        inp, _ = _copy_in(case_dir)
        pf = self.apply(PickleFile.parse(seeds[case.seed_name]), steps)
        pf.pack(inp / "m.ckpt")
        m = "in/m.ckpt"
        return [
            Command("inspect", ("inspect", m)),
            Command("inspect --json", ("inspect", "--json", m)),
            Command("convert", ("convert", m, "-o", "out/c.safetensors", "-q")),
            Command("hash", ("hash", "-q", m), frozenset({0, 1})),
        ]


# --- library folders ----------------------------------------------------------------

ODD_NAMES = (b"\xff\xfe.safetensors", b"new\nline.safetensors", b"\x1b]0;pwn\x07.safetensors",
             b"-rf.safetensors", b" .safetensors", b"a" * 240 + b".safetensors",
             "名前.safetensors".encode(), b"\xed\xa0\x80.safetensors", b"x.SAFETENSORS",
             b".hidden.safetensors", b"tab\there.ckpt", b"\xc3.gguf", b"dir\\name.pt",
             b"%s%n.safetensors", b"'; DROP TABLE files;--.safetensors", b"*.safetensors")


@dataclass
class LibraryTree:
    """Entries of a model folder: relative path (bytes) -> (kind, content)."""

    entries: dict[bytes, tuple[str, Any]]

    def write(self, root: Path, seeds: dict[str, Any]) -> None:
        broot = os.fsencode(root)
        for rel, (kind, content) in self.entries.items():
            p = os.path.join(broot, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            if kind == "seed":
                with open(p, "wb") as f:
                    f.write(seeds[content])
            elif kind == "bytes":
                with open(p, "wb") as f:
                    f.write(content)
            elif kind == "symlink":
                os.symlink(content, p)
            elif kind == "fifo":
                os.mkfifo(p)
            elif kind == "dir":
                os.makedirs(p, exist_ok=True)


def _model_entries(tree: LibraryTree) -> list[bytes]:
    return [k for k, (kind, _) in tree.entries.items() if kind == "seed"]


def lib_name(t: LibraryTree, rng: random.Random) -> str:
    models = _model_entries(t)
    if not models:
        return "noop"
    old = rng.choice(models)
    folder = os.path.dirname(old)
    new = os.path.join(folder, rng.choice(ODD_NAMES))
    t.entries[new] = t.entries.pop(old) if rng.random() < 0.5 else t.entries[old]
    return f"name {new!r}"


def lib_deep(t: LibraryTree, rng: random.Random) -> str:
    depth = rng.choice((20, 60, 120))
    seg = rng.choice((b"d", b"x" * 30, b"\xff"))
    parts = [seg] * depth
    while len(b"/".join(parts)) > 3800:
        parts.pop()
    models = _model_entries(t) or [b"m.safetensors"]
    t.entries[b"/".join(parts) + b"/deep.safetensors"] = t.entries.get(
        rng.choice(models), ("bytes", b""))
    return f"deep {len(parts)}"


def _hostile_sidecar(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.15:
        d = rng.choice((100, 10_000, 500_000))
        return (b"[" * d + b"]" * d) if rng.random() < 0.5 else (b'{"a":' * d + b"1" + b"}" * d)
    if r < 0.3:
        return rng.choice((b"NaN", b'{"baseModel": NaN}', b'{"id": 1e400}', b"\xff\xfe{}",
                           b"\xef\xbb\xbf{}", b'{"name": "\\ud800"}', b"", b"null", b"[]",
                           b'{"a":', b"\x00" * 64, b'{"model": {"name": "\x1b]0;x\x07"}}'))
    info: dict[str, Any] = {
        "id": 1, "modelId": 2, "name": "v1", "baseModel": "SD 1.5",
        "trainedWords": ["word"], "model": {"name": "fuzz", "type": "LORA", "nsfw": False},
        "files": [{"name": "m.safetensors", "hashes": {"SHA256": "0" * 64, "AutoV2": "0" * 10}}],
        "images": [{"url": "https://example.invalid/x.png", "meta": {"seed": 1}}],
        "description": "d", "sd version": "SD1", "activation text": "w", "preferred weight": 1,
        "notes": "n"}
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(sorted(info))
        info[key] = rng.choice((None, 5, -1, 1e308, True, [], {}, "x" * 100_000,
                                rng.choice(HOSTILE_TEXT), [None], {"name": []},
                                [[[[[]]]]], 10**30))
    return json.dumps(info).encode("utf-8", "surrogatepass")


def lib_sidecar(t: LibraryTree, rng: random.Random) -> str:
    models = _model_entries(t)
    if not models:
        return "noop"
    model = rng.choice(models)
    stem = model.rsplit(b".", 1)[0]
    ext = rng.choice((b".civitai.info", b".json", b".civitai.json", b".preview.json"))
    t.entries[stem + ext] = ("bytes", _hostile_sidecar(rng))
    return f"sidecar {ext!r}"


def lib_link(t: LibraryTree, rng: random.Random) -> str:
    folder = rng.choice([os.path.dirname(m) for m in _model_entries(t)] or [b"models"])
    r = rng.random()
    if r < 0.3:
        t.entries[os.path.join(folder, b"broken.safetensors")] = ("symlink",
                                                                  b"missing/x.safetensors")
        return "broken symlink"
    if r < 0.5:
        t.entries[os.path.join(folder, b"loop")] = ("symlink", b"..")
        return "dir loop symlink"
    if r < 0.65:
        t.entries[os.path.join(folder, b"self.safetensors")] = ("symlink", b"self.safetensors")
        return "self symlink"
    if r < 0.8:
        t.entries[os.path.join(folder, b"zero.safetensors")] = ("symlink", b"/dev/zero")
        return "symlink to /dev/zero"
    t.entries[os.path.join(folder, b"fifo.safetensors")] = ("fifo", None)
    return "fifo"


def lib_file(t: LibraryTree, rng: random.Random) -> str:
    folder = rng.choice([os.path.dirname(m) for m in _model_entries(t)] or [b"models"])
    r = rng.random()
    name = os.path.join(folder, rng.choice((b"odd.safetensors", b"odd.ckpt", b"odd.gguf",
                                            b"odd.pt", b"odd.bin", b"odd.sft")))
    if r < 0.3:
        size = rng.choice((2**63, 2**64 - 1, 100_000_001, 99_999_999, 8, 0))
        t.entries[name] = ("bytes", struct.pack("<Q", size) + b"{" + b" " * rng.choice((0, 7)))
        return f"header length {size}"
    if r < 0.45:
        t.entries[name] = ("bytes", b"")
        return "empty file"
    if r < 0.55:
        t.entries[name] = ("dir", None)
        return "folder named like a model"
    if r < 0.7:
        t.entries[name] = ("bytes", rng.choice((b"GGUF" + b"\xff" * 20, b"PK\x03\x04" + b"\0" * 30,
                                                b"\x80\x02}q\x00.", rng.randbytes(64))))
        return "foreign magic"
    models = _model_entries(t)
    if models:
        src = t.entries[rng.choice(models)][1]
        t.entries[name] = ("mutant", (src, rng.randrange(2**31)))
        return "mutated model"
    return "noop"


def lib_many(t: LibraryTree, rng: random.Random) -> str:
    n = rng.choice((50, 300))
    for i in range(n):
        t.entries[b"many/f%04d.safetensors" % i] = ("bytes", b"")
    return f"{n} empty files"


class LibraryTarget(Target):
    """Hostile model folders: library scan (with and without --hash), list, check."""

    def __init__(self) -> None:
        super().__init__("library", {"name": (lib_name, 2.0), "deep": (lib_deep, 0.7),
                                     "sidecar": (lib_sidecar, 2.0), "link": (lib_link, 1.5),
                                     "file": (lib_file, 2.0), "many": (lib_many, 0.3)},
                         max_steps=5)

    def prepare(self, seeds: Path) -> dict[str, Any]:
        from modelkit.testing.lora import write_lora

        paths = header_fuzz.write_seeds(seeds)
        out = {n: p.read_bytes() for n, p in paths.items()}
        write_lora(seeds / "lib_lora.safetensors", "sd1", rank=2)
        out["kohya_lora"] = (seeds / "lib_lora.safetensors").read_bytes()
        return {"webui": out, "comfy": out}

    @staticmethod
    def tree(layout: str) -> LibraryTree:
        if layout == "webui":
            base = b"webui/models/"
            return LibraryTree({
                base + b"Stable-diffusion/sd1.safetensors": ("seed", "sd1_ckpt"),
                base + b"Stable-diffusion/xl/unet.safetensors": ("seed", "sdxl_unet"),
                base + b"Lora/lora.safetensors": ("seed", "kohya_lora"),
                base + b"VAE/vae.safetensors": ("seed", "vae"),
                b"webui/embeddings/emb.safetensors": ("seed", "embedding"),
            })
        return LibraryTree({
            b"ComfyUI/models/checkpoints/sd2.safetensors": ("seed", "sd2_ckpt"),
            b"ComfyUI/models/loras/lora.safetensors": ("seed", "kohya_lora"),
            b"ComfyUI/models/unet/unet.safetensors": ("seed", "sdxl_unet"),
            b"ComfyUI/models/vae/vae.safetensors": ("seed", "vae"),
        })

    def build(self, case: Case, steps: list[tuple[str, int]], seeds: dict[str, Any],
              case_dir: Path) -> list[Command]:
        inp, _ = _copy_in(case_dir)
        tree = self.apply(self.tree(case.seed_name), steps)
        files = dict(seeds[case.seed_name])
        for rel, (kind, content) in list(tree.entries.items()):
            if kind == "mutant":
                _, data = header_fuzz.mutate(files[content[0]], random.Random(content[1]))
                tree.entries[rel] = ("bytes", data)
        tree.write(inp / "lib", files)
        v = random.Random(case.variant)
        db = ("--db", "out/lib.sqlite")
        scan = ("library", "scan", "in/lib", *db, "-q", "-j", "1")
        hashed = v.random() < 0.4
        return [
            Command("library scan", (*scan, *(("--hash",) if hashed else ())), frozenset({0, 1})),
            Command("library scan (again)", scan, frozenset({0, 1})),
            Command("library list", ("library", "list", *db), frozenset({0, 1})),
            Command("library list --json", ("library", "list", "--json", *db), frozenset({0, 1})),
            Command("library check", ("library", "check", *db), frozenset({0, 1})),
        ]


# --- sweep files --------------------------------------------------------------------


@dataclass
class SweepFiles:
    """A sweep file and its base recipe as data, and edits of the YAML text."""

    sweep: dict[str, Any]
    recipe: dict[str, Any]
    text_edits: list[int] = field(default_factory=list)
    case_dir: str = "CASE"


def _paths_in(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths_in(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths_in(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return obj


def _sweep_value(s: SweepFiles, rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.2:
        return rng.choice((None, True, [], {}, "x", 0, -1, [1, "a", None], {"a": 1}))
    if r < 0.4:
        return rng.choice((1e308, -1e308, 10**400, 2**63, -(2**63), math.nan, math.inf, 1e-320,
                           0.5, 2, 100, 10**6))
    if r < 0.55:
        return rng.choice(HOSTILE_TEXT)
    if r < 0.7:
        v: Any = 1
        for _ in range(rng.choice((10, 60, 400))):
            v = [v]
        return v
    if r < 0.9:
        return rng.choice((f"{s.case_dir}/outside/abs.safetensors", f"{s.case_dir}/outside",
                           "../escape.safetensors", "../../escape.yaml", "~/x.safetensors",
                           "in/a.safetensors", "/dev/zero", "in", f"{s.case_dir}/in/a.safetensors",
                           "out/sw/cell.safetensors", "base.yaml", "sweep.yaml", "a\0b"))
    return rng.choice((list(range(rng.choice((50, 5000)))), {"preset": "\x1b[2J"},
                       {"blocks": [0.5] * rng.choice((1, 26, 1000))}, {"path": None}))


def sw_value(s: SweepFiles, rng: random.Random) -> str:
    doc = s.sweep if rng.random() < 0.6 else s.recipe
    paths = [p for p in _paths_in(doc) if p]
    if not paths:
        return "noop"
    p = rng.choice(paths)
    _set(doc, p, _sweep_value(s, rng))
    return f"value at {'.'.join(map(str, p))}"


AXES = ("steps.mix.params.alpha", "inputs.b", "inputs.a", "output.path", "output.format",
        "options.vae", "options.seed", "steps.mix.method", "steps.mix.params.beta",
        "steps.mix.models", "steps", "inputs", "steps.mix.params.alpha.x", "steps..x",
        "__class__", "verify.steps", "output.dtype", "steps.mix.params.blocks")


def sw_axis(s: SweepFiles, rng: random.Random) -> str:
    axes = s.sweep.setdefault("axes", {})
    if not isinstance(axes, dict):
        return "noop"
    key = rng.choice(AXES)
    axes[key] = rng.choice(([0.1, 0.9], [], [None], ["in/a.safetensors"], "0.5",
                            [_sweep_value(s, rng)], list(range(rng.choice((3, 200, 20_000))))))
    if rng.random() < 0.3:
        s.sweep["mode"] = rng.choice(("zip", "product", "ZIP", 5, None))
    return f"axis {key}"


def sw_keys(s: SweepFiles, rng: random.Random) -> str:
    doc = s.sweep if rng.random() < 0.5 else s.recipe
    dicts = [p for p in _paths_in(doc) if isinstance(_get(doc, p), dict)]
    p = rng.choice(dicts)
    d = _get(doc, p)
    if d and rng.random() < 0.5:
        k = rng.choice(sorted(map(str, d)))
        d.pop(k, None)
        return f"drop {k}"
    k = rng.choice(("verify", "mode", "version", "seed", "unknown", "options", "\x1b[31m",
                    "recipe", "output", "format", "overwrite"))
    d[k] = _sweep_value(s, rng)
    return f"add {k}"


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def sw_text(s: SweepFiles, rng: random.Random) -> str:
    s.text_edits.append(rng.randrange(2**31))
    return "yaml text"


def _small_grid(done: list[tuple[int, str]]) -> bool:
    """Run a sweep for real when its dry run planned 1 to 6 cells."""
    rc, out = done[0]
    try:
        return rc == 0 and 0 < int(json.loads(out)["n_cells"]) <= 6
    except (ValueError, KeyError, TypeError):
        return False


def _flow(x: Any) -> str:
    """``x`` as YAML flow text (JSON-like; any nesting depth, NaN and
    infinities as YAML writes them)."""
    if isinstance(x, bool) or x is None:
        return json.dumps(x)
    if isinstance(x, float):
        return ".nan" if math.isnan(x) else (".inf" if x == math.inf else
                                             "-.inf" if x == -math.inf else repr(x))
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str):
        return json.dumps(x)
    if isinstance(x, dict):
        return "{" + ", ".join(f"{_flow(str(k))}: {_flow(v)}" for k, v in x.items()) + "}"
    parts, stack = [], [iter([x])]
    while stack:  # lists iteratively: deep nesting is a mutation
        try:
            item = next(stack[-1])
        except StopIteration:
            stack.pop()
            parts.append("]")
            continue
        if parts and parts[-1] not in ("[",):
            parts.append(", ")
        if isinstance(item, list):
            parts.append("[")
            stack.append(iter(item))
        else:
            parts.append(_flow(item))
    return "".join(parts[:-1])


def _yaml_text(data: Any, indent: int = 0) -> str:
    """Block style for the top two levels (so text edits meet indentation),
    flow style below."""
    if not isinstance(data, dict) or indent > 2:
        return " " * indent + _flow(data) + "\n"
    lines = []
    for k, v in data.items():
        key = " " * indent + _flow(str(k)).strip('"') if str(k).isidentifier() else \
            " " * indent + _flow(str(k))
        if isinstance(v, dict) and v and indent < 2:
            lines.append(f"{key}:\n" + _yaml_text(v, indent + 2).rstrip("\n"))
        else:
            lines.append(f"{key}: {_flow(v)}")
    return "\n".join(lines) + "\n"


def _text_edit(text: str, seed: int) -> bytes:
    rng = random.Random(seed)
    r = rng.random()
    if r < 0.15:
        lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
        for i in range(1, 9):
            prev = "a" if i == 1 else f"a{i - 1}"
            lines.append(f"a{i}: &a{i} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},"
                         f"*{prev},*{prev},*{prev}]")
        return (text + "\n".join(lines) + "\n").encode()
    if r < 0.25:
        return (text + 'x: !!python/object/apply:os.system ["touch pwned"]\n').encode()
    if r < 0.35:
        return (text + text.split("\n", 1)[0] + "\n").encode()  # a duplicate key
    if r < 0.45:
        return text.replace("  ", "\t", 1).encode()
    if r < 0.55:
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.choice((0xFF, 0x00, 0x80, 0x1B, 0x0D))
        return bytes(b)
    if r < 0.65:
        return text.encode()[:rng.randrange(len(text) + 1)]
    if r < 0.72:
        return b"\xef\xbb\xbf" + text.encode()
    if r < 0.8:
        return (text + "---\n" + text).encode()
    if r < 0.88:
        return (text + "<<: {version: 2}\n").encode()
    if r < 0.94:
        return (text + "z: " + "[" * 5000 + "]" * 5000 + "\n").encode()
    return (text + "long: " + "y" * 2_000_000 + "\n").encode()


class SweepTarget(Target):
    """Mutated sweep files and base recipes: sweep --dry-run, small real runs."""

    def __init__(self) -> None:
        super().__init__("sweep", {"value": (sw_value, 2.0), "axis": (sw_axis, 1.5),
                                   "keys": (sw_keys, 1.0), "text": (sw_text, 1.2)})

    def prepare(self, seeds: Path) -> dict[str, Any]:
        from modelkit.testing import write_checkpoint

        a, b = seeds / "sweep_a.safetensors", seeds / "sweep_b.safetensors"
        write_checkpoint(a, "sd1", seed=1)
        write_checkpoint(b, "sd1", seed=2)
        recipe: dict[str, Any] = {"version": 1,
                                  "inputs": {"a": "a.safetensors", "b": "b.safetensors"},
                  "steps": {"mix": {"method": "weighted_sum", "models": ["a", "b"],
                                    "params": {"alpha": 0.5}}},
                  "output": {"path": "unused.safetensors"}}
        product = {"version": 1, "recipe": "base.yaml",
                   "axes": {"steps.mix.params.alpha": [0.25, 0.75],
                            "inputs.b": ["b.safetensors", "a.safetensors"]}}
        zipped = {"version": 1, "recipe": "base.yaml", "mode": "zip",
                  "axes": {"steps.mix.params.alpha": [0.2, 0.8],
                           "inputs.b": ["b.safetensors", "a.safetensors"]}}
        zipped_recipe = copy.deepcopy(recipe)
        zipped_recipe["steps"]["mix"] = {"method": "add_difference", "models": ["a", "b", "a"],
                                         "params": {"alpha": 0.5}}
        zipped_recipe["inputs"]["c"] = "a.safetensors"
        zipped_recipe["steps"]["mix"]["models"] = ["a", "b", "c"]
        return {"product": (product, recipe), "zip": (zipped, zipped_recipe),
                "_a": a, "_b": b}

    def build(self, case: Case, steps: list[tuple[str, int]], seeds: dict[str, Any],
              case_dir: Path) -> list[Command]:
        inp, _ = _copy_in(case_dir)
        (case_dir / "outside").mkdir(exist_ok=True)
        sweep, recipe = seeds[case.seed_name]
        s = SweepFiles(copy.deepcopy(sweep), copy.deepcopy(recipe), case_dir=str(case_dir))
        self.apply(s, steps)
        shutil.copyfile(seeds["_a"], inp / "a.safetensors")
        shutil.copyfile(seeds["_b"], inp / "b.safetensors")
        files: dict[str, str | bytes] = {"sweep.yaml": _yaml_text(s.sweep),
                                         "base.yaml": _yaml_text(s.recipe)}
        for seed in s.text_edits:
            name = random.Random(seed).choice(sorted(files))
            text = files[name]
            raw = _text_edit(text if isinstance(text, str) else text.decode("utf-8", "replace"),
                             seed)
            files[name] = raw
        for name, text in files.items():
            (inp / name).write_bytes(text.encode() if isinstance(text, str) else text)
        v = random.Random(case.variant)
        cmds = [Command("sweep --dry-run", ("sweep", "in/sweep.yaml", "-o", "out/dry",
                                            "--dry-run", "--json", "-q"), frozenset({0, 1}))]
        if v.random() < 0.5:
            cmds.append(Command("sweep (run)", ("sweep", "in/sweep.yaml", "-o", "out/sw",
                                                "-j", "1", "-q"), frozenset({0, 1}),
                                timeout=120, gate=_small_grid))
        return cmds


TARGETS: dict[str, Callable[[], Target]] = {
    "safetensors": SafetensorsTarget, "lora": LoraTarget, "gguf": GGUFTarget,
    "pickle": PickleTarget, "library": LibraryTarget, "sweep": SweepTarget,
}

__all__ = ["TARGETS", "Case", "Command", "GGUFFile", "PickleFile", "Target", "TensorFile"]

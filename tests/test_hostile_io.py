"""Issue 17 (items 10, 14, 15, 18, 21): hostile GGUF files, pickles, library
scans and hashing. Every case runs through the real ``modelkit`` console
script: one line on stderr naming the file and exit 2, or a report; never an
internal error, a hang or an unbounded allocation."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import run_all as _run_all
from cli_support import run_entry

from modelkit.textsafe import shown


def _one_line(result: tuple[int, str, str], path: Path, *parts: str) -> str:
    rc, _out, err = result
    assert rc == 2, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("modelkit: error: "), err
    assert shown(path.name) in lines[0] and "Traceback" not in err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# --- a GGUF file built byte by byte -------------------------------------------------

def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(tensors: list[tuple[str, tuple[int, ...], int, bytes]],
               kv: list[tuple[str, int, bytes]] | None = None) -> bytes:
    """A GGUF v3 file: ``tensors`` as (name, GGUF dims innermost first, GGML
    type id, data) and ``kv`` as (key, value type id, packed value)."""
    kv = kv if kv is not None else [("general.architecture", 8, _s("sd1"))]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, vtype, value in kv:
        head += _s(key) + struct.pack("<I", vtype) + value
    offset, data = 0, b""
    for name, dims, ttype, raw in tensors:
        head += _s(name) + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", ttype, offset)
        pad = -len(raw) % 32
        data += raw + b"\0" * pad
        offset += len(raw) + pad
    head += b"\0" * (-len(head) % 32)
    return head + data


F32 = 0
GOOD_TENSORS = [("a.weight", (32, 4), F32, struct.pack("<128f", *range(128))),
                ("b.bias", (8,), F32, struct.pack("<8f", *range(8)))]


@pytest.fixture(scope="module")
def hostile_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-gguf")
    good = gguf_bytes(GOOD_TENSORS)
    files = {"good": good}
    # item 14: the first key/value's type changed from string (8) to array (9):
    # gguf-py read an array of ~2^59 elements, grew to 5 GB and ignored SIGINT
    i = good.index(b"general.architecture") + len(b"general.architecture")
    assert good[i] == 8
    files["array_type"] = good[:i] + b"\x09" + good[i + 1:]
    files["zero_dim"] = gguf_bytes([("a.weight", (32, 0), F32, b"")])
    files["five_dims"] = gguf_bytes([("a.weight", (1, 1, 1, 1, 1), F32, b"\0" * 4)])
    files["huge_kv_count"] = good[:16] + struct.pack("<Q", 1 << 62) + good[24:]
    files["huge_tensor_count"] = good[:8] + struct.pack("<Q", 1 << 62) + good[16:]
    files["past_end"] = gguf_bytes([("a.weight", (32, 4), F32, b"")]) + b"\0" * 32
    files["misaligned"] = gguf_bytes(GOOD_TENSORS, kv=[
        ("general.alignment", 4, struct.pack("<I", 48))])
    two = gguf_bytes([("a", (32,), F32, bytes(128)), ("b", (32,), F32, bytes(128))])
    b_info = struct.pack("<QIQ", 32, F32, 128)  # b's dimension, type and offset
    files["overlap"] = two[:-128].replace(b_info, struct.pack("<QIQ", 32, F32, 0))
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.gguf"
        paths[name].write_bytes(data)
    return paths


Result = tuple[int, str, str]


@pytest.fixture(scope="module")
def entry_runs(hostile_ggufs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, tuple[Path, dict[str, Result]]]:
    """The cases of the three tests below whose commands load torch, all in
    one child process through ``modelkit.cli:run`` (one torch import, not
    one per test): test name -> (its folder, its results by case name)."""
    groups = {"gguf": _gguf_cases, "pickles": _pickle_cases, "stale": _stale_cases}
    folders = {name: tmp_path_factory.mktemp(f"entry-{name}") for name in groups}
    cases = {f"{name}/{case}": args for name, make in groups.items()
             for case, args in make(folders[name], hostile_ggufs).items()}
    res = run_entry(cases, folders["gguf"], no_warnings=True)
    return {name: (folders[name], {case.split("/", 1)[1]: r for case, r in res.items()
                                   if case.split("/", 1)[0] == name}) for name in groups}


def _gguf_cases(tmp_path: Path, g: dict[str, Path]) -> dict[str, list[str]]:
    out, good = tmp_path / "out.safetensors", tmp_path / "good.safetensors"
    return {
        "inspect": ["inspect", str(g["array_type"])],
        "convert": ["convert", str(g["array_type"]), "-o", str(out)],
        "merge": ["merge", str(g["array_type"]), str(g["good"]), "-o", str(out)],
        "verify": ["verify", str(g["array_type"]), "--quiet"],
        "zero_dim": ["convert", str(g["zero_dim"]), "-o", str(out)],
        "five_dims": ["convert", str(g["five_dims"]), "-o", str(out)],
        "kv_count": ["convert", str(g["huge_kv_count"]), "-o", str(out)],
        "tensor_count": ["convert", str(g["huge_tensor_count"]), "-o", str(out)],
        "past_end": ["convert", str(g["past_end"]), "-o", str(out)],
        "misaligned": ["convert", str(g["misaligned"]), "-o", str(out)],
        "overlap": ["inspect", str(g["overlap"])],
        "good": ["convert", str(g["good"]), "-o", str(good), "-q"],
    }


def test_hostile_gguf_is_refused_in_one_line_by_every_command(
        hostile_ggufs: dict[str, Path],
        entry_runs: dict[str, tuple[Path, dict[str, Result]]]) -> None:
    """inspect, convert, merge and verify refuse each hostile GGUF in one
    line naming the file (exit 2) before any big allocation; the good one
    converts."""
    g = hostile_ggufs
    tmp_path, res = entry_runs["gguf"]
    out, good = tmp_path / "out.safetensors", tmp_path / "good.safetensors"
    for name in ("inspect", "convert", "merge", "verify"):
        _one_line(res[name], g["array_type"], "more than the rest of the file can hold")
    _one_line(res["zero_dim"], g["zero_dim"], "dimension of 0")
    _one_line(res["five_dims"], g["five_dims"], "5 dimensions; GGUF allows 1 to 4")
    _one_line(res["kv_count"], g["huge_kv_count"], "key/value count")
    _one_line(res["tensor_count"], g["huge_tensor_count"], "tensor count")
    _one_line(res["past_end"], g["past_end"], "truncated")
    _one_line(res["misaligned"], g["misaligned"], "not a power of two")
    _one_line(res["overlap"], g["overlap"], "tensors need 256 bytes of data, the file has 128")
    assert not out.exists()
    # the good file converts, read by modelkit's own reader (no gguf-py)
    from safetensors.torch import load_file

    assert res["good"][0] == 0, res["good"][2]
    t = load_file(good)
    assert t["a.weight"].shape == (4, 32) and t["b.bias"].tolist() == list(range(8))
    assert t["a.weight"].flatten().tolist() == list(range(128))


# --- item 18: malformed pickles --------------------------------------------------------

CKPT = b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n"
BAD_PICKLES = {
    # the allow-listed class through REDUCE with 3 arguments (TypeError)
    "reduce3": b"\x80\x02" + CKPT + b"(K\x01K\x02K\x03tR.",
    "newobj": b"\x80\x02" + CKPT + b"K\x01\x81.",  # NEWOBJ with an int (TypeError)
    "appends": b"\x80\x02]K\x01e.",  # APPENDS without MARK (IndexError)
    "setitems": b"\x80\x02}K\x01u.",  # SETITEMS without MARK
    "reduce_empty": b"\x80\x02R.",  # REDUCE on an empty stack
    "tuple3": b"\x80\x02\x87.",  # TUPLE3 on an empty stack
    "memo": b"\x80\x02h\x05.",  # BINGET of a memo entry never stored (KeyError)
}


def _pickle_cases(tmp_path: Path, _g: dict[str, Path]) -> dict[str, list[str]]:
    cases = {}
    for name, data in BAD_PICKLES.items():
        (tmp_path / f"{name}.ckpt").write_bytes(data)
        cases[name] = ["inspect", str(tmp_path / f"{name}.ckpt")]
    # protocol 4 with a frame: torch printed two UserWarning lines first
    (tmp_path / "p4.ckpt").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]K\x01e.")
    cases["p4"] = ["inspect", str(tmp_path / "p4.ckpt")]
    (tmp_path / "png.ckpt").write_bytes(PNG)  # an image named .ckpt
    cases["png"] = ["inspect", str(tmp_path / "png.ckpt")]
    (tmp_path / "huge.ckpt").write_bytes(_legacy_pickle(numel=4_000_000_000))
    cases["huge"] = ["inspect", str(tmp_path / "huge.ckpt")]  # torch reserved 16 GB first
    (tmp_path / "wide.ckpt").write_bytes(_legacy_pickle(numel=3, shape=30_000_000_000))
    cases["wide"] = ["inspect", str(tmp_path / "wide.ckpt")]  # torch grew the storage to fit
    (tmp_path / "legacy.ckpt").write_bytes(_legacy_pickle(numel=3))
    cases["legacy"] = ["inspect", "--json", str(tmp_path / "legacy.ckpt")]
    # a zip64 locator saying the archive spans 2 disks: zipfile.is_zipfile raised
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, 0, 2)
    eocd = b"PK\x05\x06" + bytes(18)
    (tmp_path / "disks.ckpt").write_bytes(b"\x80\x02}q\x00." + locator + eocd)
    cases["disks"] = ["inspect", str(tmp_path / "disks.ckpt")]
    return cases


def test_malformed_pickles_are_one_line_errors(
        entry_runs: dict[str, tuple[Path, dict[str, Result]]]) -> None:
    tmp_path, res = entry_runs["pickles"]
    for name in BAD_PICKLES:
        _one_line(res[name], tmp_path / f"{name}.ckpt", "not a valid checkpoint pickle")
    _one_line(res["p4"], tmp_path / "p4.ckpt", "not a readable checkpoint")
    _one_line(res["png"], tmp_path / "png.ckpt", "is a PNG image, not a model file")
    _one_line(res["huge"], tmp_path / "huge.ckpt",
              "claim 4,000,000,000 elements of tensor data but the file holds")
    _one_line(res["disks"], tmp_path / "disks.ckpt", "damaged ZIP archive")
    _one_line(res["wide"], tmp_path / "wide.ckpt",
              "a tensor in it reaches 30,000,000,000 elements into its storage")
    code, out, err = res["legacy"]
    assert code == 0 and err == "", err
    report = json.loads(out)
    assert report["file_format"] == "pickle" and report["n_tensors"] == 1, report


def _legacy_pickle(numel: int, shape: int = 3) -> bytes:
    """A legacy (pre-zip) torch checkpoint, ``{"w": float tensor of 3}``,
    whose storage record claims ``numel`` elements and whose tensor has
    ``shape`` elements (torch's own layout:
    magic number, protocol, system info, the pickle with persistent ids, the
    storage keys, then each storage's size and data)."""
    import io
    import pickle

    import torch

    storage = object()  # stands for the one storage in the pickle

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", numel, None)
            return None

    rebuild = torch._utils._rebuild_tensor_v2
    out = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001,
                 {"protocol_version": 1001, "little_endian": True,
                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(head, out, protocol=2)

    class Tensor:
        def __reduce__(self) -> tuple[object, ...]:
            from collections import OrderedDict
            return (rebuild, (storage, 0, (shape,), (1,), False, OrderedDict()))

    Pickler(out, protocol=2).dump({"w": Tensor()})
    pickle.dump(["0"], out, protocol=2)
    out.write(struct.pack("<q", 3) + struct.pack("<3f", 1.0, 2.0, 3.0))
    return out.getvalue()


# --- item 15: one bad file or folder never ends a library scan ----------------------------

def _deep_folder(root: Path, depth: int) -> Path:
    """``root/d/d/.../d`` ``depth`` levels deep (os.makedirs recurses)."""
    root.mkdir()
    path = root
    for _ in range(depth):
        path = path / "d"
        path.mkdir()
    return path


def _remove_deep(root: Path) -> None:
    """Remove a tree from :func:`_deep_folder` without recursion (pytest's
    own clean-up recurses and fails on it)."""
    folders = [root]
    while (folders[-1] / "d").is_dir():
        folders.append(folders[-1] / "d")
    for folder in reversed(folders):
        for f in folder.iterdir():
            if not f.is_dir():
                f.unlink()
        folder.rmdir()


def test_scan_survives_hostile_files_and_folders(models: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """A header length of 2^64-1 (SQLite INTEGER overflow), a name that is not
    UTF-8 (lost its batch of 100), a ``.civitai.info`` nested 100,000 deep and
    a tree 1,500 folders deep each ended the scan; now each is one broken row
    or one warning naming it, and every other file is indexed."""
    import json as json_

    lib = tmp_path / "lib"
    (lib / "a").mkdir(parents=True)
    (lib / "a" / "huge.safetensors").write_bytes(struct.pack("<Q", 2**64 - 1) + b"xx")
    bad = os.fsdecode(bytes(lib / "a") + b"/bad\xff.safetensors")
    Path(bad).write_bytes(b"\0" * 10)
    os.link(models["vae"], lib / "a" / "vae.safetensors")
    (lib / "a" / "vae.civitai.info").write_text("[" * 100_000 + "]" * 100_000)
    os.link(models["vae"], _deep_folder(lib / "deep", 1500) / "deep.safetensors")
    os.link(models["vae"], lib / "z.safetensors")
    db = tmp_path / "lib.sqlite"
    try:
        res = _run_all({"scan": ["library", "scan", str(lib), "--db", str(db), "-q",
                                 "--json"]}, tmp_path)["scan"]
    finally:
        _remove_deep(lib / "deep")
    rc, out, err = res
    assert rc == 0, err
    report = json_.loads(out)
    assert report["found"] == 4 and report["broken"] == 1 and report["kinds"]["vae"] == 3
    assert err.count("\n") == 1 and "modelkit: warning: " in err and "bad\\xff" in err
    assert "not valid UTF-8" in err
    assert report["warnings"] == [err.split("modelkit: warning: ", 1)[1].rstrip("\n")]
    import sqlite3

    conn = sqlite3.connect(db)
    rows = dict(conn.execute("SELECT name, civitai FROM files"))
    assert sorted(rows) == ["deep.safetensors", "huge.safetensors", "vae.safetensors",
                            "z.safetensors"]
    assert json_.loads(rows["vae.safetensors"]) == {"error": "JSON nested too deeply"}
    conn.close()


def test_scan_refuses_a_foreign_database_without_touching_it(tmp_path: Path) -> None:
    """Another program's database with a ``files`` table was dropped and
    rebuilt; now a one-line error, exit 2, and the file is byte-identical."""
    import sqlite3

    db = tmp_path / "other.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE files (id INTEGER, note TEXT)")
    conn.execute("INSERT INTO files VALUES (1, 'precious')")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    (tmp_path / "m").mkdir()
    res = _run_all({"scan": ["library", "scan", str(tmp_path / "m"), "--db", str(db)],
                    "list": ["library", "list", "--db", str(db)]}, tmp_path)
    for name in ("scan", "list"):
        line = _one_line(res[name], db, "not a modelkit library index",
                         "it holds other tables: files")
        assert "delete" not in line
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "other.sqlite"]


def _sqlite_error(message: str, name: str) -> Exception:
    import sqlite3

    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorname = name  # type: ignore[attr-defined]
    return exc


def test_index_errors_say_read_only_or_full(tmp_path: Path) -> None:
    """A read-only or full disk said "not a modelkit library index ... delete
    the file to rebuild it" about a good index."""
    from modelkit.library.db import index_error

    db = tmp_path / "lib.sqlite"
    cases = {
        ("attempt to write a readonly database", "SQLITE_READONLY"): "is read-only",
        ("unable to open database file", "SQLITE_CANTOPEN"): "is read-only",
        ("database or disk is full", "SQLITE_FULL"): "the disk is full",
        ("disk I/O error", "SQLITE_IOERR_WRITE"): "a full disk or a failing device",
        ("file is not a database", "SQLITE_NOTADB"): "not a modelkit library index",
    }
    for (message, name), part in cases.items():
        error = index_error(db, _sqlite_error(message, name))
        assert error is not None and part in str(error) and str(db) in str(error)
        assert "\n" not in str(error)
        assert ("delete the file" in str(error)) == (name == "SQLITE_NOTADB")
    assert index_error(db, _sqlite_error("no such column: x", "SQLITE_ERROR")) is None


# --- item 10: GGUF files in the library, and where they belong ---------------------------

Q8_0 = 8
Q8_TENSORS = [("input_blocks.1.0.emb_layers.1.weight", (32, 2), Q8_0, bytes(68)),
              ("out.0.bias", (4,), F32, struct.pack("<4f", 1, 2, 3, 4))]


def test_library_indexes_gguf_files(hostile_ggufs: dict[str, Path], tmp_path: Path) -> None:
    """``library scan`` skipped ``.gguf`` files; now a GGUF is indexed (kind
    unet, arch from general.architecture, its quant type as dtype), a hostile
    one is a broken row naming the problem, and ``library check`` says a
    GGUF in checkpoints/ belongs in models/diffusion_models, as inspect does."""
    import json as json_

    from modelkit.io.suffixes import COMFYUI_DIFFUSION_MODELS

    models = tmp_path / "ComfyUI" / "models"
    (models / "loras").mkdir(parents=True)
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "flux-q8.gguf").write_bytes(gguf_bytes(
        Q8_TENSORS, kv=[("general.architecture", 8, _s("flux"))]))
    (models / "checkpoints" / "hostile.gguf").write_bytes(
        hostile_ggufs["array_type"].read_bytes())
    db = str(tmp_path / "lib.sqlite")
    gguf = str(models / "checkpoints" / "flux-q8.gguf")
    res = _run_all({"scan": ["library", "scan", str(models), "--db", db, "-q", "--json"]},
                   tmp_path)["scan"]
    assert res[0] == 0, res[2]
    assert json_.loads(res[1])["kinds"] == {"broken": 1, "unet": 1}
    res = _run_all({"list": ["library", "list", "--db", db, "--json"],
                    "check": ["library", "check", "--db", db, "--json"],
                    "inspect": ["inspect", gguf, "--json"]}, tmp_path)
    rows = {Path(e["path"]).name: e for e in json_.loads(res["list"][1])}
    assert (rows["flux-q8.gguf"]["kind"], rows["flux-q8.gguf"]["arch"],
            rows["flux-q8.gguf"]["dtype"]) == ("unet", "flux", "Q8_0")
    assert rows["hostile.gguf"]["kind"] == "broken"
    assert "more than the rest of the file can hold" in rows["hostile.gguf"]["error"]
    hints = [h for h in json_.loads(res["check"][1])["hints"] if h["path"] == gguf]
    assert [h["code"] for h in hints] == ["unet-only"]
    assert hints[0]["expected"] == str(tmp_path / "ComfyUI" / COMFYUI_DIFFUSION_MODELS)
    notes = json_.loads(res["inspect"][1])["notes"]
    assert any(COMFYUI_DIFFUSION_MODELS in n for n in notes)


def test_readme_names_the_declared_gguf_folder() -> None:
    """The README said models/unet where inspect said models/diffusion_models."""
    from modelkit.io.suffixes import COMFYUI_DIFFUSION_MODELS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if "modelkit export-gguf IN" in line)
    assert f"`{COMFYUI_DIFFUSION_MODELS}`" in row
    assert "`.gguf`" in next(line for line in readme.splitlines()
                             if "modelkit library scan DIR" in line)


# --- the magic bytes say what a file is ---------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(64)


def test_inspect_names_images_and_archives(tmp_path: Path) -> None:
    """A PNG given to inspect said "header size ... over the 100 MB limit"."""
    files = {
        "png": (PNG, "is a PNG image, not a model file"),
        "jpg": (b"\xff\xd8\xff\xe0\0\x10JFIF\0", "is a JPEG image, not a model file"),
        "gif": (b"GIF89a\x08\0\x08\0\xf7\0", "is a GIF image, not a model file"),
        "webp": (b"RIFF\x24\0\0\0WEBPVP8 ", "is a WebP image, not a model file"),
        "zip": (b"PK\x03\x04\x14\0\0\0\0\0", "is a ZIP archive, not a safetensors file"),
    }
    cases = {}
    for name, (data, _) in files.items():
        (tmp_path / f"x.{name}").write_bytes(data + bytes(64))
        cases[name] = ["inspect", str(tmp_path / f"x.{name}")]
    # the GGUF reader says it too (and the pickle reader: see the pickle test)
    (tmp_path / "png.gguf").write_bytes(PNG)
    cases["gguf"] = ["inspect", str(tmp_path / "png.gguf")]
    res = _run_all(cases, tmp_path)
    for name, (_, message) in files.items():
        _one_line(res[name], tmp_path / f"x.{name}", message)
    _one_line(res["gguf"], tmp_path / "png.gguf", "is a PNG image, not a GGUF file")


# --- item 21: hash, stale temp files, signals in library scan -----------------------------

def test_hash_reports_each_bad_path_and_hashes_the_good_ones(tmp_path: Path) -> None:
    """``hash /proc/self/mem`` was an EIO traceback; ``hash missing good``
    stopped at the first file."""
    import hashlib

    good = tmp_path / "good.bin"
    good.write_bytes(b"modelkit" * 100)
    missing = tmp_path / "missing.safetensors"
    res = _run_all({"mem": ["hash", "-q", "/proc/self/mem"],
                    "mixed": ["hash", "-q", "--json", str(missing), str(good),
                              "/proc/self/mem"]}, tmp_path)
    _one_line(res["mem"], Path("/proc/self/mem"), "cannot read it (Input/output error)")
    rc, out, err = res["mixed"]
    assert rc == 2
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0] == f"modelkit: error: {missing}: no such file"
    assert lines[1].startswith("modelkit: error: /proc/self/mem: cannot read it")
    import json as json_

    [result] = json_.loads(out)
    assert result["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()


def _stale_cases(tmp_path: Path, g: dict[str, Path]) -> dict[str, list[str]]:
    """Partial files of a dead writer, of this live process, of another host,
    without a writer pid and of another target, beside a convert's output
    (``keep.json`` lists the ones that must stay)."""
    import hashlib
    import socket

    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out.safetensors"
    stale = tmp_path / f".out.safetensors.{host}-{dead.pid}.k2j_x9.partial"
    live = tmp_path / f".out.safetensors.{host}-{os.getpid()}.a1b2c3.partial"
    other_host = tmp_path / f".out.safetensors.000000-{dead.pid}.a1b2c3.partial"
    legacy = tmp_path / ".out.safetensors.q8w7e6.partial"
    other_target = tmp_path / f".other.safetensors.{host}-{dead.pid}.zz.partial"
    stale_dir = tmp_path / f".out.safetensors.{host}-{dead.pid}.dd.partial"
    for p in (stale, live, other_host, legacy, other_target):
        p.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "x").write_bytes(b"x")
    keep = sorted(p.name for p in (live, other_host, legacy, other_target))
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    return {"c": ["convert", str(g["good"]), "-o", str(out), "-q"]}


def test_stale_partials_of_dead_runs_are_removed(
        entry_runs: dict[str, tuple[Path, dict[str, Result]]]) -> None:
    """A SIGKILLed run's hidden temp file stayed forever; now a run writing
    the same target removes those of dead writers on this host, and leaves
    a live run's (and a name without a writer pid) alone."""
    tmp_path, res = entry_runs["stale"]
    assert res["c"][0] == 0, res["c"][2]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    assert left == json.loads((tmp_path / "keep.json").read_text())
    assert (tmp_path / "out.safetensors").is_file()


def _tiny_library(root: Path, n: int) -> list:
    from modelkit.library.scan import Found

    root.mkdir()
    found = []
    for i in range(n):
        p = root / f"f{i:03}.safetensors"
        p.write_bytes(struct.pack("<Q", 2) + b"{}")
        st = p.stat()
        found.append(Found(str(p), str(root), st.st_size, st.st_mtime_ns))
    return found


def test_scan_stops_on_a_signal_its_handler_could_not_raise(tmp_path: Path) -> None:
    """A SIGTERM that landed in an import only set the flag, and the scan went
    on to the end: the flag now stops it before the next file."""
    from modelkit.errors import INTERRUPTED, Interrupted
    from modelkit.library.scan import scan

    _tiny_library(tmp_path / "lib", 3)
    INTERRUPTED.set()
    try:
        with pytest.raises(Interrupted):
            scan([tmp_path / "lib"], tmp_path / "lib.sqlite", workers=1)
    finally:
        INTERRUPTED.clear()


def test_scan_pool_workers_are_terminated_on_interrupt(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """On a signal the pool's workers were waited for (their whole chunk);
    now they are terminated at once."""
    import time

    from modelkit.errors import Interrupted
    from modelkit.library import scan as scan_mod

    todo = _tiny_library(tmp_path / "lib", 40)
    monkeypatch.setattr(scan_mod, "PARALLEL_MIN", 8)
    monkeypatch.setattr(scan_mod, "CHUNK", 1)
    pools = []
    start_pool = scan_mod._start_pool

    def keep(workers: int) -> object:
        pools.append(start_pool(workers))
        return pools[-1]

    monkeypatch.setattr(scan_mod, "_start_pool", keep)
    rows = scan_mod._read_rows(todo, 2, None)
    first, row = next(rows)
    assert first is todo[0] and row["kind"] == "unknown"  # an empty header
    procs = list(pools[0]._processes.values())
    assert len(procs) == 2
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        rows.throw(Interrupted())
    assert time.monotonic() - t0 < 5
    # the pool's own thread may reap a worker while this one asks: wait for
    # the shared state to settle (a few ms)
    deadline = time.monotonic() + 5
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(p.is_alive() for p in procs)
    # terminated, not shut down after their chunks (that exits with 0)
    assert {p.exitcode for p in procs} <= {-signal.SIGTERM, -signal.SIGKILL}


def test_scan_warns_about_a_folder_it_cannot_list(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable folder (permissions, a path over PATH_MAX) was skipped
    silently; now it is one warning naming it, and the rest is found."""
    import errno

    from modelkit.library import scan as scan_mod

    _tiny_library(tmp_path / "a", 2)
    _tiny_library(tmp_path / "b", 1)
    scandir = os.scandir

    def refuse(path: str) -> object:
        if Path(path) == tmp_path / "a":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(scan_mod.os, "scandir", refuse)
    warnings: list[str] = []
    found = scan_mod.find_files([str(tmp_path)], warnings)
    assert sorted(Path(p).name for p in found) == ["f000.safetensors"]
    assert warnings == [f"{tmp_path / 'a'}: skipped: cannot list the folder "
                        "(Permission denied)"]

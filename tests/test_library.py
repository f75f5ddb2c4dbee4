"""The library index: scan, re-scan, list, dupes, lineage, check, and
safety under concurrent scans; ``modelkit library`` commands."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from library_fixture import EVIL, EXPECTED, TAGS, link

from modelkit.cli import main
from modelkit.errors import Cancelled, ModelkitError
from modelkit.library import db as dbm
from modelkit.library.check import check
from modelkit.library.dupes import dupes
from modelkit.library.layout import SWEEP_FILES, Placer
from modelkit.library.lineage import lineage
from modelkit.library.metadata import top_tags, training_info
from modelkit.library.query import Filters, find_entry, get_detail, list_entries
from modelkit.library.scan import scan
from modelkit.textsafe import safe_text


@pytest.fixture(autouse=True)
def _cache(model_library: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(model_library["cache"]))


def _rel(lib: dict[str, Path], path: str) -> str:
    return str(Path(path).relative_to(lib["root"]))


def _entries(lib: dict[str, Path], filters: Filters | None = None) -> dict[str, object]:
    with dbm.opened(lib["db"]) as conn:
        return {_rel(lib, e.path): e for e in list_entries(conn, filters)}


def _small_library(tmp_path: Path, lib: dict[str, Path]) -> Path:
    """A private copy (hard links) of a few files, free to change."""
    root = tmp_path / "lib"
    for rel in ("webui/models/Stable-diffusion/sd15.safetensors",
                "webui/models/Stable-diffusion/sd15-b.safetensors",
                "webui/models/Lora/style.safetensors",
                "webui/models/VAE/vae.safetensors"):
        link(lib["root"] / rel, root / rel)
    return root


def test_scan_indexes_every_file_with_kind_arch_and_placement(
        model_library: dict[str, Path]) -> None:
    entries = _entries(model_library)
    got = {rel: (e.kind, e.arch, e.layout, e.role) for rel, e in entries.items()}
    assert got == EXPECTED
    e = entries["webui/models/Stable-diffusion/sd15.safetensors"]
    assert e.prediction == "eps" and e.dtype == "F16" and e.n_tensors and not e.has_ema
    assert e.size == os.path.getsize(model_library["root"] / "webui/models/Stable-diffusion"
                                     / "sd15.safetensors")
    assert e.data_bytes is not None and e.data_bytes < e.size
    assert entries["webui/models/Stable-diffusion/a1111-merge.safetensors"].has_ema
    assert entries["webui/models/Stable-diffusion/merged.safetensors"].variant == "inpaint"
    broken = entries["webui/models/Stable-diffusion/broken.safetensors"]
    assert "truncated" in (broken.error or "") and broken.sha256 is None
    # --hash: sha256 as the whole-file digest, addnet for safetensors
    from modelkit.io.hashing import hash_file
    want = hash_file(model_library["root"] / "webui/models/VAE/vae.safetensors")
    vae = entries["webui/models/VAE/vae.safetensors"]
    assert (vae.sha256, vae.addnet, vae.legacy) == (want.sha256, want.addnet, want.legacy)


def test_scan_reads_sidecars(model_library: dict[str, Path]) -> None:
    with dbm.opened(model_library["db"]) as conn:
        style = find_entry(conn, "style")
        detail = get_detail(conn, style.path)
    assert detail is not None
    assert [Path(p).name for p in style.previews] == ["style.preview.png"]
    assert detail.civitai == {"model": "My Style", "type": "LORA", "version": "v1.0",
                              "base_model": "SD 1.5", "model_id": None, "version_id": None,
                              "trained_words": ["mystyle"]}
    assert detail.metadata["ss_output_name"] == EVIL
    assert top_tags(detail.metadata) == [("1girl", 30), ("solo", 12), ("outdoors", 5)]
    assert ("epochs", "10") in training_info(detail.metadata)
    assert sum(TAGS["my style"].values()) == 47


def test_rescan_reads_only_changed_files(tmp_path: Path, model_library: dict[str, Path]
                                         ) -> None:
    root, db = _small_library(tmp_path, model_library), tmp_path / "i.sqlite"
    first = scan([root], db)
    assert (first.found, first.new, first.unchanged, first.removed) == (4, 4, 0, 0)
    again = scan([root], db)
    assert (again.new, again.changed, again.unchanged, again.inspected) == (0, 0, 4, 0)
    sd15 = root / "webui/models/Stable-diffusion/sd15.safetensors"
    st = sd15.stat()
    os.utime(sd15, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (root / "webui/models/VAE/vae.safetensors").unlink()
    link(root / "webui/models/Lora/style.safetensors",
         root / "webui/models/Lora/style2.safetensors")
    (root / "webui/models/Stable-diffusion/sd15-b.png").write_bytes(b"not really")
    third = scan([root], db)
    assert (third.new, third.changed, third.unchanged, third.removed) == (1, 1, 2, 1)
    assert third.sidecars_updated == 1
    with dbm.opened(db) as conn:
        names = sorted(e.name for e in list_entries(conn))
        b = find_entry(conn, "sd15-b")
    assert names == ["sd15-b.safetensors", "sd15.safetensors", "style.safetensors",
                     "style2.safetensors"]
    assert [Path(p).name for p in b.previews] == ["sd15-b.png"]


def test_worker_processes_index_the_same_rows(tmp_path: Path, model_library: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import modelkit.library.scan as scan_module

    root = _small_library(tmp_path, model_library)
    scan([root], tmp_path / "one.sqlite", workers=1)
    monkeypatch.setattr(scan_module, "PARALLEL_MIN", 1)
    monkeypatch.setattr(scan_module, "CHUNK", 2)
    assert scan([root], tmp_path / "two.sqlite", workers=2).new == 4

    def rows(db: Path) -> list[tuple[object, ...]]:
        with dbm.opened(db) as conn:
            return [tuple(r)[:-1] for r in conn.execute(
                f"SELECT {', '.join(c for c in dbm.COLUMNS if c != 'scanned_at')}, 0 "
                "FROM files ORDER BY path")]

    assert rows(tmp_path / "one.sqlite") == rows(tmp_path / "two.sqlite")

    # where processes cannot start (as under Textual, whose sys.stderr has no
    # file), the scan reads in-process instead of failing
    import concurrent.futures

    class NoProcesses(concurrent.futures.ProcessPoolExecutor):
        def submit(self, *args: object, **kwargs: object) -> concurrent.futures.Future:
            raise ValueError("bad value(s) in fds_to_keep")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", NoProcesses)
    assert scan([root], tmp_path / "three.sqlite", workers=2).new == 4
    assert rows(tmp_path / "three.sqlite") == rows(tmp_path / "one.sqlite")


def test_scan_cancel_keeps_what_was_indexed(tmp_path: Path, model_library: dict[str, Path]
                                            ) -> None:
    root, db = _small_library(tmp_path, model_library), tmp_path / "i.sqlite"
    cancel = threading.Event()

    def progress(p: object) -> None:
        cancel.set()  # stop after the first file

    with pytest.raises(Cancelled, match="kept"):
        scan([root], db, progress=progress, cancel=cancel)
    with dbm.opened(db) as conn:
        assert len(list_entries(conn)) == 1
    assert scan([root], db).new == 3


def test_list_filters(model_library: dict[str, Path]) -> None:
    loras = _entries(model_library, Filters(kinds=["lora"]))
    assert set(loras) == {k for k, v in EXPECTED.items() if v[0] == "lora"}
    xl = _entries(model_library, Filters(kinds=["lora"], archs=["sdxl"]))
    assert set(xl) == {"webui/models/Lora/SD1.5/xl-detail.safetensors",
                       "comfy/models/loras/sdxl-detail.safetensors"}
    assert set(_entries(model_library, Filters(name="SD15-"))) == {
        f"webui/models/Stable-diffusion/sd15-{n}.safetensors" for n in ("b", "copy", "renamed")}
    comfy = _entries(model_library, Filters(under=[str(model_library["root"] / "comfy")]))
    assert set(comfy) == {k for k in EXPECTED if k.startswith("comfy/")}
    assert _entries(model_library, Filters(prediction="v")) == {}


def test_dupes_by_tensor_data(tmp_path: Path, model_library: dict[str, Path]) -> None:
    with dbm.opened(model_library["db"]) as conn:
        report = dupes(conn)
    groups = {tuple(sorted(_rel(model_library, e.path) for e in g.entries)): g
              for g in report.groups}
    sd = "webui/models/Stable-diffusion/"
    same = groups[(f"{sd}sd15-copy.safetensors", f"{sd}sd15-renamed.safetensors",
                   f"{sd}sd15.safetensors")]
    assert not same.same_file and not same.linked and same.renamed
    size = os.path.getsize(model_library["root"] / sd / "sd15.safetensors")
    # the copy and the renamed file (a few bytes more header) could go; sd15 is linked
    # to the session's model, which does not count
    assert same.wasted_bytes == sum(
        e.size for e in same.entries) - max(e.size for e in same.entries)
    assert same.wasted_bytes > size
    linked = groups[("webui/models/Lora/misfiled-vae.safetensors",
                     "webui/models/VAE/vae.safetensors")]
    assert linked.linked and linked.wasted_bytes == 0
    assert len(report.groups) == 4 and report.n_unhashed == 0
    # without hashes, only the files that could be copies get hashed
    root, db = _small_library(tmp_path, model_library), tmp_path / "i.sqlite"
    shutil.copyfile(root / "webui/models/VAE/vae.safetensors",
                    root / "webui/models/VAE/vae-copy.safetensors")
    scan([root], db)
    with dbm.opened(db) as conn:
        fresh = dupes(conn)
        hashed = [e.name for e in list_entries(conn) if e.addnet]
    # sd15 and sd15-b have the same tensor-data length too; the LoRA is not read
    assert fresh.n_hashed_now == 4 and sorted(hashed) == [
        "sd15-b.safetensors", "sd15.safetensors", "vae-copy.safetensors", "vae.safetensors"]
    assert [sorted(e.name for e in g.entries) for g in fresh.groups] == [
        ["vae-copy.safetensors", "vae.safetensors"]]


def _tree(node: object, depth: int = 0) -> list[tuple[int, str, str | None, str | None]]:
    rows = [(depth, node.label, node.how, node.match)]  # type: ignore[attr-defined]
    for c in node.children:  # type: ignore[attr-defined]
        rows += _tree(c, depth + 1)
    return rows


def test_lineage_from_recipe_history_a1111_and_training(model_library: dict[str, Path]
                                                        ) -> None:
    with dbm.opened(model_library["db"]) as conn:
        def tree(name: str) -> list[tuple[int, str, str | None, str | None]]:
            return _tree(lineage(conn, find_entry(conn, name)))

        merged = tree("merged")
        pruned = tree("merged-pruned")
        a1111 = tree("a1111-merge")
        style = tree("style")
        plain = tree("sd15-b")
    assert merged == [(0, "merged.safetensors", 'weighted_sum {"alpha":0.3}', "self"),
                      (1, "sd15.safetensors", None, "sha256"),
                      (1, "sd15-b.safetensors", None, "sha256")]
    assert pruned == [(0, "merged-pruned.safetensors", 'prune {"keep_ema":false}', "self"),
                      (1, "merged.safetensors", 'weighted_sum {"alpha":0.3}', "sha256"),
                      (2, "sd15.safetensors", None, "sha256"),
                      (2, "sd15-b.safetensors", None, "sha256")]
    assert a1111 == [(0, "a1111-merge.safetensors", "Weighted sum multiplier=0.5", "self"),
                     (1, "sd15.safetensors", None, "sha256"),
                     (1, "old-merge", "Add difference multiplier=1.0", None),
                     (2, "grand-a", None, None), (2, "grand-b", None, None)]
    assert style == [(0, "style.safetensors", "trained on", "self"),
                     (1, "sd15.safetensors", None, "name")]
    assert plain == [(0, "sd15-b.safetensors", None, "self")]


def test_check_hints_with_expected_folders(model_library: dict[str, Path]) -> None:
    with dbm.opened(model_library["db"]) as conn:
        report = check(conn)
    root = model_library["root"]
    got = {(_rel(model_library, h.path), h.code): h for h in report.hints}
    assert sorted(got) == sorted([
        ("webui/models/Stable-diffusion/broken.safetensors", "broken"),
        ("webui/models/Stable-diffusion/sdxl-unet.safetensors", "unet-only"),
        ("comfy/models/checkpoints/sdxl-unet-here.safetensors", "unet-only"),
        ("webui/models/Lora/misfiled-vae.safetensors", "wrong-folder"),
        ("webui/models/Lora/SD1.5/xl-detail.safetensors", "arch-folder"),
        ("webui/models/Lora/SD1.5/xl-detail.safetensors", "no-base"),
    ])
    assert got[("comfy/models/checkpoints/sdxl-unet-here.safetensors", "unet-only")
               ].expected == str(root / "comfy/models/diffusion_models")
    assert got[("webui/models/Stable-diffusion/sdxl-unet.safetensors", "unet-only")
               ].expected is None
    assert got[("webui/models/Lora/misfiled-vae.safetensors", "wrong-folder")
               ].expected == str(root / "webui/models/VAE")
    no_base = got[("webui/models/Lora/SD1.5/xl-detail.safetensors", "no-base")]
    assert no_base.expected == str(root / "comfy/models/loras")
    assert "only SD1 checkpoints" in no_base.message
    assert "'SD1.5'" in got[("webui/models/Lora/SD1.5/xl-detail.safetensors",
                             "arch-folder")].message


def _scan_in_process(root: str, db: str) -> subprocess.Popen[str]:
    # one write transaction per file, so the two scans interleave their writes
    code = ("import modelkit.library.scan as s; s.BATCH = 1; "
            f"s.scan([{root!r}], {db!r})")
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def test_concurrent_scans_and_reads_never_corrupt_the_index(
        tmp_path: Path, model_library: dict[str, Path], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    import modelkit.library.scan as scan_module

    monkeypatch.setattr(scan_module, "BATCH", 1)
    root = str(model_library["root"] / "webui/models/Stable-diffusion")
    db = str(tmp_path / "i.sqlite")
    procs = [_scan_in_process(root, db) for _ in range(2)]
    errors: list[BaseException] = []
    seen: list[int] = []

    def reader() -> None:
        try:
            for _ in range(30):
                with dbm.opened(db) as conn:
                    seen.append(len(list_entries(conn)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lambda: scan([root], db)),
               threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not errors
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        n = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    webui = len([k for k in EXPECTED if k.startswith("webui/models/Stable-diffusion/")])
    assert n == webui and all(0 <= k <= webui for k in seen)


def test_index_errors_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(ModelkitError, match="not a modelkit library index"):
        dbm.connect(junk)
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {dbm.SCHEMA_VERSION + 1}")
    with pytest.raises(ModelkitError, match="newer modelkit"):
        dbm.connect(newer)
    with pytest.raises(ModelkitError, match="no such folder"):
        scan([tmp_path / "missing"], tmp_path / "i.sqlite")


def test_safe_text_escapes_terminal_controls() -> None:
    assert safe_text("plain name.safetensors") == "plain name.safetensors"
    assert safe_text(EVIL) == "evil\\x1b]0;pwned\\x07\\x1b[2J"
    assert safe_text("a\u202eb\nc\x9bd") == "a\\u202eb\\nc\\x9bd"
    assert safe_text("x\ny", keep_newlines=True) == "x\ny"


def test_sweep_folders_are_skipped_and_their_cells_dropped(
        tmp_path: Path, model_library: dict[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep's cells are no checkpoints of the user's: a folder holding
    the sweep marker or sweep.jsonl is never indexed, and cells indexed
    before (an old sweep inside Stable-diffusion/) leave the index."""
    from modelkit.sweep import results, run

    assert SWEEP_FILES == (run.MARKER, results.JSONL)
    root, db = _small_library(tmp_path, model_library), tmp_path / "i.sqlite"
    sd = root / "webui/models/Stable-diffusion"
    old = link(sd / "sd15.safetensors", sd / "sd15-sweep/cell00_alpha-0.3.safetensors")
    assert scan([root], db).found == 5  # before it was known as a sweep folder
    (old.parent / ".modelkit-sweep").write_text("a modelkit sweep folder\n")
    new = root / "webui/sweeps/sd15-sweep"
    link(sd / "sd15.safetensors", new / "cell00_alpha-0.5.safetensors")
    (new / "sweep.jsonl").write_text("")
    assert main(["library", "scan", str(root), "--db", str(db), "-q"]) == 0
    assert capsys.readouterr().out.startswith(
        f"4 files under {root}: 0 new, 0 changed, 4 unchanged, 1 removed, 0 broken, "
        "2 sweep folders skipped (")
    with dbm.opened(db) as conn:
        assert sorted(e.name for e in list_entries(conn)) == [
            "sd15-b.safetensors", "sd15.safetensors", "style.safetensors",
            "vae.safetensors"]
    report = scan([new], db)  # a sweep folder named itself is skipped too
    assert (report.found, report.sweeps_skipped, report.to_dict()["sweeps_skipped"]) == (
        0, 1, 1)


def test_sweeps_go_beside_the_ui_model_folders() -> None:
    placer = Placer()
    for path, root, want in [
            ("/w/webui/models/Stable-diffusion/sub/a.safetensors", "/w", "/w/webui/sweeps"),
            ("/w/webui/embeddings/e.pt", "/w/webui", "/w/webui/sweeps"),
            ("/c/ComfyUI/models/checkpoints/a.safetensors", "/c", "/c/ComfyUI/sweeps"),
            ("/d/checkpoints/a.safetensors", "/d", "/d/sweeps"),
            ("/p/mine/sd1/a.safetensors", "/p/mine", "/p/mine/sweeps")]:
        assert placer.place(Path(path), Path(root)).sweeps_folder() == Path(want), path


def test_cli_library_commands(model_library: dict[str, Path],
                              capsys: pytest.CaptureFixture[str]) -> None:
    db = str(model_library["db"])
    assert main(["library", "list", "--db", db, "--kind", "lora", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {Path(e["path"]).name for e in listed} == {
        "style.safetensors", "xl-detail.safetensors", "sdxl-detail.safetensors"}
    assert main(["library", "list", "--db", db, "--kind", "lora"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["FILE", "KIND", "ARCH", "VARIANT", "LAYOUT",
                                           "PRED", "SIZE", "DTYPE", "AUTOV2"]
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    style = rows["webui/models/Lora/style.safetensors"]
    assert style[:5] == ["lora", "sd1", "-", "-", "-"] and style[7] == "f16"
    assert len(style[8]) == 10
    assert main(["library", "lineage", "merged-pruned", "--db", db]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        'merged-pruned.safetensors [prune {"keep_ema":false}]',
        '└─ merged.safetensors [weighted_sum {"alpha":0.3}] (in library)']
    assert main(["library", "check", "--db", db]) == 1
    out = capsys.readouterr().out
    assert "move to: " + str(model_library["root"] / "webui/models/VAE") in out
    assert out.rstrip().endswith(f"6 hints for {len(EXPECTED)} files")
    assert main(["library", "dupes", "--db", db]) == 0
    assert "4 duplicate groups" in capsys.readouterr().out
    assert main(["library", "lineage", "nothing-like-this", "--db", db]) == 2
    assert "nothing-like-this: no file" in capsys.readouterr().err


def test_cli_escapes_names_and_metadata(tmp_path: Path, model_library: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "lib"
    link(model_library["root"] / "webui/models/Lora/style.safetensors",
         root / f"models/Lora/{EVIL}.safetensors")
    db = str(tmp_path / "i.sqlite")
    assert main(["library", "scan", str(root), "--db", db, "-q"]) == 0
    assert main(["library", "list", "--db", db]) == 0
    assert main(["library", "lineage", "evil", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b]0;pwned\\x07" in out


def test_library_list_exit_codes_through_console_script(model_library: dict[str, Path]
                                                        ) -> None:
    exe = Path(sys.executable).with_name("modelkit")
    db = str(model_library["db"])
    found = subprocess.run([str(exe), "library", "list", "--db", db, "--kind", "vae"],
                           capture_output=True, text=True)
    assert found.returncode == 0 and "misfiled-vae.safetensors" in found.stdout
    none = subprocess.run([str(exe), "library", "list", "--db", db, "--kind", "controlnet"],
                          capture_output=True, text=True)
    assert none.returncode == 1 and none.stdout == ""
    assert "no indexed file matches" in none.stderr
    bad = subprocess.run([str(exe), "library", "list", "--db", db, "--kind", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1

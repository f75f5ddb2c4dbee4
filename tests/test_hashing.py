"""Hashes against independent computations with hashlib."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from modelkit import testing as t
from modelkit.io.hashing import hash_file
from modelkit.io.header import read_header


def test_hashes_match_definitions(models: dict[str, Path]) -> None:
    path = models["sdxl"]
    data = path.read_bytes()
    h = hash_file(path)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.autov2 == h.sha256[:10]
    assert h.legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    start = read_header(path).data_start
    assert h.addnet == hashlib.sha256(data[start:]).hexdigest()
    assert h.size_bytes == len(data)
    assert h.mismatches == []


def test_metadata_edit_keeps_tensor_hash(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    t.write_checkpoint(a, "sd1", seed=3)
    t.write_checkpoint(b, "sd1", seed=3, metadata={"ss_output_name": "renamed"})
    ha, hb = hash_file(a), hash_file(b)
    assert ha.sha256 != hb.sha256
    assert ha.addnet == hb.addnet


def test_embedded_hash_mismatch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    t.write_tensors(path, {"w": (4, 4)}, metadata={"sshs_model_hash": "0" * 64})
    h = hash_file(path)
    assert h.mismatches == [f"sshs_model_hash in metadata is {'0' * 64}, computed {h.addnet}"]
    good = tmp_path / "good.safetensors"
    t.write_tensors(good, {"w": (4, 4)})
    addnet = hash_file(good).addnet
    t.write_tensors(path, {"w": (4, 4)}, metadata={"sshs_model_hash": str(addnet),
                                                   "modelspec.hash_sha256": f"0x{addnet}"})
    assert hash_file(path).mismatches == []


def test_progress_reports_bytes(models: dict[str, Path]) -> None:
    seen = []
    hash_file(models["sd1"], seen.append)
    assert seen[-1].done == seen[-1].total == models["sd1"].stat().st_size
    assert seen[-1].unit == "bytes"


def test_concurrent_hashes_all_reach_the_cache(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """InputHashes hashes inputs on two threads: every file's entry is kept
    (the cache's read-modify-write is serialised; before, one was lost)."""
    from concurrent.futures import ThreadPoolExecutor

    from modelkit.io import hashcache

    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(tmp_path / "cache"))
    files = []
    for i in range(12):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(bytes([i]) * (1000 + i))
        files.append(f)
    with ThreadPoolExecutor(6) as pool:
        digests = list(pool.map(lambda f: hashcache.cached_hashes(f, tensor_hash=False).sha256,
                                files))
    assert digests == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert all(hashcache.lookup(f) is not None for f in files)

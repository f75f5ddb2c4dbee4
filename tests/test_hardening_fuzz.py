"""The project's own fuzzing, seeded and bounded for CI (issue 10).

Mutated headers of small real files (modelkit.fuzz) and arbitrary
JSON values dropped into a header: the reader either accepts a file the
safetensors library reads identically, or refuses it with one line naming
the file; ``inspect`` and ``prune`` through ``modelkit.cli.main`` never fail
with an internal error, a traceback, terminal escapes, a hang or a leftover
file. The long run is ``bench/fuzz_headers.py``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import safetensors

from modelkit.errors import BadFileError
from modelkit.fuzz import check_case, join_file, mutate, split_file, write_seeds
from modelkit.io.header import read_header

SEED_NAMES = ("sd1_ckpt", "sd2_ckpt", "sdxl_unet", "vae", "lora", "embedding")


def _ci(max_examples: int) -> Any:
    """Seeded, bounded settings. Hypothesis is imported in the tests, not at
    module level: collecting this file cost every xdist worker ~1 s."""
    from hypothesis import HealthCheck, settings

    return settings(derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow], max_examples=max_examples)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    paths = write_seeds(tmp_path_factory.mktemp("fuzz_seeds"))
    assert sorted(paths) == sorted(SEED_NAMES)
    return {name: p.read_bytes() for name, p in paths.items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_work")


def _reader_agrees(path: Path, data: bytes) -> None:
    """read_header accepts exactly, or refuses in one line naming the file;
    what it accepts, safetensors reads with the same names and metadata."""
    path.write_bytes(data)
    try:
        header = read_header(path)
    except BadFileError as exc:
        text = str(exc)
        assert text.startswith(str(path) + ": ") and "\n" not in text, text
        assert len(text) < 1000
        return
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(header.tensors)
        assert (f.metadata() or {}) == header.metadata
    safetensors.deserialize(data)


def test_reader_on_mutated_headers(seeds: dict[str, bytes], work: Path) -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    @_ci(150)
    @given(seed=st.sampled_from(SEED_NAMES), salt=st.integers(0, 2**32 - 1))
    def check(seed: str, salt: int) -> None:
        _, data = mutate(seeds[seed], random.Random(salt))
        _reader_agrees(work / "mutated.safetensors", data)

    check()


def _json_values() -> Any:
    from hypothesis import strategies as st

    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
        st.sampled_from(["F16", "F4", "\ud800", "\x1b]0;t\x07", "__metadata__"]),
    )
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=12)


PLACES = ("metadata_value", "metadata", "shape_item", "shape", "offset", "offsets",
          "dtype", "entry", "key")


def _place(header: dict[str, Any], place: str, value: Any) -> None:
    name = next(k for k in header if k != "__metadata__")
    entry = header[name]
    if place == "metadata_value":
        header.setdefault("__metadata__", {})["k"] = value
    elif place == "metadata":
        header["__metadata__"] = value
    elif place == "shape_item":
        entry["shape"] = [*entry["shape"], value]
    elif place in ("shape", "dtype"):
        entry[place] = value
    elif place == "offset":
        entry["data_offsets"][1] = value
    elif place == "offsets":
        entry["data_offsets"] = value
    elif place == "entry":
        header[name] = value
    else:
        header[str(value)] = header.pop(name)


def test_reader_on_arbitrary_json_values(seeds: dict[str, bytes], work: Path) -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    @_ci(100)
    @given(seed=st.sampled_from(("embedding", "vae", "lora")), place=st.sampled_from(PLACES),
           value=_json_values())
    def check(seed: str, place: str, value: Any) -> None:
        header, payload = split_file(seeds[seed])
        _place(header, place, value)
        _reader_agrees(work / "values.safetensors", join_file(header, payload))

    check()


def test_inspect_and_prune_on_mutated_files(seeds: dict[str, bytes], work: Path) -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    @_ci(60)
    @given(seed=st.sampled_from(SEED_NAMES), salt=st.integers(0, 2**32 - 1))
    def check(seed: str, salt: int) -> None:
        what, data = mutate(seeds[seed], random.Random(salt))
        defects = check_case(data, work)
        assert defects == [], (what, defects)

    check()

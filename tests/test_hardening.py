"""Hostile and damaged files (issue 10 items 3-6 and 10, read side): every one
gets a one-line exit-2 error naming the file, or a report; never an internal
error, a hang or text that acts on the terminal."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors

from modelkit.errors import BadFileError
from modelkit.fuzz import Raw, dump, join_file, run_cli
from modelkit.io.header import U64_MAX, parse_header_bytes, read_header, read_small_tensor
from modelkit.textsafe import shown

ENTRY = '"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}'


def _file(folder: Path, name: str, header: str | bytes, data: bytes = b"\0" * 4) -> Path:
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    path = folder / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _one_line_error(rc: int, err: str, path: Path, code: int = 2) -> str:
    assert rc == code, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("modelkit: error: "), err
    assert shown(path.name) in lines[0] and "Traceback" not in err
    return lines[0]


# --- item 5: the reader validates what the format requires ---------------------------

# header -> (part of modelkit's message, whether the safetensors library refuses it too)
REFUSED = {
    '{"__metadata__":{"k":1},' + ENTRY + "}": ("is a number, not a string", True),
    '{"__metadata__":{"k":NaN},' + ENTRY + "}": ("is NaN, not a string", True),
    '{"__metadata__":{"k":{"a":"b"}},' + ENTRY + "}": ("is an object, not a string", True),
    '{"__metadata__":[],' + ENTRY + "}": ("not a map of strings", True),
    '{"__metadata__":{"k":"a","k":"b"},' + ENTRY + "}": ("duplicate key 'k'", False),
    "{" + ENTRY + "," + ENTRY + "}": ("duplicate key 'w'", False),
    '{"w":{"dtype":"F16","shape":[-2],"data_offsets":[0,4]}}': ("-2, not a whole", True),
    '{"w":{"dtype":"F16","shape":[2.0],"data_offsets":[0,4]}}': ("2.0, not a whole", True),
    '{"w":{"dtype":"F16","shape":[true],"data_offsets":[0,4]}}': ("a boolean", True),
    '{"w":{"dtype":"F16","shape":[2],"data_offsets":["0",4]}}': ("a string, not", True),
    '{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4,4]}}': ("3 numbers, not 2", True),
    '{"w":{"dtype":"F16","shape":[1e400],"data_offsets":[0,4]}}': ("1e400", True),
    '{"w":{"dtype":"F16","shape":[Infinity],"data_offsets":[0,4]}}': ("Infinity", True),
    '{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,1' + "0" * 400 + ']}}': ("10000", True),
    '{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4],"x":1}}': ("unknown field", False),
    '{"w":{"dtype":"f16","shape":[2],"data_offsets":[0,4]}}': ("unknown dtype 'f16'", True),
    '{"w":{"dtype":"F16","data_offsets":[0,4]}}': ("has no shape", True),
    '{"\\ud800":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}': ("surrogate", True),
    '{"__metadata__":{"k":"\\udc00"},' + ENTRY + "}": ("surrogate", True),
    f'{{"w":{{"dtype":"F16","shape":[{U64_MAX},{U64_MAX},0],"data_offsets":[0,0]}}}}':
        ("overflows 64 bits", True),
    '{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}': ("do not fill whole bytes", True),
    '{"w":{"dtype":"F16","shape":' + "[" * 100_000 + "]" * 100_000 + ',"data_offsets":[0,4]}}':
        ("nested too deeply", True),
    " {" + ENTRY + "}": ("does not start with '{'", False),
    "\ufeff{" + ENTRY + "}": ("does not start with '{'", True),
}
ACCEPTED = {
    '{"__metadata__":null,' + ENTRY + "}": ["w"],
    "{" + ENTRY + "}\n  ": ["w"],
    '{"\\ud83d\\ude00":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},'
    '"\\u0000":{"dtype":"F16","shape":[0],"data_offsets":[4,4]},'
    '"s":{"dtype":"U16","shape":[],"data_offsets":[4,6]}}': ["\U0001f600", "\0", "s"],
}


@pytest.mark.parametrize("header", list(REFUSED), ids=range(len(REFUSED)))
def test_reader_refuses_what_the_format_forbids(header: str) -> None:
    message, library_refuses = REFUSED[header]
    raw = header.encode("utf-8", "surrogatepass")
    data = b"\0" * 4
    with pytest.raises(BadFileError) as err:
        parse_header_bytes(Path("m.safetensors"), raw, 8 + len(raw) + len(data))
    text = str(err.value)
    assert text.startswith("m.safetensors: ") and message in text and "\n" not in text
    assert len(text) < 400
    # the reference reader agrees, except where the format's text is stricter
    # than the library (duplicates, unknown fields, a header not starting with '{')
    try:
        safetensors.deserialize(struct.pack("<Q", len(raw)) + raw + data)
        refused = False
    except Exception:
        refused = True
    assert refused == library_refuses


@pytest.mark.parametrize("header", list(ACCEPTED), ids=range(len(ACCEPTED)))
def test_reader_accepts_what_the_format_allows(header: str) -> None:
    raw = header.encode()
    data = b"\0" * (6 if '"s"' in header else 4)
    h = parse_header_bytes(Path("m.safetensors"), raw, 8 + len(raw) + len(data))
    assert list(h.tensors) == ACCEPTED[header]
    lib = safetensors.deserialize(struct.pack("<Q", len(raw)) + raw + data)
    assert sorted(name for name, _ in lib) == sorted(ACCEPTED[header])


def test_utf16_header_is_refused(tmp_path: Path) -> None:
    text = "{" + ENTRY + "}"
    for enc in ("utf-16", "utf-16-le"):
        path = _file(tmp_path, f"{enc}.safetensors", text.encode(enc))
        with pytest.raises(BadFileError, match=r"not valid (UTF-8|JSON)|does not start"):
            read_header(path)


# --- item 4: hostile headers and paths give exit 2 naming the file --------------------


def _hostile_files(folder: Path) -> dict[str, Path]:
    def entry(shape: object, offsets: object) -> dict[str, object]:
        return {"w": {"dtype": "F16", "shape": shape, "data_offsets": offsets}}

    headers = {
        "shape_1e400": entry([Raw("1e400")], [0, 4]),
        "offset_infinity": entry([2], [0, Raw("Infinity")]),
        "offset_10e400": entry([2], [0, Raw("1" + "0" * 400)]),
        "nested": entry(Raw("[" * 100_000 + "]" * 100_000), [0, 4]),
        "surrogate_key": {"\ud800": entry([2], [0, 4])["w"]},
        "surrogate_meta": {"__metadata__": {"a": "\udcff"}, **entry([2], [0, 4])},
        "nan_meta": {"__metadata__": {"a": Raw("NaN")}, **entry([2], [0, 4])},
    }
    out = {name: folder / f"{name}.safetensors" for name in headers}
    for name, header in headers.items():
        out[name].write_bytes(join_file(header, b"\0" * 4))
    out["utf16"] = _file(folder, "utf16.safetensors", ("{" + ENTRY + "}").encode("utf-16"))
    loop = folder / "loop.safetensors"
    os.symlink(folder / "loop2", loop)
    os.symlink(loop, folder / "loop2")
    out["symlink_loop"] = loop
    fifo = folder / "fifo.safetensors"
    os.mkfifo(fifo)
    out["fifo"] = fifo
    out["dev_zero"] = Path("/dev/zero")
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _hostile_files(tmp_path_factory.mktemp("hostile"))


def test_hostile_files_in_process(hostile: dict[str, Path], tmp_path: Path) -> None:
    problems = {"fifo": "named pipe", "symlink_loop": "symbolic link loop",
                "dev_zero": "character device", "nested": "nested too deeply",
                "surrogate_key": "surrogate", "shape_1e400": "1e400"}
    for name, path in hostile.items():
        for args in (["inspect", str(path)], ["inspect", "--json", str(path)],
                     ["hash", str(path)],
                     ["prune", str(path), "-o", str(tmp_path / "out.safetensors"), "-q"]):
            rc, out, err = run_cli(args, seconds=10)
            line = _one_line_error(rc, err, path)
            assert out == "" and problems.get(name, "") in line, (name, args, line)
            assert list(tmp_path.iterdir()) == []


def test_hostile_files_through_the_console_script(hostile: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """The real ``modelkit`` executable: exit 2 and one line per file (one
    shell runs them all; a FIFO must not block inspect or prune)."""
    exe = shutil.which("modelkit", path=str(Path(sys.executable).parent)) or \
        shutil.which("modelkit")
    assert exe, "the modelkit console script is not installed"
    # one file per way of failing (a bad number, a recursion, a surrogate to
    # print, the file system); test_hostile_files_in_process checks them all
    names = ["shape_1e400", "nested", "surrogate_key", "symlink_loop", "fifo"]
    script = ('for f in "$@"; do "$EXE" inspect "$f" 2>&1; echo "rc=$?"; done; '
              '"$EXE" prune "$FIFO" -o "$OUT" 2>&1; echo "rc=$?"')
    env = {**os.environ, "EXE": exe, "FIFO": str(hostile["fifo"]),
           "OUT": str(tmp_path / "out.safetensors")}
    env.pop("MODELKIT_DEBUG", None)
    proc = subprocess.run(["bash", "-c", script, "_", *(str(hostile[n]) for n in names)],
                          capture_output=True, text=True, timeout=60, env=env)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 * (len(names) + 1), proc.stdout
    for i, name in enumerate([*names, "fifo"]):
        message, status = lines[2 * i], lines[2 * i + 1]
        assert status == "rc=2", (name, message)
        assert message.startswith("modelkit: error: ") and hostile[name].name in message
    assert list(tmp_path.iterdir()) == []


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(BadFileError, match="is a folder"):
        read_header(folder)


# --- item 3: real files that crashed inspect ------------------------------------------


def test_kohya_lora_without_metadata(tmp_path: Path) -> None:
    from modelkit.testing.lora import write_lora

    path = tmp_path / "lora.safetensors"
    write_lora(path, "sd1", with_metadata=False, alpha=2.0)
    rc, out, err = run_cli(["inspect", "--json", str(path)])
    assert rc == 0, err
    d = json.loads(out)
    assert d["kind"] == "lora" and d["adapter"]["alphas"] == [2.0]
    rc, out, _ = run_cli(["inspect", str(path)])
    assert rc == 0 and "alpha [2.0]" in out


def test_alphas_that_cannot_be_shown(tmp_path: Path) -> None:
    """NaN, empty, U16 and complex alphas: the readable finite ones are listed."""
    mods = {"lora_unet_a_proj_in": ("F32", [], struct.pack("<f", float("nan"))),
            "lora_unet_b_proj_in": ("U16", [], struct.pack("<H", 8)),
            "lora_unet_c_proj_in": ("C64", [], b"\0" * 8),
            "lora_unet_d_proj_in": ("F16", [0], b"")}
    header, data = {}, b""
    for mod, (dtype, shape, raw) in mods.items():
        for part, (dt, sh, r) in {"lora_down.weight": ("F16", [1, 2], b"\0" * 4),
                                  "lora_up.weight": ("F16", [2, 1], b"\0" * 4),
                                  "alpha": (dtype, shape, raw)}.items():
            header[f"{mod}.{part}"] = {"dtype": dt, "shape": sh,
                                       "data_offsets": [len(data), len(data) + len(r)]}
            data += r
    path = tmp_path / "alphas.safetensors"
    path.write_bytes(join_file(header, data))
    rc, out, err = run_cli(["inspect", "--json", str(path)])
    assert rc == 0, err
    assert json.loads(out)["adapter"]["alphas"] == [8.0]


def test_sd2_with_nan_in_the_probed_bias(tmp_path: Path) -> None:
    import torch

    from modelkit.arch.configs import TINY, UNET_PREFIX
    from modelkit.arch.keys import unet_keys
    from modelkit.inspect.prediction import SD2_PROBE_KEY, population_std
    from modelkit.testing import write_tensors

    keys = {UNET_PREFIX + k: s for k, s in unet_keys(TINY["sd2"].unet).items()}
    bias = torch.zeros(keys[SD2_PROBE_KEY], dtype=torch.float16)
    bias[3] = float("nan")
    path = tmp_path / "sd2_nan.safetensors"
    write_tensors(path, keys, overrides={SD2_PROBE_KEY: bias})
    rc, out, err = run_cli(["inspect", "--json", str(path)])
    assert rc == 0, err
    pred = json.loads(out)["prediction"]
    assert pred["type"] == "unknown" and "NaN" in pred["evidence"][0]
    values = [0.25, -0.5, 1.5, 0.125, 3.0]
    assert population_std(values) == pytest.approx(statistics.pstdev(values), rel=1e-12)


# --- item 6: nothing from a file acts on the terminal ----------------------------------

INJECTIONS = {"title": "\x1b]0;owned\x07", "clear": "\x1b[2J\x1b[H",
              "clipboard": "\x1b]52;c;ZXZpbA==\x07", "cr": "ok\rOVERWRITTEN",
              "bidi": "\u202etxt.exe", "c1": "\x9b2J", "del": "a\x7fb"}


def test_shown_escapes_and_cuts() -> None:
    assert shown("plain text") == "plain text"
    assert shown("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert shown("\x1b]0;x\x07") == "\\x1b]0;x\\x07"
    assert shown("\x9b\x7f\u202e\u2066\ufeff") == "\\x9b\\x7f\\u202e\\u2066\\ufeff"
    assert shown("\ud800|\udcff") == "\\ud800|\\xff"  # \udcff: byte 0xff of a file name
    assert shown("x" * 100, 10) == "xxxxxxx..."
    cut = shown("ab" + "\x1b" * 20, 10)
    assert cut == "ab\\x1b..." and len(cut) <= 10  # never inside an escape
    assert shown(shown("a\x1bb\ud800")) == shown("a\x1bb\ud800")
    assert shown("\U0001f600 caf\u00e9") == "\U0001f600 caf\u00e9"


def test_inspect_escapes_metadata_and_keys(tmp_path: Path) -> None:
    long_key = "k" * 5000
    keys = ["a\nFAKE LINE: prune kept everything", "\x1b]0;key\x07", long_key]
    header = {"__metadata__": {**INJECTIONS, "\x1b[31mkey": "v", "long": "y" * 5000}}
    for i, k in enumerate(keys):
        header[k] = {"dtype": "F16", "shape": [1], "data_offsets": [2 * i, 2 * i + 2]}
    path = tmp_path / "inject\x1b[2J.safetensors"
    path.write_bytes(join_file(header, b"\0" * 6))
    rc, out, err = run_cli(["inspect", str(path)])
    assert rc == 0, err
    assert not any(c in out for c in "\x1b\r\x07\x7f\x9b\u202e"), out
    assert "\\x1b]52;c;ZXZpbA==\\x07" in out and "ok\\rOVERWRITTEN" in out
    assert not any(line.startswith("FAKE LINE") for line in out.splitlines())
    assert "inject\\x1b[2J.safetensors" in out.splitlines()[0]
    assert max(len(line) for line in out.splitlines()) < 300  # long keys and values cut
    rc, out, _ = run_cli(["inspect", "--json", str(path)])
    d = json.loads(out)
    assert d["metadata"]["clipboard"] == INJECTIONS["clipboard"]  # JSON keeps it exact
    assert "\x1b" not in out


def test_hash_escapes_names_and_mismatches(tmp_path: Path) -> None:
    header = {"__metadata__": {"sshs_model_hash": "\x1b]0;x\x07" + "0" * 60},
              "w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}
    path = tmp_path / "h\x1b[2Jx.safetensors"
    path.write_bytes(join_file(header, b"\0" * 4))
    rc, out, err = run_cli(["hash", "-q", str(path)])
    assert "\x1b" not in out + err and "h\\x1b[2Jx.safetensors" in out
    assert "MISMATCH" in out
    rc, _, err = run_cli(["inspect", str(tmp_path / "gone\x1b]0;t\x07.safetensors")])
    assert rc == 2 and "\x1b" not in err and "gone\\x1b]0;t\\x07" in err


# --- item 10 (read side): errors name the file -----------------------------------------


def test_value_errors_name_the_file(tmp_path: Path) -> None:
    from modelkit.io.header import UndecodableTensorError
    from modelkit.io.reader import open_model

    header = {"c": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]},
              "f6": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [8, 11]},
              "u": {"dtype": "U16", "shape": [2], "data_offsets": [11, 15]}}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(join_file(header, b"\0" * 11 + struct.pack("<2H", 7, 65535)))
    h = read_header(path)
    assert read_small_tensor(h, "u") == [7.0, 65535.0]
    with pytest.raises(UndecodableTensorError, match=r"odd\.safetensors: tensor 'c': "
                                                    "cannot decode dtype C64"):
        read_small_tensor(h, "c")
    with open_model(path) as src:
        assert src.get("c").is_complex()  # C64 is a torch dtype: no "not supported"
        with pytest.raises(BadFileError, match=r"odd\.safetensors: tensor 'f6' has dtype "
                                               "F6_E2M3"):
            src.get("f6")


def test_device_as_merge_input_is_not_missing(tmp_path: Path) -> None:
    other = tmp_path / "b.safetensors"  # never reached: input a is refused first
    rc, _, err = run_cli(["merge", "/dev/zero", str(other), "--alpha", "0.5",
                          "-o", str(tmp_path / "m.safetensors")])
    line = _one_line_error(rc, err, Path("/dev/zero"))
    assert "character device" in line and "no such file" not in line
    assert list(tmp_path.iterdir()) == []


def test_dump_helper_writes_raw_fragments() -> None:
    assert dump({"a": [Raw("1e400")]}) == '{"a":[1e400]}'


def test_prune_report_escapes_key_names(tmp_path: Path) -> None:
    """A key with a newline cannot forge a line in prune's report (item 6)."""
    from modelkit import testing as t
    from modelkit.arch.keys import checkpoint_keys

    keys = dict(checkpoint_keys(t.arch_spec("sd1")))
    keys |= {"junk.a\nFAKE LINE: prune kept everything": (2,),
             "junk.b\rOVER\x1b]0;t\x07": (3,)}
    path = tmp_path / "ckpt.safetensors"
    t.write_tensors(path, keys)
    rc, out, err = run_cli(["prune", str(path), "-o", str(tmp_path / "p.safetensors"), "-q"])
    assert rc == 0, err
    assert not any(c in out for c in "\x1b\r\x07"), out
    assert not any(line.startswith("FAKE LINE") for line in out.splitlines())
    assert "junk.a\\nFAKE LINE: prune kept everything (unknown key)" in out
    assert "junk.b\\rOVER\\x1b]0;t\\x07 (unknown key)" in out


def test_a_long_unknown_method_name_is_cut() -> None:
    """Item 10: a 200 KB method name (under the 1 MB recipe limit) is not
    echoed whole."""
    from modelkit.core.recipe import RecipeError, parse_recipe

    text = ("version: 1\ninputs: {a: a.safetensors, b: b.safetensors}\nsteps:\n"
            f"  s: {{method: {'x' * 200_000}, models: [a, b]}}\n")
    with pytest.raises(RecipeError, match="unknown merge method 'xxx") as err:
        parse_recipe(text, "long.yaml")
    assert len(str(err.value)) < 400

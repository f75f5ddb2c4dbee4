"""Legacy ``.ckpt``/``.pt`` pickles, read with ``torch.load(weights_only=True)``.

SD checkpoints carry a few non-tensor objects, most often the
pytorch_lightning ``ModelCheckpoint`` callback state. Those classes are
allow-listed by name and rebuilt as inert placeholders; anything else is
refused with the class named. Nothing is ever unpickled without restriction.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from modelkit.errors import BadFileError, UnsafePickleError
from modelkit.io.files import check_input_file
from modelkit.io.writer import atomic_path
from modelkit.textsafe import shown

# classes SD/LDM checkpoints embed beside the weights (never executed)
ALLOWED_CLASSES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "typing.Any",
)


class Placeholder(dict):
    """Inert stand-in for an allow-listed foreign object; keeps its state."""

    def __setstate__(self, state: Any) -> None:
        self["__state__"] = state


def _placeholder_types() -> list[tuple[type, str]]:
    types = []
    for dotted in ALLOWED_CLASSES:
        cls = type(dotted.rsplit(".", 1)[1], (Placeholder,), {})
        types.append((cls, dotted))
    return types


_UNSUPPORTED = re.compile(r"(?:Unsupported global|unsupported GLOBAL)[^\w]*(?:GLOBAL )?"
                          r"([\w.]+)")


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        # A1111 textual inversion .pt: {"string_to_param": {"*": tensor}, ...}
        obj = {f"string_to_param.{k}": v for k, v in obj["string_to_param"].items()}
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(
            obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BadFileError(f"{path}: pickle holds a {type(obj).__name__}, not a state dict")
    import torch

    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors and obj:
        raise BadFileError(f"{path}: pickle holds no tensors at the top level or under "
                           "'state_dict'")
    return tensors


def _sniffed(p: Path) -> str | None:
    """What the file's magic bytes say it is, when that is not a pickle or a
    ZIP (the two forms of a checkpoint)."""
    from modelkit.io.files import open_input_file
    from modelkit.io.suffixes import SNIFF_BYTES, sniff

    try:
        with open_input_file(p) as f:
            what = sniff(f.read(SNIFF_BYTES))
    except (OSError, BadFileError):
        return None
    return None if what is None or "pickle" in what or "ZIP" in what else what


def _short(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 120 characters, escaped."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return shown(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, 120)


class _Inert:
    """What the size probe builds for every class a pickle names: accepts any
    arguments and state, runs nothing."""

    def __new__(cls, *_args: Any, **_kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def __setstate__(self, _state: Any) -> None:
        pass


def _extent(offset: Any, size: Any, stride: Any) -> int:
    """Elements of storage a tensor view reaches (``offset`` plus the last
    element's index, plus one), or 0 when the view is empty or unreadable."""
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(isinstance(x, int) for x in (*size, *stride))):
        return 0
    if any(n <= 0 for n in size):
        return 0
    return offset + sum((n - 1) * abs(s) for n, s in zip(size, stride, strict=True)) + 1


class _StorageProbe(pickle.Unpickler):
    """Reads a legacy (pre-zip) torch pickle without building anything real:
    every class is :class:`_Inert`; each storage record's element count is
    noted (``('storage', type, key, location, numel, view)``), and so is how
    far into its storage each tensor reaches (torch grows a storage to fit
    the tensor built on it)."""

    def __init__(self, f: Any, claims: list[int], extents: list[int]) -> None:
        super().__init__(f)
        self.claims = claims
        self.extents = extents

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return self._tensor
        return _Inert

    def _tensor(self, _storage: Any = None, offset: Any = 0, size: Any = (), stride: Any = (),
                *_rest: Any) -> None:
        self.extents.append(_extent(offset, size, stride))

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage") \
                and isinstance(pid[4], int):
            self.claims.append(pid[4])
        return None


def _check_legacy_storage_sizes(p: Path) -> None:
    """Refuse a legacy checkpoint whose storage records claim more elements
    than the file has bytes: torch allocates each storage before reading its
    data, so a few edited digits in a small file would reserve gigabytes.
    The same for a tensor whose shape reaches past that (torch grows the
    storage to fit it). Every element takes at least one byte in the file, so
    real files pass. A pickle the probe cannot read is left to ``torch.load``
    to refuse."""
    claims: list[int] = []
    extents: list[int] = []
    try:
        with p.open("rb") as f:
            for _ in range(3):  # magic number, protocol version, system info
                _StorageProbe(f, claims, extents).load()
            _StorageProbe(f, claims, extents).load()
    except Exception:
        pass
    size = p.stat().st_size
    if any(n < 0 for n in claims) or sum(claims) > size:
        raise BadFileError(f"{shown(p, 300)}: not a readable checkpoint: its storage "
                           f"records claim {sum(claims):,} elements of tensor data but the "
                           f"file holds {size:,} bytes; the file is damaged")
    if extents and max(extents) > size:
        raise BadFileError(f"{shown(p, 300)}: not a readable checkpoint: a tensor in it "
                           f"reaches {max(extents):,} elements into its storage but the "
                           f"file holds {size:,} bytes; the file is damaged")


def load_pickle_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the tensors of a ``.ckpt``/``.pt``/``.bin`` file safely.

    Zip-format files are memory-mapped, so tensors are paged in on use.

    Raises:
        UnsafePickleError: the pickle references a class not on the allow-list.
        BadFileError: unreadable or not a state dict.
    """
    import torch

    p = check_input_file(path)
    try:
        is_zip = zipfile.is_zipfile(p)
    except zipfile.BadZipFile as exc:  # is_zipfile lets some damaged archives through
        raise BadFileError(f"{shown(p, 300)}: not a readable checkpoint (damaged ZIP "
                           f"archive: {_short(exc)})") from None
    if not is_zip:
        _check_legacy_storage_sizes(p)
    try:
        with torch.serialization.safe_globals(list(_placeholder_types())), \
                warnings.catch_warnings(record=True):
            # torch warns (twice, on stderr) about some protocol-4 framing
            # before it fails: the one-line error below says what is wrong
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=is_zip)
    except FileNotFoundError:
        raise BadFileError(f"{p}: no such file") from None
    except pickle.UnpicklingError as exc:
        m = _UNSUPPORTED.search(str(exc))
        if m is None:
            what = _sniffed(p)
            if what is not None:
                raise BadFileError(f"{shown(p, 300)}: is {what}, not a model file") from None
            raise BadFileError(f"{p}: not a readable checkpoint (corrupt or not a "
                               "pickle)") from None
        raise UnsafePickleError(
            f"{p}: refused to unpickle: the file references {m.group(1)}, which is not "
            "on modelkit's allow-list; only load pickles from sources you trust, or "
            "get a .safetensors version") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise BadFileError(f"{p}: not a readable checkpoint ({msg})") from None
    except Exception as exc:
        # the restricted unpickler runs the opcodes of a hostile or damaged
        # pickle as they come: a malformed stack (APPENDS or SETITEMS without
        # MARK, REDUCE or NEWOBJ with arguments that do not fit, a memo index
        # never stored) raises IndexError, TypeError, KeyError, ...
        raise BadFileError(f"{shown(p, 300)}: not a valid checkpoint pickle "
                           f"({_short(exc)}); the file is damaged or not a "
                           "checkpoint") from None
    return _unwrap(obj, p)


def save_pickle_state_dict(state: dict[str, Any], path: str | os.PathLike[str],
                           extra: dict[str, Any] | None = None,
                           inputs: tuple[str | os.PathLike[str], ...] = ()) -> None:
    """Write a legacy zip-format ``.ckpt`` (``{"state_dict": ...}`` plus
    ``extra`` top-level entries). Used for compatibility output and tests."""
    import torch

    obj: dict[str, Any] = {"state_dict": state}
    obj.update(extra or {})
    with atomic_path(Path(path), inputs) as tmp:
        torch.save(obj, tmp)

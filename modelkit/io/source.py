"""Models as key-by-key sources.

A *source* is anything with tensor ``infos`` (name -> dtype/shape), string
``metadata``, ``get(key)`` and the ``input_paths`` it reads. An open file
(:class:`~modelkit.io.reader.ModelSource`) is one; a :class:`DerivedSource`
computes each tensor on demand from other sources, so prune, EMA selection,
quantization and merges chain without intermediate files and the writer
still sees one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from modelkit.errors import ModelkitError
from modelkit.io.header import TensorInfo

if TYPE_CHECKING:
    import torch

    from modelkit.io.writer import TensorSink


class Source(Protocol):
    """What a transform reads and what a writer writes."""

    infos: dict[str, TensorInfo]
    metadata: dict[str, str]

    def get(self, key: str) -> torch.Tensor: ...

    @property
    def input_paths(self) -> tuple[Path, ...]: ...


def tensor_info(name: str, dtype: str, shape: Iterable[int]) -> TensorInfo:
    """A header-style entry for a tensor that is not in a file yet (offsets
    start at 0, so ``nbytes`` is right)."""
    from modelkit.io.writer import TensorSpec

    spec = TensorSpec(name, dtype, tuple(int(d) for d in shape))
    return TensorInfo(name, spec.dtype, spec.shape, 0, spec.nbytes)


class KeyAccess:
    """``keys``, ``in`` and ``iter`` over a source's ``infos`` and ``get``."""

    infos: dict[str, TensorInfo]

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def iter(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.infos:
            yield key, self.get(key)


@dataclass
class DerivedSource(KeyAccess):
    """A model computed one tensor at a time.

    Args:
        label: what it is, for messages (``prune(a.safetensors)``).
        infos: every output tensor's dtype and shape, in output order.
        metadata: the output ``__metadata__``.
        produce: ``produce(key)`` returns the tensor for ``key``.
        input_paths: the files it reads (never written over).
    """

    label: str
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]
    produce: Callable[[str], torch.Tensor]
    input_paths: tuple[Path, ...] = ()
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the run report's warnings
    # the layers a quantized file stores, dequantized on read: key -> stored format
    # (``float8_e4m3fn scaled``, ``int8_blockwise``, ``nf4``; modelkit.io.quantized)
    quantized_layers: dict[str, str] = field(default_factory=dict)
    # optional faster route: ``stream(key, sink)`` writes the key's bytes
    # into a :class:`~modelkit.io.writer.TensorSink` (in pieces, or copied
    # file to file) and returns True, or returns False to let the writer
    # call ``get``
    stream: Callable[[str, TensorSink], bool] | None = None

    def get(self, key: str) -> torch.Tensor:
        if key not in self.infos:
            raise ModelkitError(f"{self.label}: has no tensor {key!r}")
        return self.produce(key)


def input_paths_of(sources: Iterable[Source]) -> tuple[Path, ...]:
    """Every file the given sources read, once each, in order."""
    out: list[Path] = []
    for s in sources:
        out += [p for p in s.input_paths if p not in out]
    return tuple(out)


def source_label(source: Source) -> str:
    """A short name for messages: the file path or the derived label."""
    label = getattr(source, "label", None)
    if label:
        return str(label)
    return str(getattr(source, "path", "<model>"))

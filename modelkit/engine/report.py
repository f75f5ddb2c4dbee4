"""What a run did: one :class:`RunReport` for every command and recipe, with
one :meth:`RunReport.to_dict` that every ``--json`` prints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from modelkit.jsontypes import JSONDict, JSONValue

# report properties worth showing in JSON beside the dataclass fields
_PROPERTIES = ("relative_l2", "snr_db", "overall_relative_l2")


@dataclass
class StepReport:
    """One step of the run: the transform, its parameters and its own
    report (e.g. keys dropped by prune, saturation counts, int8 or fp8 error,
    EMA deltas, merge counts)."""

    name: str
    transform: str
    kind: str
    params: dict[str, Any]
    report: Any = None

    def to_dict(self) -> JSONDict:
        return {"name": self.name, "transform": self.transform, "kind": self.kind,
                "params": self.params, "report": jsonable(self.report)}


@dataclass
class RunReport:
    """The result of :func:`modelkit.engine.runner.run`.

    Counts are over output tensors: ``n_merged`` computed by merge steps,
    ``n_copied`` taken unchanged from the primary input, ``n_skipped`` left
    out by ``missing_keys: skip``, ``n_ignored`` keys only the secondary
    merge inputs have. ``peak_estimate_bytes`` is planned from the headers;
    ``peak_measured_bytes`` is the growth of the process's anonymous memory
    (RssAnon) during the write, when the platform reports it.
    """

    output: Path | None
    format: str
    arch: str
    dry_run: bool = False
    n_tensors: int = 0
    n_merged: int = 0
    n_copied: int = 0
    n_skipped: int = 0
    n_ignored: int = 0
    output_bytes: int = 0
    peak_estimate_bytes: int = 0
    peak_measured_bytes: int | None = None
    seconds: float = 0.0
    steps: list[StepReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_details: dict[str, Any] = field(default_factory=dict)
    verify: Any = None

    @property
    def n_keys(self) -> int:
        """Output tensors (the old merge report's name for ``n_tensors``)."""
        return self.n_tensors

    @property
    def bytes_written(self) -> int:
        """Bytes of the output (the old convert report's name)."""
        return self.output_bytes

    @property
    def report(self) -> Any:
        """The output step's own report."""
        return self.steps[-1].report if self.steps else None

    def to_dict(self) -> JSONDict:
        """Plain JSON values; infinities become null."""
        return {
            "output": str(self.output) if self.output else None,
            "format": self.format, "arch": self.arch, "dry_run": self.dry_run,
            "n_tensors": self.n_tensors, "n_keys": self.n_tensors,
            "n_merged": self.n_merged, "n_copied": self.n_copied,
            "n_skipped": self.n_skipped, "n_ignored": self.n_ignored,
            "output_bytes": self.output_bytes, "bytes_written": self.output_bytes,
            "peak_estimate_bytes": self.peak_estimate_bytes,
            "peak_measured_bytes": self.peak_measured_bytes,
            "seconds": round(self.seconds, 3),
            "steps": [s.to_dict() for s in self.steps],
            "report": jsonable(self.report),
            "warnings": list(self.warnings), "notes": list(self.notes),
            "output_details": jsonable(self.output_details),
            "verify": jsonable(self.verify),
        }


def jsonable(value: object) -> JSONValue:
    """``value`` as plain JSON: dataclasses as dicts (plus their figure
    properties), paths as strings, infinities and NaN as None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        d = asdict(value)
        for prop in _PROPERTIES:
            if hasattr(type(value), prop):
                d[prop] = getattr(value, prop)
        blocks = getattr(value, "blocks", None)
        if isinstance(d.get("blocks"), dict) and isinstance(blocks, dict):
            d["blocks"] = {k: {**v, "relative_l2": blocks[k].relative_l2}
                           if hasattr(blocks[k], "relative_l2") else v
                           for k, v in d["blocks"].items()}
        return jsonable(d)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return str(value)

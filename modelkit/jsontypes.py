"""The type of JSON values: what a report's ``to_dict()`` returns and
``--json`` prints (plain data, layer 0).

Containers are read-only (``Sequence``, ``Mapping``) so that a ``list[str]``
or a ``dict[str, int]`` is a JSON value as it is; tuples print as lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

JSONScalar: TypeAlias = str | int | float | bool | None
JSONValue: TypeAlias = JSONScalar | Sequence["JSONValue"] | Mapping[str, "JSONValue"]
JSONDict: TypeAlias = dict[str, JSONValue]

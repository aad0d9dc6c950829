"""The base of the typed settings dataclasses: ``from_config`` (partial mapping over the defaults, unknown keys
refused in one line naming the node) and ``to_dict`` (the plain dict a checkpoint stores)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from lensflow._util.plain import to_plain

__all__ = ["Settings"]

_S = TypeVar("_S", bound="Settings")


class Settings:
    """``from_config`` / ``to_dict`` shared by the settings dataclasses; ``node`` names them in errors."""

    node = ""

    @classmethod
    def from_config(cls: type[_S], values: Mapping[str, Any] | _S | None = None) -> _S:
        """Settings from a (partial) mapping over the defaults; ``None`` gives the defaults."""
        if isinstance(values, cls):
            return values
        d = dict(to_plain(values) or {})
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"{cls.node}: unknown keys {unknown}; known: {known}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (what a checkpoint's hyper_parameters hold)."""
        return to_plain(dataclasses.asdict(self))  # type: ignore[call-overload]

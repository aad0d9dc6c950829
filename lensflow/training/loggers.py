"""The run's metric logger from ``conf/logger``: Weights & Biases (offline by default), CSV or none."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lensflow._util.checks import check_bool, check_choice
from lensflow._util.plain import to_plain

__all__ = ["LoggerSettings", "make_logger", "wandb_mode"]

KINDS = ("wandb", "csv", "none")


@dataclass(frozen=True)
class LoggerSettings:
    """``kind`` wandb | csv | none; the rest configures wandb (``offline``: see :func:`wandb_mode`)."""

    kind: str = "none"
    project: str = "lensflow"
    entity: str | None = None
    offline: bool | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    log_model: bool = False

    def __post_init__(self) -> None:
        check_choice("logger.kind", self.kind, KINDS)
        if self.offline is not None:
            check_bool("logger.offline", self.offline)
        check_bool("logger.log_model", self.log_model)
        object.__setattr__(self, "tags", tuple(str(t) for t in self.tags))

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> LoggerSettings:
        """From a ``logger`` node (``None`` or ``kind: none``: no logger); unknown keys are refused."""
        d = dict(to_plain(node) or {})
        if d.get("kind") is None:
            d["kind"] = "none"
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"logger: unknown keys {unknown}")
        d["tags"] = tuple(d.get("tags") or ())
        d["project"] = d.get("project") or "lensflow"
        return cls(**d)


def wandb_mode(offline: bool | None) -> str:
    """wandb's mode: ``offline=True`` offline, ``False`` online, ``None`` ``WANDB_MODE`` if set, else offline."""
    if offline is True:
        return "offline"
    if offline is False:
        return "online"
    return os.environ.get("WANDB_MODE") or "offline"


def make_logger(settings: LoggerSettings, name: str, run_dir: Path) -> Any:
    """The Lightning logger writing into ``run_dir`` (``False`` for none)."""
    if settings.kind == "none":
        return False
    if settings.kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(settings.offline)
    logger = WandbLogger(
        name=name,
        save_dir=str(run_dir),
        project=settings.project,
        entity=settings.entity,
        offline=mode in ("offline", "dryrun"),
        mode=mode,
        tags=list(settings.tags),
        log_model=settings.log_model,
    )
    # Lightning always hands wandb.init anonymous=None, which wandb >= 0.19 answers with "The anonymous setting has
    # no effect" on every run; the setting is gone from wandb, so it is left out.
    logger._wandb_init.pop("anonymous", None)
    return logger

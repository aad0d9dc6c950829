"""Typed settings of a training run: the model, the optimiser and the sample check (library defaults).

Each dataclass holds the library's one default per knob; ``conf/model``, ``conf/optim`` and the ``check``
node of ``conf/train.yaml`` are the command's values for the same fields (a test keeps them equal).
:meth:`from_mapping` takes a partial mapping (Python callers) or a composed config node, refuses unknown
keys and checks every value with one line naming ``NODE.KEY``; :meth:`to_dict` gives the plain dict a
checkpoint stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from lensflow._util.checks import check_bool, check_choice, check_int, check_number, check_optional_int
from lensflow._util.plain import to_plain

__all__ = ["LEGACY_MODEL", "CheckSettings", "ModelSettings", "OptimSettings"]

#: Model keys that checkpoints of lensflow 0.1 (hparams with ``map_meta``) lack, at the values they were trained with.
LEGACY_MODEL: dict[str, Any] = {"shift_method": "margin", "stationary": False}

_S = TypeVar("_S", bound="_Settings")


class _Settings:
    """``from_mapping`` / ``to_dict`` shared by the settings dataclasses."""

    node = ""

    @classmethod
    def from_mapping(cls: type[_S], values: Mapping[str, Any] | _S | None = None) -> _S:
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


@dataclass(frozen=True)
class ModelSettings(_Settings):
    """The Glow (:class:`lensflow.flows.Glow`): sizes, padding, preprocessing and soft clamps.

    ``cond_dim`` (``None`` = the number of conditioning parameters of the data) only checks the size;
    ``padding="auto"`` is circular for periodic maps, zero otherwise. ``shift_method`` chooses the shifted
    log's shift (``"ml"``: maximum likelihood; ``"margin"``: 1σ below the training minimum, lensflow 0.1);
    ``stationary`` puts the learned Fourier-space Gaussian layer in front of the multi-scale Glow, with a fitted
    dense block for its ``stationary_low_modes``² lowest modes; ``stationary_dense`` replaces it by the fitted exact
    Gaussian of a stationary field on the crop (maps up to 64²; for a conditional model its correlation function is a
    polynomial of degree ``stationary_degree`` in each normalised parameter, fitted on all training maps);
    ``shift_degree`` makes a conditional model's shifted log (its λ, mean and std) polynomials of that degree in θ
    (``None``: one for all θ). ``cond_log`` conditions on ``log θ`` instead of θ (both normalised to zero mean and
    unit variance over the training split): κ's amplitude is close to a power law in Ω_m and σ_8, so ``log std``
    and ξ are close to linear in ``log θ`` and the fitted polynomials leave less bias across a wide box.
    docs/emulator-design.md measures each: the ML shift and the crop Gaussian cut the kappa_quick KL gap from 0.0040
    to 0.00011 bits/pixel.
    """

    node = "model"

    kind: str = "glow"
    levels: int = 4
    steps: int = 32
    hidden: int = 512
    cond_dim: int | None = None
    padding: str = "auto"
    log_shift: bool = False
    scale_bound: float = 2.0
    prior_bound: float = 5.0
    learn_top_prior: bool = True
    shift_method: str = "ml"
    stationary: bool = True
    stationary_knots: int = 24
    stationary_low_modes: int = 8
    stationary_dense: bool = False
    stationary_degree: int = 3
    shift_degree: int | None = None
    cond_log: bool = False

    def __post_init__(self) -> None:
        check_choice("model.kind", self.kind, ("glow",))
        check_choice("model.shift_method", self.shift_method, ("ml", "margin"))
        check_bool("model.stationary", self.stationary)
        check_int("model.stationary_knots", self.stationary_knots, 2)
        check_int("model.stationary_low_modes", self.stationary_low_modes, 0)
        check_bool("model.stationary_dense", self.stationary_dense)
        check_int("model.stationary_degree", self.stationary_degree, 0)
        check_optional_int("model.shift_degree", self.shift_degree, 0)
        check_bool("model.cond_log", self.cond_log)
        for name in ("levels", "steps", "hidden"):
            check_int(f"model.{name}", getattr(self, name), 1)
        check_optional_int("model.cond_dim", self.cond_dim, 0)
        check_choice("model.padding", self.padding, ("auto", "zero", "circular"))
        check_bool("model.log_shift", self.log_shift)
        check_bool("model.learn_top_prior", self.learn_top_prior)
        for name in ("scale_bound", "prior_bound"):
            object.__setattr__(
                self, name, check_number(f"model.{name}", getattr(self, name), minimum=0, strict_min=True)
            )

    def glow_config(self, channels: int, npix: int, cond_dim: int, periodic: bool) -> dict[str, Any]:
        """The :meth:`lensflow.flows.Glow.from_config` dict of this model on ``channels x npix²`` maps."""
        if self.cond_dim is not None and self.cond_dim != cond_dim:
            raise ValueError(
                f"model.cond_dim={self.cond_dim} but the data give {cond_dim} conditioning parameters; "
                "set data.cond or model.cond_dim=null"
            )
        padding = ("circular" if periodic else "zero") if self.padding == "auto" else self.padding
        return {
            "in_channels": int(channels),
            "image_size": int(npix),
            "levels": self.levels,
            "steps": self.steps,
            "hidden": self.hidden,
            "cond_dim": int(cond_dim),
            "padding": padding,
            "scale_bound": self.scale_bound,
            "prior_bound": self.prior_bound,
            "learn_top_prior": self.learn_top_prior,
            "log_shift": self.log_shift,
            "shift_method": self.shift_method,
            "stationary": self.stationary,
            "stationary_knots": self.stationary_knots,
            "stationary_low_modes": self.stationary_low_modes,
            "stationary_dense": self.stationary_dense,
            "stationary_degree": self.stationary_degree,
            "shift_degree": self.shift_degree,
        }


@dataclass(frozen=True)
class OptimSettings(_Settings):
    """AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``, clipping, EMA, non-finite guard.

    ``grad_clip``: max global gradient norm (``None``: no clipping). ``ema_decay``: warmed up as
    ``min(ema_decay, (1 + t) / (10 + t))`` at step t. ``max_nonfinite_steps``: skipped steps in a row
    before the run stops.
    """

    node = "optim"

    lr: float = 5e-4
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 500
    min_lr_ratio: float = 0.02
    grad_clip: float | None = 50.0
    ema_decay: float = 0.999
    max_nonfinite_steps: int = 20

    def __post_init__(self) -> None:
        num = check_number
        object.__setattr__(self, "lr", num("optim.lr", self.lr, minimum=0, strict_min=True))
        object.__setattr__(self, "weight_decay", num("optim.weight_decay", self.weight_decay, minimum=0))
        object.__setattr__(self, "eps", num("optim.eps", self.eps, minimum=0, strict_min=True))
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2:
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(num("optim.betas", b, minimum=0, maximum=1) for b in betas))
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        object.__setattr__(self, "min_lr_ratio", num("optim.min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1))
        clip = num("optim.grad_clip", self.grad_clip, minimum=0, strict_min=True, allow_none=True)
        object.__setattr__(self, "grad_clip", clip)
        decay = num("optim.ema_decay", self.ema_decay, minimum=0, maximum=1)
        if decay >= 1:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        object.__setattr__(self, "ema_decay", decay)
        check_int("optim.max_nonfinite_steps", self.max_nonfinite_steps, 1)


@dataclass(frozen=True)
class CheckSettings(_Settings):
    """The sample check against the validation maps (:mod:`lensflow.training.checks`).

    ``every``: epochs between in-training checks (0: none). ``n_samples``: maps drawn (and at most as many
    validation maps compared). ``smoothing_arcmin``: Gaussian σ before peaks and PDF (``None``: 2 pixels).
    ``n_bins``: peak and PDF bins. ``batch_size``: maps per sampling pass. ``final``: check the best
    checkpoint after training (``samples.h5``, ``summary.json``, plots), with validate's full default
    comparison and verdict too. ``kl_maps`` / ``kl_train_maps``: validation / training maps on which the KL
    gap against the exact likelihood is logged at every validation when the store has one (0: off).
    """

    node = "check"

    every: int = 1
    n_samples: int = 256
    temperature: float = 1.0
    smoothing_arcmin: float | None = None
    n_bins: int = 16
    batch_size: int = 64
    final: bool = True
    kl_maps: int = 1000
    kl_train_maps: int = 500

    def __post_init__(self) -> None:
        check_int("check.every", self.every, 0)
        check_int("check.kl_maps", self.kl_maps, 0)
        check_int("check.kl_train_maps", self.kl_train_maps, 0)
        check_int("check.n_samples", self.n_samples, 0)
        check_int("check.n_bins", self.n_bins, 2)
        check_int("check.batch_size", self.batch_size, 1)
        t = check_number("check.temperature", self.temperature, minimum=0, strict_min=True)
        object.__setattr__(self, "temperature", t)
        s = check_number("check.smoothing_arcmin", self.smoothing_arcmin, minimum=0, allow_none=True)
        object.__setattr__(self, "smoothing_arcmin", s)
        check_bool("check.final", self.final)

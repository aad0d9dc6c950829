"""Typed settings of a training run: the model (:class:`lensflow.model.ModelSettings`), the optimiser and the
sample check (library defaults).

Each dataclass holds the one default per knob; ``conf/model/glow.yaml``, ``conf/optim/adamw.yaml`` and ``check`` of
``conf/train.yaml`` take them as nodes (:mod:`lensflow.confstore`), and each field's comment is its documentation.
:meth:`from_config` takes a partial mapping (Python callers) or a composed config node, refuses unknown
keys and checks every value with one line naming ``NODE.KEY``; :meth:`to_dict` gives the plain dict a
checkpoint stores.
"""

from __future__ import annotations

from dataclasses import dataclass

from lensflow._util.checks import check_bool, check_int, check_number
from lensflow._util.settings import Settings
from lensflow.model import ModelSettings

__all__ = ["CheckSettings", "ModelSettings", "OptimSettings"]


@dataclass(frozen=True)
class OptimSettings(Settings):
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
    warmup_steps: int = 500  # linear ramp from 0 to lr
    min_lr_ratio: float = 0.02  # cosine floor as a fraction of lr; total length = trainer.max_steps
    grad_clip: float | None = 50.0  # max global gradient norm; null = no clipping
    # EMA of the weights (used for validation, sampling, generation); warmed up as min(ema_decay, (1 + t) / (10 +
    # t)) at step t
    ema_decay: float = 0.999
    max_nonfinite_steps: int = 20  # skipped steps (non-finite loss or gradient) in a row before the run stops

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
class CheckSettings(Settings):
    """The sample check against the validation maps (:mod:`lensflow.training.sample_check`).

    ``every``: epochs between in-training checks (0: none). ``n_samples``: maps drawn (and at most as many
    validation maps compared). ``smoothing_arcmin``: Gaussian σ before peaks and PDF (``None``: 2 pixels).
    ``n_bins``: peak and PDF bins. ``batch_size``: maps per sampling pass. ``final``: check the best
    checkpoint after training (``samples.h5``, ``summary.json``, plots), with validate's full default
    comparison and verdict too. ``kl_maps`` / ``kl_train_maps``: validation / training maps on which the KL
    gap against the exact likelihood is logged at every validation when the store has one (0: off).
    """

    node = "check"

    every: int = 1  # epochs between checks; 0 disables the in-training check
    n_samples: int = 256  # maps drawn per check (at most as many validation maps are compared)
    temperature: float = 1.0
    smoothing_arcmin: float | None = None  # Gaussian smoothing before peaks/PDF; null = 2 pixels
    n_bins: int = 16  # peak and PDF bins over validate's nu ranges (-2..6, -4..6; nu in validation-map sigmas)
    batch_size: int = 64  # maps per sampling pass
    # sample the best checkpoint after training (samples.h5, summary.json, plots); also runs validate's full
    # default comparison and verdict on those samples
    final: bool = True
    kl_maps: int = 1000  # validation maps scored for the KL gap vs the exact likelihood (stores of built-in flat sims)
    # training maps scored the same way (memorization: the train gap falls below the held-out one)
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

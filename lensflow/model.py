"""The trained emulator as a plain ``torch.nn.Module`` (:class:`KappaFlow`): draw κ maps, score them.

::

    from lensflow.model import KappaFlow
    flow = KappaFlow.load("runs/kappa/checkpoints/best.ckpt")      # a training checkpoint or an export
    maps = flow.sample(8, cond={"Omega_m": 0.3, "sigma_8": 0.8})     # [8, C, H, W] float32, κ
    logp = flow.log_prob(maps, cond={"Omega_m": 0.3, "sigma_8": 0.8})  # [8] nats per map
    flow.save("kappa.pt")                                              # weights + meta only (share this)

A :class:`KappaFlow` holds everything a trained emulator is: the Glow (its fixed preprocessing and Gaussian part
included) with its raw and EMA weights, the conditioning normalisation (training-split mean and std of θ, or of
log θ), the training box of θ, and the training store's :class:`~lensflow.mapstore.StoreMeta`. It needs neither
Lightning nor Hydra: :class:`lensflow.training.GlowModule` wraps it to train it, and generation, inference and
validation use it directly.

File formats (both read with ``torch.load(weights_only=True)``, see :mod:`lensflow.checkpoint`):

* a training checkpoint (Lightning): ``state_dict`` keys ``model.<name>`` (and before lensflow 0.2, ``<name>``,
  which :meth:`KappaFlow.from_checkpoint` maps), optimizer state, the run's counters;
* an export (:meth:`KappaFlow.save`): ``state_dict`` keys ``<name>``, ``hyper_parameters`` and the ``"lensflow"``
  entry with ``"format": "model"``; no optimizer state (about half the size).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lensflow._util.atomic import atomic_path
from lensflow._util.checks import check_bool, check_choice, check_int, check_number, check_optional_int
from lensflow._util.log import get_logger
from lensflow._util.plain import to_plain
from lensflow._util.settings import Settings
from lensflow.checkpoint import lensflow_entry, read_checkpoint, training_maps
from lensflow.conditioning import condition_rows, normalize_conditions
from lensflow.flows import Glow
from lensflow.flows.spline import MAX_BINS
from lensflow.mapstore import StoreMeta

__all__ = ["KappaFlow", "ModelSettings", "TrainingBox"]

log = get_logger(__name__)

#: The ``state_dict`` prefix of the model inside a training checkpoint (:class:`lensflow.training.GlowModule`).
PREFIX = "model."
#: Keys of a pre-0.2 training checkpoint that belong to the training loop, not to the model.
_LOOP_KEYS = ("ema_steps",)
#: Buffers added in lensflow 0.2: older checkpoints lack them (the training box is then read from the store).
_NEW_BUFFERS = ("cond_low", "cond_high")


@dataclass(frozen=True)
class ModelSettings(Settings):
    """The Glow (:class:`lensflow.flows.Glow`): sizes, padding, preprocessing and soft clamps.

    ``cond_dim`` (``None`` = the number of conditioning parameters of the data) only checks the size;
    ``padding="auto"`` is circular for periodic maps, zero otherwise. ``shift_method`` chooses the shifted
    log's shift (``"ml"``: maximum likelihood; ``"margin"``: 1σ below the training minimum);
    ``stationary`` puts the learned Fourier-space Gaussian layer in front of the multi-scale Glow, with a fitted
    dense block for its ``stationary_low_modes``² lowest modes; ``stationary_dense`` replaces it by the fitted exact
    Gaussian of a stationary field on the crop (maps up to 64²; for a conditional model its correlation function is a
    polynomial of degree ``stationary_degree`` in each normalised parameter, fitted on all training maps);
    ``shift_degree`` makes a conditional model's shifted log (its λ, mean and std) polynomials of that degree in θ
    (``None``: one for all θ). ``coupling`` picks the flow steps' coupling layer: ``"affine"``
    (:class:`~lensflow.flows.coupling.AffineCoupling`, log-scales soft-clamped by ``scale_bound``) or ``"spline"``
    (:class:`~lensflow.flows.spline.SplineCoupling`, ``spline_bins`` rational-quadratic bins on
    ``[-spline_tail_bound, spline_tail_bound]``, identity outside); checkpoints saved before the choice are affine.
    ``cond_log`` conditions on ``log θ`` instead of θ (both normalised to zero mean and
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
    cond_dim: int | None = None  # null = len(data.cond); set it to check the conditioning size explicitly
    padding: str = "auto"  # auto = circular for periodic stores, zero otherwise
    log_shift: bool = False  # shifted-log preprocessing of κ (Preprocess); the shift is fitted on training maps
    scale_bound: float = 2.0  # soft clamp of affine-coupling log-scales
    # affine: affine couplings (Glow) | spline: rational-quadratic spline couplings (Neural Spline Flows)
    coupling: str = "affine"
    spline_bins: int = 8  # spline couplings: bins of each spline (2-256)
    # spline couplings: act on [-b, b] of the ActNorm-normalised activations, identity outside
    spline_tail_bound: float = 5.0
    prior_bound: float = 5.0  # soft clamp of prior log-std
    # width of the split priors' networks, which also see each map's per-channel mean and std (0: a linear 3x3 conv)
    split_hidden: int = 0
    # couple the radii of the whitened latents of this many coarsest levels (a map's power on those scales moving
    # together, as on N-body maps; 0: independent levels)
    amplitude_levels: int = 0
    learn_top_prior: bool = True
    # ml: maximum-likelihood shift of a shifted-lognormal PDF | margin: 1 sigma below the minimum
    shift_method: str = "ml"
    # the ml shift times this (>= 1): a less lognormal Gaussian part, which modulates small scales less (N-body maps)
    shift_scale: float = 1.0
    stationary: bool = True  # learned isotropic Gaussian layer in Fourier space before the Glow (TRENF-style)
    stationary_knots: int = 24  # radial knots of its filter
    # side of the block of lowest modes it whitens with one dense matrix (crop boundaries)
    stationary_low_modes: int = 8
    stationary_dense: bool = False  # instead: the fitted exact Gaussian of a stationary field on the crop (<= 64^2)
    # conditional crop Gaussian: degree of its correlation function's polynomial in each parameter
    stationary_degree: int = 3
    # conditional models: degree in each parameter of the shifted log's λ, mean, std (null: one set)
    shift_degree: int | None = None
    cond_log: bool = False  # conditional models: condition on log θ (amplitudes are ~power laws of Omega_m, sigma_8)

    def __post_init__(self) -> None:
        check_choice("model.kind", self.kind, ("glow",))
        check_choice("model.shift_method", self.shift_method, ("ml", "margin"))
        scale = check_number("model.shift_scale", self.shift_scale, minimum=1)
        object.__setattr__(self, "shift_scale", scale)
        check_choice("model.coupling", self.coupling, ("affine", "spline"))
        check_int("model.spline_bins", self.spline_bins, 2, MAX_BINS)
        check_bool("model.stationary", self.stationary)
        check_int("model.stationary_knots", self.stationary_knots, 2)
        check_int("model.stationary_low_modes", self.stationary_low_modes, 0)
        check_bool("model.stationary_dense", self.stationary_dense)
        check_int("model.stationary_degree", self.stationary_degree, 0)
        check_optional_int("model.shift_degree", self.shift_degree, 0)
        check_bool("model.cond_log", self.cond_log)
        for name in ("levels", "steps", "hidden"):
            check_int(f"model.{name}", getattr(self, name), 1)
        check_int("model.split_hidden", self.split_hidden, 0)
        check_optional_int("model.cond_dim", self.cond_dim, 0)
        check_choice("model.padding", self.padding, ("auto", "zero", "circular"))
        check_bool("model.log_shift", self.log_shift)
        check_bool("model.learn_top_prior", self.learn_top_prior)
        check_int("model.amplitude_levels", self.amplitude_levels, 0)
        if self.amplitude_levels > self.levels:
            raise ValueError(
                f"model.amplitude_levels must be at most model.levels = {self.levels}, got {self.amplitude_levels}"
            )
        for name in ("scale_bound", "spline_tail_bound", "prior_bound"):
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
            "coupling": self.coupling,
            "spline_bins": self.spline_bins,
            "spline_tail_bound": self.spline_tail_bound,
            "prior_bound": self.prior_bound,
            "split_hidden": self.split_hidden,
            "amplitude_levels": self.amplitude_levels,
            "learn_top_prior": self.learn_top_prior,
            "log_shift": self.log_shift,
            "shift_method": self.shift_method,
            "shift_scale": self.shift_scale,
            "stationary": self.stationary,
            "stationary_knots": self.stationary_knots,
            "stationary_low_modes": self.stationary_low_modes,
            "stationary_dense": self.stationary_dense,
            "stationary_degree": self.stationary_degree,
            "shift_degree": self.shift_degree,
        }


@dataclass(frozen=True)
class TrainingBox:
    """The range of each conditioning parameter over the training split (physical units): where the emulator
    interpolates. ``low``/``high`` [P] in the order of ``names``."""

    names: tuple[str, ...]
    low: np.ndarray
    high: np.ndarray

    def as_dict(self) -> dict[str, tuple[float, float]]:
        """``{name: (low, high)}``, given to the 7 digits float32 ``/params`` carry (0.85, not 0.85000002)."""
        return {n: (_r7(lo), _r7(hi)) for n, lo, hi in zip(self.names, self.low, self.high, strict=True)}

    def check(self, rows: np.ndarray | None, allow_extrapolation: bool = False) -> None:
        """Refuse (one-line ``ValueError`` naming the parameter, value and box) conditions ``rows`` [n, P] outside
        the box, unless ``allow_extrapolation``. A relative tolerance of 1e-6 absorbs float32 round-off."""
        if rows is None or allow_extrapolation or rows.size == 0:
            return
        box = self.as_dict()
        for j, name in enumerate(self.names):
            lo, hi = box[name]
            tol = 1e-6 * max(1.0, abs(lo), abs(hi))
            col = np.asarray(rows)[:, j]
            bad = col[(col < lo - tol) | (col > hi + tol)]
            if bad.size:
                raise ValueError(
                    f"cond.{name}={float(bad[0]):g} is outside the emulator's training box [{lo:g}, {hi:g}]: it "
                    "would extrapolate; pass allow_extrapolation=true to sample there anyway"
                )


def _r7(v: float) -> float:
    return float(f"{float(v):.7g}")


class KappaFlow(nn.Module):
    """A Glow emulator of κ maps with its EMA weights, conditioning normalisation, training box and map metadata.

    Args:
        model: :class:`ModelSettings` or a (partial) mapping of its fields.
        meta: the training store's :class:`~lensflow.mapstore.StoreMeta` (or its ``to_dict()``).
        npix: map side in pixels.
        param_names: conditioning parameter names (empty: unconditional).
        seed: seed of the weight initialisation.
        store: path of the training store (provenance; the training box of pre-0.2 checkpoints is read from it).
        info: the ``"lensflow"`` entry of the file it came from (config, provenance), kept by :meth:`save`.

    Buffers: ``cond_mean``/``cond_std`` [P] (of θ, or of ln θ with ``model.cond_log``) and ``cond_low``/
    ``cond_high`` [P], the training box in physical units (``low > high`` until :meth:`fit_normalization`: no box
    known, nothing is refused).
    """

    def __init__(
        self,
        model: ModelSettings | Mapping[str, Any] | None = None,
        meta: StoreMeta | Mapping[str, Any] | None = None,
        npix: int | None = None,
        param_names: Sequence[str] = (),
        seed: int = 0,
        store: str | os.PathLike | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        meta, npix, store = training_maps({"meta": meta, "npix": npix, "store": None if store is None else str(store)})
        self.settings = ModelSettings.from_config(model)
        self.meta, self.npix, self.store = meta, int(npix), store
        self.param_names = tuple(str(p) for p in (param_names or ()))
        self.seed = int(seed)
        self.info = dict(info or {})
        glow_config = self.settings.glow_config(meta.channels, self.npix, len(self.param_names), meta.periodic)
        self.glow = Glow.from_config(glow_config, init_seed=self.seed)
        self.glow_ema = copy.deepcopy(self.glow)
        self.glow_ema.requires_grad_(False)
        p = len(self.param_names)
        self.register_buffer("cond_mean", torch.zeros(p, dtype=torch.float64))
        self.register_buffer("cond_std", torch.ones(p, dtype=torch.float64))
        self.register_buffer("cond_low", torch.ones(p, dtype=torch.float64))
        self.register_buffer("cond_high", -torch.ones(p, dtype=torch.float64))

    # -- description ------------------------------------------------------------------------------------
    @property
    def cond_log(self) -> bool:
        """Whether the network is conditioned on log θ (``model.cond_log``)."""
        return self.settings.cond_log

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one map."""
        return self.meta.channels, self.npix, self.npix

    @property
    def num_dims(self) -> int:
        """``C * H * W``."""
        return self.glow.num_dims

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.cond_mean.device

    @property
    def training_box(self) -> TrainingBox | None:
        """The training split's range of each parameter (``None``: unconditional, or not known)."""
        if not self.param_names or bool((self.cond_low > self.cond_high).any()):
            return None
        low, high = (t.detach().cpu().numpy().copy() for t in (self.cond_low, self.cond_high))
        return TrainingBox(self.param_names, low, high)

    def hyper_parameters(self) -> dict[str, Any]:
        """The constructor arguments as plain data (what a file stores to rebuild the model)."""
        return {
            "model": self.settings.to_dict(),
            "meta": self.meta.to_dict(),
            "npix": self.npix,
            "store": self.store,
            "param_names": list(self.param_names),
            "seed": self.seed,
        }

    # -- normalisation ----------------------------------------------------------------------------------
    def fit_normalization(
        self,
        maps: np.ndarray | Tensor,
        cond_mean: Sequence[float] | np.ndarray = (),
        cond_std: Sequence[float] | np.ndarray = (),
        params: np.ndarray | Tensor | None = None,
        box: tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray] | None = None,
    ) -> None:
        """Set the cond statistics [P] (of the physical values, or of their logs with ``model.cond_log``) and the
        training box ``(low, high)`` [P] (default: the range of ``params``), then fit the κ preprocessing (and the
        Gaussian part) on training maps [N, C, H, W] and their physical conditions ``params`` [N, P] (a conditional
        crop Gaussian fits ξ(θ) on them). The EMA weights get the same fixed parts."""
        p = len(self.param_names)
        mean = torch.as_tensor(np.asarray(cond_mean, dtype=np.float64).reshape(-1))
        std = torch.as_tensor(np.asarray(cond_std, dtype=np.float64).reshape(-1))
        if mean.numel() != p or std.numel() != p:
            raise ValueError(f"cond_mean/cond_std must have {p} entries")
        if not bool(torch.all(std > 0)):
            raise ValueError("cond_std must be positive")
        self.cond_mean.copy_(mean)
        self.cond_std.copy_(std)
        if box is None and p and params is not None:
            arr = np.asarray(params, dtype=np.float64).reshape(-1, p)
            box = (arr.min(axis=0), arr.max(axis=0))
        if box is not None:
            low, high = (torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(-1)) for b in box)
            if low.numel() != p or high.numel() != p or bool((low > high).any()):
                raise ValueError(f"box: want (low, high) with {p} entries each and low <= high")
            self.cond_low.copy_(low)
            self.cond_high.copy_(high)
        cond = None
        if self.param_names and params is not None:
            cond = normalize_conditions(
                torch.as_tensor(np.asarray(params)), self.cond_mean, self.cond_std, log=self.cond_log
            )
        self.glow.fit_preprocessing(maps, cond)
        self.glow_ema.preprocess.load_state_dict(self.glow.preprocess.state_dict())
        if self.glow.stationary is not None:
            self.glow_ema.stationary.load_state_dict(self.glow.stationary.state_dict())

    def condition_rows(self, cond: Any, n: int | None = None, allow_extrapolation: bool = True) -> np.ndarray | None:
        """Physical conditions float64 ``[n, P]`` of ``cond`` (see :mod:`lensflow.conditioning`), refused outside
        the training box unless ``allow_extrapolation`` (``None`` for an unconditional model)."""
        rows = condition_rows(cond, self.param_names, n)
        box = self.training_box
        if box is not None:
            box.check(rows, allow_extrapolation)
        return rows

    def normalize_cond(self, cond: Any, n: int | None = None) -> Tensor | None:
        """Physical conditioning values -> the normalised float32 ``[n, P]`` tensor the Glow takes.

        ``cond``: ``None`` (unconditional models), a tensor/array ``[n, P]`` or ``[P]`` in the order of
        :attr:`param_names`, or a dict ``{name: value or [n] values}`` (see :mod:`lensflow.conditioning`).
        """
        rows = condition_rows(cond, self.param_names, n)
        return normalize_conditions(rows, self.cond_mean, self.cond_std, log=self.cond_log)

    # -- drawing and scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: Tensor, cond: Tensor | None = None) -> None:
        """Data-dependent ActNorm initialisation of the raw weights on ``x`` (κ) and ``cond`` (normalised),
        then EMA := raw. Every rank must call this at the same time (ActNorm all-reduces its statistics)."""
        self.glow.initialize(x, cond)
        self.glow_ema.load_state_dict(self.glow.state_dict())

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: Any = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        ema: bool = True,
        batch_size: int | None = None,
        allow_extrapolation: bool = False,
    ) -> Tensor:
        """Draw ``n`` maps ``[n, C, H, W]`` in κ units (normalisation undone), EMA weights by default.

        Args:
            n: number of maps.
            cond: physical conditioning values (see :meth:`normalize_cond`); one row is broadcast to all maps.
            temperature: latent temperature (1 = the trained distribution).
            generator: torch generator of the latent noise (its device is used for the draw).
            noise: ``[n, C*H*W]`` standard-normal latents (order: :class:`lensflow.flows.Glow`), not drawn.
            ema: use the EMA weights (default) or the raw weights.
            batch_size: maps per pass (default all at once).
            allow_extrapolation: draw at conditions outside the training box (refused by default, in one line).
        """
        glow = self.glow_ema if ema else self.glow
        rows = self.condition_rows(cond, n, check_bool("allow_extrapolation", allow_extrapolation))
        c = normalize_conditions(rows, self.cond_mean, self.cond_std, log=self.cond_log)
        was_training = glow.training
        glow.eval()
        try:
            step = n if batch_size is None else max(1, min(batch_size, n))
            out = [
                glow.sample(
                    min(step, n - lo),
                    cond=None if c is None else c[lo : lo + step],
                    temperature=temperature,
                    generator=generator,
                    noise=None if noise is None else noise[lo : lo + step],
                )
                for lo in range(0, n, step)
            ]
            return out[0] if len(out) == 1 else torch.cat(out)
        finally:
            glow.train(was_training)

    def log_prob(self, x: Tensor, cond: Any = None, ema: bool = True) -> Tensor:
        """``log p(κ)`` in nats per map [B] of maps ``x`` [B, C, H, W] in κ units (EMA weights by default);
        ``cond`` in physical units.

        A map outside the model's support (with ``model.log_shift``, a pixel at or below the shifted log's
        floor ``-λ(θ)``) has density 0: its value is ``-inf``. Maps with NaN or Inf pixels raise ``ValueError``.
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.map_shape:
            got = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"maps must have shape [n, {', '.join(map(str, self.map_shape))}], got {got}")
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"maps: {len(bad)} map(s) have NaN or Inf pixels (first: map {bad[0]})")
        glow = self.glow_ema if ema else self.glow
        c = self.normalize_cond(cond, x.shape[0])
        lp = glow.log_prob(x, c)
        pre = glow.preprocess
        if pre.log_shift:  # the preprocessing clamps such pixels (training must not see NaN); the density is 0
            shift = pre.statistics(c)[0].to(x.device, torch.float64)[:, :, None, None]
            outside = ((x.to(torch.float64) + shift) <= 0).flatten(1).any(dim=1)
            lp = torch.where(outside, torch.full_like(lp, -torch.inf), lp)
        return lp

    # -- files ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the model alone (weights, normalisation, box, metadata; no optimizer state) atomically, for
        :meth:`load` or ``torch.load(path, weights_only=True)``. Returns the path."""
        info = {
            **lensflow_entry(
                config=self.info.get("config"),
                meta=self.meta,
                npix=self.npix,
                store=self.store,
                param_names=self.param_names,
                provenance=self.info.get("provenance") or {},
            ),
            "format": "model",
        }
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        obj = {"lensflow": to_plain(info), "hyper_parameters": self.hyper_parameters(), "state_dict": state}
        with atomic_path(path, overwrite=overwrite) as tmp:
            torch.save(obj, tmp)
        return Path(path)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> KappaFlow:
        """The model (eval mode, CPU) of a checkpoint dict read by :func:`lensflow.checkpoint.read_checkpoint`: a
        training checkpoint of any lensflow release, or an export (:meth:`save`). One-line ``ValueError`` naming
        ``source`` when it does not fit."""
        hp = dict(ckpt["hyper_parameters"])
        state = model_state(ckpt["state_dict"])
        try:
            flow = cls(
                model=hp.get("model"),
                meta=hp.get("meta"),
                npix=hp.get("npix"),
                param_names=hp.get("param_names") or (),
                seed=int(hp.get("seed", 0) or 0),
                store=hp.get("store"),
                info=ckpt.get("lensflow") if isinstance(ckpt.get("lensflow"), Mapping) else None,
            )
            old = [k for k in _NEW_BUFFERS if k not in state]
            for k in old:
                state[k] = getattr(flow, k).clone()
            flow.load_state_dict(state, strict=True)
        except (TypeError, RuntimeError, ValueError, KeyError) as e:
            raise ValueError(
                f"{source}: checkpoint does not match this lensflow's model "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        if old and flow.param_names:
            flow.box_from_store()
        return flow.eval()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> KappaFlow:
        """The model (eval mode) of a checkpoint or export file on ``device``; one-line ``ValueError`` naming the
        file if it is missing or not a lensflow model."""
        return cls.from_checkpoint(read_checkpoint(path, "cpu"), path).to(device)

    def box_from_store(self) -> None:
        """Set the training box from the training store's train split (checkpoints older than lensflow 0.2 do not
        hold it); leaves it unknown, with a warning, when the store is not readable here."""
        from lensflow.mapstore import open_store

        try:
            with open_store(str(self.store)) as st:
                names = list(st.meta.param_names)
                p = st.read_params(st.indices("train")).astype(np.float64)
            cols = [names.index(k) for k in self.param_names]
        except (OSError, ValueError, TypeError) as e:
            log.warning(
                "the training box of this emulator is unknown (checkpoint older than lensflow 0.2, training store "
                "%s not readable: %s): conditions outside it are not refused",
                self.store,
                str(e).splitlines()[0][:120] if str(e) else type(e).__name__,
            )
            return
        self.cond_low.copy_(torch.as_tensor(p[:, cols].min(axis=0)))
        self.cond_high.copy_(torch.as_tensor(p[:, cols].max(axis=0)))


def model_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The :class:`KappaFlow` entries of a ``state_dict``: ``model.*`` of a training checkpoint, or every entry but
    the loop's (``ema_steps``) of a pre-0.2 checkpoint or an export."""
    keys = list(state_dict)
    if any(k.startswith(PREFIX) for k in keys):
        return {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    return {k: v for k, v in state_dict.items() if k not in _LOOP_KEYS}

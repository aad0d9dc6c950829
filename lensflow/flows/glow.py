"""Multi-scale, optionally conditional Glow on κ maps (Kingma & Dhariwal 2018)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from ._common import acc_dtype, check_coupling, check_padding, check_positive_int, check_positive_number
from .amplitude import LatentAmplitude
from .crop_gaussian import CropGaussian
from .preprocess import Preprocess
from .spline import MAX_BINS
from .split import Split, TopPrior
from .squeeze import Squeeze
from .stationary import StationaryGaussian
from .step import FlowStep

_LOG_2PI = math.log(2.0 * math.pi)

#: The :attr:`Glow.config` keys that configure the :class:`Preprocess` (popped by :meth:`Glow.from_config`).
_PREPROCESS_KEYS = ("log_shift", "margin", "shift_method", "shift_degree", "shift_scale")


class Glow(nn.Module):
    """Glow normalising flow on ``[B, C, H, W]`` maps (κ units), with a fixed pixel-wise preprocessing.

    Architecture (data -> latent): ``Preprocess``, optionally a ``StationaryGaussian`` (a learned isotropic
    whitening filter in Fourier space, data-initialised to the training maps' power spectrum), then, for each of
    ``levels`` levels, ``Squeeze`` (2x2 ->
    4C), ``steps`` x ``FlowStep`` (ActNorm, LU 1x1 conv, affine or spline coupling) and, except at the last level,
    a ``Split`` that factors out half of the channels whitened by a Gaussian prior conditioned on the
    kept half (and on ``cond``). The last level's output is whitened by a learned ``TopPrior``. With
    ``amplitude_levels = k > 0``, a :class:`~lensflow.flows.amplitude.LatentAmplitude` then couples the radii of the
    ``k`` coarsest whitened latents (a map's power on those scales moving together).

    Latents: ``encode`` returns ``zs``, one tensor per level, finest first (the split-off halves of levels
    1..L-1, then the top). Each is whitened, i.e. i.i.d. standard normal under the model, so
    ``log_prob(x) = sum_i log N(zs_i; 0, I) + logdet`` where ``logdet = log|det d(zs)/dx|`` includes the
    preprocessing, and ``sample`` is ``decode(temperature * noise)``.

    Noise order (``sample(noise=...)``): a ``[n, num_dims]`` standard-normal tensor is cut, column-wise, into
    consecutive blocks of sizes ``prod(latent_shapes[i])`` in the order of ``zs`` (finest split first, top
    last), each reshaped row-major to ``[n, C_i, H_i, W_i]``. Row ``j`` only affects map ``j``.

    Args:
        in_channels: map channels (tomographic bins).
        image_size: map side in pixels; must be divisible by ``2**levels``.
        levels: number of scales (>= 1).
        steps: flow steps per level (>= 1).
        hidden: width of the coupling networks.
        cond_dim: size of the conditioning vector (0: unconditional). ``cond`` is a float ``[B, cond_dim]``
            tensor, already normalised by the caller.
        padding: ``"zero"`` or ``"circular"`` (periodic maps) for every 3x3 convolution.
        preprocess: the pixel-wise preprocessing; default an identity-initialised ``Preprocess(in_channels)``
            (call ``glow.preprocess.fit(train_maps)`` before training).
        scale_bound: affine-coupling log-scales are soft-clamped to ``(-scale_bound, scale_bound)``.
        coupling: ``"affine"`` (:class:`~lensflow.flows.coupling.AffineCoupling`, the default and every model
            saved before the choice existed) or ``"spline"`` (:class:`~lensflow.flows.spline.SplineCoupling`,
            a monotonic rational-quadratic spline per changed pixel: more expressive per step, more network
            outputs).
        spline_bins: bins of each spline (``coupling="spline"`` only).
        spline_tail_bound: splines act on ``[-spline_tail_bound, spline_tail_bound]`` (ActNorm-normalised units)
            and are the identity outside (``coupling="spline"`` only).
        prior_bound: prior log-standard-deviations are soft-clamped to ``(-prior_bound, prior_bound)``.
        split_hidden: width of the split priors' networks (:class:`~lensflow.flows.split.Split`; 0: a linear 3x3
            convolution of the kept half, as openai/glow and every model saved before the choice existed).
        amplitude_levels: end with a :class:`~lensflow.flows.amplitude.LatentAmplitude` over the radii of the
            whitened latents of the coarsest this many levels, the top included (at most ``levels``; 0: independent
            levels, as every model saved before the choice existed).
        learn_top_prior: learn a per-channel mean / log-std for the top latent (else standard normal, plus
            the ``cond`` term when conditional).
        init_seed: if given, parameters are initialised from this seed without touching torch's global RNG;
            otherwise from the global RNG (seed it yourself).
        stationary: put a :class:`~lensflow.flows.stationary.StationaryGaussian` layer after the preprocessing
            (Hartley basis for circular padding, i.e. periodic maps, DCT-II otherwise; conditioned like the rest).
        stationary_knots: radial knots of that layer's filter.
        stationary_low_modes: side of the block of lowest modes that layer whitens with one dense matrix (0: none).
        stationary_dense: use the fitted exact Gaussian of a stationary field on the crop instead
            (:class:`~lensflow.flows.crop_gaussian.CropGaussian`, at most 8,192 pixels × channels; conditional
            models fit its correlation function as a polynomial in the normalised parameters).
        stationary_degree: that polynomial's degree in each parameter.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        levels: int,
        steps: int,
        hidden: int,
        cond_dim: int = 0,
        padding: str = "zero",
        preprocess: Preprocess | None = None,
        *,
        scale_bound: float = 2.0,
        coupling: str = "affine",
        spline_bins: int = 8,
        spline_tail_bound: float = 5.0,
        prior_bound: float = 5.0,
        split_hidden: int = 0,
        amplitude_levels: int = 0,
        learn_top_prior: bool = True,
        init_seed: int | None = None,
        stationary: bool = False,
        stationary_knots: int = 24,
        stationary_low_modes: int = 0,
        stationary_dense: bool = False,
        stationary_degree: int = 3,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("image_size", image_size)
        check_positive_int("levels", levels)
        check_positive_int("steps", steps)
        check_positive_int("hidden", hidden)
        check_positive_int("cond_dim", cond_dim, minimum=0)
        check_padding(padding)
        if image_size % (2**levels):
            raise ValueError(f"image_size={image_size} must be divisible by 2**levels = {2**levels}")
        if not scale_bound > 0:
            raise ValueError(f"scale_bound must be > 0, got {scale_bound!r}")
        check_coupling(coupling)
        check_positive_int("spline_bins", spline_bins, minimum=2)
        if spline_bins > MAX_BINS:
            raise ValueError(f"spline_bins must be an integer in [2, {MAX_BINS}], got {spline_bins!r}")
        check_positive_number("spline_tail_bound", spline_tail_bound)
        if not prior_bound > 0:
            raise ValueError(f"prior_bound must be > 0, got {prior_bound!r}")
        check_positive_int("split_hidden", split_hidden, minimum=0)
        if check_positive_int("amplitude_levels", amplitude_levels, minimum=0) > levels:
            raise ValueError(f"amplitude_levels must be at most levels = {levels}, got {amplitude_levels}")
        if preprocess is None:
            preprocess = Preprocess(in_channels)
        elif not isinstance(preprocess, Preprocess):
            raise ValueError(f"preprocess must be a Preprocess or None, got {type(preprocess).__name__}")
        elif preprocess.channels != in_channels:
            raise ValueError(f"preprocess has {preprocess.channels} channels but in_channels={in_channels}")
        elif preprocess.conditional and preprocess.cond_dim != cond_dim:
            raise ValueError(f"preprocess has cond_dim={preprocess.cond_dim} but cond_dim={cond_dim}")
        if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int)):
            raise ValueError(f"init_seed must be an int or None, got {init_seed!r}")

        self.in_channels = in_channels
        self.image_size = image_size
        self.num_levels = levels
        self.steps_per_level = steps
        self.hidden = hidden
        self.cond_dim = cond_dim
        self.padding = padding
        self.scale_bound = float(scale_bound)
        self.coupling = coupling
        self.spline_bins = int(spline_bins)
        self.spline_tail_bound = float(spline_tail_bound)
        self.prior_bound = float(prior_bound)
        self.split_hidden = int(split_hidden)
        self.amplitude_levels = int(amplitude_levels)
        self.learn_top_prior = bool(learn_top_prior)
        self.stationary_knots = int(stationary_knots)
        self.stationary_low_modes = int(stationary_low_modes)
        self.stationary_degree = check_positive_int("stationary_degree", stationary_degree, minimum=0)
        self.preprocess = preprocess
        self.squeeze = Squeeze()

        self.stationary_dense = bool(stationary and stationary_dense)
        self.stationary: StationaryGaussian | CropGaussian | None = (
            CropGaussian(in_channels, image_size, cond_dim, self.stationary_degree)
            if self.stationary_dense
            else StationaryGaussian(
                in_channels,
                image_size,
                padding == "circular",
                self.stationary_knots,
                cond_dim,
                self.stationary_low_modes,
            )
            if stationary
            else None
        )
        if init_seed is None:
            self._build()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                self._build()

    def _build(self) -> None:
        c, s = self.in_channels, self.image_size
        flows, splits, shapes = [], [], []
        for i in range(self.num_levels):
            c, s = 4 * c, s // 2
            flows.append(
                nn.ModuleList(
                    FlowStep(
                        c,
                        self.hidden,
                        self.cond_dim,
                        self.padding,
                        self.scale_bound,
                        coupling=self.coupling,
                        spline_bins=self.spline_bins,
                        spline_tail_bound=self.spline_tail_bound,
                    )
                    for _ in range(self.steps_per_level)
                )
            )
            if i < self.num_levels - 1:
                split = Split(c, self.cond_dim, self.padding, self.prior_bound, self.split_hidden)
                splits.append(split)
                shapes.append((split.n_out, s, s))
                c = split.n_keep
        shapes.append((c, s, s))
        self.flows = nn.ModuleList(flows)
        self.splits = nn.ModuleList(splits)
        self.top_prior = TopPrior(c, self.cond_dim, self.learn_top_prior, self.prior_bound)
        self._latent_shapes = tuple(shapes)
        k = self.amplitude_levels
        self.amplitude = LatentAmplitude([a * b * d for a, b, d in shapes[-k:]], self.cond_dim) if k else None

    # -- description --------------------------------------------------------------------------------------
    @property
    def num_dims(self) -> int:
        """``C * H * W``, the dimension of a map (and of the concatenated latents)."""
        return self.in_channels * self.image_size**2

    @property
    def latent_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """``(C, H, W)`` of each latent in ``zs`` order (finest split first, top last)."""
        return self._latent_shapes

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain types) to rebuild this model; weights and statistics come from
        ``state_dict``."""
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "levels": self.num_levels,
            "steps": self.steps_per_level,
            "hidden": self.hidden,
            "cond_dim": self.cond_dim,
            "padding": self.padding,
            "scale_bound": self.scale_bound,
            "coupling": self.coupling,
            "spline_bins": self.spline_bins,
            "spline_tail_bound": self.spline_tail_bound,
            "prior_bound": self.prior_bound,
            "split_hidden": self.split_hidden,
            "amplitude_levels": self.amplitude_levels,
            "learn_top_prior": self.learn_top_prior,
            "stationary": self.stationary is not None,
            "stationary_knots": self.stationary_knots,
            "stationary_low_modes": self.stationary_low_modes,
            "stationary_dense": self.stationary_dense,
            "stationary_degree": self.stationary_degree,
            "log_shift": self.preprocess.log_shift,
            "margin": self.preprocess.margin,
            "shift_method": self.preprocess.shift_method,
            "shift_degree": self.preprocess.cond_degree,
            "shift_scale": self.preprocess.shift_scale,
        }

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The keys of :attr:`config`, which :meth:`from_config` takes: the constructor's arguments and the
        preprocessing's (for callers that build a Glow from a larger settings mapping)."""
        own = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "preprocess", "init_seed")]
        return (*own, *_PREPROCESS_KEYS)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, init_seed: int | None = None) -> Glow:
        """Inverse of :attr:`config` (then ``load_state_dict`` for weights and statistics); ``init_seed`` as
        in the constructor. ``log_shift``, ``margin``, ``shift_method``, ``shift_scale`` and ``shift_degree`` (the
        degree of a conditional model's θ-dependent preprocessing; ``None``: one for all θ) configure the
        :class:`Preprocess`; a config saved before ``shift_scale`` existed has 1.
        A config saved before ``coupling`` existed lacks it and the spline keys: an affine model, as it was."""
        cfg = dict(config)
        pre = Preprocess(
            cfg["in_channels"],
            log_shift=cfg.pop("log_shift", False),
            margin=cfg.pop("margin", 1.0),
            shift_method=cfg.pop("shift_method", "margin"),
            cond_dim=cfg.get("cond_dim", 0),
            cond_degree=cfg.pop("shift_degree", None),
            shift_scale=cfg.pop("shift_scale", 1.0),
        )
        return cls(preprocess=pre, init_seed=init_seed, **cfg)

    @torch.no_grad()
    def fit_preprocessing(self, maps: Tensor | Any, cond: Tensor | None = None, chunk: int = 256) -> None:
        """Fit the fixed parts in front of the flow on training maps [N, C, H, W] (κ): the preprocessing statistics,
        then the stationary layer's whitening (its data-dependent initialisation, on all of these maps rather than
        one batch: a dense correlation or low-mode block needs many maps). ``cond`` [N, P] (normalised) are the
        maps' conditions; a conditional preprocessing and the conditional crop Gaussian need them, the stationary filter
        ignores them here."""
        x = torch.as_tensor(maps)
        if cond is not None:
            cond = self._check_cond(torch.as_tensor(cond), x.shape[0]).to(torch.float64)
        crop = isinstance(self.stationary, CropGaussian) and self.cond_dim > 0
        if cond is None and (crop or self.preprocess.conditional):
            what = "crop Gaussian" if crop else "preprocessing"
            raise ValueError(f"cond: a conditional {what} is fitted on maps and their conditions [N, P]")
        self.preprocess.fit(x, cond if self.preprocess.conditional else None, chunk=chunk)
        if self.stationary is None:
            return
        dev = self.preprocess.mean.device
        parts = [
            self.preprocess(x[i : i + chunk].to(dev, torch.float64), None if cond is None else cond[i : i + chunk])[0]
            for i in range(0, x.shape[0], chunk)
        ]
        if crop:
            self.stationary.initialize(torch.cat(parts), cond)
        else:
            self.stationary.initialize(torch.cat(parts))

    # -- checks -------------------------------------------------------------------------------------------
    def _check_x(self, x: Tensor) -> None:
        want = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _check_cond(self, cond: Tensor | None, batch: int) -> Tensor | None:
        if self.cond_dim == 0:
            if cond is not None:
                raise ValueError("cond: this Glow has cond_dim=0 but a cond tensor was given")
            return None
        if cond is None:
            raise ValueError(f"cond: this Glow has cond_dim={self.cond_dim}, pass cond of shape [B, {self.cond_dim}]")
        if cond.dim() == 1:
            cond = cond.unsqueeze(0)
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim or cond.shape[0] not in (1, batch):
            raise ValueError(f"cond must have shape [{batch}, {self.cond_dim}], got {tuple(cond.shape)}")
        if not cond.is_floating_point():
            raise ValueError(f"cond must be a floating-point tensor, got dtype {cond.dtype}")
        return cond.expand(batch, -1).to(self._param_dtype())

    # -- data -> latent -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Encode ``x`` (κ units). Returns ``(zs, logdet[B])``, ``logdet = log|det d(zs)/dx|`` in nats."""
        self._check_x(x)
        cond = self._check_cond(cond, x.shape[0])
        h, logdet = self.preprocess(x, cond)
        if self.stationary is not None:
            h, ld = self.stationary(h, cond)
            logdet = logdet + ld
        zs: list[Tensor] = []
        for i, level in enumerate(self.flows):
            h, _ = self.squeeze(h)
            for step in level:
                h, ld = step(h, cond)
                logdet = logdet + ld
            if i < self.num_levels - 1:
                h, z, ld = self.splits[i](h, cond)
                zs.append(z)
                logdet = logdet + ld
        z, ld = self.top_prior(h, cond)
        zs.append(z)
        logdet = logdet + ld
        if self.amplitude is not None:
            k = self.amplitude_levels
            coarse, ld = self.amplitude(zs[-k:], cond)
            zs = zs[:-k] + coarse
            logdet = logdet + ld
        return zs, logdet

    def encode(self, x: Tensor, cond: Tensor | None = None) -> list[Tensor]:
        """Whitened latents of ``x``, finest split first (see class docstring)."""
        return self.forward(x, cond)[0]

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``log p(x)`` in nats per map [B]: the continuous density of ``x`` in κ units."""
        zs, logdet = self.forward(x, cond)
        lp = logdet
        for z in zs:
            z = z.to(acc_dtype(z))
            lp = lp - 0.5 * (z * z).sum(dim=(1, 2, 3)) - 0.5 * _LOG_2PI * z[0].numel()
        return lp

    def bits_per_dim(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``-log2 p(x) / num_dims`` [B] for the continuous density of ``x`` in κ units (can be negative)."""
        return -self.log_prob(x, cond) / (self.num_dims * math.log(2.0))

    @torch.no_grad()
    def initialize(self, x: Tensor, cond: Tensor | None = None) -> None:
        """Run the data-dependent ActNorm initialisation on a batch (a no-op once initialised)."""
        self.forward(x, cond)

    # -- latent -> data -----------------------------------------------------------------------------------
    def decode(self, zs: list[Tensor] | tuple[Tensor, ...], cond: Tensor | None = None) -> Tensor:
        """Inverse of :meth:`encode`: whitened latents -> maps in κ units."""
        if not isinstance(zs, (list, tuple)) or len(zs) != len(self._latent_shapes):
            raise ValueError(f"zs must be a list of {len(self._latent_shapes)} tensors (one per level)")
        batch = zs[0].shape[0]
        for i, (z, shape) in enumerate(zip(zs, self._latent_shapes, strict=True)):
            if z.dim() != 4 or tuple(z.shape[1:]) != shape or z.shape[0] != batch:
                raise ValueError(
                    f"zs[{i}] must have shape [{batch}, {shape[0]}, {shape[1]}, {shape[2]}], got {tuple(z.shape)}"
                )
        cond = self._check_cond(cond, batch)
        if self.amplitude is not None:
            k = self.amplitude_levels
            zs = [*zs[:-k], *self.amplitude.inverse(zs[-k:], cond)]
        h = self.top_prior.inverse(zs[-1], cond)
        for i in range(self.num_levels - 1, -1, -1):
            if i < self.num_levels - 1:
                h = self.splits[i].inverse(h, zs[i], cond)
            for step in reversed(self.flows[i]):
                h = step.inverse(h, cond)
            h = self.squeeze.inverse(h)
        if self.stationary is not None:
            h = self.stationary.inverse(h, cond)
        return self.preprocess.inverse(h, cond)

    def split_noise(self, noise: Tensor) -> list[Tensor]:
        """Cut a ``[n, num_dims]`` tensor into per-level latents in the documented noise order."""
        if noise.dim() != 2 or noise.shape[1] != self.num_dims:
            raise ValueError(f"noise must have shape [n, {self.num_dims}], got {tuple(noise.shape)}")
        out, off = [], 0
        for c, h, w in self._latent_shapes:
            d = c * h * w
            out.append(noise[:, off : off + d].reshape(noise.shape[0], c, h, w))
            off += d
        return out

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Draw ``n`` maps [n, C, H, W] in κ units (no autograd; use ``decode`` to differentiate).

        ``temperature`` scales the whitened latents at every level (the prior standard deviations).
        ``noise`` ([n, num_dims], standard normal, see the class docstring for its order) replaces the
        internal draw, so map ``j`` depends only on ``noise[j]``; otherwise noise is drawn with
        ``generator`` (on its own device, then moved).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        p = next(self.parameters())
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        if noise is None:
            gdev = generator.device if generator is not None else p.device
            noise = torch.randn(n, self.num_dims, generator=generator, device=gdev, dtype=dtype)
        elif noise.shape[0] != n:
            raise ValueError(f"noise must have shape [{n}, {self.num_dims}], got {tuple(noise.shape)}")
        noise = noise.to(p.device, dtype)
        zs = self.split_noise(noise)
        if temperature != 1.0:
            zs = [temperature * z for z in zs]
        return self.decode(zs, cond)

    def clear_cache(self) -> None:
        """Drop cached inverse 1x1-conv weights (needed only after writing weights through ``.data``)."""
        for m in self.modules():
            if hasattr(m, "clear_cache") and m is not self:
                m.clear_cache()

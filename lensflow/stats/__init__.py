"""Summary statistics of weak-lensing convergence (κ) maps, batched in torch on CPU and GPU.

Every function takes one map [H, W], a batch [B, H, W] or a channelled batch [B, C, H, W] (results per
map and channel) of square maps, numpy or torch: numpy in gives float64 numpy out, a tensor in gives a
tensor out on the same device (float32/float64 as given).  Computation is vectorised over the batch
(in chunks that bound memory), in float64 on CPU and float32 on GPUs unless the input is float64.
NaN/Inf, non-square maps, non-increasing edges and non-positive pixel scales raise ValueError naming
the argument.

Conventions
-----------
* Units: pixel scales and smoothing σ in arcmin; κ dimensionless; C_ℓ in steradians (κ² sr).
* Power spectrum (LensTools normalization): C_ℓ = A_pix² |FFT(κ)|² / A with A_pix the pixel area and
  A the map area in sr, averaged over all modes of the full Fourier plane with ℓ in (ℓ_lo, ℓ_hi]
  (modes within 1e-9 relative of an edge count as on it).  ℓ of a mode is 2π|k| with k from
  ``fftfreq(npix, d=pixel in radians)``.  The returned ℓ is the mode-weighted mean of each bin.  No
  apodization, mean subtraction or pixel-window deconvolution.  ``default_ell_edges``: log-spaced from
  2ℓ_min = 2·2π/L to ℓ_Nyquist = π/pixel; edges that would leave a bin without lattice modes are
  dropped, and ``power_spectrum`` rejects empty bins.
* Smoothing: Gaussian of standard deviation σ (not FWHM), sampled and truncated at 4σ with unit sum
  (the weights of ``scipy.ndimage.gaussian_filter``), applied as separable sums (narrow kernels)
  or by FFT (wide ones).  Boundary: zero outside the map
  (``periodic=False``) or periodic.
* Shape noise: white, σ_pix = σ_e / sqrt(n_gal A_pix), σ_e per ellipticity component, n_gal per
  arcmin²; after smoothing σ_noise = σ_e / sqrt(4π σ_s² n_gal) (``smoothed_noise_sigma``), the usual
  normalization of ν = κ / σ_noise.
* Peaks/minima: pixels strictly above/below all 8 neighbours (plateaus never count), reported as raw
  counts per map, binned by height in map units (pass ν edges × σ_noise for S/N bins).
* Borders: without ``periodic`` the outer pixel ring holds no peak, minimum or Minkowski stencil;
  ``border`` (pixels) or ``SummaryConfig.border_arcmin`` widens the excluded ring, e.g. to drop the
  band darkened by zero-padded smoothing.  With ``periodic`` neighbours wrap around.
* Histograms (peaks, minima, PDF) follow ``numpy.histogram``: [lo, hi), last bin closed, values
  outside the edges dropped.  The PDF is a density: count / (N_pixels · width) with N_pixels all pixels
  used, so it integrates to the fraction of pixels inside the edges.
* Minkowski functionals: thresholds are bin edges and each value belongs to the bin midpoint ν_b.
  V0 = fraction of pixels with κ >= ν_b; V1 = (1/4A) ∫ δ(κ-ν)|∇κ| dA (per arcmin) and
  V2 = (1/2πA) ∫ δ(κ-ν)(2κxκyκxy - κx²κyy - κy²κxx)/(κx²+κy²) dA (per arcmin²), with δ the indicator of
  t_b <= κ < t_{b+1} over the bin width (Kratochvil et al. 2012, as LensTools) and derivatives from
  second-order central differences; A is the area of the pixels used.
* Moments: mean, variance, skewness, excess kurtosis (population estimators, like scipy.stats).
* ``summarize``: one config (``SummaryConfig``) for every set compared; noise is drawn per map before
  smoothing; bins in ν = κ/σ with σ the smoothed noise σ or a reference σ per scale fixed by
  ``with_reference_sigma``, so simulations and mocks share absolute κ edges.  Every value is
  [B, nfeatures]; ``summary_bins`` gives the x values and ``kappa_edges`` the κ edges.
"""

from .minkowski import minkowski
from .noise import pixel_noise_sigma, shape_noise, smoothed_noise_sigma
from .pdf import moments, pixel_pdf
from .peaks import minima_counts, peak_counts
from .smoothing import gaussian_weights, smooth
from .spectra import ARCMIN, default_ell_edges, ell_modes, power_spectrum
from .summary import (
    STATISTICS,
    SummaryConfig,
    kappa_edges,
    summarize,
    summary_bins,
    with_reference_sigma,
)

__all__ = [
    "ARCMIN",
    "STATISTICS",
    "SummaryConfig",
    "default_ell_edges",
    "ell_modes",
    "gaussian_weights",
    "kappa_edges",
    "minima_counts",
    "minkowski",
    "moments",
    "peak_counts",
    "pixel_noise_sigma",
    "pixel_pdf",
    "power_spectrum",
    "shape_noise",
    "smooth",
    "smoothed_noise_sigma",
    "summarize",
    "summary_bins",
    "with_reference_sigma",
]

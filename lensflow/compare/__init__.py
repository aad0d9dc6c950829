"""Compare the statistics of two sets of κ maps (a reference, e.g. held-out simulations, and a candidate,
e.g. emulator mocks), bin by bin, and decide whether they agree.

Everything here works on plain arrays: a statistic is an array ``[N, ...]`` with one row per map (as
returned by :func:`lensflow.stats.summarize`); the trailing axes are flattened into ``F`` bins.

Metrics per statistic and bin
-----------------------------
- ``frac_error_mean`` = (μ_c − μ_r)/|μ_r|, the fractional error of the mean;
- ``std_ratio`` = σ_c/σ_r (sample standard deviations, ddof = 1);
- ``z_mean`` = (μ_c − μ_r)/SE with SE = sqrt(σ_r²/N_r + σ_c²/N_c), the mean difference in units of its
  standard error;
- ``chi2``: χ² of the mean difference d against the reference covariance S_r scaled to the covariance
  of a difference of two means, S_r (1/N_r + 1/N_c), with the Hartlap et al. (2007) factor
  h = (N_r − p − 2)/(N_r − 1) on the inverse: χ² = h dᵀ S_r⁻¹ d / (1/N_r + 1/N_c), p-value from χ²_p.
  Because the mean difference is independent of S_r for Gaussian data, T² = χ²/h is exactly Hotelling's
  T², and ``pvalue_hotelling`` from F(p, N_r − p) is the finite-sample-exact p-value (Sellentin & Heavens
  2016 give the same conclusion: the Hartlap χ² tail is too light when p/N_r is not small).
  Bins without reference variance are left out, and the inverse is taken in the eigenbasis of the
  reference correlation matrix, dropping numerically null modes (relative eigenvalue < ``1e-10``, e.g.
  the normalisation constraint of a PDF), so p is the rank actually used. When p ≥ N_r − 2 the
  Hartlap factor is ≤ 0 and the χ² is reported as not computable (``chi2 = None`` with a ``note``);
  ``chi2_diag`` = Σ z_mean² is always given (no p-value: bins are correlated).
- ``corr``: the error of the correlation matrix, max and rms over the off-diagonal elements of
  R_c − R_r, beside the finite-sample noise floor: the rms that two independent draws of the *same*
  distribution would show. The floor is computed from the delta-method (influence-function) variance of
  sample correlation coefficients, which is exact asymptotically for any distribution with finite
  fourth moments and reduces to (1 − ρ²)²/N for Gaussian data; it is evaluated through an N×N Gram
  matrix, so it costs O(N²F + NF²) and never forms the F² pair space.
- ``skewness`` / ``kurtosis``: per-bin sample skewness G1 and excess kurtosis G2 of each set's
  distribution of the statistic, and their t-statistic (difference over its standard error, the SE from
  the influence function of each estimator; 6/N and 24/N for Gaussian data, larger for heavy tails).

Verdict and why the tolerances look the way they do
--------------------------------------------------------------------
The defaults (:class:`Tolerances`) follow the issue: mean within max(2 %, 3 standard errors), standard
deviation within 5 %, correlation rms error ≤ 0.05. Read literally, the last two would fail two
independent draws of the same distribution at the sample sizes a validation uses: with N = 300 maps per
set the standard error of a ratio of standard deviations is ≈ sqrt(1/(2N) · 2) ≈ 6 % for Gaussian
statistics, and the rms of off-diagonal correlation differences is ≈ sqrt(2/N) ≈ 8 %. So each tolerance
is a *floor on the accepted error*, widened by the sampling noise of the comparison:

- mean, per bin: |μ_c − μ_r| ≤ max(``mean_rtol``·|μ_r|, z_F·SE), z_F the multiple-testing threshold below;
- std, per bin: |σ_c/σ_r − 1| ≤ ``std_rtol`` or the spreads are not significantly different,
  |z_BF| ≤ z_F, with z_BF the Brown–Forsythe statistic (Welch z of the mean absolute deviation from the
  median). The delta-method error of ln(σ_c/σ_r), SE_ln² = Σ_sets (β₂ − 1)/(4N), is reported too, but
  it does not decide: per-map statistics of κ maps are often sparse and heavy-tailed (rare high peaks,
  PDF tails), where the sample kurtosis underestimates the tails and a bin in which one set has a single
  non-zero value gives a ratio of 0 or ∞. On 30 pairs of independent lognormal simulation sets (250
  maps of 64² per set, 15 statistics, default thresholds) the ln-ratio rule failed the std criterion in
  4 pairs, the Brown–Forsythe rule in none;
- correlation: rms² ≤ ``corr_rms``² + q, where q is the (1 − α) quantile of the noise-only rms², from
  a Satterthwaite (scaled χ²) fit to the first two moments of the quadratic form (α from
  ``corr_sigma``, one-sided: 3 → 0.13 %, shared over the statistics of the family).

Multiple testing: the verdict fails if *any* bin fails, so a per-bin 3σ threshold fails a 40-bin
statistic from noise alone with probability ≈ 10 %, and a report of 15 statistics × ~18 bins most of the
time. ``multiple_testing="sidak"`` (default) raises the per-bin threshold to z_F with
1 − (1 − α_F)^F = α₁, α₁ = 2Φ(−``mean_sigma``) = 0.27 %, F the number of bins in the family, so the
family keeps the false-alarm rate of a single 3σ test per criterion. ``family="report"`` (default) makes
the family every bin of every statistic compared together (z_F ≈ 4.6 for 270 bins): the exit code of a
validation is one decision, and it should fail two independent draws of one distribution ~0.3 % of the
time per criterion, not ~10 %. Measured on the 30 simulation pairs above: 0 of 30 fail with
``family="report"``, 3 of 30 with ``family="statistic"`` (per-statistic thresholds, z_F ≈ 3.8 for 20
bins: more sensitive to a problem confined to one statistic). The cost of the wider threshold is small
where it matters: wherever 2 % exceeds z_F·SE, the 2 % floor decides. ``"bonferroni"`` is slightly more
conservative than Šidák, ``"none"`` is the literal per-bin 3σ. Bins without variance in either set (e.g.
empty peak bins at high ν) do not count towards F and pass only if their means agree.

χ² and skewness/kurtosis t-statistics are always reported; they gate the verdict only when
``chi2_pvalue`` / ``moments_sigma`` are set, because with many maps they detect differences far below
the 2 % the mean tolerance deliberately accepts.

Calibration by permutation (the default since issue 14)
-------------------------------------------------------
The Šidák thresholds above assume near-Gaussian, independent bins and were calibrated on equal, large sets.
With a small reference (40 maps against 400) sparse tail bins broke that: a bin where the reference has no
counts gets a Welch SE from the candidate alone, and 5 of 16 pairs of one distribution failed. With
``permutations`` set (default 1,000), the mean and spread criteria instead use the pooled-scale z of every
bin (finite wherever either set varies) and a family-wise threshold z* = the (1 − α) quantile of max |z| over
the report under random relabelling of the pooled maps, which is exact under the null for any sizes, tails or
correlations (:mod:`lensflow.compare.permutation`); the spread criterion runs on absolute deviations from the
pooled median. Two report-level gates test the joint summary vector: its correlation matrix against the noise
floor (one more member of the correlation family), and the energy-distance omnibus test with a permutation
p-value (``omnibus_sigma``, :mod:`lensflow.compare.omnibus`), which catches differences no single bin shows.
The measured false-alarm rates and power are in docs/validation.md (``python -m lensflow.bench validate``).

Memorisation (pixel level)
--------------------------
:func:`memorization_check` compares nearest-neighbour L2 distances of candidate maps to the training
maps with those of held-out reference maps to the same training maps. Independent maps sit at a
well-defined typical distance from the training set; a copied (or nearly copied) training map sits
near zero. It fails when more than ``max_near_fraction`` of the candidates lie closer than
``near_factor`` × median(held-out distance), or when candidates are significantly (one-sided
Mann–Whitney, p < ``pvalue``) *and* substantially (median ratio < ``median_ratio``) closer than held-out
maps are.

Layout
------
``tolerances`` (:class:`Tolerances`, :class:`MemorizationTolerances`, :func:`per_bin_sigma`), ``metrics``
(the two-sample metrics above), ``verdict`` (:func:`compare_statistic`, one helper per criterion;
:func:`summary_rows`), ``joint`` (:func:`compare`: the report-level decision), ``permutation`` (the
calibrated family thresholds), ``omnibus`` (the energy-distance test) and ``memorization``. Everything public
is re-exported here, so ``from lensflow.compare import compare`` and ``import lensflow.compare as cmp`` work as
before.
"""

from __future__ import annotations

from lensflow.compare.joint import compare
from lensflow.compare.memorization import memorization_check, nearest_neighbour_distances
from lensflow.compare.metrics import (
    Moments,
    brown_forsythe_z,
    correlation_error,
    hartlap_chi2,
    moment_tstats,
)
from lensflow.compare.tolerances import MemorizationTolerances, Tolerances, per_bin_sigma
from lensflow.compare.verdict import CRITERIA, compare_statistic, standardized_deviations, summary_rows

__all__ = [
    "CRITERIA",
    "MemorizationTolerances",
    "Moments",
    "Tolerances",
    "brown_forsythe_z",
    "compare",
    "compare_statistic",
    "correlation_error",
    "hartlap_chi2",
    "memorization_check",
    "moment_tstats",
    "nearest_neighbour_distances",
    "per_bin_sigma",
    "standardized_deviations",
    "summary_rows",
]

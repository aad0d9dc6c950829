"""Fused CPU kernels behind :func:`lensflow.stats.summarize` (numba).

The torch implementation of every statistic makes one pass over memory per elementary operation (about
60–80 float64 passes per pixel and smoothing scale).  On CPU that, not arithmetic, bounds the speed.
These kernels do the same arithmetic in one pass per map while the map sits in cache: smoothing,
peaks, minima, PDF, Minkowski tables and moments for one smoothing scale; C_ℓ binning of a transform.

They are serial and release the GIL (``nogil``); :mod:`lensflow.stats.summary` runs them on blocks of
maps from a pool of threads, so the numpy noise draws and FFTs of the same blocks run in parallel too.
The torch path stays the reference: tests require both to agree to round-off, and it serves GPUs.
Definitions (bins, regions, finite differences) are documented on the torch functions.

About 500 lines and one very long kernel (:func:`scale_stats`) on purpose: numba compiles each kernel into one
loop nest, and splitting it would lose the single pass over memory that is the reason for this module.
"""

from __future__ import annotations

import math

import numpy as np

try:  # numba is a dependency, but a broken llvmlite must not take the whole package down
    from numba import njit

    AVAILABLE = True
except Exception:  # pragma: no cover - exercised only without numba
    AVAILABLE = False

    def njit(*args, **kwargs):  # type: ignore[no-redef]
        def wrap(f):
            return f

        return wrap


# bin specification: [uniform (0/1), e0, 1/width, near] next to the edges array (see stats._array.Bins)


def bin_spec(uniform: bool, e0: float, inv: float, near: float) -> np.ndarray:
    return np.array([1.0 if uniform else 0.0, e0, inv, near])


@njit(cache=True, nogil=True, inline="always")
def _slot(v, e, uniform, e0, inv, near, close_last):
    """Slot of v in a table of nbins + 2 slots: 0 below, b + 1 for bin b, nbins + 1 above.

    Same rule as ``Bins.index``: arithmetic on uniform edges, exact comparison near an edge.
    """
    nb = e.size - 1
    if uniform:
        t = (v - e0) * inv
        f = math.floor(t)
        if abs(t - f - 0.5) <= 0.5 - near:
            if f < -1.0:
                f = -1.0
            elif f > nb:
                f = float(nb)
            return int(f) + 1
    # number of edges <= v (bucketize, right=True)
    lo = 0
    hi = e.size
    while lo < hi:
        mid = (lo + hi) >> 1
        if e[mid] <= v:
            lo = mid + 1
        else:
            hi = mid
    if close_last and v == e[nb]:
        return nb
    return lo


@njit(cache=True, nogil=True, inline="always")
def _row(src, q, h, periodic, zero):
    """Row q of src with zero (a row of zeros) or periodic boundary (-h <= q < 2h)."""
    if 0 <= q < h:
        return src[q]
    if not periodic:
        return zero
    return src[q + h] if q < 0 else src[q - h]


@njit(cache=True, nogil=True)
def _smooth_cols(src, dst, w, periodic, off, zero):
    """dst[off + i, off + j] = Σ_k w[k] src[i + k - r, j]: the symmetric kernel ``w`` along the first axis
    (zero or periodic boundary, radius < h).  An output row stays in L1 while the source rows stream
    through it, up to four pairs of rows (i - k, i + k) per sweep, so most taps cost a load, not a
    read-modify-write.  ``dst`` may be padded, hence ``off``."""
    h, n = src.shape
    r = (w.size - 1) // 2
    wc = w[r]
    for i in range(h):
        d = dst[i + off]
        s = src[i]
        for j in range(n):
            d[j + off] = s[j] * wc
        k = 1
        while k <= r:
            g = min(4, r - k + 1)
            a1 = _row(src, i - k, h, periodic, zero)
            b1 = _row(src, i + k, h, periodic, zero)
            w1 = w[r + k]
            if g == 4:
                a2 = _row(src, i - k - 1, h, periodic, zero)
                b2 = _row(src, i + k + 1, h, periodic, zero)
                a3 = _row(src, i - k - 2, h, periodic, zero)
                b3 = _row(src, i + k + 2, h, periodic, zero)
                a4 = _row(src, i - k - 3, h, periodic, zero)
                b4 = _row(src, i + k + 3, h, periodic, zero)
                w2 = w[r + k + 1]
                w3 = w[r + k + 2]
                w4 = w[r + k + 3]
                for j in range(n):
                    d[j + off] += (w1 * (a1[j] + b1[j]) + w2 * (a2[j] + b2[j])) + (
                        w3 * (a3[j] + b3[j]) + w4 * (a4[j] + b4[j])
                    )
            elif g >= 2:
                g = 2
                a2 = _row(src, i - k - 1, h, periodic, zero)
                b2 = _row(src, i + k + 1, h, periodic, zero)
                w2 = w[r + k + 1]
                for j in range(n):
                    d[j + off] += w1 * (a1[j] + b1[j]) + w2 * (a2[j] + b2[j])
            else:
                for j in range(n):
                    d[j + off] += w1 * (a1[j] + b1[j])
            k += g


@njit(cache=True, nogil=True)
def _transpose(src, dst):
    """dst = src.T in 16x16 tiles (both stay in L1)."""
    h, n = src.shape
    for i0 in range(0, h, 16):
        for j0 in range(0, n, 16):
            for i in range(i0, min(i0 + 16, h)):
                for j in range(j0, min(j0 + 16, n)):
                    dst[j, i] = src[i, j]


@njit(cache=True, nogil=True)
def scale_stats(
    x,
    w,
    periodic,
    border,
    flags,
    pk_e,
    pk_s,
    mn_e,
    mn_s,
    pdf_e,
    pdf_s,
    mk_e,
    mk_s,
    out_pk,
    out_mn,
    out_pdf,
    out_cnt,
    out_grad,
    out_curv,
    out_mom,
):
    """One smoothing scale of [N, H, W] maps: smooth with the 1-D kernel ``w`` (length 1 = unsmoothed),
    then fill per map:

    * ``out_pk``, ``out_mn`` [N, nb]: strict 8-neighbour maxima / minima by height bin;
    * ``out_pdf`` [N, nb]: pixel counts by bin (on the region outside ``border``);
    * ``out_cnt``, ``out_grad``, ``out_curv`` [N, nm + 2]: per merged Minkowski slot, pixel counts and
      sums of 2|∇κ| and of twice the curvature term (the tables of ``minkowski_tensor``);
    * ``out_mom`` [N, 4]: mean and the central moments m2, m3, m4.

    ``flags``: do peaks, minima, pdf, Minkowski, moments.  Regions as in the torch path: peaks, minima
    and Minkowski use pixels with a full stencil, cut by ``border`` (at least 1 without ``periodic``);
    PDF and moments all pixels outside ``border``.  Each row is done in two sweeps: a branch-free one
    (neighbour extremes, derivatives) that the compiler vectorizes, then the binning, which adds runs of
    pixels falling in the same slot in registers (neighbouring pixels of a smooth map mostly do).

    One long function on purpose: numba compiles it into one loop nest whose buffers stay in registers and
    cache, which a split into called kernels would lose. Sections, in order: set-up (scratch rows, bin specs);
    per map: smoothing (two column passes, giving the transposed map) and the padded copy with its ring; per
    stencil row: neighbour extremes -> peaks/minima (compaction, then binning), derivatives -> Minkowski slots
    (two alternating tables); the Minkowski tables summed into the outputs; per region row: PDF and moment
    sums; the PDF counts and moments stored.
    """
    n, h, wd = x.shape
    smooth = w.size > 1
    tmp = np.empty((h, wd))
    tmp2 = np.empty((wd, h))
    zero = np.zeros(wd)
    pad = np.zeros((h + 2, wd + 2))  # the map with a one-pixel ring (wrapped when periodic)
    nmax = np.empty(wd + 2)
    nmin = np.empty(wd + 2)
    grad = np.empty(wd + 2)
    curv = np.empty(wd + 2)
    slot = np.empty(wd + 2, np.int32)  # int32: AVX2 converts doubles to int32, not int64, in vector form
    pidx = np.empty(wd + 2, np.int64)
    midx = np.empty(wd + 2, np.int64)
    # without the sweep of one kind of extremum, no pixel qualifies as one
    nmax[:] = np.inf
    nmin[:] = -np.inf
    tab = np.zeros((2, mk_e.size + 1, 3))  # Minkowski slots x (count, 2|∇κ|, curvature), twice
    ptab = np.zeros((2, pdf_e.size + 1))
    b0 = border if periodic else max(border, 1)
    do_pk, do_mn, do_pdf, do_mk, do_mom = flags[0] != 0, flags[1] != 0, flags[2] != 0, flags[3] != 0, flags[4] != 0
    pk_u, pk_0, pk_i, pk_n = pk_s[0] != 0.0, pk_s[1], pk_s[2], pk_s[3]
    mn_u, mn_0, mn_i, mn_n = mn_s[0] != 0.0, mn_s[1], mn_s[2], mn_s[3]
    npk = pk_e.size - 1
    nmn = mn_e.size - 1
    npdf = pdf_e.size - 1
    tiny = 2.2250738585072014e-308
    lo = b0 + 1  # padded columns and rows of the stencil region
    hi = wd - b0 + 1
    for m in range(n):
        if smooth:
            # both passes run down columns (the fast direction); the result is the transpose of the
            # smoothed map, which every statistic here is invariant under (the 8-neighbourhood, the
            # regions and the Minkowski integrands are symmetric in x <-> y)
            _smooth_cols(x[m], tmp, w, periodic, 0, zero)
            _transpose(tmp, tmp2)
            _smooth_cols(tmp2, pad, w, periodic, 1, zero)
        else:
            xm = x[m]
            for i in range(h):
                for j in range(wd):
                    pad[i + 1, j + 1] = xm[i, j]
        if periodic:
            for j in range(1, wd + 1):
                pad[0, j] = pad[h, j]
                pad[h + 1, j] = pad[1, j]
            for i in range(h + 2):
                pad[i, 0] = pad[i, wd]
                pad[i, wd + 1] = pad[i, 1]
        if do_pk:
            out_pk[m, :] = 0.0
        if do_mn:
            out_mn[m, :] = 0.0
        if do_mk:
            tab[:, :, :] = 0.0
        if do_pk or do_mn or do_mk:
            for i in range(b0 + 1, h - b0 + 1):
                dn = pad[i - 1]
                mid = pad[i]
                up = pad[i + 1]
                # one output array per sweep: with more, the vectorizer gives up on its alias checks
                if do_pk:
                    for j in range(lo, hi):
                        hu = max(max(up[j - 1], up[j]), up[j + 1])
                        hd = max(max(dn[j - 1], dn[j]), dn[j + 1])
                        nmax[j] = max(max(hu, hd), max(mid[j - 1], mid[j + 1]))
                if do_mn:
                    for j in range(lo, hi):
                        lu = min(min(up[j - 1], up[j]), up[j + 1])
                        ld = min(min(dn[j - 1], dn[j]), dn[j + 1])
                        nmin[j] = min(min(lu, ld), min(mid[j - 1], mid[j + 1]))
                if do_pk or do_mn:
                    # branch-free compaction of the candidates (a data-dependent branch per pixel
                    # mispredicts often), then binning of the few extrema
                    npk_row = 0
                    nmn_row = 0
                    for j in range(lo, hi):
                        c = mid[j]
                        pidx[npk_row] = j
                        npk_row += c > nmax[j]
                        midx[nmn_row] = j
                        nmn_row += c < nmin[j]
                    if do_pk:
                        for q in range(npk_row):
                            s = _slot(mid[pidx[q]], pk_e, pk_u, pk_0, pk_i, pk_n, True)
                            if 1 <= s <= npk:
                                out_pk[m, s - 1] += 1.0
                    if do_mn:
                        for q in range(nmn_row):
                            s = _slot(mid[midx[q]], mn_e, mn_u, mn_0, mn_i, mn_n, True)
                            if 1 <= s <= nmn:
                                out_mn[m, s - 1] += 1.0
                if do_mk:
                    for j in range(lo, hi):
                        a = mid[j + 1] - mid[j - 1]
                        b = up[j] - dn[j]
                        grad[j] = math.sqrt(a * a + b * b)
                    for j in range(lo, hi):
                        c = mid[j]
                        a = mid[j + 1] - mid[j - 1]
                        b = up[j] - dn[j]
                        kxx = (mid[j + 1] + mid[j - 1]) - 2.0 * c
                        kyy = (up[j] + dn[j]) - 2.0 * c
                        cxy = ((up[j + 1] - up[j - 1]) - dn[j + 1]) + dn[j - 1]
                        a2 = a * a
                        b2 = b * b
                        curv[j] = (a * b * cxy - 2.0 * a2 * kyy - 2.0 * b2 * kxx) / max(a2 + b2, tiny)
                    _slots(mid, lo, hi, mk_e, mk_s, False, slot)
                    # neighbours mostly share a slot: alternate two tables so that consecutive
                    # additions do not wait on each other through memory
                    for j in range(lo, hi - 1, 2):
                        s = slot[j]
                        tab[0, s, 0] += 1.0
                        tab[0, s, 1] += grad[j]
                        tab[0, s, 2] += curv[j]
                        s = slot[j + 1]
                        tab[1, s, 0] += 1.0
                        tab[1, s, 1] += grad[j + 1]
                        tab[1, s, 2] += curv[j + 1]
                    if (hi - lo) % 2:
                        s = slot[hi - 1]
                        tab[0, s, 0] += 1.0
                        tab[0, s, 1] += grad[hi - 1]
                        tab[0, s, 2] += curv[hi - 1]
        if do_mk:
            for s in range(out_cnt.shape[1]):
                out_cnt[m, s] = tab[0, s, 0] + tab[1, s, 0]
                out_grad[m, s] = tab[0, s, 1] + tab[1, s, 1]
                out_curv[m, s] = tab[0, s, 2] + tab[1, s, 2]
        if do_pdf:
            ptab[:, :] = 0.0
            jlo = border + 1
            jhi = wd - border + 1
            for i in range(border + 1, h - border + 1):
                _slots(pad[i], jlo, jhi, pdf_e, pdf_s, True, slot)
                for j in range(jlo, jhi - 1, 2):
                    ptab[0, slot[j]] += 1.0
                    ptab[1, slot[j + 1]] += 1.0
                if (jhi - jlo) % 2:
                    ptab[0, slot[jhi - 1]] += 1.0
            for b in range(npdf):
                out_pdf[m, b] = ptab[0, b + 1] + ptab[1, b + 1]
        if do_mom:
            _moments(pad, border + 1, h - border + 1, wd - border + 1, out_mom[m])


@njit(cache=True, nogil=True)
def _slots(row, lo, hi, e, spec, close_last, out):
    """out[j] = _slot(row[j]) for j in [lo, hi): the arithmetic sweep first (branch-free), then the
    rare values near an edge again by exact comparison."""
    nb = e.size - 1
    if spec[0] != 0.0:
        e0 = spec[1]
        inv = spec[2]
        lim = 0.5 - spec[3]
        nfix = 0  # a count, not a bool: the OR-reduction does not vectorize
        for j in range(lo, hi):
            t = (row[j] - e0) * inv
            f = math.floor(t)
            nfix += abs(t - f - 0.5) > lim
            out[j] = np.int32(min(max(f, -1.0), float(nb))) + np.int32(1)
        if nfix == 0:
            return
        for j in range(lo, hi):
            t = (row[j] - e0) * inv
            if abs(t - math.floor(t) - 0.5) > lim:
                out[j] = _slot(row[j], e, False, 0.0, 0.0, 0.0, close_last)
        return
    for j in range(lo, hi):
        out[j] = _slot(row[j], e, False, 0.0, 0.0, 0.0, close_last)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _moments(pad, lo, hi, hj, out):
    """out = mean, m2, m3, m4 of pad[lo:hi, lo:hj] (reassociated sums vectorize; round-off level)."""
    total = 0.0
    for i in range(lo, hi):
        row = pad[i]
        for j in range(lo, hj):
            total += row[j]
    cnt = float((hi - lo) * (hj - lo))
    mean = total / cnt
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    for i in range(lo, hi):
        row = pad[i]
        for j in range(lo, hj):
            d = row[j] - mean
            d2 = d * d
            s2 += d2
            s3 += d2 * d
            s4 += d2 * d2
    out[0] = mean
    out[1] = s2 / cnt
    out[2] = s3 / cnt
    out[3] = s4 / cnt


@njit(cache=True, nogil=True)
def bin_spectra(f, slot, coef, pair_a, pair_b, out):
    """out[m, p, b] = Σ_k coef[k] Re(f[m, a_p, k] conj f[m, b_p, k]) over the modes k of bin b.

    ``f`` [N, C, M]: rfft2 planes, flattened; ``slot`` [M]: bin of each mode (-1: none); ``coef``:
    A_pix² / A times the mode's weight (2 for a mode standing for its mirror image, 1 for a
    self-conjugate one) over the bin's number of modes.  Pairs (a, a) give auto spectra.
    """
    n = f.shape[0]
    nb = out.shape[2]
    acc = np.empty(nb)
    for m in range(n):
        for p in range(pair_a.size):
            fa = f[m, pair_a[p]]
            fb = f[m, pair_b[p]]
            acc[:] = 0.0
            for k in range(slot.size):
                b = slot[k]
                if b >= 0:
                    u = fa[k]
                    v = fb[k]
                    acc[b] += coef[k] * (u.real * v.real + u.imag * v.imag)
            out[m, p, :] = acc


@njit(cache=True, nogil=True)
def add_scaled(x, noise, sigma, out):
    """out = x + sigma · noise, element-wise (flattened), in one pass."""
    xf = x.reshape(-1)
    nf = noise.reshape(-1)
    of = out.reshape(-1)
    for k in range(xf.size):
        of[k] = xf[k] + sigma * nf[k]


# -- shape-noise streams -------------------------------------------------------------------------------------------
# Per-map noise streams: numpy's SFC64 bit generator (seeded exactly as numpy seeds it from a SeedSequence),
# turned into normals by a 256-layer ziggurat (Marsaglia & Tsang 2000, in Doornik's 2005 ZIGNOR form). Done here
# rather than by numpy's Generator.standard_normal because the draws were the largest single cost of a noisy
# summary (about 3x slower through numpy's per-call machinery on 16k values).
_ZIG_R = 3.6541528853610088  # start of the tail
_ZIG_V = 0.00492867323399  # area of each layer


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray]:
    x = np.empty(257)
    f = math.exp(-0.5 * _ZIG_R * _ZIG_R)
    x[0] = _ZIG_V / f  # the base layer: a rectangle plus the tail, of width V / f(R)
    x[1] = _ZIG_R
    x[256] = 0.0
    for i in range(2, 256):
        x[i] = math.sqrt(-2.0 * math.log(_ZIG_V / x[i - 1] + f))
        f = math.exp(-0.5 * x[i] * x[i])
    return x, x[1:] / x[:-1]


ZIG_X, ZIG_RATIO = _ziggurat_tables()
_U53 = 1.0 / 9007199254740992.0  # 2^-53


@njit(cache=True, nogil=True, inline="always")
def _sfc64(a, b, c, w):
    """One SFC64 step (as numpy's SFC64.random_raw): (output, a, b, c, counter) from (a, b, c, counter)."""
    out = a + b + w
    rot = (c << np.uint64(24)) | (c >> np.uint64(40))
    return out, b ^ (b >> np.uint64(11)), c + (c << np.uint64(3)), rot + out, w + np.uint64(1)


@njit(cache=True, nogil=True)
def sfc64_seeded(seed3):
    """SFC64 state [a, b, c, counter] from three 64-bit seed words, as numpy's SFC64 sets it (counter 1,
    12 outputs discarded)."""
    a, b, c, w = seed3[0], seed3[1], seed3[2], np.uint64(1)
    for _ in range(12):
        _, a, b, c, w = _sfc64(a, b, c, w)
    s = np.empty(4, np.uint64)
    s[0], s[1], s[2], s[3] = a, b, c, w
    return s


@njit(cache=True, nogil=True)
def normal_fill(s, out, zx, zr):
    """Fill ``out`` (1-D) with standard normals from the SFC64 state ``s`` (advanced in place).

    Each draw takes one 64-bit output: the low 8 bits pick the layer, the top 53 a uniform u in [-1, 1);
    about 99% are accepted at once; the rest go through the layer's wedge test or the tail (beyond R).
    The state lives in locals: through the array, every step would be a store the compiler cannot drop.
    """
    a, b, c, w = s[0], s[1], s[2], s[3]
    k = 0
    n = out.size
    while k < n:
        r, a, b, c, w = _sfc64(a, b, c, w)
        i = int(r & np.uint64(255))
        u = 2.0 * (float(r >> np.uint64(11)) * _U53) - 1.0
        while True:
            if abs(u) < zr[i]:
                out[k] = u * zx[i]
                break
            r, a, b, c, w = _sfc64(a, b, c, w)
            u2 = (float(r >> np.uint64(11)) + 0.5) * _U53  # in (0, 1)
            if i == 0:  # tail, Marsaglia's method
                r, a, b, c, w = _sfc64(a, b, c, w)
                u3 = (float(r >> np.uint64(11)) + 0.5) * _U53
                x = math.log(u2) / _ZIG_R
                if -2.0 * math.log(u3) >= x * x:
                    out[k] = x - _ZIG_R if u < 0.0 else _ZIG_R - x
                    break
            else:  # wedge between layers i and i + 1
                x = u * zx[i]
                f0 = math.exp(-0.5 * (zx[i] * zx[i] - x * x))
                f1 = math.exp(-0.5 * (zx[i + 1] * zx[i + 1] - x * x))
                if f1 + u2 * (f0 - f1) < 1.0:
                    out[k] = x
                    break
            r, a, b, c, w = _sfc64(a, b, c, w)  # rejected: a fresh layer and uniform
            i = int(r & np.uint64(255))
            u = 2.0 * (float(r >> np.uint64(11)) * _U53) - 1.0
        k += 1
    s[0], s[1], s[2], s[3] = a, b, c, w

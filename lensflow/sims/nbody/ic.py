"""Initial conditions: a Gaussian linear density field with pyccl's P(k), displaced to second order (2LPT).

The white noise of box ``seed`` is drawn in real space with numpy (``SeedSequence(seed)``, PCG64, float32), so a
box is the same bit for bit on any machine and does not depend on the torch device. The field on the particle
grid (``n³`` cells of side ``L/n``) is δ(k) = FFT(w) · sqrt(P(k)/V_cell), whose power spectrum estimator
``|δ(k)|² L³/n⁶`` has mean P(k). Displacements (Scoccimarro 1998; FastPM's ``lpt``):

    x = q + D₁ Ψ₁ + D₂ Ψ₂,   Ψ₁(k) = i k/k² δ(k),   Ψ₂ = the same operator on (3/7) Σ_{i<j} (φ_ii φ_jj − φ_ij²),

with φ_ij = ∂_i∂_j ∇⁻² δ, and the momenta p = a² E (f₁ D₁ Ψ₁ + f₂ D₂ Ψ₂) in the units of
:mod:`lensflow.sims.nbody.background`.
The exact ``i k`` is used here (the displacement is a smooth field); the k = 0 and Nyquist planes carry no
displacement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lensflow.sims.nbody.background import Background
from lensflow.sims.nbody.mesh import inv_laplace_kernel, rfft_wavenumbers

__all__ = ["linear_field", "lpt_displacements", "initial_state"]


def linear_field(
    n: int,
    box: float,
    power: Callable[[np.ndarray], np.ndarray],
    seed: int | Sequence[int] | np.random.SeedSequence,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The Fourier-space linear density δ(k) [n, n, n//2+1] (complex64) of a box of side ``box`` (Mpc/h).

    ``power(k)`` is P(k) in (Mpc/h)³ at k in h/Mpc, at the time the field is wanted.
    """
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rng = np.random.Generator(np.random.PCG64(ss))
    white = torch.from_numpy(rng.standard_normal((n, n, n), dtype=np.float32)).to(device)
    wk = torch.fft.rfftn(white)
    kx, ky, kz = rfft_wavenumbers(n, device)
    cell = box / n
    kmag = torch.sqrt(kx * kx + ky * ky + kz * kz) / cell  # h/Mpc
    k_np = kmag.cpu().double().numpy()
    p = np.zeros_like(k_np)
    pos = k_np > 0
    p[pos] = power(k_np[pos])
    amp = torch.from_numpy(np.sqrt(p / cell**3).astype(np.float32)).to(device)
    return wk * amp


def _lpt1(field_k: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Displacement components (mesh units, real) i k/k² field(k) of a Fourier field on the particle grid."""
    kx, ky, kz = rfft_wavenumbers(n, field_k.device)
    inv = -inv_laplace_kernel(kx, ky, kz)  # 1/k², 0 at k = 0
    out = []
    for ki in (kx, ky, kz):
        # the Nyquist plane has no sign for i k: zero it, so the displacement stays real and symmetric
        ki = torch.where(torch.abs(ki) >= math.pi - 1e-6, torch.zeros_like(ki), ki)
        out.append(torch.fft.irfftn(1j * ki * inv * field_k, s=(n, n, n)))
    return out


def lpt_displacements(delta_k: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First- and second-order displacements Ψ₁, Ψ₂ [n³, 3] (mesh units) of δ(k) on the particle grid."""
    psi1 = torch.stack([c.reshape(-1) for c in _lpt1(delta_k, n)], 1)
    kx, ky, kz = rfft_wavenumbers(n, delta_k.device)
    phi = delta_k * inv_laplace_kernel(kx, ky, kz)  # ∇⁻²δ
    ks = (kx, ky, kz)

    def phi_ij(i: int, j: int) -> torch.Tensor:
        return torch.fft.irfftn(-(ks[i] * ks[j]) * phi, s=(n, n, n))

    diag = [phi_ij(i, i) for i in range(3)]
    source = diag[0] * diag[1] + diag[1] * diag[2] + diag[2] * diag[0]
    del diag
    for i, j in ((0, 1), (1, 2), (2, 0)):
        source -= phi_ij(i, j) ** 2
    source_k = torch.fft.rfftn(source * (3.0 / 7.0))
    psi2 = torch.stack([c.reshape(-1) for c in _lpt1(source_k, n)], 1)
    return psi1, psi2


def initial_state(
    n: int,
    box: float,
    bg: Background,
    a_init: float,
    power_today: Callable[[np.ndarray], np.ndarray],
    seed: int | Sequence[int] | np.random.SeedSequence,
    mesh_factor: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and momenta [n³, 3] at ``a_init``, in *force-mesh* units (cell = box / (mesh_factor · n)).

    ``power_today(k)`` is the linear P(k) today ((Mpc/h)³, k in h/Mpc); the field is drawn today and the 2LPT
    growth factors carry it back to ``a_init``.
    """
    delta_k = linear_field(n, box, power_today, seed, device)
    psi1, psi2 = lpt_displacements(delta_k, n)
    del delta_k
    g = torch.arange(n, device=device, dtype=torch.float32)
    q = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    d1, d2 = float(bg.D1(a_init)), float(bg.D2(a_init))
    ea = float(bg.E(a_init))
    f1, f2 = float(bg.f1(a_init)), float(bg.f2(a_init))
    s = float(mesh_factor)  # particle-grid units -> force-mesh units
    x = (q + d1 * psi1 + d2 * psi2) * s
    p = (a_init**2 * ea) * (f1 * d1 * psi1 + f2 * d2 * psi2) * s
    return x, p

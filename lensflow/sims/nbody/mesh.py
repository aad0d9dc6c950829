"""Cloud-in-cell painting and readout on a periodic cubic mesh, and the Fourier kernels of the PM force (torch).

Positions are in mesh units (cell side 1, the mesh spans ``[0, n)`` on each axis, periodic). One
:class:`CIC` holds the 8 neighbour indices and weights of a set of positions, so the density is painted and
the three force components are read out with the same stencil (Hockney & Eastwood 1988, §5-3): the
self-force of a particle then vanishes by symmetry. The same code runs on CPU and CUDA; float32 throughout,
indices int64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CIC", "gradient_kernel", "inv_laplace_kernel", "paint", "readout", "rfft_wavenumbers"]


class CIC:
    """The cloud-in-cell stencil of ``pos`` [N, 3] (mesh units) on a periodic ``n³`` mesh."""

    def __init__(self, pos: torch.Tensor, n: int) -> None:
        self.n = int(n)
        if self.n**3 >= 2**31:
            raise ValueError(f"CIC: a mesh of {self.n}^3 cells needs 64-bit indices; use n < 1291")
        base = torch.floor(pos)
        frac = pos - base  # in [0, 1)
        # int32 indices (half the memory traffic of int64); positions are wrapped into [0, n) by the caller
        # up to rounding, so one conditional wrap on each side replaces a (slow) integer modulo.
        i0 = base.to(torch.int32)
        i0 = torch.where(i0 >= self.n, i0 - self.n, i0)
        i0 = torch.where(i0 < 0, i0 + self.n, i0)
        i1 = i0 + 1
        i1 = torch.where(i1 == self.n, torch.zeros_like(i1), i1)
        n2 = self.n * self.n
        # flat index of corner (dx, dy, dz) = x * n² + y * n + z; weights are products of (1 - f) or f.
        ix = (i0[:, 0] * n2, i1[:, 0] * n2)
        iy = (i0[:, 1] * self.n, i1[:, 1] * self.n)
        iz = (i0[:, 2], i1[:, 2])
        wx = (1 - frac[:, 0], frac[:, 0])
        wy = (1 - frac[:, 1], frac[:, 1])
        wz = (1 - frac[:, 2], frac[:, 2])
        N = pos.shape[0]
        self.index = torch.empty((8, N), dtype=torch.int32, device=pos.device)
        self.weight = torch.empty((8, N), dtype=pos.dtype, device=pos.device)
        c = 0
        for a in (0, 1):
            for b in (0, 1):
                xy = ix[a] + iy[b]
                wxy = wx[a] * wy[b]
                for d in (0, 1):
                    torch.add(xy, iz[d], out=self.index[c])
                    torch.mul(wxy, wz[d], out=self.weight[c])
                    c += 1

    def paint(self, mass: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The mesh [n, n, n] of ``mass`` (a scalar or [N]) deposited with CIC weights."""
        w = self.weight * mass
        out = torch.zeros(self.n**3, dtype=w.dtype, device=w.device)
        out.index_add_(0, self.index.reshape(-1), w.reshape(-1))
        return out.view(self.n, self.n, self.n)

    def readout(self, mesh: torch.Tensor) -> torch.Tensor:
        """Values [N] of ``mesh`` [n, n, n] interpolated at the positions with CIC weights."""
        flat = mesh.reshape(-1)
        return (flat[self.index.long()] * self.weight).sum(0)


def rfft_wavenumbers(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wavenumbers (radians per cell) of an ``rfftn`` of an ``n³`` mesh, broadcastable to [n, n, n//2+1]."""
    k = torch.fft.fftfreq(n, device=device) * (2 * math.pi)
    kz = torch.fft.rfftfreq(n, device=device) * (2 * math.pi)
    return k.view(-1, 1, 1), k.view(1, -1, 1), kz.view(1, 1, -1)


def gradient_kernel(k: torch.Tensor) -> torch.Tensor:
    """The Fourier multiplier of the 4-point centred difference ∂ (i times it): (8 sin k − sin 2k) / 6.

    The finite-difference gradient (as FastPM and JaxPM use) damps the force near the Nyquist frequency, where
    the mesh cannot represent it anyway; it returns the bare ``i·k`` at small k.
    """
    return 1j * (8 * torch.sin(k) - torch.sin(2 * k)) / 6


def inv_laplace_kernel(kx: torch.Tensor, ky: torch.Tensor, kz: torch.Tensor) -> torch.Tensor:
    """−1/k² (mesh units), with 0 at k = 0 (the mean density exerts no force)."""
    k2 = kx * kx + ky * ky + kz * kz
    out = torch.where(k2 > 0, -1.0 / torch.where(k2 > 0, k2, torch.ones_like(k2)), torch.zeros_like(k2))
    return out


def paint(pos: torch.Tensor, n: int, mass: float = 1.0) -> torch.Tensor:
    """CIC mesh [n, n, n] of particles ``pos`` [N, 3] (mesh units) of ``mass`` each: numba on CPU, torch elsewhere."""
    if pos.device.type == "cpu":
        from lensflow.sims.nbody import _cic_cpu

        return torch.from_numpy(_cic_cpu.paint(pos.numpy(), n, mass))
    return CIC(pos, n).paint(mass)


def readout(mesh: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Values [N, C] of ``mesh`` [C, n, n, n] at ``pos`` [N, 3] (mesh units): numba on CPU, torch elsewhere."""
    if pos.device.type == "cpu":
        from lensflow.sims.nbody import _cic_cpu

        return torch.from_numpy(_cic_cpu.readout(mesh.numpy(), pos.numpy()))
    cic = CIC(pos, mesh.shape[-1])
    return torch.stack([cic.readout(m) for m in mesh], 1)

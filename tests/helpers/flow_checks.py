"""The one harness of the flow-layer tests (the normflows ``FlowTest`` pattern): round trips and brute-force
log-determinants for any layer with the ``forward(x, cond) -> (*outputs, logdet)`` /
``inverse(*outputs, cond) -> x`` contract of :mod:`lensflow.flows`."""

from __future__ import annotations

from collections.abc import Callable

import torch


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU torch generator."""
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Perturb every parameter so no layer sits at its (identity / zero) initialisation (non-zero coupling and
    prior weights, random LU factors, ActNorms, FiLM, ...)."""
    g = gen(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def row(cond: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """The condition of sample ``i`` (``None`` stays ``None``)."""
    return None if cond is None else cond[i : i + 1]


def brute_logdet(fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """log|det J| of ``fn(x_i, i)`` at each sample ``x_i`` of x (float64), by autograd on the flattened map."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def flat(v, xi=xi, i=i):
            return fn(v.view_as(xi), i).reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, xi.reshape(-1), vectorize=True)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def check_forward_inverse(
    layer: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor | None = None, *, atol: float = 1e-12
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``layer.inverse(*layer(x, cond)[:-1], cond)`` gives ``x`` back within ``atol``; returns (outputs, logdet)."""
    *ys, ld = layer(x, cond)
    torch.testing.assert_close(layer.inverse(*ys, cond), x, rtol=0, atol=atol)
    return ys, ld


def check_logdet(
    layer: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor | None, logdet: torch.Tensor, *, atol: float = 1e-9
) -> None:
    """``logdet`` [B] equals the brute-force log|det| of the layer's outputs (flattened, concatenated) per sample."""

    def outputs(v: torch.Tensor, i: int) -> torch.Tensor:
        return torch.cat([t.flatten(1) for t in layer(v, row(cond, i))[:-1]], 1)

    torch.testing.assert_close(logdet, brute_logdet(outputs, x), rtol=0, atol=atol)


def check_flow_layer(
    layer: torch.nn.Module,
    x: torch.Tensor,
    cond: torch.Tensor | None = None,
    *,
    inverse_atol: float = 1e-12,
    logdet_atol: float = 1e-9,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`check_forward_inverse` and :func:`check_logdet` of one layer on float64 ``x``."""
    ys, ld = check_forward_inverse(layer, x, cond, atol=inverse_atol)
    check_logdet(layer, x, cond, ld, atol=logdet_atol)
    return ys, ld

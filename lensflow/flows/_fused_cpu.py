"""The fused CPU training path of :class:`~lensflow.flows.nets.CouplingNet`: a hand-written GEMM backward.

On CPU, a training step of the reference Glow spends about a third of its time outside arithmetic: every
[B, hidden, H, W] temporary of the backward pass (the gradients of both hidden layers and both ReLU masks) is a
fresh allocation above glibc's 32 MB mmap threshold, i.e. thousands of page faults each, and oneDNN's backward
of the thin 3x3 convolutions runs at a third of GEMM speed. :class:`_CouplingNetFn` keeps oneDNN for the forward
and writes the backward as GEMMs on NHWC matrices: the two big gradient temporaries live in a per-thread
workspace reused by every coupling, the ReLU masks are applied in place, and the 3x3 convolutions become a
GEMM against 9 shifted copies of their thin side (a few MB). Same arithmetic, identical results to rounding
(tests/test_flows_layers.py compares both paths, gradients included, in float32 and float64).

It reaches into private torch API (``torch._C._functorch`` to detect vmap wrappers, ``aten.threshold_backward``
with ``grad_input=``), which is why it lives apart from the architecture.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._conv import conv, conv_relu, padded

__all__ = ["FUSED_MIN_MACS", "coupling_net", "use_fused"]

_WORKSPACE = threading.local()
# The fused path saves time in proportion to the hidden 1x1 convolution's work (B*H*W*hidden^2 multiply-adds) but
# costs a fixed few dozen small ops per call: below ~16M multiply-adds it is no faster (measured on the 2-core dev
# machine: 0.7-0.9x at 2-8M, 1.15-1.7x from 33M up).
FUSED_MIN_MACS = 1 << 24


def use_fused(x: Tensor, hidden: int) -> bool:
    """Whether a CouplingNet call on ``x`` with ``hidden`` channels takes the fused path: CPU, float32/64,
    autograd recording, no autocast, no vmap, and at least ``FUSED_MIN_MACS`` multiply-adds in the hidden 1x1."""
    return (
        x.shape[0] * x.shape[2] * x.shape[3] * hidden * hidden >= FUSED_MIN_MACS
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not _transformed(x)
    )


def _transformed(t: Tensor) -> bool:
    """True for vmap/functorch wrappers (legacy ones included), which have no batching rule for out= ops."""
    ft = torch._C._functorch
    return any(
        getattr(ft, f, lambda _: False)(t)
        for f in ("is_legacy_batchedtensor", "is_batchedtensor", "is_functorch_wrapped_tensor")
    )


def _workspace(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Two scratch vectors of n elements, owned by this thread (backward passes never overlap within one)."""
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = {}
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < 2 * n:
        buf = cache[(dtype, device)] = torch.empty(2 * n, dtype=dtype, device=device)
    return buf[:n], buf[n : 2 * n]


_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # kernel tap k = 3 * (dy + 1) + (dx + 1)


def _taps(t: Tensor, sign: int, circular: bool) -> Tensor:
    """[B, H, W, C] -> [B, H, W, 9, C]; tap k at pixel p is ``t[p + sign * d_k]`` (0 or wrapped outside)."""
    h, w = t.shape[1:3]
    tp = padded(t, circular)
    return torch.stack(
        [tp[:, 1 + sign * dy : 1 + sign * dy + h, 1 + sign * dx : 1 + sign * dx + w] for dy, dx in _OFFSETS], 3
    )


def _untap(g: Tensor, circular: bool) -> Tensor:
    """Adjoint of ``_taps(., +1, .)``: [B, H, W, 9, C] -> [B, H, W, C], ``sum_k g[p - d_k, k]``."""
    h, w = g.shape[1:3]
    gp = padded(g, circular)
    out = None
    for k, (dy, dx) in enumerate(_OFFSETS):
        s = gp[:, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w, k]
        out = s.clone() if out is None else out.add_(s)
    return out


def _nhwc(t: Tensor) -> Tensor:
    """[B, C, H, W] -> [B*H*W, C] (a view for channels_last tensors)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class _CouplingNetFn(torch.autograd.Function):
    """CouplingNet's ``conv3x3 -> [FiLM] -> ReLU -> conv1x1 -> ReLU -> conv3x3`` with a GEMM backward.

    ``w3, b3`` are the output layer's effective (gain-folded) weight and bias; ``gamma, beta`` ([B, hidden])
    the FiLM scale offset and shift, or None.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3, gamma, beta, padding):  # noqa: D102
        if gamma is None:
            h1, a = conv_relu(x, w1, b1, padding), None
        else:
            a = conv(x, w1, b1, padding)
            h1 = a.mul(1.0 + gamma[:, :, None, None]).add_(beta[:, :, None, None]).relu_()
        h2 = conv_relu(h1, w2, b2, padding)
        out = conv(h2, w3, b3, padding)
        ctx.circular = padding == "circular"
        ctx.save_for_backward(x, w1, w2, w3, h1, h2, a, gamma)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):  # noqa: D102
        x, w1, w2, w3, h1, h2, a, gamma = ctx.saved_tensors
        circ = ctx.circular
        b, hid, h, w = h1.shape
        n, co, ci = b * h * w, w3.shape[0], w1.shape[1]
        # under vmap (jacobian(vectorize=True)) out= and in-place ops have no batching rule: plain ops there
        plain = _transformed(gout)
        ws = (None, None) if plain else tuple(t.view(n, hid) for t in _workspace(n * hid, h2.dtype, h2.device))

        def mm(p: Tensor, q: Tensor, out: Tensor | None) -> Tensor:
            return p @ q if out is None else torch.mm(p, q, out=out)

        def relu_grad(g: Tensor, hm: Tensor) -> Tensor:
            if plain:
                return torch.ops.aten.threshold_backward(g, hm, 0)
            return torch.ops.aten.threshold_backward.grad_input(g, hm, 0, grad_input=g)

        go = gout.permute(0, 2, 3, 1)
        # output conv: out[p] = sum_k W_k h2[p + d_k]  =>  dh2[q] = sum_k W_k^T go[q - d_k]
        go9 = _taps(go, -1, circ).reshape(n, 9 * co)
        h2m = _nhwc(h2)
        gw3 = (go9.t() @ h2m).reshape(3, 3, co, hid).permute(2, 3, 0, 1)
        gb3 = go.sum(dim=(0, 1, 2))
        gh2 = relu_grad(mm(go9, w3.permute(2, 3, 0, 1).reshape(9 * co, hid), ws[0]), h2m)
        h1m = _nhwc(h1)
        gw2 = (gh2.t() @ h1m).view(hid, hid, 1, 1)
        gb2 = gh2.sum(0)
        ga = relu_grad(mm(gh2, w2.view(hid, hid), ws[1]), h1m)
        ggamma = gbeta = None
        if gamma is not None:
            gbeta = ga.view(b, h * w, hid).sum(1)
            am = _nhwc(a)
            prod = ga * am if plain else torch.mul(ga, am, out=ws[0])  # gh2 is spent
            ggamma = prod.view(b, h * w, hid).sum(1)
            scale = (1.0 + gamma)[:, None, :]
            ga = (ga.view(b, h * w, hid) * scale if plain else ga.view(b, h * w, hid).mul_(scale)).view(n, hid)
        cols = _taps(x.permute(0, 2, 3, 1), 1, circ).reshape(n, 9 * ci)
        gw1 = (ga.t() @ cols).view(hid, 3, 3, ci).permute(0, 3, 1, 2)
        gb1 = ga.sum(0)
        gcols = (ga @ w1.permute(0, 2, 3, 1).reshape(hid, 9 * ci)).view(b, h, w, 9, ci)
        gx = _untap(gcols, circ).permute(0, 3, 1, 2)
        return gx, gw1, gb1, gw2, gb2, gw3, gb3, ggamma, gbeta, None


def coupling_net(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    padding: str,
) -> Tensor:
    """CouplingNet's forward through :class:`_CouplingNetFn` (its backward is the GEMM one); ``x`` channels_last."""
    return _CouplingNetFn.apply(x, w1, b1, w2, b2, w3, b3, gamma, beta, padding)

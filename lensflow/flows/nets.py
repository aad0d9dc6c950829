"""Convolutional networks used inside coupling layers and learned priors."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._common import check_padding, check_positive_int


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: str) -> Tensor:
    k = weight.shape[-1]
    if k == 1:
        return F.conv2d(x, weight, bias)
    if padding == "circular":
        return F.conv2d(_circular_pad(x, k // 2), weight, bias)
    return F.conv2d(x, weight, bias, padding=k // 2)


def _circular_pad(x: Tensor, p: int) -> Tensor:
    """Periodic padding that keeps channels_last (F.pad's circular mode returns NCHW, halving conv speed)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return _padded(x.permute(0, 2, 3, 1), True, p).permute(0, 3, 1, 2)
    return F.pad(x, (p, p, p, p), mode="circular")


def _padded(t: Tensor, circular: bool, p: int = 1) -> Tensor:
    """[B, H, W, ...] -> [B, H + 2p, W + 2p, ...], zeros or periodic wrap around."""
    if circular:
        t = torch.cat([t[:, -p:], t, t[:, :p]], 1)
        return torch.cat([t[:, :, -p:], t, t[:, :, :p]], 2)
    return F.pad(t, [0, 0] * (t.dim() - 3) + [p, p, p, p])


_ONEDNN_RELU = [True]  # cleared if this torch build lacks oneDNN's fused convolution + ReLU


def _conv_relu(x: Tensor, weight: Tensor, bias: Tensor, padding: str) -> Tensor:
    """``relu(conv(x))``; one oneDNN call with the ReLU fused (one pass less) where that is exact and allowed:
    CPU, float32, channels_last, no autocast, and no autograd recording (the fused op has no derivative)."""
    if (
        _ONEDNN_RELU[0]
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        p = weight.shape[-1] // 2
        if padding == "circular" and p:
            x, p = _circular_pad(x, p), 0
        try:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [p, p], [1, 1], [1, 1], 1, "relu", [], "")
        except (AttributeError, RuntimeError, NotImplementedError):
            _ONEDNN_RELU[0] = False
    return F.relu(_conv(x, weight, bias, padding), inplace=True)


class ZeroConv2d(nn.Module):
    """3x3 convolution started at exactly zero, with a learned per-channel output gain ``exp(3 * logs)``.

    Used as the last layer of every coupling network and learned prior, so each starts as the identity
    (coupling) or a standard normal (prior); the gain lets the output grow quickly once training starts
    (openai/glow ``Conv2dZeros``). The gain is folded into the weight and bias.
    """

    def __init__(
        self, in_channels: int, out_channels: int, padding: str = "zero", logscale_factor: float = 3.0
    ) -> None:
        super().__init__()
        self.padding = check_padding(padding)
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(out_channels))
        self.logscale_factor = float(logscale_factor)

    def forward(self, x: Tensor) -> Tensor:
        g = (self.logs * self.logscale_factor).exp()
        return _conv(x, self.weight * g.view(-1, 1, 1, 1), self.bias * g, self.padding)


class CouplingNet(nn.Module):
    """``conv3x3 -> [FiLM(cond)] -> ReLU -> conv1x1 -> ReLU -> ZeroConv2d`` (biases, PyTorch default init).

    ``cond`` ([B, cond_dim]) enters through a FiLM layer (per-channel scale and shift of the first hidden
    layer), zero-initialised so the conditional model starts equal to the unconditional one.

    No ActNorm on the hidden layers (unlike openai/glow): data-initialised unit-variance hidden units make
    the first Adam steps of the zero-initialised output layer move every coupling coherently by
    ``lr * sum|h|`` (order 1 at width 256), a loss spike that costs hundreds of steps; the default init
    keeps the hidden units ~4x smaller and training smooth. Inputs are already ActNorm-ed flow activations.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int, cond_dim: int = 0, padding: str = "zero"
    ) -> None:
        super().__init__()
        check_positive_int("hidden", hidden)
        check_positive_int("cond_dim", cond_dim, minimum=0)
        self.padding = check_padding(padding)
        conv1 = nn.Conv2d(in_channels, hidden, 3)
        conv2 = nn.Conv2d(hidden, hidden, 1)
        self.weight1, self.bias1 = conv1.weight, conv1.bias
        self.weight2, self.bias2 = conv2.weight, conv2.bias
        self.out = ZeroConv2d(hidden, out_channels, padding)
        self.cond_dim = cond_dim
        if cond_dim:
            self.film = nn.Linear(cond_dim, 2 * hidden)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        # channels_last: oneDNN (CPU) and cuDNN (GPU, bf16) run the 3x3 convolutions with few input or
        # output channels 1.3-3x faster than in NCHW.
        x = x.contiguous(memory_format=torch.channels_last)
        gamma = beta = None
        if self.cond_dim:
            gamma, beta = self.film(cond).to(x.dtype).chunk(2, dim=1)
        if _use_fused(x, self.weight1.shape[0]):
            g = (self.out.logs * self.out.logscale_factor).exp()
            w3, b3 = self.out.weight * g.view(-1, 1, 1, 1), self.out.bias * g
            return _CouplingNetFn.apply(
                x, self.weight1, self.bias1, self.weight2, self.bias2, w3, b3, gamma, beta, self.padding
            )
        if self.cond_dim:
            h = _conv(x, self.weight1, self.bias1, self.padding)
            h = F.relu(h * (1.0 + gamma.to(h.dtype)[:, :, None, None]) + beta.to(h.dtype)[:, :, None, None])
        else:
            h = _conv_relu(x, self.weight1, self.bias1, self.padding)
        return self.out(_conv_relu(h, self.weight2, self.bias2, self.padding))


# -- fused CPU training path ---------------------------------------------------------------------------------------
# On CPU, a training step of the reference Glow spends about a third of its time outside arithmetic: every
# [B, hidden, H, W] temporary of the backward pass (the gradients of both hidden layers and both ReLU masks) is a
# fresh allocation above glibc's 32 MB mmap threshold, i.e. thousands of page faults each, and oneDNN's backward
# of the thin 3x3 convolutions runs at a third of GEMM speed. _CouplingNetFn keeps oneDNN for the forward and
# writes the backward as GEMMs on NHWC matrices: the two big gradient temporaries live in a per-thread
# workspace reused by every coupling, the ReLU masks are applied in place, and the 3x3 convolutions become a
# GEMM against 9 shifted copies of their thin side (a few MB). Same arithmetic, identical results to rounding
# (tests/test_flows_layers.py compares both paths, gradients included, in float32 and float64).
_WORKSPACE = threading.local()
# The fused path saves time in proportion to the hidden 1x1 convolution's work (B*H*W*hidden^2 multiply-adds) but
# costs a fixed few dozen small ops per call: below ~16M multiply-adds it is no faster (measured on the 2-core dev
# machine: 0.7-0.9x at 2-8M, 1.15-1.7x from 33M up).
_FUSED_MIN_MACS = 1 << 24


def _use_fused(x: Tensor, hidden: int) -> bool:
    return (
        x.shape[0] * x.shape[2] * x.shape[3] * hidden * hidden >= _FUSED_MIN_MACS
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
    tp = _padded(t, circular)
    return torch.stack(
        [tp[:, 1 + sign * dy : 1 + sign * dy + h, 1 + sign * dx : 1 + sign * dx + w] for dy, dx in _OFFSETS], 3
    )


def _untap(g: Tensor, circular: bool) -> Tensor:
    """Adjoint of ``_taps(., +1, .)``: [B, H, W, 9, C] -> [B, H, W, C], ``sum_k g[p - d_k, k]``."""
    h, w = g.shape[1:3]
    gp = _padded(g, circular)
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
            h1, a = _conv_relu(x, w1, b1, padding), None
        else:
            a = _conv(x, w1, b1, padding)
            h1 = a.mul(1.0 + gamma[:, :, None, None]).add_(beta[:, :, None, None]).relu_()
        h2 = _conv_relu(h1, w2, b2, padding)
        out = _conv(h2, w3, b3, padding)
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

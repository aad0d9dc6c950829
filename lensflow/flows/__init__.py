"""Glow normalising flows in plain PyTorch (no Lightning, no Hydra).

Every layer maps data -> latent with ``forward(x, cond=None) -> (y, logdet[B])`` and back with
``inverse(y, cond=None) -> x`` (``Split`` returns/takes the factored-out latent as an extra tensor).
Log-dets are in nats and accumulated in float32 (float64 for float64 inputs), also under bf16 autocast.
"""

from .actnorm import ActNorm
from .amplitude import LatentAmplitude
from .coupling import AffineCoupling
from .glow import Glow
from .invconv import InvConv1x1
from .nets import CouplingNet, ZeroConv2d
from .preprocess import Preprocess
from .spline import SplineCoupling
from .split import Split, TopPrior
from .squeeze import Squeeze
from .step import FlowStep

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "CouplingNet",
    "FlowStep",
    "Glow",
    "InvConv1x1",
    "LatentAmplitude",
    "Preprocess",
    "SplineCoupling",
    "Split",
    "Squeeze",
    "TopPrior",
    "ZeroConv2d",
]

"""Field-level inference with a conditional emulator: grid posteriors of (Ω_m, σ_8)-like parameters.

``likelihoods`` (the emulator's, the exact one of the built-in simulators, a binned-C_ℓ Gaussian one),
``posterior`` (grid posteriors: moments, credible intervals, HPD credibility of a point, figure of merit) and
``run`` (:func:`infer`, the command ``python -m lensflow.infer``).
"""

from lensflow.inference.posterior import GridPosterior, ParameterGrid
from lensflow.inference.run import InferRequest, infer

__all__ = ["GridPosterior", "InferRequest", "ParameterGrid", "infer"]

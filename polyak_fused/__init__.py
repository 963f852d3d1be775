"""polyak-fused: parameter-free Polyak-stepsize optimizers for PyTorch, fused with Triton."""

from .adasps import AdaSPS, adasps
from .clipped_sgd import ClippedSGD, clipped_sgd
from .decsps import DecSPS, decsps
from .dog import DoG, dog
from .inexact_polyak import InexactPolyak, inexact_polyak
from .momo import MoMo, momo
from .momo_adam import MoMoAdam, momo_adam
from .nsgdm import NSGDM, nsgdm
from .polyak import Polyak, polyak
from ._optimizer import watch_loss

__all__ = [
    "InexactPolyak", "inexact_polyak",
    "Polyak", "polyak",
    "DecSPS", "decsps",
    "AdaSPS", "adasps",
    "DoG", "dog",
    "ClippedSGD", "clipped_sgd",
    "NSGDM", "nsgdm",
    "MoMo", "momo",
    "MoMoAdam", "momo_adam",
    "watch_loss",
]
__version__ = "0.1.0"

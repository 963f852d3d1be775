"""Test problems from the Inexact Polyak paper, shared by the tests and the experiments in bench/.

`LZeroLOneQuartic` is the (L0, L1)-smooth function of Takezawa et al., Sec. 6.1 / App. C:

    f(x) = (L0 L1^2 / 72) x^4 + (L0 / 4) x^2 + f*,    x* = 0,  f(x*) = f*,

which is (L0, L1)-smooth for any L0, L1 >= 0 (their Prop. 3) but not L-smooth: its curvature
grows with L1, so plain GD needs a step of order 1/L1^2 while clipped GD and Polyak-type steps do
not. The paper's settings: L0 = 1, f* = 1, l* = 0, x0 = 5, L1 in {1, 10, 100, 1000}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LZeroLOneQuartic:
    L0: float = 1.0
    L1: float = 1.0
    f_star: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """f(x), summed over the elements of x (each coordinate is one copy of the 1-D problem)."""
        return (self.L0 * self.L1**2 / 72 * x**4 + self.L0 / 4 * x**2).sum() + self.f_star

    def gap(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) - f*, computed without the cancellation of f(x) - f* (exact near x* = 0)."""
        return (self.L0 * self.L1**2 / 72 * x**4 + self.L0 / 4 * x**2).sum()

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.L0 * self.L1**2 / 18 * x**3 + self.L0 / 2 * x


#: Table 3 of the paper: GD learning rates per L1, clipped GD (lr, clip) per L1.
PAPER_GD_LR = {1: 1e-1, 10: 1e-3, 100: 1e-5, 1000: 1e-7}
PAPER_CLIPPED_GD = {1: (0.1, 20.0), 10: (0.1, 10.0), 100: (0.1, 10.0), 1000: (0.1, 10.0)}
PAPER_X0 = 5.0
PAPER_LOWER_BOUND = 0.0

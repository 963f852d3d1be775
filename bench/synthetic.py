"""Figure 1 of Takezawa et al. (NeurIPS 2024): the synthetic (L0, L1)-smooth problem.

f(x) = (L0 L1^2 / 72) x^4 + (L0 / 4) x^2 + f*, with L0 = 1, f* = 1, l* = 0, x0 = 5 and
L1 in {1, 10, 100, 1000} (polyak_fused.problems). Every method runs on one float64 scalar with the
package's optimizers (their default path: foreach on the CPU) and the exact gradient:

  (a) GD           ClippedSGD(lr from Table 3, max_norm=inf), 500 iterations
  (b) clipped GD   ClippedSGD(lr=0.1, max_norm=c from Table 3), 500 iterations
  (c) Polyak       Polyak with f* known, 500 iterations
  (d) DecSPS       DecSPS(c0=1, gamma_b=10, l*=0), 10000 iterations
  (e) AdaSPS       AdaSPS(c_p=1, l*=0), 10000 iterations
  (f) Inexact Polyak, Algorithm 1: for each horizon T of a grid, restart from x0, run T steps with
      track_best=True, then load_best(loss=f(x_T)); the point plotted at T is f(x_best) - f*.

The gap f(x) - f* is measured with ``problem.gap`` (no cancellation against f* = 1). The paper
does not state DecSPS's c0, gamma_b or AdaSPS's c_p; the values above are our choice.

Polyak is given the loss f(x) - f* (computed without cancellation) and f_star = 0, which is the
same step (f(x) - f*)/|f'(x)|^2 as f_star = 1 with the loss f(x): passing f(x) itself would round
f - f* to 0 once it falls below ~1e-16 (the float64 spacing at 1.0) and freeze the iterate there.
The other methods see the loss f(x) itself (their l* = 0, so there is no cancellation).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

import polyak_fused as pf
from polyak_fused.problems import (PAPER_CLIPPED_GD, PAPER_GD_LR, PAPER_LOWER_BOUND, PAPER_X0,
                                   LZeroLOneQuartic)

#: Methods of the fixed-length panels (a)-(e), in panel order, with their labels.
TRAJECTORY_METHODS = {
    "gd": "GD",
    "clipped_gd": "Clipped GD",
    "polyak": "Polyak (f* known)",
    "decsps": "DecSPS",
    "adasps": "AdaSPS",
}
INEXACT = "inexact_polyak"
LABELS = {**TRAJECTORY_METHODS, INEXACT: "Inexact Polyak (Alg. 1)"}

#: Values below this are drawn off the bottom of the log axis (the iterate may reach x = 0).
PLOT_FLOOR = 1e-20


@dataclass
class SyntheticConfig:
    l1_values: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    short_iters: int = 500        # GD, clipped GD, Polyak (the paper's panels a-c)
    long_iters: int = 10_000      # DecSPS, AdaSPS (panels d-e)
    t_grid: tuple[int, ...] = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)
    decsps: dict = field(default_factory=lambda: {"c0": 1.0, "gamma_b": 10.0})
    adasps: dict = field(default_factory=lambda: {"c_p": 1.0})
    l0: float = 1.0
    f_star: float = 1.0
    x0: float = PAPER_X0

    def iterations(self, method: str) -> int:
        return self.short_iters if method in ("gd", "clipped_gd", "polyak") else self.long_iters


def _problem(cfg: SyntheticConfig, l1: float) -> LZeroLOneQuartic:
    return LZeroLOneQuartic(L0=cfg.l0, L1=float(l1), f_star=cfg.f_star)


def _start(cfg: SyntheticConfig) -> torch.Tensor:
    return torch.full((1,), cfg.x0, dtype=torch.float64, requires_grad=True)


def hyperparameters(cfg: SyntheticConfig, method: str, l1: float) -> dict:
    """The hyperparameters a method gets at this L1 (Table 3 of the paper for GD / clipped GD)."""
    key = int(l1)
    if method == "gd":
        return {"lr": PAPER_GD_LR[key], "max_norm": math.inf}
    if method == "clipped_gd":
        lr, clip = PAPER_CLIPPED_GD[key]
        return {"lr": lr, "max_norm": clip}
    if method == "polyak":
        return {"f_star": cfg.f_star}
    if method == "decsps":
        return {**cfg.decsps, "lower_bound": PAPER_LOWER_BOUND}
    if method == "adasps":
        return {**cfg.adasps, "lower_bound": PAPER_LOWER_BOUND}
    raise ValueError(f"unknown method {method!r}")


def _make_optimizer(method: str, x: torch.Tensor, hp: dict):
    if method in ("gd", "clipped_gd"):
        return pf.ClippedSGD([x], lr=hp["lr"], max_norm=hp["max_norm"])
    if method == "polyak":
        return pf.Polyak([x], f_star=0.0)  # given f - f* as the loss, see module doc
    if method == "decsps":
        return pf.DecSPS([x], c0=hp["c0"], gamma_b=hp["gamma_b"],
                         lower_bound=hp["lower_bound"])
    if method == "adasps":
        return pf.AdaSPS([x], c_p=hp["c_p"], lower_bound=hp["lower_bound"])
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def run_trajectory(cfg: SyntheticConfig, method: str, l1: float, on_steps=None) -> np.ndarray:
    """f(x_t) - f* for t = 0..iterations of one method (the last iterate, as in panels a-e)."""
    problem = _problem(cfg, l1)
    iters = cfg.iterations(method)
    x = _start(cfg)
    opt = _make_optimizer(method, x, hyperparameters(cfg, method, l1))
    gaps = torch.empty(iters + 1, dtype=torch.float64)
    gaps[0] = problem.gap(x)
    for t in range(iters):
        x.grad = problem.grad(x)
        loss = problem.gap(x) if method == "polyak" else problem(x)
        opt.step(loss=loss)
        gaps[t + 1] = problem.gap(x)
        if on_steps is not None and (t + 1) % 500 == 0:
            on_steps(500)
    if on_steps is not None:
        on_steps(iters % 500)
    return gaps.numpy()


@torch.no_grad()
def run_inexact_polyak(cfg: SyntheticConfig, l1: float, total_steps: int) -> dict:
    """Algorithm 1 with horizon T from x0: the best-iterate gap and the last-iterate gap."""
    problem = _problem(cfg, l1)
    x = _start(cfg)
    opt = pf.InexactPolyak([x], total_steps=total_steps, lower_bound=PAPER_LOWER_BOUND,
                           track_best=True)
    for _ in range(total_steps):
        x.grad = problem.grad(x)
        opt.step(loss=problem(x))
    last_gap = problem.gap(x).item()
    opt.load_best(loss=problem(x))  # f(x_T) competes too, as in Algorithm 1
    return {"L1": l1, "T": total_steps, "best_gap": problem.gap(x).item(),
            "last_gap": last_gap, "x_best": x.item()}


@dataclass
class SyntheticResult:
    config: SyntheticConfig
    curves: dict          # (method, L1) -> np.ndarray of gaps, t = 0..iterations
    sweep: list[dict]     # Inexact Polyak: one row per (L1, T)

    def summary(self) -> list[dict]:
        """One row per (method, L1): the final gap, and the best gap seen along the way."""
        rows = []
        for (method, l1), gaps in self.curves.items():
            hp = hyperparameters(self.config, method, l1)
            rows.append({"method": method, "L1": l1, "iterations": len(gaps) - 1,
                         "hyperparameters": _fmt_hp(hp), "initial_gap": float(gaps[0]),
                         "final_gap": float(gaps[-1]), "min_gap": float(gaps.min())})
        t_max = max(self.config.t_grid)
        for row in self.sweep:
            if row["T"] == t_max:
                rows.append({"method": INEXACT, "L1": row["L1"], "iterations": t_max,
                             "hyperparameters": f"T={t_max}, l*=0, best iterate",
                             "initial_gap": float(_problem(self.config, row["L1"]).gap(
                                 torch.tensor([self.config.x0], dtype=torch.float64))),
                             "final_gap": row["best_gap"], "min_gap": row["best_gap"]})
        return rows


def _fmt_hp(hp: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in hp.items())


def run(cfg: SyntheticConfig | None = None, progress: bool = True) -> SyntheticResult:
    cfg = cfg or SyntheticConfig()
    total = len(cfg.l1_values) * (sum(cfg.iterations(m) for m in TRAJECTORY_METHODS)
                                  + sum(cfg.t_grid))
    bar = _progress(total, "synthetic", progress)
    curves, sweep = {}, []
    try:
        for method in TRAJECTORY_METHODS:
            for l1 in cfg.l1_values:
                bar.set_postfix_str(f"{method} L1={l1:g}")
                curves[(method, l1)] = run_trajectory(cfg, method, l1, on_steps=bar.update)
        for l1 in cfg.l1_values:
            for T in cfg.t_grid:
                bar.set_postfix_str(f"inexact_polyak L1={l1:g} T={T}")
                sweep.append(run_inexact_polyak(cfg, l1, T))
                bar.update(T)
    finally:
        bar.close()
    return SyntheticResult(cfg, curves, sweep)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, mininterval=0.5)


def _log_spaced(n: int, points: int = 120) -> np.ndarray:
    """Iterations 0..n: all of the first 50, then about `points` log-spaced ones, and n."""
    idx = np.unique(np.concatenate([np.arange(min(n, 50) + 1),
                                    np.geomspace(1, n, points).round().astype(int), [n]]))
    return idx[idx <= n]


def write_csvs(result: SyntheticResult, out: str) -> dict[str, str]:
    """synthetic_curves.csv (log-spaced iterations), synthetic_inexact_polyak.csv (the T sweep)
    and synthetic_summary.csv. Returns {name: path}."""
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, f"synthetic_{name}.csv")
             for name in ("curves", "inexact_polyak", "summary")}
    with open(paths["curves"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "L1", "iteration", "gap"])
        for (method, l1), gaps in result.curves.items():
            for t in _log_spaced(len(gaps) - 1):
                w.writerow([method, f"{l1:g}", int(t), f"{gaps[t]:.6e}"])
    _write_rows(paths["inexact_polyak"], result.sweep,
                ["L1", "T", "best_gap", "last_gap", "x_best"])
    _write_rows(paths["summary"], result.summary(),
                ["method", "L1", "iterations", "hyperparameters", "initial_gap", "final_gap",
                 "min_gap"])
    return paths


def _write_rows(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6e}" if isinstance(v, float) and k not in ("L1",) else
                            (f"{v:g}" if k == "L1" else v)) for k, v in row.items()})


def plot(result: SyntheticResult, path: str) -> str:
    """The six panels of Figure 1: gap vs iterations (a-e), best gap vs T (f); log y."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), constrained_layout=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(cfg.l1_values)))
    for ax, (letter, method) in zip(axes.flat, zip("abcdef", list(TRAJECTORY_METHODS) + [INEXACT])):
        for color, l1 in zip(colors, cfg.l1_values):
            if method == INEXACT:
                rows = sorted((r for r in result.sweep if r["L1"] == l1), key=lambda r: r["T"])
                xs = [r["T"] for r in rows]
                ys = np.maximum([r["best_gap"] for r in rows], PLOT_FLOOR * 1e-10)
                ax.plot(xs, ys, "o-", color=color, ms=3, label=f"L1={l1:g}")
            else:
                gaps = result.curves[(method, l1)]
                ax.plot(np.arange(len(gaps)), np.maximum(gaps, PLOT_FLOOR * 1e-10),
                        color=color, label=f"L1={l1:g}")
        ax.set_yscale("log")
        ax.set_ylim(PLOT_FLOOR, 1e10)
        if method == INEXACT:
            ax.set_xscale("log")
            ax.set_xlabel("T (a fresh run from x0 for each T)")
            ax.set_ylabel("f(x_best) - f*")
        else:
            ax.set_xlabel("iteration t")
            ax.set_ylabel("f(x_t) - f*")
        ax.set_title(f"({letter}) {LABELS[method]}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Synthetic (L0,L1)-smooth problem, L0=1, x0=5, f*=1, float64 "
                 f"(gaps below {PLOT_FLOOR:g} are off the axis)", fontsize=11)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

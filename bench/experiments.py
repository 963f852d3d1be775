"""Reproduce the convergence experiments of Takezawa et al. (NeurIPS 2024) with this package.

    python -m bench.experiments --quick          # both experiments, short CPU version (minutes)
    python -m bench.experiments --device cuda    # the paper-length char-GPT run (5000 steps)
    python -m bench.experiments --only synthetic # Figure 1 only (float64, CPU, ~20 s)

1. ``synthetic``: Figure 1, the (L0, L1)-smooth quartic for L1 in {1, 10, 100, 1000}: GD, clipped
   GD (Table 3 hyperparameters), Polyak (f* known), DecSPS, AdaSPS and Inexact Polyak (Algorithm 1,
   one fresh run per horizon T). See bench/synthetic.py.
2. ``gpt``: a character-level GPT trained with SGD and clipped SGD (each tuned on a small grid by
   final validation loss) and with the parameter-free Polyak (f* = 0), DecSPS, AdaSPS, DoG and
   Inexact Polyak (T = the number of steps). See bench/char_gpt.py.

Writes CSVs and PNGs to --out (default bench/results/experiments) and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import time

import torch

from . import char_gpt as G
from . import synthetic as S

DEFAULT_OUT = os.path.join("bench", "results", "experiments")

#: --quick: a few minutes on a 2-core CPU.
QUICK_GPT = dict(steps=300, batch_size=16, block_size=64, n_layer=2, n_head=2, n_embd=64,
                 eval_batches=8, test_batches=32)
QUICK_LRS = (0.1, 0.3, 1.0)
QUICK_CLIPS = (0.5, 1.0, math.inf)
QUICK_T_GRID = (10, 30, 100, 300, 1000, 3000, 10_000)
#: Default: the paper's Nano-GPT length (5000 steps, batch 64, block 256) with nanoGPT's
#: shakespeare-char model shape (6 layers, 6 heads, width 384), dropout 0.
FULL_GPT = dict(steps=5000, batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384,
                eval_batches=20, test_batches=100)
FULL_LRS = (1.0, 0.3, 0.1, 0.03, 0.01)
FULL_CLIPS = (1.0, 5.0, math.inf)
CORPUS_CHARS = 4_000_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short CPU version: coarser T grid; GPT with 2 layers, width 64, block 64, "
                        "batch 16, 300 steps, lr grid 0.1/0.3/1 and clip grid 0.5/1/inf")
    p.add_argument("--only", choices=("synthetic", "gpt"), help="run one experiment only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the GPT runs (default: cuda if available, else cpu); the "
                        "synthetic problem always runs in float64 on the CPU")
    p.add_argument("--steps", type=int, help="GPT training steps (default 5000, --quick 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the GPT init and batches")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--data", help="a text file for the GPT (default: the standard library's "
                                  f"own .py files, first {CORPUS_CHARS:,} characters)")
    p.add_argument("--lrs", type=_floats,
                   help="SGD / clipped SGD lr grid, comma-separated (default "
                        + ",".join(f"{v:g}" for v in FULL_LRS) + "; --quick "
                        + ",".join(f"{v:g}" for v in QUICK_LRS) + ")")
    p.add_argument("--clips", type=_floats,
                   help="clipped SGD threshold grid, inf allowed (default "
                        + ",".join(f"{v:g}" for v in FULL_CLIPS) + "; --quick "
                        + ",".join(f"{v:g}" for v in QUICK_CLIPS) + ")")
    p.add_argument("--methods", type=_methods, default=G.METHODS,
                   help="GPT methods, comma-separated (default: all of " + ",".join(G.METHODS)
                        + ")")
    p.add_argument("--reference", action="store_true",
                   help="use the eager reference optimizers (fused=False) on CUDA too")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a busy "
                        "machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values or any(math.isnan(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in G.METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {G.METHODS}")
    return names


def gpt_config(args: argparse.Namespace) -> tuple[G.TrainConfig, tuple, tuple]:
    base = QUICK_GPT if args.quick else FULL_GPT
    steps = args.steps or base["steps"]
    evals = 12 if args.quick else 20
    cfg = G.TrainConfig(**{**base, "steps": steps}, eval_every=max(1, steps // evals),
                        seed=args.seed, device=args.device,
                        fused=False if args.reference else None)
    lrs = args.lrs or (QUICK_LRS if args.quick else FULL_LRS)
    clips = args.clips or (QUICK_CLIPS if args.quick else FULL_CLIPS)
    return cfg, lrs, clips


# ---- tables --------------------------------------------------------------------------------------
def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def synthetic_tables(result: S.SyntheticResult) -> str:
    cfg = result.config
    l1s = list(cfg.l1_values)
    summary = {(r["method"], r["L1"]): r for r in result.summary()}
    rows = []
    for method in list(S.TRAJECTORY_METHODS) + [S.INEXACT]:
        iters = max(cfg.t_grid) if method == S.INEXACT else cfg.iterations(method)
        rows.append([S.LABELS[method], str(iters)]
                    + [f"{summary[(method, l1)]['final_gap']:.1e}" for l1 in l1s])
    first = format_table(["method", "iters"] + [f"L1={l1:g}" for l1 in l1s], rows)
    sweep = {(r["L1"], r["T"]): r["best_gap"] for r in result.sweep}
    second = format_table(["T"] + [f"L1={l1:g}" for l1 in l1s],
                          [[str(T)] + [f"{sweep[(l1, T)]:.1e}" for l1 in l1s]
                           for T in cfg.t_grid])
    initial = "  ".join(f"L1={l1:g}: {summary[('gd', l1)]['initial_gap']:.3g}" for l1 in l1s)
    return ("Synthetic (L0,L1)-smooth problem: f(x) - f* after the run "
            "(last iterate; Inexact Polyak: best iterate of Algorithm 1)\n"
            f"f(x0) - f*: {initial}\n{first}\n\n"
            "Inexact Polyak (Algorithm 1), f(x_best) - f* for each horizon T "
            f"(a fresh run from x0 = {cfg.x0:g} per T)\n{second}")


def gpt_table(exp: G.GPTExperiment) -> str:
    rows = []
    for method, r in exp.selected().items():
        rows.append([G.LABELS[method], r.hparams(), f"{r.curve[-1]['train_loss']:.3f}",
                     f"{r.curve[-1]['val_loss']:.3f}", f"{r.test_loss:.3f}",
                     "diverged" if r.diverged else "ok", f"{r.seconds:.0f}"])
    cfg = exp.config
    grid = [r for r in exp.runs if r.method in G.TUNED]
    grid_rows = [[r.method, r.hparams(), f"{r.curve[-1]['val_loss']:.3f}",
                  f"{r.test_loss:.3f}", "diverged" if r.diverged else "ok"] for r in grid]
    text = (f"Char-level GPT: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, "
            f"block {cfg.block_size}, batch {cfg.batch_size}, {cfg.steps} steps, "
            f"{exp.num_parameters:,} parameters, vocab {exp.vocab_size}, device {cfg.device}\n"
            f"corpus: {exp.corpus}\n"
            + format_table(["method", "selected", "train", "val", "test", "status", "s"], rows))
    if grid_rows:
        text += ("\n\nGrid (SGD = clip inf; clipped SGD's selection also considers the SGD runs)\n"
                 + format_table(["method", "hyperparameters", "val", "test", "status"],
                                grid_rows))
    return text


# ---- run info ------------------------------------------------------------------------------------
def _git_sha() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def write_run_info(path: str, info: dict) -> None:
    """key,value rows; keys of an earlier run_info.csv that this run does not set are kept
    (so `--only gpt` does not erase the synthetic run's conditions)."""
    merged = {}
    if os.path.exists(path):
        with open(path, newline="") as fh:
            merged = {row["key"]: row["value"] for row in csv.DictReader(fh)}
    merged.update(info)
    info = merged
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "value"])
        for k, v in info.items():
            w.writerow([k, v])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    common = {"command": "python -m bench.experiments " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": _git_sha(),
              "python": platform.python_version(), "torch": torch.__version__}
    info = {}
    outputs = []
    if args.only in (None, "synthetic"):
        cfg = S.SyntheticConfig(t_grid=QUICK_T_GRID) if args.quick else S.SyntheticConfig()
        info.update({f"synthetic_{k}": v for k, v in common.items()})
        start = time.perf_counter()
        result = S.run(cfg, progress=progress)
        info["synthetic_seconds"] = f"{time.perf_counter() - start:.1f}"
        info["synthetic_device"] = "cpu, float64, eager reference (fused=False)"
        outputs += list(S.write_csvs(result, args.out).values())
        outputs.append(S.plot(result, os.path.join(args.out, "synthetic.png")))
        print(synthetic_tables(result), end="\n\n", flush=True)
    if args.only in (None, "gpt"):
        cfg, lrs, clips = gpt_config(args)
        if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        if not args.quick and torch.device(cfg.device).type == "cpu":
            print("note: the full char-GPT configuration on a CPU takes many hours; "
                  "use --quick, or --device cuda", file=sys.stderr)
        info.update({f"gpt_{k}": v for k, v in common.items()})
        text, corpus = G.load_text(args.data, CORPUS_CHARS)
        data = G.CharData(text)
        start = time.perf_counter()
        exp = G.run_experiment(data, corpus, cfg, lrs, clips, methods=args.methods,
                               progress=progress)
        info.update({"gpt_seconds": f"{time.perf_counter() - start:.1f}",
                     "gpt_device": _device_name(cfg.device), "gpt_corpus": corpus,
                     "gpt_vocab": data.vocab_size, "gpt_parameters": exp.num_parameters,
                     "gpt_config": (f"{cfg.n_layer} layers, {cfg.n_head} heads, width "
                                    f"{cfg.n_embd}, block {cfg.block_size}, batch "
                                    f"{cfg.batch_size}, {cfg.steps} steps, eval every "
                                    f"{cfg.eval_every} steps on {cfg.eval_batches} batches, "
                                    f"test on {cfg.test_batches} batches, seed {cfg.seed}"),
                     "gpt_lr_grid": " ".join(f"{v:g}" for v in lrs),
                     "gpt_clip_grid": " ".join(f"{v:g}" for v in clips),
                     "gpt_optimizers": ("eager reference (fused=False)" if args.reference
                                        else "fused=None (Triton on CUDA, reference on CPU)")})
        outputs += list(G.write_csvs(exp, args.out).values())
        outputs.append(G.plot_curves(exp, os.path.join(args.out, "gpt_curves.png")))
        outputs.append(G.plot_test(exp, os.path.join(args.out, "gpt_test.png")))
        print(gpt_table(exp), end="\n\n", flush=True)
    info_path = os.path.join(args.out, "run_info.csv")
    write_run_info(info_path, info)
    outputs.append(info_path)
    print("wrote " + ", ".join(sorted(outputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

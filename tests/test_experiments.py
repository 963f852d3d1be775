"""Smoke tests of bench/experiments.py (the paper's experiments): tiny configurations of the
synthetic Figure 1 and of the char-level GPT, run end to end through the same functions as
`python -m bench.experiments`, with their CSVs and plots checked."""

import csv
import math
import pathlib
import sys

import pytest
import torch

import matplotlib  # noqa: F401  (the test extra installs it: a missing one fails, not skips)
import tqdm  # noqa: F401

# bench/ is not an installed package: make it importable however pytest is started.
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import char_gpt as G  # noqa: E402
from bench import experiments as X  # noqa: E402
from bench import synthetic as S  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def assert_png(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC, path


@pytest.fixture(scope="module")
def synthetic_result():
    # L1 = 1 and 1000, the two ends of the paper's range. 500 iterations for GD / clipped GD /
    # Polyak (the paper's length), 300 for DecSPS / AdaSPS (enough to see them stall at L1=1000),
    # and two horizons T for Inexact Polyak. About 8k float64 steps of the eager reference.
    cfg = S.SyntheticConfig(l1_values=(1.0, 1000.0), long_iters=300, t_grid=(100, 2000))
    return S.run(cfg, progress=False)


def test_synthetic_reproduces_figure1_shape(synthetic_result):
    final = {(r["method"], r["L1"]): r["final_gap"] for r in synthetic_result.summary()}
    init = {l1: S._problem(synthetic_result.config, l1).gap(
        torch.tensor([5.0], dtype=torch.float64)).item() for l1 in (1.0, 1000.0)}
    assert init[1000.0] / init[1.0] > 5e5  # f(x0) - f* = 14.9 vs 8.7e6
    # (a) GD with the Table 3 step sizes slows down as L1 grows: 500 steps reach ~1e-22 at
    # L1 = 1 and stay above 1 at L1 = 1000.
    assert final[("gd", 1.0)] < 1e-12 and final[("gd", 1000.0)] > 1.0
    # (b, c) clipped GD and Polyak (f* known) do not depend on L1.
    for l1 in (1.0, 1000.0):
        assert final[("clipped_gd", l1)] < 1e-12, l1
        assert final[("polyak", l1)] < 1e-12, l1
    # (e) AdaSPS's first step is tiny when the first gradient is huge, and it never grows.
    assert final[("adasps", 1000.0)] > 0.5 * init[1000.0]
    # (f) Inexact Polyak at a fixed T: the best-iterate gap does not grow with L1 (within an
    # order of magnitude) although f(x0) - f* grows by 6e5, and it is far below f(x0) - f*.
    sweep = {(r["L1"], r["T"]): r for r in synthetic_result.sweep}
    g1, g1000 = sweep[(1.0, 2000)]["best_gap"], sweep[(1000.0, 2000)]["best_gap"]
    assert 0 <= g1 < 1e-4 and 0 <= g1000 < 1e-4, (g1, g1000)
    assert max(g1, g1000) <= 10 * min(g1, g1000), (g1, g1000)
    # Algorithm 1 returns the best iterate: never worse than the last one, and the last one
    # bounces far out on this function, which is why the selection is needed.
    for row in synthetic_result.sweep:
        assert row["best_gap"] <= row["last_gap"], row
    assert max(r["last_gap"] for r in synthetic_result.sweep if r["T"] == 2000) > 1e-3


def test_synthetic_outputs(synthetic_result, tmp_path):
    paths = S.write_csvs(synthetic_result, str(tmp_path))
    cols, rows = read_csv(paths["curves"])
    assert cols == ["method", "L1", "iteration", "gap"]
    assert {r["method"] for r in rows} == set(S.TRAJECTORY_METHODS)
    assert all(math.isfinite(float(r["gap"])) and float(r["gap"]) >= 0 for r in rows)
    last = max(int(r["iteration"]) for r in rows if r["method"] == "decsps")
    assert last == 300
    cols, rows = read_csv(paths["inexact_polyak"])
    assert cols == ["L1", "T", "best_gap", "last_gap", "x_best"]
    assert sorted((float(r["L1"]), int(r["T"])) for r in rows) == [
        (1.0, 100), (1.0, 2000), (1000.0, 100), (1000.0, 2000)]
    cols, rows = read_csv(paths["summary"])
    assert cols == ["method", "L1", "iterations", "hyperparameters", "initial_gap", "final_gap",
                    "min_gap"]
    assert len(rows) == 6 * 2
    gd = [r for r in rows if r["method"] == "gd" and r["L1"] == "1000"]
    assert gd[0]["hyperparameters"] == "lr=1e-07, max_norm=inf"  # Table 3
    table = X.synthetic_tables(synthetic_result)
    assert "Inexact Polyak" in table and "L1=1000" in table
    assert_png(S.plot(synthetic_result, str(tmp_path / "synthetic.png")))


def test_corpus_is_deterministic_and_split_in_order():
    text, desc = G.stdlib_corpus(max_chars=50_000)
    again, _ = G.stdlib_corpus(max_chars=50_000)
    assert text == again and len(text) == 50_000 and "standard library" in desc
    data = G.CharData(text)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 40_000, "val": 5_000, "test": 5_000}
    decoded = "".join(data.chars[i] for i in data.splits["val"][:200].tolist())
    assert decoded == text[40_000:40_200]


def test_gpt_tiny_run_end_to_end(tmp_path):
    text, desc = G.stdlib_corpus(max_chars=200_000)
    data = G.CharData(text)
    cfg = G.TrainConfig(steps=30, batch_size=8, block_size=32, n_layer=1, n_head=2, n_embd=32,
                        eval_every=10, eval_batches=2, test_batches=4, seed=3, device="cpu")
    exp = G.run_experiment(data, desc, cfg, lrs=(0.3,), clips=(1.0, math.inf), progress=False)
    # one SGD run, one clipped SGD run (clip = inf is the SGD run), five parameter-free runs
    assert [r.method for r in exp.runs] == list(G.METHODS)
    first = {r.curve[0]["val_loss"] for r in exp.runs}
    assert len(first) == 1  # the same initialisation for every method
    assert abs(first.pop() - math.log(data.vocab_size)) < 0.5
    ip = exp.selected()["inexact_polyak"]
    assert [row["step"] for row in ip.curve] == [0, 10, 20, 30]
    losses = [v for row in ip.curve for v in (row["train_loss"], row["val_loss"])]
    assert all(math.isfinite(v) for v in losses) and math.isfinite(ip.test_loss)
    assert not ip.diverged and ip.curve[-1]["val_loss"] < ip.curve[0]["val_loss"] - 0.5

    paths = G.write_csvs(exp, str(tmp_path))
    cols, rows = read_csv(paths["summary"])
    assert cols == ["method", "hyperparameters", "final_train_loss", "final_val_loss",
                    "test_loss", "diverged", "seconds"]
    assert [r["method"] for r in rows] == list(G.METHODS)
    clipped = next(r for r in rows if r["method"] == "clipped_sgd")["hyperparameters"]
    assert clipped in ("lr=0.3, clip=1", "lr=0.3")
    cols, rows = read_csv(paths["grid"])
    assert cols[:3] == ["method", "lr", "clip"] and len(rows) == len(G.METHODS)
    assert sum(int(r["selected"]) for r in rows) >= len(G.METHODS) - 1
    cols, rows = read_csv(paths["curves"])
    assert cols == ["method", "lr", "clip", "step", "train_loss", "val_loss"]
    assert len(rows) == sum(len(r.curve) for r in exp.runs)
    assert_png(G.plot_curves(exp, str(tmp_path / "gpt_curves.png")))
    assert_png(G.plot_test(exp, str(tmp_path / "gpt_test.png")))


def test_cli_options():
    args = X.parse_args(["--quick", "--steps", "7", "--lrs", "0.1,1", "--clips", "1,inf",
                         "--only", "gpt", "--seed", "5", "--device", "cpu"])
    cfg, lrs, clips = X.gpt_config(args)
    assert (cfg.steps, cfg.eval_every, cfg.seed, cfg.n_layer, cfg.n_embd) == (7, 1, 5, 2, 64)
    assert lrs == (0.1, 1.0) and clips == (1.0, math.inf) and cfg.fused is None
    full, lrs, _ = X.gpt_config(X.parse_args(["--device", "cpu"]))
    assert (full.steps, full.batch_size, full.block_size, full.n_layer, full.n_head,
            full.n_embd) == (5000, 64, 256, 6, 6, 384)
    for bad in (["--methods", "adam"], ["--lrs", "0,1"], ["--steps", "0"], ["--threads", "0"],
                ["--only", "lstm"]):
        with pytest.raises(SystemExit):
            X.parse_args(bad)


def test_main_gpt_writes_results(tmp_path, capsys):
    out = tmp_path / "res"
    rc = X.main(["--quick", "--only", "gpt", "--steps", "3", "--device", "cpu",
                 "--methods", "sgd,inexact_polyak", "--lrs", "0.3", "--no-progress",
                 "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Inexact Polyak" in printed and "SGD (tuned)" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpt_curves.csv", "gpt_curves.png", "gpt_grid.csv", "gpt_summary.csv",
                     "gpt_test.png", "run_info.csv"]
    _, rows = read_csv(out / "run_info.csv")
    info = {r["key"]: r["value"] for r in rows}
    assert "3 steps" in info["gpt_config"] and info["gpt_lr_grid"] == "0.3"

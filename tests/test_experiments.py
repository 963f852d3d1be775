"""Smoke tests of bench/experiments.py (the paper's experiments): tiny configurations of the
synthetic Figure 1 and of the char-level GPT, run end to end through the same functions as
`python -m bench.experiments`, with their CSVs and plots checked; the `--smoke` job itself, its
plan, thread policy and output folder; the README's results blocks against the committed run."""

import csv
import math
import pathlib
import re
import shutil
import subprocess
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
from bench import readme_table as R  # noqa: E402
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
    exp = G.run_experiment(data, desc, cfg, lrs=(0.3,), clips=(1.0, math.inf), progress=False,
                           adamw_lrs=(3e-3,))
    # one SGD run, one clipped SGD run (clip = inf is the SGD run), one AdamW run, one of each
    # other method
    assert [r.method for r in exp.runs] == list(G.METHODS)
    first = {r.curve[0]["val_loss"] for r in exp.runs}
    assert len(first) == 1  # the same initialisation for every method
    assert abs(first.pop() - math.log(data.vocab_size)) < 0.5
    for method in ("adamw", "momo", "momo_adam"):
        r = exp.selected()[method]
        assert not r.diverged and r.curve[-1]["val_loss"] < r.curve[0]["val_loss"] - 0.5, method
    assert exp.selected()["adamw"].hparams() == "lr=0.003"
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
                         "--adamw-lrs", "1e-3", "--only", "gpt", "--seed", "5", "--device", "cpu"])
    cfg, lrs, clips, adamw_lrs = X.gpt_config(args)
    assert (cfg.steps, cfg.eval_every, cfg.seed, cfg.n_layer, cfg.n_embd) == (7, 1, 5, 2, 64)
    assert lrs == (0.1, 1.0) and clips == (1.0, math.inf) and cfg.fused is None
    assert adamw_lrs == (1e-3,)
    # the default is the --quick size (its alias); --paper is the paper's length
    default = X.parse_args(["--device", "cpu"])
    assert default.size == "default" and default.out == X.DEFAULT_OUT
    cfg, lrs, clips, adamw_lrs = X.gpt_config(default)
    assert (cfg.steps, cfg.batch_size, cfg.block_size, cfg.n_layer, cfg.n_embd) == (
        300, 16, 64, 2, 64)
    assert lrs == (0.1, 0.3, 1.0) and adamw_lrs == (1e-3, 3e-3, 1e-2)
    # 3 SGD + 6 clipped SGD (clip = inf is SGD) + 3 AdamW + 7 one-run methods
    assert len(G.plan_jobs(G.METHODS, lrs, clips, adamw_lrs)) == 19
    full, _, _, _ = X.gpt_config(X.parse_args(["--paper", "--device", "cpu"]))
    assert (full.steps, full.batch_size, full.block_size, full.n_layer, full.n_head,
            full.n_embd) == (5000, 64, 256, 6, 6, 384)
    smoke, _, _, _ = X.gpt_config(X.parse_args(["--smoke"]))
    assert smoke.steps == 20 and smoke.n_layer == 1
    assert X.parse_args(["--threads", "3"]).threads == 3
    assert X.parse_args([]).threads == "auto"
    for bad in (["--methods", "adam"], ["--lrs", "0,1"], ["--steps", "0"], ["--threads", "0"],
                ["--threads", "many"], ["--only", "lstm"], ["--smoke", "--paper"]):
        with pytest.raises(SystemExit):
            X.parse_args(bad)


def test_thread_policy():
    """--threads auto: the usable cores the 1-minute load average does not show busy, rounded,
    at least 1 (two torch threads on a busy 2-core machine fall far behind one)."""
    cases = {(2, 0.0): 2, (2, 0.4): 2, (2, 0.6): 1, (2, 1.0): 1, (2, 6.0): 1, (8, 2.2): 6,
             (8, 0.0): 8, (1, 0.0): 1}
    for (cores, load), threads in cases.items():
        got, why = X.choose_threads(cores, load)
        assert got == threads, (cores, load, got)
        assert f"{cores} usable cores" in why and f"{load:.2f}" in why
    threads, _ = X.choose_threads()
    assert 1 <= threads <= X.usable_cores()


def test_plan_line():
    cfg, lrs, clips, adamw_lrs = X.gpt_config(X.parse_args(["--device", "cpu"]))
    jobs = G.plan_jobs(G.METHODS, lrs, clips, adamw_lrs)
    line = X.gpt_plan(cfg, G.METHODS, jobs, 150.0, 1)
    assert line == "char-GPT: 10 methods, 19 runs x 300 steps; about 2.5 min at 1 thread"
    timing = {"step": 0.01, "eval_batch": 0.002}
    # 19 runs x (300 steps x 10 ms + (2 x 8 x 14 eval batches + 32 test batches) x 2 ms)
    assert math.isclose(G.estimate_seconds(cfg, 19, timing), 19 * (3.0 + 256 * 0.002))
    syn_cfg = X.SIZES["default"]["synthetic"]
    syn = X.synthetic_plan(syn_cfg, 100.0)
    assert syn == ("synthetic: 6 methods x 4 L1 values (Inexact Polyak: 7 horizons T), "
                          "143,760 float64 steps; about 1.7 min")
    assert X.synthetic_steps(syn_cfg) == 4 * (3 * 500 + 2 * 10_000 + 14_440)


def test_smoke_job_end_to_end(tmp_path, capsys):
    """`python -m bench.experiments --smoke`: both experiments, every output, in seconds."""
    out = tmp_path / "res"
    assert X.main(["--smoke", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = printed.splitlines()[:4]
    assert plan[0].startswith("plan (smoke size; torch threads: 1, --threads)"), plan
    assert re.fullmatch(r"  synthetic: 6 methods x 2 L1 values \(Inexact Polyak: 2 horizons T\), "
                        r"920 float64 steps; about \d+ s", plan[1]), plan[1]
    assert re.fullmatch(r"  char-GPT: 10 methods, 10 runs x 20 steps; about \d+ s at 1 thread",
                        plan[2]), plan[2]
    assert plan[3].startswith("  in all about ") and plan[3].endswith(f"results to {out}")
    assert re.search(r"^took .* \(planned about .*\); load average", printed, re.M)
    for label in ("AdamW (tuned)", "MoMo-Adam", "MoMo ", "Inexact Polyak", "Synthetic"):
        assert label in printed, label
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpt_curves.csv", "gpt_curves.png", "gpt_grid.csv", "gpt_summary.csv",
                     "gpt_test.png", "run_info.csv", "synthetic.png", "synthetic_curves.csv",
                     "synthetic_inexact_polyak.csv", "synthetic_summary.csv"]
    _, rows = read_csv(out / "gpt_summary.csv")
    assert [r["method"] for r in rows] == list(G.METHODS)
    info = R.run_info(out)
    for key in ("wall_seconds", "estimated_seconds", "machine", "load_at_start", "load_at_end",
                "gpt_threads", "gpt_size", "gpt_adamw_lr_grid"):
        assert info[key], key
    assert info["gpt_size"] == "smoke" and info["gpt_threads"].startswith("1 ")
    # the results blocks can be made from any run's folder
    blocks = R.results_blocks(out)
    assert "| AdamW (tuned, 1 runs) | lr = 0.003 |" in blocks["gpt"]
    assert "test − AdamW" in blocks["gpt"] and "| Inexact Polyak |" in blocks["gpt"]
    assert "| T | L1 = 1 | L1 = 1000 |" in blocks["synthetic"]


def test_default_out_is_ignored_by_git():
    """A run writes to bench/runs/experiments (ignored); the committed run is elsewhere."""
    assert X.DEFAULT_OUT == "bench/runs/experiments"
    assert X.REFERENCE_OUT == "bench/results/experiments"
    if shutil.which("git") is None or not (pathlib.Path(ROOT) / ".git").exists():
        pytest.skip("not a git checkout: nothing to ignore files in")
    ignored = subprocess.run(["git", "check-ignore", "-q", X.DEFAULT_OUT + "/gpt_summary.csv"],
                             cwd=ROOT)
    assert ignored.returncode == 0, f"{X.DEFAULT_OUT} is not ignored by git"
    tracked = subprocess.run(["git", "check-ignore", "-q", X.REFERENCE_OUT + "/gpt_summary.csv"],
                             cwd=ROOT)
    assert tracked.returncode == 1, f"{X.REFERENCE_OUT} is ignored: the committed run would go"


def test_main_gpt_writes_results(tmp_path, capsys):
    out = tmp_path / "res"
    rc = X.main(["--quick", "--only", "gpt", "--steps", "3", "--device", "cpu",
                 "--methods", "sgd,adamw,inexact_polyak", "--lrs", "0.3", "--adamw-lrs", "3e-3",
                 "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Inexact Polyak" in printed and "SGD (tuned)" in printed and "AdamW" in printed
    assert "char-GPT: 3 methods, 3 runs x 3 steps" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpt_curves.csv", "gpt_curves.png", "gpt_grid.csv", "gpt_summary.csv",
                     "gpt_test.png", "run_info.csv"]
    _, rows = read_csv(out / "run_info.csv")
    info = {r["key"]: r["value"] for r in rows}
    assert "3 steps" in info["gpt_config"] and info["gpt_lr_grid"] == "0.3"
    assert info["gpt_adamw_lr_grid"] == "0.003"


# ---- the README's results blocks -----------------------------------------------------------------
def test_committed_run_has_every_method():
    _, rows = read_csv(R.RESULTS / "gpt_summary.csv")
    assert [r["method"] for r in rows] == list(G.METHODS)
    info = R.run_info(R.RESULTS)
    for key in ("wall_seconds", "machine", "load_at_start", "load_at_end", "gpt_threads"):
        assert info[key], key


def test_update_readme_replaces_marked_blocks(tmp_path):
    readme = tmp_path / "README.md"
    start, end = R.markers("gpt")
    readme.write_text(f"intro\n{start}\nold numbers\n{end}\noutro\n")
    assert R.update_readme(readme, check=True) == ["gpt"]
    assert "old numbers" in readme.read_text()  # --check leaves it alone
    assert R.update_readme(readme) == ["gpt"]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{end}\noutro\n")
    assert R.readme_blocks(text)["gpt"] == R.gpt_block()
    assert R.update_readme(readme, check=True) == []


def test_readme_results_equal_committed_csvs():
    """The README's results blocks are what `python -m bench.readme_table --experiments` makes
    from bench/results/experiments (fix: `--write README.md`)."""
    readme = pathlib.Path(ROOT) / "README.md"
    present = R.readme_blocks(readme.read_text())
    if not present:
        pytest.skip("README.md has no <!-- results:gpt --> / <!-- results:synthetic --> markers yet")
    expected = R.results_blocks()
    for name, text in present.items():
        assert text == expected[name], (
            f"README.md's {name} results block differs from the committed CSVs: run "
            "python -m bench.readme_table --experiments --write README.md")

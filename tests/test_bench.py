"""The benchmarks' pieces: the layouts have the real shapes, the traffic budget matches the
kernels, one tiny run of the step benchmark writes a CSV that the README table reads, and one
`--quick` run of the foreach benchmark writes its CSV and tables with the traffic counted as
bench/NOTES.md says. CPU only, seconds."""

from __future__ import annotations

import csv
import math

import torch

from bench import foreach_benchmark, layouts, readme_table, step_benchmark


def test_gpt2_layout_is_gpt2_small():
    lay = layouts.GPU_LAYOUTS["gpt2_124m"]
    assert lay.n_params == 124_439_808          # GPT-2 small with the head tied to wte
    assert lay.n_tensors == 148
    assert lay.shapes[0] == (50257, 768) and lay.shapes[1] == (1024, 768)
    llama = layouts.GPU_LAYOUTS["llama_1b"]
    assert 0.9e9 < llama.n_params < 1.1e9
    assert layouts.GPU_LAYOUTS["tiny_2000"].n_tensors == 2000
    assert layouts.GPU_LAYOUTS["huge_4"].n_params == 4 * 64 * 2**20
    for name in layouts.DEFAULT_GPU + layouts.DEFAULT_CPU:
        assert layouts.get(name).name == name


def test_traffic_budget():
    f32, bf16 = torch.float32, torch.bfloat16
    assert step_benchmark.bytes_per_param("inexact_polyak", f32) == 16   # bench/NOTES.md
    assert step_benchmark.bytes_per_param("inexact_polyak", bf16) == 8
    assert step_benchmark.bytes_per_param("dog", f32) == 24
    assert step_benchmark.bytes_per_param("nsgdm", f32) == 28
    assert step_benchmark.bytes_per_param("clipped_sgd", f32, dict(momentum=0.0)) == 16
    assert step_benchmark.bytes_per_param("clipped_sgd", f32, dict(momentum=0.9)) == 24
    assert step_benchmark.bytes_per_param("momo", f32) == 32
    assert step_benchmark.bytes_per_param("momo_adam", f32) == 44
    assert step_benchmark.bytes_per_param("momo_adam", bf16) == 22


def test_harness_smoke(tmp_path, capsys):
    """One quick run on the smallest CPU layout: every requested provider gets a timed, finite
    row with the floor arithmetic consistent, and the README table is made from it."""
    out = tmp_path / "step.csv"
    threads = torch.get_num_threads()
    step_benchmark.main(["--device", "cpu", "--quick", "--layouts", "tiny_200",
                         "--dtypes", "float32", "--optimizers", "inexact_polyak,clipped_sgd",
                         "--providers", "reference,foreach,torch_sgd_clip,fused",
                         "--out", str(out), "--no-plot", "--target-s", "0.01"])
    assert torch.get_num_threads() == threads     # the run's one CPU thread is not left behind
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["threads"] == "1" for r in rows)
    got = {(r["optimizer"], r["provider"]) for r in rows}
    assert got == {("inexact_polyak", "reference"), ("inexact_polyak", "foreach"),
                   ("clipped_sgd", "reference"), ("clipped_sgd", "foreach"),
                   ("clipped_sgd", "torch_sgd_clip")}           # no fused row on CPU
    lay = layouts.get("tiny_200")
    for r in rows:
        assert set(step_benchmark.COLUMNS) == set(r)
        med = float(r["median_ms"])
        assert 0 < float(r["p20_ms"]) <= med <= float(r["p80_ms"])
        assert int(r["n_params"]) == lay.n_params and int(r["n_tensors"]) == 200
        assert int(r["bytes"]) == 16 * lay.n_params
        floor = int(r["bytes"]) / (float(r["copy_gbps"]) * 1e9) * 1e3
        assert math.isclose(float(r["floor_ms"]), floor, rel_tol=1e-3)
        assert math.isclose(float(r["frac_of_floor"]), floor / med, rel_tol=1e-2)
        assert int(r["launches"]) > 0
        assert "non-finite" not in r["note"] and "failed" not in r["note"]
    # the eager reference dispatches more ops than the foreach path (2624 against 1432 per step
    # on tiny_200, 2026-12-03: the foreach path's sums take a dot product per tensor)
    launches = {(r["optimizer"], r["provider"]): int(r["launches"]) for r in rows}
    assert launches[("inexact_polyak", "reference")] > launches[("inexact_polyak", "foreach")]
    text = readme_table.make_tables(rows)
    assert "| tiny_200 | float32 |" in text and "InexactPolyak" in text


def test_readme_block_rewrite(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_table.START}\nold table\n{readme_table.END}\noutro\n")
    assert readme_table.write_block(readme, "new table\n")
    text = readme.read_text()
    assert "old table" not in text and "new table" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    plain = tmp_path / "other.md"
    plain.write_text("no markers\n")
    assert not readme_table.write_block(plain, "x")
    assert plain.read_text() == "no markers\n"


def test_paired_ratio_compares_within_rounds():
    """The ratios pair two providers' times round by round: a slow phase that caught one
    provider's steps more often than the other's does not move the ratio, as it moves the ratio
    of the two all-step medians (here 15 / 20)."""
    timed = {"a": {"median_ms": 15.0, "round_ms": [10.0, 15.0, 15.0]},
             "b": {"median_ms": 20.0, "round_ms": [20.0, 20.0, 30.0]}}
    assert foreach_benchmark.paired_ratio(timed, "a", "b") == 0.5
    assert foreach_benchmark.paired_ratio(timed, "b", "a") == 2.0
    unpaired = {"a": {"median_ms": 3.0, "round_ms": []}, "b": {"median_ms": 4.0, "round_ms": []}}
    assert foreach_benchmark.paired_ratio(unpaired, "a", "b") == 0.75


def test_foreach_benchmark_quick(tmp_path):
    """`python -m bench.foreach_benchmark --quick` end to end (one thread: the run shares two
    cores with other jobs): every provider on both tiny layouts gets a row with every column,
    positive times, traffic and floor, the bytes per parameter the NOTES table gives (counted by
    the dispatch mode), a memory measurement from the subprocess, and the markdown tables. No
    timing assertions."""
    out = tmp_path / "foreach"
    threads = torch.get_num_threads()
    csv_path = foreach_benchmark.main(["--quick", "--threads", "1", "--out", str(out)])
    assert torch.get_num_threads() == threads
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == foreach_benchmark.COLUMNS
        rows = list(reader)
    names = set(foreach_benchmark.PROVIDERS)
    quick = foreach_benchmark.QUICK_LAYOUTS
    assert {(r["layout"], r["method"]) for r in rows} == {(lay, n) for lay in quick for n in names}
    assert len(names) == 14 and sum(p.kind == "ours" for p in foreach_benchmark.PROVIDERS.values())\
        == 10                                   # 9 methods, ClippedSGD with and without momentum
    for r in rows:
        lay = quick[r["layout"]]
        assert int(r["n_params"]) == lay.n_params and int(r["n_tensors"]) == lay.n_tensors
        assert int(r["reps"]) == 3 and int(r["rounds"]) == 1
        for col in ("median_ms", "p20_ms", "p80_ms", "bytes_per_param", "sgd_gbps", "floor_ms",
                    "ratio_to_floor", "ratio_clip_sgd"):
            assert float(r[col]) > 0, (r["method"], col)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        floor = (float(r["budget_bytes_per_param"]) * lay.n_params      # the method's own floor
                 / (float(r["sgd_gbps"]) * 1e9) * 1e3)
        assert math.isclose(float(r["floor_ms"]), floor, rel_tol=2e-2)
        # the traffic counted per op and compiled loop, as bench/NOTES.md counts it by hand
        # (within the 0-d scalars): with the compiled loops every method at its budget
        counted, hand = float(r["bytes_per_param"]), foreach_benchmark.HAND_COUNT[r["method"]]
        assert abs(counted - hand) < 0.5, (r["method"], counted)
        if r["kind"] == "ours":
            assert hand == int(r["budget_bytes_per_param"]), r["method"]
        assert math.isfinite(float(r["peak_extra_mb"])) and float(r["state_mb"]) >= 0
        assert r["memory_met"] in ("yes", "no")
        assert "failed" not in r["note"] and "non-finite" not in r["note"], r["note"]
        if r["kind"] == "ours":
            assert r["floor_met"] in ("yes", "no") and float(r["ratio_peer"]) > 0
        if r["method"] in ("momo", "momo_adam"):
            assert float(r["ratio_adam"]) > 0
        if r["method"] == "inexact_polyak":
            assert float(r["time_target"]) == (0.8 if r["layout"] == "gpt2_tiny" else 1.0)
    sgd = {r["layout"]: r for r in rows if r["method"] == "torch_sgd"}
    assert all(math.isclose(float(r["ratio_to_floor"]), 1.0, rel_tol=1e-2) for r in sgd.values())
    text = (tmp_path / "foreach.md").read_text()
    assert "Conditions:" in text and "load average" in text and "| InexactPolyak |" in text
    assert "aten::" in (tmp_path / "foreach_profile.md").read_text()

"""The step benchmark's pieces: the foreach baselines compute the reference's update, the layouts
have the real shapes, the traffic budget matches the kernels, and one tiny run of the harness
writes a CSV that the README table reads. CPU only, a few seconds."""

from __future__ import annotations

import csv
import importlib
import inspect
import math

import pytest
import torch

import polyak_fused as pf
from bench import baselines, layouts, readme_table, step_benchmark

# (method, class, hyperparameters): non-default values where a default would hide a term
# (a non-zero lower bound, weight decay, momentum, the agnostic schedule).
CONFIGS = [
    ("inexact_polyak", pf.InexactPolyak, dict(total_steps=50, lower_bound=0.1)),
    ("polyak", pf.Polyak, dict(f_star=0.2, c=0.5, max_lr=3.0)),
    ("decsps", pf.DecSPS, dict(c0=1.5, gamma_b=2.0, lower_bound=0.05)),
    ("adasps", pf.AdaSPS, dict(c_p=0.7, lower_bound=0.05)),
    ("dog", pf.DoG, dict(reps_rel=1e-3, weight_decay=0.01)),
    ("clipped_sgd", pf.ClippedSGD, dict(max_norm=0.5, momentum=0.0)),
    ("clipped_sgd", pf.ClippedSGD, dict(max_norm=0.5, momentum=0.9)),
    ("nsgdm", pf.NSGDM, dict(beta=0.8, schedule="constant")),
    ("nsgdm", pf.NSGDM, dict(beta=0.8, schedule="agnostic")),
]
SHAPES = [(3, 5), (7,), (1,), (4, 4, 2), (11, 3)]


@pytest.mark.parametrize("item", [False, True], ids=["foreach", "foreach_item"])
@pytest.mark.parametrize("method,cls,hp", CONFIGS,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CONFIGS)])
def test_baseline_matches_reference(method, cls, hp, item):
    """5 steps in float64 on fresh random gradients and losses: the same parameters, step count
    and step size as the eager reference (5 steps exercise DecSPS's and AdaSPS's running min,
    DoG's growing rbar and the momentum recursions)."""
    torch.manual_seed(1234)
    x0 = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    ref = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = cls(ref, lr=0.3, fused=False, **hp)
    mine = [x.clone() for x in x0]
    grads = [torch.empty_like(x) for x in x0]
    base = baselines.make_baseline(method, mine, grads, item=item, lr=0.3, **hp)
    for _ in range(5):
        gs = [torch.randn_like(x) for x in x0]
        loss = torch.rand((), dtype=torch.float64) + 0.5
        for p, g in zip(ref, gs):
            p.grad = g.clone()
        for d, g in zip(grads, gs):
            d.copy_(g)
        opt.step(loss=loss)
        base.step(loss)
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(mine[0], x0[0])           # the steps did move the parameters
    assert float(base.scalars["step"]) == float(opt.scalars["step"]) == 5
    name = "clip_coef" if method == "clipped_sgd" else "step_size"
    assert math.isclose(float(base.scalars[name]), float(opt.scalars[name]), rel_tol=1e-12)


def test_device_baseline_does_not_touch_the_host():
    """The no-item version never converts a tensor to a Python number: with every .item() and
    .tolist() made to fail, a step still runs."""
    torch.manual_seed(0)
    xs = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    base = baselines.make_baseline("adasps", xs, gs, item=False)
    orig_item, orig_tolist = torch.Tensor.item, torch.Tensor.tolist

    def boom(*a, **k):
        raise AssertionError("host sync")
    try:
        torch.Tensor.item, torch.Tensor.tolist = boom, boom
        base.step(torch.tensor(2.0, dtype=torch.float64))
    finally:
        torch.Tensor.item, torch.Tensor.tolist = orig_item, orig_tolist
    assert float(base.scalars["step"]) == 1


def test_baseline_defaults_and_constants_match_the_package():
    from polyak_fused._optimizer import TINY_GRAD_SQ
    # the modules, not the functional forms of the same names that polyak_fused exports
    dog_module = importlib.import_module("polyak_fused.dog")
    clip_module = importlib.import_module("polyak_fused.clipped_sgd")
    assert baselines.TINY_GRAD_SQ == TINY_GRAD_SQ
    assert baselines.DOG_EPS == dog_module.DOG_EPS
    assert baselines.CLIP_EPS == clip_module.CLIP_EPS
    classes = {"inexact_polyak": pf.InexactPolyak, "polyak": pf.Polyak, "decsps": pf.DecSPS,
               "adasps": pf.AdaSPS, "dog": pf.DoG, "clipped_sgd": pf.ClippedSGD, "nsgdm": pf.NSGDM}
    for method, cls in classes.items():
        sig = inspect.signature(cls.__init__).parameters
        for name, value in baselines.DEFAULT_HPARAMS[method].items():
            assert sig[name].default == value, (method, name)


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
                         "--providers", "reference,foreach_item,foreach,torch_sgd_clip,fused",
                         "--out", str(out), "--no-plot", "--target-s", "0.01"])
    assert torch.get_num_threads() == threads     # the run's one CPU thread is not left behind
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["threads"] == "1" for r in rows)
    got = {(r["optimizer"], r["provider"]) for r in rows}
    assert got == {("inexact_polyak", "reference"), ("inexact_polyak", "foreach_item"),
                   ("inexact_polyak", "foreach"), ("clipped_sgd", "reference"),
                   ("clipped_sgd", "foreach_item"), ("clipped_sgd", "foreach"),
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
    # the eager reference dispatches many more ops than the foreach version
    launches = {(r["optimizer"], r["provider"]): int(r["launches"]) for r in rows}
    assert launches[("inexact_polyak", "reference")] > 10 * launches[("inexact_polyak", "foreach")]
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

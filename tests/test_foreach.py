"""The foreach path (torch._foreach_* ops, polyak_fused/_foreach.py) against the eager reference.

Every test runs the foreach path in each of its forms (the `form` fixture): the host form (CPU:
the step's scalars are read as Python numbers and the tensors updated in place), with its passes
as the compiled CPU loops (polyak_fused/_cpu_loops) and with torch ops (where the loops cannot be
built), and the device form (what MPS, XPU and CUDA without Triton run: nothing read on the host,
every update committed with torch.where), forced on the CPU by emptying
polyak_fused._foreach.HOST_DEVICES. Where the
blocking matters, polyak_fused._foreach.BLOCK is made small, so that tensors of a few thousand
elements are cut into flat views and small ones grouped (test_a_small_block_cuts_the_step_into_
blocks checks that the setting takes effect).

  * parity: test_parity's configurations and param groups, every dtype, against the float64
    reference, with the fused path's tolerances (float64: 1e-12);
  * the choice of path (fused / foreach switches, torch.optim's semantics);
  * the guards: non-finite loss or gradient (bitwise unchanged, counted as skipped), zero
    gradient, loss below the lower bound; GradScaler's scale and inf flag;
  * state_dict round trip, pickling and deepcopy; parameters without a gradient; the functional
    forms; watch_loss; and no host read inside step() in the device form.
Inputs are random (seeded per test), never only zeros, except where zeros are the point.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import sys

import pytest
import test_functional as functional
import test_no_grad as no_grad
import test_parity as parity
import test_watch_loss as watch
import torch
from eager_helpers import assert_same_snapshot, snapshot
from helpers import assert_close

import polyak_fused as pf
import polyak_fused._foreach as F
from polyak_fused import _cpu_loops
from polyak_fused._optimizer import COMMON_SCALARS

CPU = torch.device("cpu")
NAMES = list(parity.OPTIMIZERS)          # every configuration of test_parity
MIXED_SHAPES = parity._shapes("mixed")   # empty, one element, 5003 elements, a strided one, ...
SMALL_BLOCK = 256
STEPS = parity.STEPS                     # 3
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
          torch.float64: "float64"}
F64_TOL = (1e-12, 1e-14)                 # (rtol, atol) of the float64 foreach run
# One configuration per class (the path choice is made in the base class; each class passes it).
ONE_PER_CLASS = ["inexact_polyak", "polyak", "decsps", "adasps", "dog", "clipped_sgd", "nsgdm",
                 "momo", "momo_adam"]


# ---- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(params=["host", "host_torch_ops", "device"])
def form(request, monkeypatch):
    """The foreach path's form: "host" (CPU's own, its passes the compiled CPU loops),
    "host_torch_ops" (the CPU's own with torch ops, as where the loops cannot be built) or
    "device" (forced on the CPU)."""
    if request.param == "host":
        assert _cpu_loops.module() is not None, "the compiled CPU loops did not build"
    else:
        monkeypatch.setattr(_cpu_loops, "_chosen", None)      # the torch ops
    if request.param == "device":
        monkeypatch.setattr(F, "HOST_DEVICES", ())
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(F, "BLOCK", SMALL_BLOCK)


def path_taken(opt) -> str:
    return opt._fused_cache["param_set"][2]


def build(name, params, **path):
    """test_parity's configuration `name` over its three param groups (lr x1, x0.5 as a float,
    x0.25 as a tensor), on the path given by `path` (fused= / foreach=)."""
    specs = [g for g in parity._groups(params, CPU) if g["params"]]
    opt = parity.OPTIMIZERS[name]([{"params": g["params"]} for g in specs], **path)
    base = opt.defaults["lr"]
    for group, spec in zip(opt.param_groups, specs):
        lr = base * spec.get("lr_scale", 1.0)
        group["lr"] = torch.tensor(lr) if spec.get("tensor_lr") else lr
    return opt


def random_params(dtype, gen, shapes=MIXED_SHAPES):
    return parity._make_params(shapes, dtype, CPU, gen)


def random_grads(params, gen, scale=1.0):
    """A gradient per parameter, drawn in float64 and rounded to its dtype (times `scale`); a
    strided parameter gets a gradient with its strides, as autograd gives it."""
    grads = []
    for p in params:
        g = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)
        grads.append(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).copy_(g))
    return grads


def random_loss(gen):
    return 1.0 + torch.rand((), generator=gen, dtype=torch.float64).item()


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone(memory_format=torch.preserve_format)


def float64_copies(params):
    """(.clone(): float64 parameters must not share their memory with the copies)"""
    return [torch.nn.Parameter(p.detach().double().clone()) for p in params]


def step_both(opt, ref, params, ref_params, grads, loss):
    """One step of the run and of its float64 reference on the same (rounded) inputs."""
    set_grads(params, grads)
    set_grads(ref_params, [None if g is None else g.double() for g in grads])
    opt.step(loss=torch.tensor(loss).to(params[0].dtype))
    ref.step(loss=torch.tensor(loss).to(params[0].dtype).double())


def compare(opt, ref, params, ref_params, dtype, what):
    """Parameters, every state buffer and every scalar of `opt` against the float64 reference
    `ref`, with test_parity's tolerances and rules (which scalars depend on stored tensors,
    MoMo's step size and lb left out in bfloat16/float16); float64 at F64_TOL throughout."""
    low = dtype != torch.float64
    rtol, atol = parity.DTYPES[dtype] if low else F64_TOL
    skip = parity._not_compared(opt, dtype) if low else set()
    scalar_names = COMMON_SCALARS + opt.SCALARS
    for i, (a, e) in enumerate(zip(params, ref_params)):
        assert_close(a, e, rtol=rtol, atol=atol, what=f"{what} param {i} {tuple(a.shape)}")
        assert opt.state[a].keys() == ref.state[e].keys(), f"{what} state keys of param {i}"
        for key, buf in ref.state[e].items():
            if key not in scalar_names:
                assert_close(opt.state[a][key], buf, rtol=rtol, atol=atol,
                             what=f"{what} state {key!r} of param {i}")
    for key, value in ref.scalars.items():
        got = opt.scalars[key]
        if key in ("step", "skipped"):
            assert got.item() == value.item(), f"{what} scalar {key}: {got.item()} vs {value.item()}"
        elif key not in skip:
            assert_close(got, value, rtol=parity._scalar_rtol(opt, key, rtol) if low else rtol,
                         atol=1e-7 if low else 1e-13, what=f"{what} scalar {key!r}")


# ---- 1. parity with the float64 reference ----------------------------------------------------------
@pytest.mark.parametrize("blocking", ["one_block", "small_blocks"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("name", NAMES)
def test_foreach_matches_the_float64_reference(name, dtype, blocking, form, monkeypatch):
    """test_parity's run on the foreach path: STEPS steps, three param groups (one with a tensor
    lr), ragged shapes with an empty, a one-element and a strided parameter; the reference gets
    float64 copies of the same rounded parameters, gradients and losses."""
    if blocking == "small_blocks":
        monkeypatch.setattr(F, "BLOCK", SMALL_BLOCK)
    gen = torch.Generator().manual_seed(10)
    params = random_params(dtype, gen)
    ref_params = float64_copies(params)
    opt = build(name, params, foreach=True)
    ref = build(name, ref_params, foreach=False)
    for _ in range(STEPS):
        step_both(opt, ref, params, ref_params, random_grads(params, gen), random_loss(gen))
    assert path_taken(opt) == "foreach" and path_taken(ref) == "reference"
    assert opt.scalars["step"].item() == STEPS and opt.scalars["skipped"].item() == 0
    compare(opt, ref, params, ref_params, dtype, f"{name}/{DTYPES[dtype]}/{form}/{blocking}")


@pytest.mark.parametrize("name", ["inexact_polyak_best", "dog", "clipped_sgd_momentum",
                                  "momo_adam_adamw_fstar"])
@pytest.mark.parametrize("mix", ["fp32+bf16", "fp32+bf16+fp16"])
def test_foreach_matches_the_reference_across_dtypes(name, mix, form, small_blocks):
    """float32, bfloat16 and float16 parameters in one optimizer (the exact dtypes are updated in
    place on the host, the others through a float32 copy)."""
    gen = torch.Generator().manual_seed(11)
    params = random_params(mix, gen)
    ref_params = float64_copies(params)
    opt = build(name, params, foreach=True)
    ref = build(name, ref_params, foreach=False)
    for _ in range(STEPS):
        step_both(opt, ref, params, ref_params, random_grads(params, gen), random_loss(gen))
    compare(opt, ref, params, ref_params, torch.bfloat16, f"{name}/{mix}/{form}")


#: The configurations whose host form updates whole tensors in place (x <- x - c g).
IN_PLACE_ON_THE_HOST = {"inexact_polyak", "inexact_polyak_best", "polyak_sps_max", "polyak",
                        "decsps", "adasps", "clipped_sgd"}


def test_the_dot_products_are_cut_at_a_block(small_blocks, monkeypatch):
    """Each dot product of the sums (with torch ops) covers at most BLOCK elements (their
    accuracy)."""
    monkeypatch.setattr(_cpu_loops, "_chosen", None)
    lengths = []
    real_dot = torch.dot

    def recording_dot(a, b):
        lengths.append(a.numel())
        return real_dot(a, b)

    monkeypatch.setattr(torch, "dot", recording_dot)
    total = F.sum_of_squares([torch.randn(5003), torch.randn(7, 13)], torch.float64)
    assert max(lengths) <= SMALL_BLOCK and len(lengths) == 20 + 1
    assert torch.isfinite(total)


@pytest.mark.parametrize("name", NAMES)
def test_a_small_block_cuts_the_step_into_blocks(name, form, small_blocks, monkeypatch):
    """With BLOCK = SMALL_BLOCK every block the step works on holds at most that many elements,
    except a strided tensor larger than a block (not cut into flat views), which is a block of
    its own; so the runs with small blocks do exercise the cutting and grouping."""
    made = []
    real_blocks = F.blocks

    def recording_blocks(*lists, **kwargs):
        for block in real_blocks(*lists, **kwargs):
            made.append(block[0])
            yield block

    monkeypatch.setattr(F, "blocks", recording_blocks)
    gen = torch.Generator().manual_seed(12)
    params = random_params(torch.float32, gen)
    opt = build(name, params, foreach=True)
    for _ in range(2):
        set_grads(params, random_grads(params, gen))
        opt.step(loss=random_loss(gen))
    if form == "host":    # the compiled loops: one loop per pass over all tensors, no blocks
        assert not made, f"{name}: blocks where the compiled CPU loops run"
        return
    if form == "host_torch_ops" and name in IN_PLACE_ON_THE_HOST:
        # one pass of in-place foreach ops over whole tensors and blocked dot products: no
        # temporaries, hence no blocks; the dot products are cut at BLOCK (checked below)
        assert not made, f"{name}: blocks on the host, where the update needs none"
        return
    assert made, f"{name}: the step made no blocks"
    for block in made:
        n = sum(t.numel() for t in block)
        assert n <= SMALL_BLOCK or (len(block) == 1 and not block[0].is_contiguous()), \
            f"{name}: a block of {n} elements in {[tuple(t.shape) for t in block]}"
    assert max(len(b) for b in made) > 1, "small tensors are grouped into one block"


#: The compiled loops each configuration's host step calls: (sum pass, update pass).
LOOPS_TAKEN = {name: ("sum_sq", "axpy") for name in NAMES} | {
    "dog": ("dog_sums", "axpy"),
    "clipped_sgd_momentum": ("sum_sq", "momentum_update"),
    "nsgdm": ("momentum_sums", "momentum_update"),
    "nsgdm_agnostic": ("momentum_sums", "momentum_update"),
    "momo": ("momentum_sums", "momentum_update"),
    "momo_bc_fstar": ("momentum_sums", "momentum_update"),
    "momo_adam": ("adam_sums", "adam_update"),
    "momo_adam_adamw_fstar": ("adam_sums", "adam_update")}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("name", NAMES)
def test_the_host_form_runs_each_pass_as_one_compiled_loop(name, dtype, monkeypatch):
    """On the CPU every step is one call of its sum loop and one of its update loop, over all
    tensors (the transposed one included), and no torch op touches a whole tensor."""
    loops = _cpu_loops.module()
    calls = []
    for function in ("sum_sq", "dog_sums", "axpy", "momentum_sums", "momentum_update",
                     "adam_sums", "adam_update"):
        def recording(*args, _real=getattr(loops, function), _name=function):
            calls.append((_name, len(args[0] if args[0] is not None else args[1])))
            return _real(*args)
        monkeypatch.setattr(loops, function, recording)
    gen = torch.Generator().manual_seed(14)
    params = random_params(dtype, gen)
    opt = build(name, params, foreach=True)
    set_grads(params, random_grads(params, gen))
    opt.step(loss=random_loss(gen))
    assert [c for c, _ in calls] == list(LOOPS_TAKEN[name]), f"{name}: {calls}"
    assert all(n == len(params) for _, n in calls), f"{name}: {calls}"


def test_a_step_on_tensors_the_loops_refuse_runs_the_torch_ops():
    """A parameter with gaps in its memory (a strided slice) sends the step to the torch ops,
    which give the reference's result."""
    gen = torch.Generator().manual_seed(15)
    base = torch.randn(9, 16, generator=gen, dtype=torch.float64)
    params = [torch.nn.Parameter(torch.empty(9, 16)[:, ::2].copy_(base[:, ::2])),
              torch.nn.Parameter(torch.randn(33, generator=gen))]
    assert "not a dense CPU tensor" in _cpu_loops.module().refusal(params[:1])
    ref_params = float64_copies(params)
    opt = build("momo_adam", params, foreach=True)
    ref = build("momo_adam", ref_params, foreach=False)
    for _ in range(STEPS):
        grads = random_grads(params, gen)
        set_grads(params, grads)
        set_grads(ref_params, [g.double() for g in grads])
        loss = random_loss(gen)
        opt.step(loss=loss)
        ref.step(loss=loss)
    assert _cpu_loops.for_tensors(params) is None
    compare(opt, ref, params, ref_params, torch.float32, "momo_adam/gapped")


# ---- 2. the choice of path -----------------------------------------------------------------------
@pytest.mark.parametrize("switches, expected", [
    (dict(foreach=True), "foreach"),
    (dict(foreach=False), "reference"),
    (dict(fused=False), "foreach"),
    (dict(fused=False, foreach=False), "reference"),
    (dict(), "foreach"),                        # the default on the CPU
    (dict(fused=True, foreach=False), "fused"),  # (the kernels under the Triton interpreter)
], ids=["foreach", "foreach_false", "fused_false", "both_false", "default", "fused"])
@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_the_switches_pick_the_path(name, switches, expected):
    gen = torch.Generator().manual_seed(20)
    params = random_params(torch.float32, gen, [(3, 4), (5,)])
    opt = parity.OPTIMIZERS[name](params, **switches)
    assert opt.foreach is switches.get("foreach")
    set_grads(params, random_grads(params, gen))
    opt.step(loss=random_loss(gen))
    assert path_taken(opt) == expected


@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_the_default_takes_the_foreach_path_for_float64_parameters(name):
    gen = torch.Generator().manual_seed(21)
    params = random_params(torch.float64, gen, [(3, 4), (5,)])
    opt = parity.OPTIMIZERS[name](params)
    set_grads(params, random_grads(params, gen))
    opt.step(loss=random_loss(gen))
    assert path_taken(opt) == "foreach"


@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_fused_and_foreach_both_true_is_refused(name):
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="foreach"):
        parity.OPTIMIZERS[name](params, fused=True, foreach=True)


@pytest.mark.parametrize("bad", ["yes", 1, 0])
@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_a_foreach_that_is_not_a_bool_is_refused(name, bad):
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="Invalid foreach"):
        parity.OPTIMIZERS[name](params, foreach=bad)


# ---- 3. guards -----------------------------------------------------------------------------------
#: (loss, value put into one gradient element): the element sits in the 5003-element tensor,
#: past its first blocks when BLOCK is small.
BAD_INPUTS = {"nan_loss": (math.nan, None), "inf_loss": (math.inf, None),
              "nan_grad": (1.5, math.nan), "inf_grad": (1.5, -math.inf)}
BAD_TENSOR, BAD_INDEX = MIXED_SHAPES.index((5003,)), 4321


def bad_step(opt, params, gen, bad):
    loss, value = BAD_INPUTS[bad]
    grads = random_grads(params, gen)
    if value is not None:
        grads[BAD_TENSOR][BAD_INDEX] = value
    set_grads(params, grads)
    assert opt.step(loss=loss) is not None       # no exception


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_input_skips_the_step_bitwise(name, bad, dtype, form, small_blocks):
    gen = torch.Generator().manual_seed(30)
    params = random_params(dtype, gen)
    opt = build(name, params, foreach=True)
    for _ in range(2):                           # two ordinary steps first: the state exists
        set_grads(params, random_grads(params, gen))
        opt.step(loss=random_loss(gen))
    before = snapshot(opt)
    bad_step(opt, params, gen, bad)
    after = snapshot(opt)
    assert path_taken(opt) == "foreach"
    assert_same_snapshot(after, before, ignore_scalars=("skipped",), what=f"{name} {bad}: ")
    assert after["scalars"]["skipped"].item() == before["scalars"]["skipped"].item() + 1
    # and the next, finite step is taken
    set_grads(params, random_grads(params, gen))
    opt.step(loss=random_loss(gen))
    assert opt.scalars["step"].item() == 3 and opt.scalars["skipped"].item() == 1
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_first_step_leaves_the_parameters_unchanged(name, bad, form, small_blocks):
    gen = torch.Generator().manual_seed(31)
    params = random_params(torch.float32, gen)
    opt = build(name, params, foreach=True)
    start = [p.detach().clone() for p in params]
    bad_step(opt, params, gen, bad)
    for i, (p, s) in enumerate(zip(params, start)):
        assert torch.equal(p, s), f"{name} {bad}: param {i} moved"
    assert opt.scalars["step"].item() == 0 and opt.scalars["skipped"].item() == 1


@pytest.mark.parametrize("name", NAMES)
def test_a_zero_gradient_gives_a_zero_step(name, form, small_blocks):
    """A zero first gradient: no NaN anywhere, the reference's scalars (AdaSPS's eta = +inf, MoMo's
    cap), and, without weight decay (which moves x along a zero direction), x unchanged."""
    gen = torch.Generator().manual_seed(32)
    params = random_params(torch.float32, gen)
    ref_params = float64_copies(params)
    start = [p.detach().clone() for p in params]
    opt = build(name, params, foreach=True)
    ref = build(name, ref_params, foreach=False)
    step_both(opt, ref, params, ref_params, [torch.zeros_like(p) for p in params], 1.5)
    assert opt.scalars["step"].item() == 1 and opt.scalars["skipped"].item() == 0
    after = snapshot(opt)
    for t in after["params"] + [v for st in after["state"] for v in st.values()] + \
            list(after["scalars"].values()):
        assert not t.isnan().any(), f"{name}: NaN after a zero gradient"
    if opt.defaults.get("weight_decay", 0.0) == 0.0:
        for i, (p, s) in enumerate(zip(params, start)):
            assert torch.equal(p, s), f"{name}: param {i} moved along a zero gradient"
    compare(opt, ref, params, ref_params, torch.float32, f"{name} zero gradient")


@pytest.mark.parametrize("cls, kwargs", [
    (pf.InexactPolyak, dict(total_steps=10, lower_bound=0.5)),
    (pf.InexactPolyak, dict(total_steps=10, lower_bound=0.5, track_best=True)),
    (pf.Polyak, dict(f_star=0.5)),
    (pf.Polyak, dict(f_star=0.5, c=0.5, max_lr=0.1)),
    (pf.DecSPS, dict(lower_bound=0.5)),
    (pf.AdaSPS, dict(lower_bound=0.5)),
    (pf.MoMo, dict(lb=0.5)),
    (pf.MoMoAdam, dict(lb=0.5)),
], ids=["inexact_polyak", "inexact_polyak_best", "polyak", "sps_max", "decsps", "adasps", "momo",
        "momo_adam"])
def test_a_loss_below_the_lower_bound_gives_a_zero_step(cls, kwargs, form, small_blocks):
    gen = torch.Generator().manual_seed(33)
    params = random_params(torch.float32, gen)
    start = [p.detach().clone() for p in params]
    opt = cls(params, foreach=True, **kwargs)
    set_grads(params, random_grads(params, gen))
    opt.step(loss=0.25)                          # f < l*: (f - l*)_+ = 0
    for i, (p, s) in enumerate(zip(params, start)):
        assert torch.equal(p, s), f"param {i} moved"
    assert opt.scalars["step_size"].item() == 0.0
    assert opt.scalars["step"].item() == 1 and opt.scalars["skipped"].item() == 0


# ---- 4. GradScaler -------------------------------------------------------------------------------
SCALE = 2.0 ** 12   # a power of two: S * g and (S * g) / S carry the bits of g


def scaled_step(opt, params, grads, loss, scale, found_inf=0.0):
    """What torch.amp.GradScaler.step(opt) does for an optimizer with
    _step_supports_amp_scaling: .grad holds S * g, the scale and the inf flag are attributes."""
    set_grads(params, [g * scale for g in grads])
    opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(found_inf)
    try:
        opt.step(loss=loss)
    finally:
        del opt.grad_scale, opt.found_inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_a_scaled_step_equals_the_unscaled_step_bitwise(name, dtype, form, small_blocks):
    gen = torch.Generator().manual_seed(40)
    params = random_params(dtype, gen)
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = build(name, params, foreach=True)
    plain = build(name, plain_params, foreach=True)
    for _ in range(STEPS):
        grads, loss = random_grads(params, gen), random_loss(gen)
        scaled_step(opt, params, grads, loss, SCALE)
        set_grads(plain_params, grads)
        plain.step(loss=loss)
    assert opt.scalars["step"].item() == STEPS
    assert_same_snapshot(snapshot(opt), snapshot(plain), what=f"{name} scaled vs unscaled: ")


@pytest.mark.parametrize("name", NAMES)
def test_found_inf_skips_the_step_bitwise(name, form, small_blocks):
    """GradScaler's flag alone (the gradients the optimizer reads are finite) skips the step."""
    gen = torch.Generator().manual_seed(41)
    params = random_params(torch.float32, gen)
    opt = build(name, params, foreach=True)
    scaled_step(opt, params, random_grads(params, gen), random_loss(gen), SCALE)
    before = snapshot(opt)
    scaled_step(opt, params, random_grads(params, gen), random_loss(gen), SCALE, found_inf=1.0)
    after = snapshot(opt)
    assert_same_snapshot(after, before, ignore_scalars=("skipped",), what=f"{name} found_inf: ")
    assert after["scalars"]["skipped"].item() == 1 and after["scalars"]["step"].item() == 1


@pytest.mark.parametrize("name", list(watch.FACTORIES))
def test_grad_scaler_with_watched_micro_batches_equals_the_unscaled_run_bitwise(name, form):
    """test_grad_scaler's run on the foreach path: the real torch.amp.GradScaler("cpu"), whose
    scale doubles during the run, watch_loss over 4 micro-batches, a bare scaler.step(opt)."""
    def run(scaler):
        model = watch.make_model(torch.float32)
        opt = watch.FACTORIES[name](model.parameters(), foreach=True)
        for x, y in watch.make_batches(torch.float32, 4):
            opt.zero_grad()
            for xs, ys in watch.micro_batches(x, y):
                loss = opt.watch_loss(watch.mse(model, xs, ys)) / watch.MICRO
                (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        return opt

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14, growth_interval=2)
    opt = run(scaler)
    assert scaler.get_scale() == 2.0 ** 16
    assert path_taken(opt) == "foreach" and opt.scalars["step"].item() == 4
    assert_same_snapshot(snapshot(opt), snapshot(run(None)), what=f"{name} GradScaler: ")


# ---- 5. state_dict, pickling, deepcopy ----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_equals_the_uninterrupted_run(name, form, small_blocks):
    """K steps (the second skipped: a NaN gradient), torch.save / torch.load of state_dict() into a
    fresh optimizer over fresh parameters, M more steps: bitwise the uninterrupted K + M steps."""
    K, M = 3, 3
    gen = torch.Generator().manual_seed(50)
    start = random_params(torch.float32, gen)
    inputs = [(random_grads(start, gen), random_loss(gen)) for _ in range(K + M)]
    inputs[1][0][BAD_TENSOR][BAD_INDEX] = math.nan

    def fresh():
        return [torch.nn.Parameter(p.detach().clone()) for p in start]

    def run(opt, params, steps):
        for t in steps:
            set_grads(params, inputs[t][0])
            opt.step(loss=inputs[t][1])

    whole_params = fresh()
    whole = build(name, whole_params, foreach=True)
    run(whole, whole_params, range(K + M))

    first_params = fresh()
    first = build(name, first_params, foreach=True)
    run(first, first_params, range(K))
    assert first.scalars["skipped"].item() == 1
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed_params = fresh()
    with torch.no_grad():
        for p, q in zip(resumed_params, first_params):
            p.copy_(q)
    resumed = build(name, resumed_params, foreach=True)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    run(resumed, resumed_params, range(K, K + M))
    assert path_taken(resumed) == "foreach"
    assert_same_snapshot(snapshot(resumed), snapshot(whole), what=f"{name} resumed: ")


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("foreach, expected", [(True, "foreach"), (False, "reference"),
                                               (None, "foreach")])
@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_a_copy_keeps_foreach(name, foreach, expected, how):
    gen = torch.Generator().manual_seed(51)
    params = random_params(torch.float32, gen, [(3, 4), (5,)])
    opt = parity.OPTIMIZERS[name](params, foreach=foreach)
    set_grads(params, random_grads(params, gen))
    opt.step(loss=random_loss(gen))
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert clone.foreach is foreach
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    set_grads(clone_params, random_grads(clone_params, gen))
    clone.step(loss=random_loss(gen))
    assert path_taken(clone) == expected
    assert clone.scalars["step"].item() == 2


# ---- 6. parameters without a gradient -------------------------------------------------------------
#: step -> the parameters whose .grad is None: params 0 and 1 form group 0 (1 is its last
#: parameter, just before group 1), param 2 is group 1 (lr x0.5), which is idle as a whole at step 4.
IDLE = {1: (1,), 2: (0, 1), 4: (2,)}


def no_grad_run(factory, **path):
    params, targets = no_grad._problem(seed=3)
    opt = factory([{"params": params[:2]}, {"params": params[2:]}], **path)
    opt.param_groups[1]["lr"] = 0.5 * opt.defaults["lr"]
    for t in range(no_grad.STEPS):
        opt.zero_grad()
        loss = no_grad._loss(params, targets, t)
        loss.backward()
        for i in IDLE.get(t, ()):
            params[i].grad = None
        scalar_names = COMMON_SCALARS + opt.SCALARS
        before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()
                                        if k != "best" and k not in scalar_names})
                  for p in params]
        opt.step(loss=loss.detach())
        for i in IDLE.get(t, ()):   # an idle parameter and its buffers stay bitwise
            x, buffers = before[i]
            assert torch.equal(params[i], x), f"idle param {i} moved at step {t}"
            for k, v in buffers.items():
                assert torch.equal(opt.state[params[i]][k], v), f"idle buffer {k!r} at step {t}"
    return opt, params


@pytest.mark.parametrize("name, factory", [o[:2] for o in no_grad.OPTIMIZERS], ids=no_grad.IDS)
def test_parameters_without_gradient_step_as_the_reference(name, factory, form, monkeypatch):
    """test_no_grad's problem in two param groups, with None gradients at the end of group 0 and
    for all of group 1 at some steps; float64, so foreach and reference agree to 1e-12. DoG and
    InexactPolyak(track_best=True) still cover the idle parameters (x_t - x_0, the best iterate)."""
    monkeypatch.setattr(F, "BLOCK", 8)   # tensors of 12, 5 and 6 elements: cut and grouped
    opt, params = no_grad_run(factory, foreach=True)
    ref, ref_params = no_grad_run(factory, foreach=False)
    assert path_taken(opt) == "foreach" and path_taken(ref) == "reference"
    compare(opt, ref, params, ref_params, torch.float64, name)


# ---- 7. the functional forms -------------------------------------------------------------------------
def functional_run(name, dtype, **path):
    """test_functional's K steps through the functional form, on `path` (fused= / foreach=)."""
    cls, form_fn, kwargs, buffer_names = functional.FORMS[name]
    model, data = functional.problem(dtype)
    params = list(model.parameters())
    state = cls.functional_state(params, **kwargs)
    hparams = {k: v for k, v in kwargs.items() if k != "lr"}
    for x, y in data:
        for p in params:
            p.grad = None
        loss = functional.loss_of(model, x, y)
        loss.backward()
        with torch.no_grad():
            form_fn(params, [p.grad for p in params], *[state.get(n) for n in buffer_names],
                    state["scalars"], lrs=kwargs.get("lr", 1.0), loss=loss.detach(), **path,
                    **hparams)
    return params, state["scalars"]


def class_run(name, dtype, **path):
    cls, _, kwargs, _ = functional.FORMS[name]
    model, data = functional.problem(dtype)
    opt = cls(model.parameters(), **path, **kwargs)
    for x, y in data:
        opt.zero_grad()
        loss = functional.loss_of(model, x, y)
        loss.backward()
        opt.step(loss=loss)
    return list(model.parameters()), opt._packed_scalars


def count_calls(monkeypatch, module, name, calls):
    """Count the calls of module.<name> (the functional form looks it up at each call)."""
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("foreach, impl", [(True, "foreach"), (None, "foreach"),
                                           (False, "reference")])
@pytest.mark.parametrize("name", list(functional.FORMS))
def test_the_functional_form_takes_the_class_steps(name, foreach, impl, form, monkeypatch):
    """pf.<method>(..., foreach=True) and its default (foreach=None) run _foreach_<method>,
    foreach=False _reference_<method>; each bitwise the class's steps on that path."""
    form_fn = functional.FORMS[name][1]
    module, method = sys.modules[form_fn.__module__], form_fn.__name__
    calls = {}
    for which in ("foreach", "reference"):
        count_calls(monkeypatch, module, f"_{which}_{method}", calls)
    params, scalars = functional_run(name, torch.float32, foreach=foreach)
    assert calls == {f"_{impl}_{method}": functional.K}, calls
    expected_params, expected_scalars = class_run(name, torch.float32, foreach=impl == "foreach")
    for i, (a, e) in enumerate(zip(params, expected_params)):
        assert torch.equal(a, e), f"{name}: param {i}"
    assert torch.equal(scalars, expected_scalars), f"{name}: scalars"


def test_the_functional_form_refuses_both_paths_and_a_foreach_that_is_not_a_bool():
    params = [torch.nn.Parameter(torch.ones(3))]
    scalars = pf.Polyak.functional_state(params)["scalars"]
    for path, message in [(dict(fused=True, foreach=True), "foreach"),
                          (dict(foreach="yes"), "Invalid foreach")]:
        with pytest.raises(ValueError, match=message):
            pf.polyak(params, [torch.ones(3)], scalars, loss=torch.tensor(1.0), **path)
    assert scalars.tolist() == [0.0, 0.0, 0.0]


# ---- 8. watch_loss, and no host read in the device form -------------------------------------------
@pytest.mark.parametrize("name", ["InexactPolyak", "MoMo"])
def test_watched_micro_batches_take_the_big_batch_step(name, form):
    """test_watch_loss's main check on the foreach path, float64: 4 micro-batches through
    watch_loss and a bare step() against one big batch with its loss given."""
    def run(micro):
        model = watch.make_model(torch.float64)
        opt = watch.FACTORIES[name](model.parameters(), foreach=True)
        for x, y in watch.make_batches(torch.float64):
            opt.zero_grad()
            if micro:
                watch.accumulate(model, opt, x, y, "mean")
                opt.step()
            else:
                loss = watch.mse(model, x, y)
                loss.backward()
                opt.step(loss=loss)
        assert path_taken(opt) == "foreach"
        return model, opt

    model, opt = run(micro=True)
    expected, expected_opt = run(micro=False)
    watch.assert_same_params(model, expected, 1e-12, f"{name} watched, foreach ({form})")
    for key, value in expected_opt.scalars.items():
        torch.testing.assert_close(opt.scalars[key], value, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("name", list(watch.FACTORIES))
def test_the_device_form_reads_nothing_on_the_host(name, monkeypatch):
    """The device form's contract (it runs where a host read stalls the accelerator): step()
    with watched micro-batches calls no .item(), bool(), float(), ... on a tensor."""
    monkeypatch.setattr(F, "HOST_DEVICES", ())
    model = watch.make_model(torch.float32)
    opt = watch.FACTORIES[name](model.parameters(), foreach=True)
    guard = watch.NoHostSync(opt)
    try:
        for x, y in watch.make_batches(torch.float32):
            opt.zero_grad()
            watch.accumulate(model, opt, x, y, "mean")
            opt.step()
    finally:
        guard.allow()
    assert path_taken(opt) == "foreach" and opt.scalars["step"].item() == watch.K

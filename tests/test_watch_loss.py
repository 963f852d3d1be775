"""The step's loss is the loss of the function whose gradient is in .grad (docs/usage.md):
`watch_loss`, a bare `step()`, gradient accumulation, closures, and the rules for combinations.

The main check: N micro-batches accumulated through `watch_loss` take the same step as one big
batch given its loss explicitly, whatever the user divides by. In float64 on the eager reference
the two differ only by the order of the sums (measured ~1e-16; the bound is 1e-12). On the fused
path (float32, Triton interpreter) the big-batch gradient and the sum of the micro-batch
gradients differ by float32 rounding (~1e-7 relative), so the bound is 1e-5.

Every optimizer runs K = 3 steps, so that the running scalars (DecSPS's bound, AdaSPS's gap sum,
DoG's G, momentum) feed a step computed from an accumulated loss at least twice.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import polyak_fused as pf
import polyak_fused._foreach

K = 3
MICRO = 4
BATCH = 32  # MICRO micro-batches of 8

# Every optimizer; the loss-free ones (DoG, ClippedSGD, NSGDM) also take the watched loss (for
# their non-finite check), so they must not be thrown off by it either.
FACTORIES = {
    "InexactPolyak": lambda ps, **kw: pf.InexactPolyak(ps, total_steps=10, **kw),
    "Polyak": lambda ps, **kw: pf.Polyak(ps, c=2.0, **kw),
    "DecSPS": lambda ps, **kw: pf.DecSPS(ps, **kw),
    "AdaSPS": lambda ps, **kw: pf.AdaSPS(ps, **kw),
    "DoG": lambda ps, **kw: pf.DoG(ps, reps_rel=1e-2, **kw),
    "ClippedSGD": lambda ps, **kw: pf.ClippedSGD(ps, lr=0.1, max_norm=0.5, momentum=0.9, **kw),
    "NSGDM": lambda ps, **kw: pf.NSGDM(ps, lr=0.05, **kw),
    "MoMo": lambda ps, **kw: pf.MoMo(ps, weight_decay=0.01, use_fstar=True, **kw),
    "MoMoAdam": lambda ps, **kw: pf.MoMoAdam(ps, lr=0.05, **kw),
}
POLYAK_FAMILY = ["InexactPolyak", "Polyak", "DecSPS", "AdaSPS", "MoMo", "MoMoAdam"]
#: path -> (the optimizer's path arguments, dtype, rtol)
PATHS = {"reference": (dict(foreach=False), torch.float64, 1e-12),
         "foreach": (dict(foreach=True), torch.float64, 1e-12),
         "fused": (dict(fused=True), torch.float32, 1e-5)}


def every_path(names):
    """(name, path) for each optimizer and path."""
    return [pytest.param(name, path, id=f"{name}-{path}") for name in names for path in PATHS]


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 2)).to(dtype)


def make_batches(dtype, steps=K):
    """Fresh random batches, a different one per step; targets offset so the loss stays > 0."""
    gen = torch.Generator().manual_seed(1234)
    return [(torch.randn(BATCH, 6, generator=gen, dtype=torch.float64).to(dtype),
             (torch.randn(BATCH, 2, generator=gen, dtype=torch.float64) + 1.0).to(dtype))
            for _ in range(steps)]


def mse(model, x, y, reduction="mean"):
    return torch.nn.functional.mse_loss(model(x), y, reduction=reduction)


def big_batch_run(name, path_args, dtype, reduction="mean"):
    """The target: one backward over the whole batch, its loss given explicitly."""
    model = make_model(dtype)
    opt = FACTORIES[name](model.parameters(), **path_args)
    for x, y in make_batches(dtype):
        opt.zero_grad()
        loss = mse(model, x, y, reduction)
        loss.backward()
        opt.step(loss=loss)
    return model, opt


def assert_same_params(actual, expected, rtol, what):
    for i, (a, e) in enumerate(zip(actual.parameters(), expected.parameters())):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * 1e-2,
                                   msg=lambda m, i=i: f"{what}, param {i}: {m}")
    start = make_model(next(expected.parameters()).dtype)
    moved = max((e - s).abs().max().item() for e, s in zip(expected.parameters(), start.parameters()))
    assert moved > 1e-4, f"{what}: the big-batch run barely moved; the comparison proves nothing"


def micro_batches(x, y):
    return zip(x.chunk(MICRO), y.chunk(MICRO))


# ---- accumulation ---------------------------------------------------------------------------------
def accumulate(model, opt, x, y, how):
    """One step's worth of micro-batches, the way users write it."""
    for xs, ys in micro_batches(x, y):
        if how == "mean":        # mean-reduced losses, each backpropagated divided by N
            loss = opt.watch_loss(mse(model, xs, ys))
            (loss / MICRO).backward()
        elif how == "sum":       # sum-reduced losses, backpropagated as they are
            loss = opt.watch_loss(mse(model, xs, ys, "sum"))
            loss.backward()
        elif how == "watch_divided":  # the user watches the already-divided loss
            loss = opt.watch_loss(mse(model, xs, ys) / MICRO)
            loss.backward()
        elif how == "extra_watched":  # a watched loss that no backward reaches adds nothing
            opt.watch_loss(mse(model, xs + 1.0, ys))
            loss = opt.watch_loss(mse(model, xs, ys))
            (loss / MICRO).backward()
        else:
            raise AssertionError(how)


@pytest.mark.parametrize("how", ["mean", "sum", "watch_divided", "extra_watched"])
@pytest.mark.parametrize("name, path", every_path(FACTORIES))
def test_accumulated_micro_batches_take_the_big_batch_step(name, how, path):
    fused, dtype, rtol = PATHS[path]
    expected, expected_opt = big_batch_run(name, fused, dtype, "sum" if how == "sum" else "mean")
    model = make_model(dtype)
    opt = FACTORIES[name](model.parameters(), **fused)
    for x, y in make_batches(dtype):
        opt.zero_grad()
        accumulate(model, opt, x, y, how)
        opt.step()
    assert_same_params(model, expected, rtol, f"{name} {how} {path}")
    for key, value in expected_opt.scalars.items():
        torch.testing.assert_close(opt.scalars[key], value, rtol=rtol, atol=0.0,
                                   msg=lambda m, key=key: f"scalar {key}: {m}")
    assert opt.scalars["step"].item() == K and opt.scalars["skipped"].item() == 0


@pytest.mark.parametrize("path", list(PATHS))
def test_zero_grad_between_backward_and_step_drops_that_backwards_loss(path):
    fused, dtype, rtol = PATHS[path]
    expected, _ = big_batch_run("InexactPolyak", fused, dtype)
    model = make_model(dtype)
    opt = FACTORIES["InexactPolyak"](model.parameters(), **fused)
    for x, y in make_batches(dtype):
        junk = opt.watch_loss(mse(model, x * 3.0, y - 2.0))   # a backward the user throws away
        junk.backward()
        opt.zero_grad()
        accumulate(model, opt, x, y, "mean")
        opt.step()
    assert_same_params(model, expected, rtol, "zero_grad drops the watched loss")


@pytest.mark.parametrize("name", POLYAK_FAMILY)
def test_a_second_backward_through_a_watched_loss_adds_again(name):
    """retain_graph: .grad holds 2 g, so the step's function is 2 f."""
    x, y = make_batches(torch.float64, 1)[0]
    twice, once = make_model(torch.float64), make_model(torch.float64)
    opt_twice = FACTORIES[name](twice.parameters())
    opt_once = FACTORIES[name](once.parameters())
    loss = opt_twice.watch_loss(mse(twice, x, y))
    loss.backward(retain_graph=True)
    loss.backward()
    opt_twice.step()
    loss2 = 2 * mse(once, x, y)
    loss2.backward()
    opt_once.step(loss=loss2)
    for a, e in zip(twice.parameters(), once.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=0.0)


def test_the_step_uses_the_watched_sum_once_and_clears_it():
    x, y = make_batches(torch.float64, 1)[0]
    model = make_model(torch.float64)
    opt = FACTORIES["InexactPolyak"](model.parameters())
    loss = opt.watch_loss(mse(model, x, y))
    loss.backward()
    used = opt.step()
    assert torch.equal(used, loss.detach()), "step() returns the loss it used"
    with pytest.raises(ValueError, match="watch_loss"):
        opt.step()  # the sum was consumed: a second bare step has no loss


# ---- closures -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_a_closure_whose_backward_reaches_a_watched_loss_uses_the_watched_sum(path):
    """Lightning's shape under accumulate_grad_batches=4: the first micro-batches backpropagate
    outside step(), the last one inside the closure, which returns its loss divided by 4.
    The watched sum, not the closure's value, is the loss of .grad's function."""
    fused, dtype, rtol = PATHS[path]
    expected, _ = big_batch_run("InexactPolyak", fused, dtype)
    model = make_model(dtype)
    opt = FACTORIES["InexactPolyak"](model.parameters(), **fused)
    for x, y in make_batches(dtype):
        opt.zero_grad()
        parts = list(micro_batches(x, y))
        for xs, ys in parts[:-1]:
            (opt.watch_loss(mse(model, xs, ys)) / MICRO).backward()

        def closure(xs=parts[-1][0], ys=parts[-1][1]):
            loss = opt.watch_loss(mse(model, xs, ys)) / MICRO
            loss.backward()
            return loss

        returned = opt.step(closure)
        assert returned.grad_fn is not None, "step(closure) returns the closure's value"
    assert_same_params(model, expected, rtol, "closure + watched loss")


def test_a_closure_without_watched_loss_uses_its_return_value():
    expected, _ = big_batch_run("InexactPolyak", dict(foreach=False), torch.float64)
    model = make_model(torch.float64)
    opt = FACTORIES["InexactPolyak"](model.parameters())
    for x, y in make_batches(torch.float64):
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = mse(model, x, y)
            loss.backward()
            return loss
        opt.step(closure)
    assert_same_params(model, expected, 1e-12, "closure")


# ---- the rules for combinations, and bad input -----------------------------------------------------
def test_loss_given_while_a_watched_loss_is_pending_is_refused():
    x, y = make_batches(torch.float64, 1)[0]
    model = make_model(torch.float64)
    opt = FACTORIES["InexactPolyak"](model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.watch_loss(mse(model, x, y))
    loss.backward()
    with pytest.raises(ValueError, match="loss= while a watched loss is pending"):
        opt.step(loss=loss)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    opt.step()  # the watched loss is still there for a bare step
    assert opt.scalars["step"].item() == 1


@pytest.mark.parametrize("name", POLYAK_FAMILY)
def test_bare_step_with_nothing_watched_still_raises(name):
    model = make_model(torch.float64)
    opt = FACTORIES[name](model.parameters())
    mse(model, *make_batches(torch.float64, 1)[0]).backward()
    with pytest.raises(ValueError, match=f"{name} computes its step size from the loss"):
        opt.step()


@pytest.mark.parametrize("name", ["DoG", "ClippedSGD", "NSGDM"])
def test_loss_free_optimizers_take_a_bare_step_with_nothing_watched(name):
    model = make_model(torch.float64)
    opt = FACTORIES[name](model.parameters())
    mse(model, *make_batches(torch.float64, 1)[0]).backward()
    assert opt.step() is None
    assert opt.scalars["step"].item() == 1


@pytest.mark.parametrize("bad, message", [
    (1.5, "watch_loss takes a floating 0-d tensor, got float"),
    (torch.ones(3, requires_grad=True), r"watch_loss takes a floating 0-d tensor, got \(torch.float32, \(3,\)\)"),
    (torch.tensor(2.0), "requires grad; this one does not"),
    (torch.tensor(2, dtype=torch.int64), "floating 0-d tensor"),
])
def test_watch_loss_rejects_what_is_not_a_loss_before_backward(bad, message):
    opt = FACTORIES["InexactPolyak"](make_model(torch.float64).parameters())
    with pytest.raises(ValueError, match=message):
        opt.watch_loss(bad)


def test_watching_keeps_no_graph_alive():
    """The optimizer holds no reference to the loss or its graph, whether or not a backward
    reached it."""
    model = make_model(torch.float64)
    opt = FACTORIES["InexactPolyak"](model.parameters())
    x, y = make_batches(torch.float64, 1)[0]
    hidden = model[1](model[0](x))           # an activation the graph saves
    loss = opt.watch_loss(torch.nn.functional.mse_loss(model[2](hidden), y))
    refs = [weakref.ref(loss), weakref.ref(hidden)]
    unreached = opt.watch_loss(mse(model, x, y))
    refs.append(weakref.ref(unreached))
    loss.backward()
    del loss, hidden, unreached
    gc.collect()
    assert all(r() is None for r in refs), "a watched loss or its graph outlived the backward"
    opt.step()
    assert opt.scalars["step"].item() == 1


# ---- no host sync ---------------------------------------------------------------------------------
class NoHostSync:
    """Makes .item(), .tolist(), .cpu() and the implicit conversions raise while a step runs:
    installed by a step pre-hook, removed by a step post-hook (torch.optim's own hooks)."""

    NAMES = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")

    def __init__(self, opt):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        self.steps = 0
        opt.register_step_pre_hook(lambda *a: self.forbid())
        opt.register_step_post_hook(lambda *a: self.allow())

    def forbid(self):
        def forbidden(*args, **kwargs):
            raise AssertionError("host sync inside step()")
        for n in self.NAMES:
            setattr(torch.Tensor, n, forbidden)

    def allow(self):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        self.steps += 1


@pytest.mark.parametrize("name, path", every_path(FACTORIES))
def test_watched_step_makes_no_host_sync(name, path, monkeypatch):
    """A watched loss with accumulation; the fused path here runs under the Triton interpreter,
    which works on the CPU tensors' memory without calling any of the guarded methods. The
    foreach path runs its device form (what it does off the CPU; on the CPU it reads its step
    size on the host, which stalls no device)."""
    monkeypatch.setattr(polyak_fused._foreach, "HOST_DEVICES", ())
    fused, dtype, _ = PATHS[path]
    model = make_model(dtype)
    opt = FACTORIES[name](model.parameters(), **fused)
    guard = NoHostSync(opt)
    try:
        for x, y in make_batches(dtype):
            opt.zero_grad()
            accumulate(model, opt, x, y, "mean")
            opt.step()
    finally:
        guard.allow()
    assert guard.steps == K + 1  # (allow() ran once more in the finally)
    assert opt.scalars["step"].item() == K

"""The host path of step(): what it keeps between steps, and that a parameter, gradient or state
tensor that moves is never missed.

Each test drives two optimizers in lockstep, the fused path (under the Triton interpreter in CI)
and the eager reference (fused=False, foreach=False) on copies of the same parameters, applies the same change
to both between steps (a new .grad, a parameter's .data replaced, a param group added, a state
loaded, ...), and compares the parameters after every step. The changes are those a training loop,
a framework or a user makes; each one would go unseen by a step that trusted its cached tables.
The opt-in flat-gradient mode (flatten_grads) is held to the same standard and, in addition,
must equal the default fused path bitwise.
"""

from __future__ import annotations

import math
import warnings
import weakref

import pytest
import torch
from helpers import assert_bitwise_equal, assert_close
from test_parity import OPTIMIZERS, STATE_DEPENDENT_SCALARS

from polyak_fused import _host_pass as csrc_host
import polyak_fused as pf
from polyak_fused._host_pass import reference
from polyak_fused._kernels import polyak_step as K

# bfloat16: a few units in the last place after up to six steps (the interpreter rounds toward
# zero, torch to nearest: test_parity.DTYPES). A missed update shows in the float32 parameters,
# directly or through the global norm, whose share of every step size is far above 1e-5.
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True, params=["compiled", "python"])
def host_pass(request, monkeypatch):
    """Every test runs with the compiled host pass and with its Python specification."""
    module = csrc_host.compiled() if request.param == "compiled" else reference
    monkeypatch.setattr(csrc_host, "_chosen", module)
    return module


def _params(device, seed=0, bf16=True):
    """Two float32 and two bfloat16 parameters (two dtype groups), one of them 2-D; all float32
    with bf16=False."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33, 7), (5,), (129,), (4, 4)]
    low = torch.bfloat16 if bf16 else torch.float32
    dtypes = [torch.float32, torch.float32, low, low]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt).to(device))
            for s, dt in zip(shapes, dtypes)]


class Pair:
    """A fused optimizer and its eager twin over equal parameters."""

    def __init__(self, name, device, seed=0, params=None):
        self.device = device
        # DoG's and NSGD-M's step size depends on stored tensors: the bfloat16 rounding of some
        # parameters (toward zero under the interpreter, to nearest in torch) would reach all of
        # them, and the comparison could no longer tell a missed update from rounding
        bf16 = not name.startswith(STATE_DEPENDENT_SCALARS)
        self.params = params if params is not None else _params(device, seed, bf16)
        self.twin = [torch.nn.Parameter(p.detach().clone()) for p in self.params]
        self.opt = OPTIMIZERS[name](self.params, fused=True)
        self.ref = OPTIMIZERS[name](self.twin, fused=False, foreach=False)
        self.seed = 100 * seed

    def grads(self, which=None):
        """Fresh random gradients, as new tensors, for both (all parameters or those listed)."""
        self.seed += 1
        gen = torch.Generator().manual_seed(self.seed)
        for i, (p, t) in enumerate(zip(self.params, self.twin)):
            if which is None or i in which:
                g = torch.randn(p.shape, generator=gen).to(p.dtype)
                p.grad = g.to(self.device)
                t.grad = g.clone().to(self.device)

    def step(self, loss=1.5):
        self.opt.step(loss=torch.tensor(loss, device=self.device))
        self.ref.step(loss=torch.tensor(loss, device=self.device))
        self.check()

    def check(self, what="param"):
        for i, (a, b) in enumerate(zip(self.params, self.twin)):
            tol = TOL[a.dtype]
            assert_close(a, b, rtol=tol, atol=tol, what=f"{what} {i}")


def _plan(opt):
    return opt._fused_cache["plan"]


# ---------------------------------------------------------------------------------------------
# The default path: every change is seen
# ---------------------------------------------------------------------------------------------
def test_same_gradients_reuse_everything(device):
    """The steady state: the same .grad objects (zero_grad(set_to_none=False)) give the same
    params tuple and the same plan, whose record of every tensor stays as it was; a new .grad
    object at a new address keeps the plan and rewrites its gradient's address only."""
    pair = Pair("adasps", device)
    pair.grads()
    pair.step()
    cache = pair.opt._fused_cache
    plan, params = cache["plan"], cache["collected"].params
    record = plan.watched.copy()
    for _ in range(3):
        for p, t in zip(pair.params, pair.twin):
            g = torch.randn(p.shape).to(p.dtype)
            p.grad.copy_(g.to(device))
            t.grad.copy_(g.to(device))
        pair.step()
        assert cache["plan"] is plan and cache["collected"].params is params
        assert (plan.watched == record).all()
    old = pair.params[0].grad
    pair.grads(which={0})   # one new .grad object, while the old one is alive: a new address
    pair.step()
    assert cache["plan"] is plan and cache["collected"].params is params
    assert plan.watched[0, 1] == pair.params[0].grad.data_ptr() != old.data_ptr()
    assert (plan.watched[1:] == record[1:]).all()


def test_gradients_are_not_kept_alive_between_steps(device):
    """What the optimizer keeps between steps (to recognise the gradients) must not keep them:
    after zero_grad(set_to_none=True) the old gradients are freed, as with torch.optim."""
    pair = Pair("inexact_polyak", device)
    pair.grads()
    pair.step()
    pair.step()
    old = [weakref.ref(p.grad) for p in pair.params]
    pair.opt.zero_grad(set_to_none=True)
    assert all(r() is None for r in old), "a gradient outlived zero_grad(set_to_none=True)"


@pytest.mark.parametrize("name", ["inexact_polyak_best", "dog", "nsgdm", "clipped_sgd_momentum"])
def test_new_gradient_tensors_every_step(name, device):
    """zero_grad(set_to_none=True) + backward: new .grad objects at every step, the same plan
    with its gradient column rewritten."""
    pair = Pair(name, device)
    keep = []  # keep old gradients alive so that new ones cannot reuse their addresses
    for k in range(4):
        pair.grads()
        keep.append([p.grad for p in pair.params])
        pair.step()
        if k == 0:
            plan = _plan(pair.opt)
    assert _plan(pair.opt) is plan


def test_one_gradient_replaced_or_removed(device):
    pair = Pair("inexact_polyak", device)
    pair.grads()
    pair.step()
    pair.grads(which={2})              # one new .grad; the others stay the same objects
    pair.step()
    for p, t in ((pair.params[1], pair.twin[1]),):  # no gradient: not stepped
        p.grad, t.grad = None, None
    before = pair.params[1].detach().clone()
    pair.step()
    assert_bitwise_equal(pair.params[1], before, "a parameter without .grad")
    pair.grads()                       # back again
    pair.step()


def test_a_gradient_that_is_not_contiguous(device):
    pair = Pair("clipped_sgd_momentum", device)
    pair.grads()
    pair.step()
    for p, t in ((pair.params[0], pair.twin[0]),):  # (33, 7): a transposed (7, 33) tensor
        g = torch.randn(7, 33).to(device)
        p.grad, t.grad = g.t(), g.t().clone()
    assert not pair.params[0].grad.is_contiguous()
    pair.step()
    pair.step()


@pytest.mark.parametrize("how,name", [("clone", "dog"), ("swap_tensors", "dog"),
                                      ("new_dtype", "adasps")])
def test_parameter_data_replaced(how, name, device):
    """p.data = other (what a module's .to() or .half() does), torch.utils.swap_tensors: the next
    step sees the parameter's new address and rebuilds the tables."""
    pair = Pair(name, device)
    pair.grads()
    pair.step()
    for ps in (pair.params, pair.twin):
        p = ps[1]
        if how == "clone":
            p.data = p.data.clone()
        elif how == "new_dtype":
            p.data = p.data.to(torch.bfloat16)
        else:
            torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().clone()))
    plan = _plan(pair.opt)
    pair.grads()
    pair.step()
    assert _plan(pair.opt) is not plan
    pair.grads()
    pair.step()


def test_state_of_another_dtype_than_its_parameter_is_refused(device):
    """A parameter cast after its state was made (model.half() mid-run): the kernels read every
    tensor of a row in one dtype, so the fused path refuses instead of reading garbage."""
    pair = Pair("dog", device)
    pair.grads()
    pair.step()
    p = pair.params[1]
    p.data = p.data.to(torch.bfloat16)
    p.grad = torch.randn(p.shape).to(torch.bfloat16).to(device)
    with pytest.raises(RuntimeError, match=r"Invalid state dtype: torch.float32 for a "
                                           r"torch.bfloat16 parameter"):
        pair.opt.step(loss=1.0)


def test_parameter_moved_while_its_old_storage_is_kept(device):
    """p.data replaced while another tensor keeps the old storage alive (nothing is freed).
    The default path compares every parameter's address at every step, so the very next step
    updates the parameter where it now lives, as the reference does, and leaves the old storage
    alone."""
    pair = Pair("inexact_polyak", device)
    pair.grads()
    pair.step()
    plan = _plan(pair.opt)
    m = 3
    kept = pair.params[m].data                      # holds the old storage
    kept_before = kept.clone()
    pair.params[m].data = kept.clone()
    pair.twin[m].data = pair.twin[m].data.clone()
    pair.grads()
    pair.step()                                     # compares with the reference
    assert _plan(pair.opt) is not plan, "the tables still point at the old storage"
    assert torch.equal(kept, kept_before), "the step wrote into the storage the parameter left"


def test_gradient_storage_replaced_in_place(device):
    """p.grad.data = other: the same .grad object with new memory. The next step reads the
    gradients' addresses and rewrites the gradient column of the same plan."""
    pair = Pair("nsgdm", device)
    pair.grads()
    pair.step()
    pair.step()
    plan = _plan(pair.opt)
    for p, t in zip(pair.params, pair.twin):
        g = torch.randn(p.shape).to(p.dtype)
        p.grad.data = g.to(device)
        t.grad.data = g.clone().to(device)
    pair.step()
    assert _plan(pair.opt) is plan
    assert list(plan.watched[:, 1]) == [p.grad.data_ptr() for p in pair.params]


def test_param_group_added_and_list_mutated(device):
    pair = Pair("polyak", device)
    pair.grads()
    pair.step()
    extra = torch.nn.Parameter(torch.randn(9, device=device))
    extra_twin = torch.nn.Parameter(extra.detach().clone())
    pair.opt.add_param_group({"params": [extra], "lr": 0.5})
    pair.ref.add_param_group({"params": [extra_twin], "lr": 0.5})
    pair.params.append(extra)
    pair.twin.append(extra_twin)
    pair.grads()
    pair.step()
    # appended to a group's list in place (not through add_param_group): seen by its length
    late = torch.nn.Parameter(torch.randn(6, device=device))
    late_twin = torch.nn.Parameter(late.detach().clone())
    pair.opt.param_groups[0]["params"].append(late)
    pair.ref.param_groups[0]["params"].append(late_twin)
    pair.params.append(late)
    pair.twin.append(late_twin)
    pair.grads()
    pair.step()
    # one parameter replaced in its group's list, in place: the list is the same object
    swap = torch.nn.Parameter(torch.randn(5, device=device))
    swap_twin = torch.nn.Parameter(swap.detach().clone())
    assert pair.opt.param_groups[0]["params"][1] is pair.params[1]
    pair.opt.param_groups[0]["params"][1] = swap
    pair.ref.param_groups[0]["params"][1] = swap_twin
    pair.params[1], pair.twin[1] = swap, swap_twin
    pair.grads()
    pair.step()


def test_load_state_dict_mid_run(device):
    """A checkpoint from another run, loaded into both: new state buffers and scalars."""
    pair = Pair("dog", device)
    other = Pair("dog", device, seed=1)
    for _ in range(2):
        pair.grads()
        pair.step()
        other.grads()
        other.step()
    pair.opt.load_state_dict(other.opt.state_dict())
    pair.ref.load_state_dict(other.ref.state_dict())
    for _ in range(2):
        pair.grads()
        pair.step()


def test_a_misaligned_tensor_in_an_aligned_group(device):
    """One parameter starts 4 bytes (float32) or 2 bytes (bfloat16) past a 16-byte boundary: its
    chunks take the scalar loop, the others keep their vectors; the results are the same."""
    gen = torch.Generator().manual_seed(5)
    params = []
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(301, generator=gen).to(dtype).to(device)
        params += [torch.nn.Parameter(torch.randn(64, generator=gen).to(dtype).to(device)),
                   torch.nn.Parameter(base[1:]),  # offset 1 element: misaligned
                   torch.nn.Parameter(torch.randn(5000, generator=gen).to(dtype).to(device))]
    assert params[1].data_ptr() % 16 != 0 and params[4].data_ptr() % 16 != 0
    pair = Pair("clipped_sgd_momentum", device, params=params)
    for _ in range(3):
        pair.grads()
        pair.step()


# ---------------------------------------------------------------------------------------------
# Chunk size (GPU launch configuration)
# ---------------------------------------------------------------------------------------------
def test_chunk_size_follows_the_layout():
    """Powers of two between MIN_CHUNK and MAX_CHUNK, multiples of the block; at least WAVES
    waves of resident programs where the layout is large enough."""
    n_sms = 132
    slots = n_sms * K.PROGRAMS_PER_SM
    for numels in ([124_439_808], [4096] * 2000, [1 << 26] * 4, [953_000_000], [10], [3 << 20]):
        cfg = K.cuda_launch_config(numels, n_sms)
        chunk = cfg["chunk"]
        assert K.MIN_CHUNK <= chunk <= K.MAX_CHUNK and chunk & (chunk - 1) == 0
        assert chunk % cfg["block"] == 0
        n_chunks = sum(-(-n // chunk) for n in numels)
        if chunk > K.MIN_CHUNK:
            assert n_chunks >= K.WAVES * slots
        if chunk < K.MAX_CHUNK:   # the next power of two would give fewer than WAVES waves
            assert sum(numels) // (2 * chunk) < K.WAVES * slots
    assert K.cuda_launch_config([124_439_808], n_sms)["chunk"] == 16384   # GPT-2 124M
    assert K.cuda_launch_config([4096] * 2000, n_sms)["chunk"] == K.MIN_CHUNK


def test_functional_lists_mutated_in_place_are_seen(device):
    """The functional form with a cache and plain lists: a list changed in place between calls
    is compared element by element (only a tuple the plan kept itself is trusted as is)."""
    params = _params(device)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    cache, scalars = {}, torch.zeros(4, device=device)
    ref_scalars = torch.zeros(4, device=device)
    scalars[3] = ref_scalars[3] = math.inf
    grads = [torch.randn(p.shape).to(p.dtype).to(device) for p in params]
    kw = dict(lrs=[1.0] * 4, loss=torch.tensor(2.0, device=device), total_steps=10,
              lower_bound=0.0, track_best=False)
    for k in range(3):
        if k == 2:   # the same list object, one gradient replaced in it
            grads[1] = torch.randn(params[1].shape).to(device)
        with torch.no_grad():
            pf.inexact_polyak(params, grads, None, scalars, fused=True, cache=cache, **kw)
            pf.inexact_polyak(twin, [g.clone() for g in grads], None, ref_scalars, fused=False, foreach=False,
                              **kw)
        for i, (a, b) in enumerate(zip(params, twin)):
            tol = TOL[a.dtype]
            assert_close(a, b, rtol=tol, atol=tol, what=f"param {i} after call {k}")


# ---------------------------------------------------------------------------------------------
# Flat gradients (opt.flatten_grads())
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flat_gradients_equal_the_default_path_bitwise(name, device):
    """Same gradients, same steps: the flat mode and the default fused path give the same bits
    (same tables, same chunks, same summation order), and both match the reference."""
    runs = []
    for flat in (False, True):
        params = _params(device, seed=4)
        opt = OPTIMIZERS[name](params, fused=True)
        if flat:
            opt.flatten_grads()
            views = [p.grad for p in params]
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            opt.zero_grad()
            for p in params:
                g = torch.randn(p.shape, generator=gen).to(p.dtype).to(device)
                if flat:
                    p.grad.add_(g)   # what backward does: accumulate into the view
                else:
                    p.grad = g
            opt.step(loss=torch.tensor(1.0 + seed, device=device))
        if flat:
            assert all(p.grad is v for p, v in zip(params, views)), "the views were replaced"
        runs.append(([p.detach().clone() for p in params],
                     {k: v.clone() for k, v in opt.scalars.items()}))
    for i, (a, b) in enumerate(zip(runs[0][0], runs[1][0])):
        assert_bitwise_equal(a, b, f"param {i}")
    for k in runs[0][1]:
        assert_bitwise_equal(runs[0][1][k], runs[1][1][k], f"scalar {k}")


def _flat_pair(name, device):
    pair = Pair(name, device)
    pair.opt.flatten_grads()
    return pair


def _backward_like(pair):
    """Fresh gradients accumulated in place, as backward does into existing .grad tensors."""
    pair.seed += 1
    gen = torch.Generator().manual_seed(pair.seed)
    for p, t in zip(pair.params, pair.twin):
        g = torch.randn(p.shape, generator=gen).to(p.dtype).to(pair.device)
        for x, gx in ((p, g), (t, g.clone())):
            if x.grad is None:
                x.grad = gx
            else:
                x.grad.add_(gx)


def test_flat_gradients_turned_on_mid_run_watch_the_parameters(device):
    """flatten_grads() after steps on the default path (whose plan watches no storage): the next
    step rebuilds the plan with the storage watches, so that a parameter moved later (its old
    storage freed) is seen at once, not only by the spot check."""
    pair = Pair("inexact_polyak", device)
    pair.grads()
    pair.step()
    assert not _plan(pair.opt).watching
    pair.opt.flatten_grads()
    pair.opt.zero_grad()
    pair.ref.zero_grad()
    _backward_like(pair)
    pair.step()
    plan = _plan(pair.opt)
    assert plan.watching
    for ps in (pair.params, pair.twin):
        ps[0].data = ps[0].data.clone()   # the old storage is freed
    assert plan.moved[0], "the watch on the old storage did not fire"
    pair.opt.zero_grad()
    pair.ref.zero_grad()
    _backward_like(pair)
    pair.step()                           # compares with the reference
    assert _plan(pair.opt) is not plan


def test_flat_zero_grad_zeroes_in_place_and_keeps_the_views(device):
    pair = _flat_pair("inexact_polyak", device)
    views = [p.grad for p in pair.params]
    assert all(v is not None and v.data_ptr() % 16 == 0 for v in views)
    _backward_like(pair)
    pair.opt.zero_grad()   # set_to_none=True by default: the views stay, zeroed
    assert all(p.grad is v for p, v in zip(pair.params, views))
    assert all(torch.count_nonzero(v) == 0 for v in views)


@pytest.mark.parametrize("how", ["model_zero_grad", "assigned", "create_graph_style"])
def test_flat_gradients_replaced_are_seen(how, device):
    """Something else replaces the views: the step sees it (the buffer's use count drops), takes
    the default path, warns once, and installs the views again with the values kept."""
    pair = _flat_pair("nsgdm", device)
    for k in range(4):
        pair.opt.zero_grad()
        pair.ref.zero_grad()
        if k == 1:
            for p in pair.params:
                if how == "model_zero_grad":       # torch.nn.Module.zero_grad()
                    p.grad = None
                elif how == "assigned":
                    p.grad = torch.zeros_like(p)
                else:                              # out-of-place accumulation: a new tensor
                    p.grad = p.grad + 0
        _backward_like(pair)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pair.step()
        assert bool(caught) == (k == 1), [str(w.message) for w in caught]
        assert all(p.grad._base is not None for p in pair.params), "views not reinstalled"


@pytest.mark.parametrize("how", ["none", "assigned", "out_of_place"])
def test_flat_gradient_replaced_is_seen_at_once(how, device):
    """One .grad replaced, outside the spot check's next window: the buffer's use count alone
    shows it, at the next check."""
    pair = _flat_pair("polyak", device)
    flat = pair.opt._live.flat_grads
    _backward_like(pair)
    pair.step()
    i = next(i for i in range(len(flat.params))
             if i not in range(flat.spot_next, flat.spot_next + 2))
    p = flat.params[i]
    p.grad = None if how == "none" else torch.zeros_like(p) if how == "assigned" else p.grad * 1
    assert not flat.intact(pair.opt.param_groups)


def test_flat_gradient_replaced_while_the_old_view_is_kept(device):
    """The case the use count cannot see: the old view kept elsewhere. The spot check (two
    parameters per step, in turn) finds it within len(params) / 2 steps."""
    pair = _flat_pair("inexact_polyak", device)
    flat = pair.opt._live.flat_grads
    _backward_like(pair)
    pair.step()
    kept = [p.grad for p in pair.params]   # references to every view
    pair.params[3].grad = torch.zeros_like(pair.params[3])
    found = False
    for _ in range(math.ceil(len(flat.params) / 2)):
        if not flat.intact(pair.opt.param_groups):
            found = True
            break
    assert found
    del kept


def test_flat_gradients_after_add_param_group_and_load_state_dict(device):
    pair = _flat_pair("dog", device)
    _backward_like(pair)
    pair.step()
    extra = torch.nn.Parameter(torch.randn(9, device=device))
    extra_twin = torch.nn.Parameter(extra.detach().clone())
    pair.opt.add_param_group({"params": [extra]})
    pair.ref.add_param_group({"params": [extra_twin]})
    pair.params.append(extra)
    pair.twin.append(extra_twin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the new parameter has no view yet: one default step
        _backward_like(pair)
        pair.step()
    assert extra.grad._base is not None
    pair.opt.zero_grad()
    pair.ref.zero_grad()
    _backward_like(pair)
    pair.step()
    sd_fused, sd_ref = pair.opt.state_dict(), pair.ref.state_dict()
    pair.opt.load_state_dict(sd_fused)
    pair.ref.load_state_dict(sd_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            pair.opt.zero_grad()
            pair.ref.zero_grad()
            _backward_like(pair)
            pair.step()


def test_flat_gradients_leave_frozen_parameters_alone(device):
    params = _params(device)
    params[1].requires_grad_(False)
    opt = pf.Polyak(params, fused=True)
    opt.flatten_grads()
    assert params[1].grad is None
    before = params[1].detach().clone()
    for p in params:
        if p.requires_grad:
            p.grad.normal_()
    opt.step(loss=1.0)
    assert_bitwise_equal(params[1], before, "a frozen parameter")


def test_flat_gradients_pick_up_an_unfrozen_parameter(device):
    """A parameter frozen when the views were made, unfrozen later: its first .grad is found by
    the spot check within (n bound + n frozen) / 2 steps, and the next step binds it."""
    pair = Pair("clipped_sgd_momentum", device)
    pair.params[2].requires_grad_(False)
    pair.twin[2].requires_grad_(False)
    pair.opt.flatten_grads()
    flat = pair.opt._live.flat_grads
    assert pair.params[2].grad is None and len(flat.frozen) == 1
    pair.params[2].requires_grad_(True)
    pair.twin[2].requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(math.ceil((len(flat.params) + len(flat.frozen)) / 2)):
            pair.opt.zero_grad()
            pair.ref.zero_grad()
            _backward_like(pair)
            pair.step()
    assert pair.params[2].grad._base is not None, "the unfrozen parameter got no view"
    assert len(pair.opt._live.flat_grads.frozen) == 0


def test_flat_gradients_refuse_sparse_gradients(device):
    p = torch.nn.Parameter(torch.randn(3, 3, device=device))
    p.grad = torch.eye(3, device=device).to_sparse()
    opt = pf.InexactPolyak([p], total_steps=10, fused=True)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.flatten_grads()

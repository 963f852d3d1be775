"""Distributed training: DDP and FSDP2 take the steps of one process on the whole batch.

Two CPU processes (gloo) are spawned once for the module; one job runs every scenario and saves
each rank's results, which the tests below compare with a single-process run computed here.

The model is Linear(5, 3) -> tanh -> Linear(3, 1) in float64: sharded over 2 ranks its first
layer splits unevenly (2 + 1 rows) and its second layer leaves rank 1 a zero-size shard. The loss
is a mean squared error, so the mean of the two half-batch losses is the full-batch loss and
the mean of the two half-batch gradients (what DDP and FSDP2 reduce) is the full-batch gradient.
STEPS = 5: enough for the running scalars (DoG's rbar and G, AdaSPS's sum of gaps) to feed back
into the step size, while a per-rank loss already makes the ranks differ after one step.
The same job also covers HSDP (a 2 x 1 mesh), the fused path on shards, state_dict round trips,
a non-finite value on one rank, and the packing of the all-reduce; the tests at the end run in
this process (no collective in one process, a world of one rank, bad options).
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import polyak_fused as pf
import polyak_fused._foreach
from polyak_fused import distributed

WORLD = 2
STEPS = 5
BATCH = 16
JOB_DEADLINE_S = 110

OPTIMIZERS = {
    "InexactPolyak": lambda ps, **kw: pf.InexactPolyak(ps, total_steps=STEPS, **kw),
    "Polyak": lambda ps, **kw: pf.Polyak(ps, **kw),
    "AdaSPS": lambda ps, **kw: pf.AdaSPS(ps, **kw),
    # reps_rel=1e-2: with the default 1e-6 the first STEPS steps move the parameters by ~1e-5
    "DoG": lambda ps, **kw: pf.DoG(ps, reps_rel=1e-2, **kw),
    # three global sums (<g, x>, <d, x>, ||d||^2 or sum d^2 / D) over the shards
    "MoMo": lambda ps, **kw: pf.MoMo(ps, weight_decay=0.01, use_fstar=True, **kw),
    "MoMoAdam": lambda ps, **kw: pf.MoMoAdam(ps, lr=0.1, weight_decay=0.01, **kw),
}
ALL_CLASSES = {
    "InexactPolyak": lambda ps, **kw: pf.InexactPolyak(ps, total_steps=STEPS, **kw),
    "Polyak": lambda ps, **kw: pf.Polyak(ps, **kw),
    "DecSPS": lambda ps, **kw: pf.DecSPS(ps, **kw),
    "AdaSPS": lambda ps, **kw: pf.AdaSPS(ps, **kw),
    "DoG": lambda ps, **kw: pf.DoG(ps, **kw),
    "ClippedSGD": lambda ps, **kw: pf.ClippedSGD(ps, lr=0.1, max_norm=1.0, momentum=0.9, **kw),
    "NSGDM": lambda ps, **kw: pf.NSGDM(ps, lr=0.1, **kw),
    "MoMo": lambda ps, **kw: pf.MoMo(ps, **kw),
    "MoMoAdam": lambda ps, **kw: pf.MoMoAdam(ps, **kw),
}


# ---- the problem, built identically in every process --------------------------------------------
def make_model(dtype=torch.float64):
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1)).to(dtype)


def make_data(dtype=torch.float64):
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(BATCH, 1, generator=gen, dtype=torch.float64) + 1.0
    return x.to(dtype), y.to(dtype)


def half(t, rank):
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def train(model, opt, x, y, steps=STEPS):
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)


def single_process_run(name, dtype=torch.float64, **kw):
    model = make_model(dtype)
    opt = OPTIMIZERS[name](model.parameters(), **kw)
    train(model, opt, *make_data(dtype))
    return [p.detach().clone() for p in model.parameters()], opt


class _CountCollectives:
    """Counts torch.distributed.all_reduce calls, and makes .item()/bool()/float() raise (a host
    sync), while active."""

    SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __enter__(self):
        self.count = 0
        self._all_reduce = dist.all_reduce

        def counted(*args, **kwargs):
            self.count += 1
            return self._all_reduce(*args, **kwargs)

        def forbidden(*args, **kwargs):
            raise AssertionError("host sync inside step()")

        dist.all_reduce = counted
        self._saved = {n: getattr(torch.Tensor, n) for n in self.SYNCS}
        for n in self.SYNCS:
            setattr(torch.Tensor, n, forbidden)
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._all_reduce
        for n, f in self._saved.items():
            setattr(torch.Tensor, n, f)
        return False


def train_counted(model, opt, x, y, steps=STEPS):
    """train(), counting the all-reduces issued by the optimizer steps alone."""
    count = 0
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        with _CountCollectives() as c:
            opt.step(loss=loss)
        count += c.count
    return count


def train_watched(model, opt, x, y, steps=STEPS, micro=2):
    """train() through watch_loss and a bare step(): each step accumulates `micro` micro-batches
    (loss / micro backpropagated), counting the all-reduces of the steps alone."""
    count = 0
    for _ in range(steps):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = opt.watch_loss(torch.nn.functional.mse_loss(model(xs), ys))
            (loss / micro).backward()
        with _CountCollectives() as c:
            opt.step()
        count += c.count
    return count


# ---- the spawned job ----------------------------------------------------------------------------
def _ddp_watched(rank, name):
    """Each rank watches its own loss; DDP averages the gradients, the step averages the losses."""
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = OPTIMIZERS[name](ddp.parameters())
    x, y = make_data()
    n = train_watched(ddp, opt, half(x, rank), half(y, rank))
    return {"params": [p.detach().clone() for p in model.parameters()], "all_reduces": n,
            "step": opt.scalars["step"].clone()}


def _ddp(rank, name, average_loss=True):
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = OPTIMIZERS[name](ddp.parameters(), average_loss=average_loss)
    x, y = make_data()
    n = train_counted(ddp, opt, half(x, rank), half(y, rank))
    return {"params": [p.detach().clone() for p in model.parameters()], "all_reduces": n,
            "step": opt.scalars["step"].clone(), "after_step": distributed.current_reduction()}


def _nonfinite_on_one_rank(rank, sharded):
    """Rank 1 alone sees a NaN loss (DDP) or an inf in its gradient shard (FSDP2) at the second
    step: every rank skips that step, and the ranks still agree."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    if sharded:
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        net = model
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = OPTIMIZERS["InexactPolyak"](net.parameters())
    x, y = half(make_data()[0], rank), half(make_data()[1], rank)
    for step in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        if step == 1 and rank == 1:
            if sharded:
                next(model.parameters()).grad.to_local()[0, 0] = float("inf")
            else:
                loss = loss * float("nan")
        opt.step(loss=loss)
    params = [p.full_tensor() if sharded else p for p in model.parameters()]
    return {"params": [p.detach().clone() for p in params],
            "skipped": opt.scalars["skipped"].item(), "step": opt.scalars["step"].item()}


def _sharded(rank, name, mesh_shape, dtype=torch.float64, **kw):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = make_model(dtype)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = OPTIMIZERS[name](model.parameters(), **kw)
    x, y = make_data(dtype)
    n = train_counted(model, opt, half(x, rank), half(y, rank))
    st = [v for p in model.parameters() for k, v in opt.state[p].items()
          if k not in opt.scalars]   # (the global scalars, plain tensors, are in the first one's)
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()],
            "local_numels": [p.to_local().numel() for p in model.parameters()],
            "placements": str(next(model.parameters()).placements),
            "all_reduces": n, "step": opt.scalars["step"].clone(),
            "state_is_dtensor": [isinstance(v, DTensor) for v in st]}


def _fsdp_state_dict(rank, name):
    """A sharded optimizer saved after STEPS steps and loaded into a new one takes the same
    next step."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = make_model()
    fully_shard(model, mesh=mesh)
    opt = OPTIMIZERS[name](model.parameters())
    x, y = half(make_data()[0], rank), half(make_data()[1], rank)
    train(model, opt, x, y)
    saved_params = [p.detach().clone() for p in model.parameters()]
    saved_state = copy.deepcopy(opt.state_dict())
    train(model, opt, x, y, steps=1)
    after = [p.full_tensor().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved_params):
            p.copy_(s)
    opt2 = OPTIMIZERS[name](model.parameters())
    opt2.load_state_dict(saved_state)
    train(model, opt2, x, y, steps=1)
    return {"after": after, "reloaded": [p.full_tensor().clone() for p in model.parameters()],
            "state_types": sorted({type(v).__name__ for p in model.parameters()
                                   for k, v in opt2.state[p].items() if k not in opt2.scalars})}


def _packing(rank):
    """The reduction itself, on mixed dtypes: loss averaged, sums added, dtypes kept."""
    red = distributed._AllReduce(None, WORLD, average_loss=True, reduce_sums=True)
    loss = torch.tensor(float(rank + 1), dtype=torch.float32)
    s64 = torch.tensor(10.0 * (rank + 1), dtype=torch.float64)
    s16 = torch.tensor(0.5 * (rank + 1), dtype=torch.bfloat16)
    out = red(loss, s64, s16)
    out_no_loss = red(None, s64)
    return {"out": [(t.dtype, t.item()) for t in out], "no_loss": (out_no_loss[0],
                                                                  out_no_loss[1].item())}


#: The methods whose fused path runs on FSDP2 shards in the job.
FUSED_SHARDED = ["InexactPolyak", "MoMoAdam"]


def _scenarios():
    out = {f"ddp/{n}": (lambda r, n=n: _ddp(r, n)) for n in OPTIMIZERS}
    out.update({f"ddp_watched/{n}": (lambda r, n=n: _ddp_watched(r, n)) for n in OPTIMIZERS})
    out["ddp_per_rank_loss/InexactPolyak"] = lambda r: _ddp(r, "InexactPolyak", average_loss=False)
    out.update({f"fsdp/{n}": (lambda r, n=n: _sharded(r, n, (WORLD,))) for n in OPTIMIZERS})
    out["hsdp/DoG"] = lambda r: _sharded(r, "DoG", (WORLD, 1))
    out.update({f"fsdp_fused_fp32/{n}": (lambda r, n=n: _sharded(
        r, n, (WORLD,), dtype=torch.float32, fused=True)) for n in FUSED_SHARDED})
    out["fsdp_state_dict/DoG"] = lambda r: _fsdp_state_dict(r, "DoG")
    out["fsdp_state_dict/InexactPolyak"] = lambda r: _fsdp_state_dict(r, "InexactPolyak")
    out["nonfinite/ddp"] = lambda r: _nonfinite_on_one_rank(r, sharded=False)
    out["nonfinite/fsdp"] = lambda r: _nonfinite_on_one_rank(r, sharded=True)
    out["packing"] = _packing
    return out


def _worker(rank, world, store, out_dir):
    # The job runs on CPU tensors (gloo), so its fused scenario runs the Triton kernels in the
    # interpreter even where conftest left it off for a GPU run (triton is not imported yet here).
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    # The default path on these CPU tensors is the foreach path: its device form (what runs on
    # an accelerator without Triton) reads nothing on the host, which the job checks; its host
    # form differs only in how the update is committed, after the same reductions.
    polyak_fused._foreach.HOST_DEVICES = ()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for key, fn in _scenarios().items():
            try:
                results[key] = fn(rank)
            except Exception:  # recorded, and reported by the test that reads it
                results[key] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(WORLD, str(out_dir / "store"), str(out_dir)),
                             nprocs=WORLD, join=False, start_method="spawn")
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=JOB_DEADLINE_S)
        while not ctx.join(timeout=1):
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"the {WORLD}-process job ran past {JOB_DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def result(job, key):
    per_rank = [res[key] for res in job]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"rank {r} failed in {key}:\n{res['error']}"
    return per_rank


def assert_params_close(actual, expected, what, rtol=1e-10, atol=1e-13):
    """float64: the runs agree to ~1e-14 relative (measured); the margin covers other CPUs."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"{what}, param {i}: {m}")


# ---- tests on the job's results -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_half_batches_match_one_process_on_the_whole_batch(job, name):
    ranks = result(job, f"ddp/{name}")
    expected, opt = single_process_run(name)
    assert opt.scalars["step"].item() == STEPS and opt.scalars["skipped"].item() == 0
    moved = max((e - p0).abs().max().item() for e, p0 in zip(expected, make_model().parameters()))
    assert moved > 1e-3, "the reference run barely moved; the comparison would prove nothing"
    for r, res in enumerate(ranks):
        assert_params_close(res["params"], expected, f"DDP rank {r}")
        assert res["all_reduces"] == STEPS, "one all-reduce per step"
        assert res["step"].item() == STEPS
        assert res["after_step"] is None, "the reduction stays active after step()"
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b), "the replicas differ"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_ranks_watching_their_own_loss_stay_bitwise_equal(job, name):
    """watch_loss + bare step() under DDP, 2 micro-batches per rank: the replicas stay bitwise
    equal, and equal one process taking the whole batch with step(loss=)."""
    ranks = result(job, f"ddp_watched/{name}")
    expected, _ = single_process_run(name)
    for r, res in enumerate(ranks):
        assert_params_close(res["params"], expected, f"DDP rank {r}, watched loss")
        assert res["all_reduces"] == STEPS, "one all-reduce per step (the loss average)"
        assert res["step"].item() == STEPS
    for i, (a, b) in enumerate(zip(ranks[0]["params"], ranks[1]["params"])):
        assert torch.equal(a, b), f"the replicas differ in param {i}"


def test_ddp_without_loss_averaging_the_replicas_drift_apart(job):
    """The control: each rank's own half-batch loss gives each rank its own step size."""
    ranks = result(job, "ddp_per_rank_loss/InexactPolyak")
    gap = max((a - b).abs().max().item() for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert gap > 1e-4, f"replicas should drift apart without the loss average, gap {gap}"
    assert all(res["all_reduces"] == 0 for res in ranks), "average_loss=False communicates nothing"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_sharded_matches_one_process(job, name):
    ranks = result(job, f"fsdp/{name}")
    expected, _ = single_process_run(name)
    # uneven (2 + 1 rows) and zero-size shards really happened
    assert ranks[0]["local_numels"] == [10, 2, 3, 1]
    assert ranks[1]["local_numels"] == [5, 1, 0, 0]
    for r, res in enumerate(ranks):
        assert res["placements"] == "(Shard(dim=0),)"
        assert_params_close(res["params"], expected, f"FSDP2 rank {r}")
        assert res["all_reduces"] == STEPS, "one all-reduce per step"
        assert res["step"].item() == STEPS
        assert all(res["state_is_dtensor"])


def test_hsdp_replicated_shards_count_once(job):
    """A (replicate=2, shard=1) mesh: each rank holds whole parameters as DTensors with a
    Replicate placement; the sums are divided by the 2 replicas before they are added."""
    ranks = result(job, "hsdp/DoG")
    expected, _ = single_process_run("DoG")
    for r, res in enumerate(ranks):
        assert res["placements"] == "(Replicate(), Shard(dim=0))"
        assert_params_close(res["params"], expected, f"HSDP rank {r}")
        assert res["all_reduces"] == STEPS


@pytest.mark.parametrize("name", FUSED_SHARDED)
def test_fsdp2_fused_path_matches_one_process(job, name):
    """The Triton path (interpreted on CPU) on local shards, zero-size ones included, fp32: one
    sum (InexactPolyak) and MoMo-Adam's three (<g, x>, <d, x>, sum d^2 / D) all-reduced."""
    ranks = result(job, f"fsdp_fused_fp32/{name}")
    expected, _ = single_process_run(name, dtype=torch.float32, fused=False, foreach=False)
    for r, res in enumerate(ranks):
        assert_params_close(res["params"], expected, f"fused FSDP2 rank {r}", rtol=1e-5, atol=1e-6)
        assert res["all_reduces"] == STEPS


@pytest.mark.parametrize("name", ["DoG", "InexactPolyak"])
def test_fsdp2_state_dict_round_trip(job, name):
    for r, res in enumerate(result(job, f"fsdp_state_dict/{name}")):
        for a, b in zip(res["reloaded"], res["after"]):
            assert torch.equal(a, b), f"rank {r}: a reloaded optimizer took a different step"
        if name == "DoG":
            assert res["state_types"] == ["DTensor"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_nonfinite_value_on_one_rank_skips_the_step_on_every_rank(job, mode):
    ranks = result(job, f"nonfinite/{mode}")
    for res in ranks:
        assert (res["skipped"], res["step"]) == (1.0, 2.0)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)


def test_one_all_reduce_packs_loss_average_and_sums(job):
    for res in result(job, "packing"):
        assert res["out"] == [(torch.float32, 1.5), (torch.float64, 30.0), (torch.bfloat16, 1.5)]
        assert res["no_loss"] == (None, 30.0)


# ---- single-process tests -----------------------------------------------------------------------
def _forbid_collectives(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was issued in a single process")

    for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter"):
        monkeypatch.setattr(dist, name, forbidden)


@pytest.mark.parametrize("name", list(ALL_CLASSES))
def test_single_process_issues_no_collective(monkeypatch, name):
    assert not dist.is_initialized()
    _forbid_collectives(monkeypatch)
    model = make_model()
    opt = ALL_CLASSES[name](model.parameters())
    seen = []
    real = distributed.reduction_for

    def spy(*args):
        scope = real(*args)
        seen.append(scope.reduction)
        return scope

    monkeypatch.setattr(distributed, "reduction_for", spy)
    train(model, opt, *make_data(), steps=2)
    assert seen == [None, None]
    assert opt.scalars["step"].item() == 2


def test_world_of_one_issues_no_collective_and_unwraps_dtensors(monkeypatch, tmp_path):
    """An initialised group of one rank: plain parameters communicate nothing; DTensor
    parameters on a one-rank mesh step on their local tensors exactly like plain ones, and
    their state is a DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        _forbid_collectives(monkeypatch)
        plain, _ = single_process_run("DoG")
        mesh = init_device_mesh("cpu", (1,))
        model = make_model()
        # DTensor parameters whose local tensors are the plain model's parameters (one rank)
        dparams = [torch.nn.Parameter(DTensor.from_local(p.detach(), mesh, [Shard(0)]))
                   for p in model.parameters()]
        opt = OPTIMIZERS["DoG"](dparams)
        x, y = make_data()
        for _ in range(STEPS):
            model.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            for dp, p in zip(dparams, model.parameters()):
                dp.grad = DTensor.from_local(p.grad, mesh, [Shard(0)])
            opt.step(loss=loss)
        for dp, p in zip(dparams, model.parameters()):
            assert dp.to_local().data_ptr() == p.data_ptr()
        assert_params_close([p.detach() for p in model.parameters()], plain, "DTensor, 1 rank")
        assert all(isinstance(v, DTensor) for p in dparams
                   for k, v in opt.state[p].items() if k not in opt.scalars)

        mixed = [torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Shard(0)])),
                 torch.nn.Parameter(torch.ones(3))]
        for p in mixed:
            p.grad = torch.ones_like(p)
        with pytest.raises(ValueError, match="some parameters are DTensors"):
            pf.InexactPolyak(mixed, total_steps=1).step(loss=1.0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(ALL_CLASSES))
@pytest.mark.parametrize("kwargs, message", [
    (dict(average_loss=1), "Invalid average_loss"),
    (dict(average_loss=None), "Invalid average_loss"),
    (dict(process_group="world"), "Invalid process_group"),
])
def test_invalid_distributed_options(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ALL_CLASSES[name](make_model().parameters(), **kwargs)

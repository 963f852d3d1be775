"""torch.optim's contract, checked the way PyTorch's own generic optimizer tests check it
(test/test_optim.py and torch/testing/_internal/common_optimizers.py in the PyTorch repository):
a failed add_param_group, the four state_dict hooks, repeated param groups, no empty state
entries, hyperparameters given in the param groups, errors at construction. Then the design
that makes those hold: the global scalars live in the state of the first parameter (id 0 in
state_dict()), one 0-d tensor per name, as torch.optim.LBFGS keeps its global state; they are
views of the one packed buffer the step reads, keep their float32/float64 bits whatever the
first parameter's dtype, and old checkpoints still load.

tests/data/old_checkpoint_e9a6c3b.pt (4.7 KB) was written by commit e9a6c3b, which kept the
scalars in param_groups[0]["scalars"]; the even older format (state["scalars"]) is made from it
here. The script, run from the repository root at that commit:

    import math, torch, polyak_fused as pf

    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    def run(opt, m, steps):
        for t in range(steps):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            if t == 1:
                m.weight.grad[0, 0] = math.nan   # a skipped step
            opt.step(loss=loss)

    out = {}
    m = model()
    opt = pf.InexactPolyak([{"params": [m.weight]}, {"params": [m.bias], "lr": 1 / 3}],
                           total_steps=20, lower_bound=0.01, track_best=True, fused=False, foreach=False)
    run(opt, m, 3)
    out["inexact_polyak_best"] = {"model": m.state_dict(), "opt": opt.state_dict()}
    m = model()
    opt = pf.DoG(m.parameters(), reps_rel=1e-2, fused=False, foreach=False)
    run(opt, m, 3)
    out["dog"] = {"model": m.state_dict(), "opt": opt.state_dict()}
    torch.save(out, "tests/data/old_checkpoint_e9a6c3b.pt")
"""

from __future__ import annotations

import copy
import io
import math
import pathlib
import pickle

import pytest
import torch

import polyak_fused as pf
from polyak_fused import _optimizer
from eager_helpers import (OPTIMIZER_FACTORIES, OPTIMIZER_IDS, assert_bitwise_equal,
                           assert_same_snapshot, snapshot)
from test_errors import REQUIRED

OLD_CHECKPOINT = pathlib.Path(__file__).parent / "data" / "old_checkpoint_e9a6c3b.pt"

# Required constructor arguments (test_errors' list), and for each class one global
# hyperparameter with a valid value other than its default.
CLASSES = list(REQUIRED)
OTHER_GLOBAL = {
    pf.InexactPolyak: ("total_steps", 20),
    pf.Polyak: ("f_star", 0.5),
    pf.DecSPS: ("c0", 2.0),
    pf.AdaSPS: ("c_p", 2.0),
    pf.DoG: ("weight_decay", 0.1),
    pf.ClippedSGD: ("max_norm", 1.0),
    pf.NSGDM: ("schedule", "agnostic"),
    pf.MoMo: ("beta", 0.5),
    pf.MoMoAdam: ("betas", (0.8, 0.99)),
}
# Every global hyperparameter of each class at a valid non-default value (item 7).
ALL_GLOBALS = {
    pf.InexactPolyak: dict(total_steps=30, lower_bound=0.01, track_best=True),
    pf.Polyak: dict(f_star=0.01, c=0.5, max_lr=0.3),
    pf.DecSPS: dict(c0=2.0, gamma_b=5.0, lower_bound=0.01),
    pf.AdaSPS: dict(c_p=2.0, lower_bound=0.01),
    pf.DoG: dict(reps_rel=1e-3, weight_decay=0.01),
    pf.ClippedSGD: dict(max_norm=0.5, momentum=0.9),
    pf.NSGDM: dict(beta=0.5, schedule="agnostic"),
    pf.MoMo: dict(weight_decay=0.01, beta=0.5, lb=0.01, bias_correction=True, use_fstar=True),
    pf.MoMoAdam: dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, lb=0.01, divide=False,
                      use_fstar=True),
}
class_ids = pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
fused_class_ids = class_ids
configs = pytest.mark.parametrize("factory", OPTIMIZER_FACTORIES, ids=OPTIMIZER_IDS)


# ---- helpers -------------------------------------------------------------------------------------
def make_model(seed=3, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 2)).to(dtype)


def train(model, opt, steps: range):
    """A fixed batch per step index, independent of the global RNG."""
    for t in steps:
        g = torch.Generator().manual_seed(100 + t)
        like = next(model.parameters())
        x, y = (torch.randn(16, 5, generator=g).to(like), torch.randn(16, 2, generator=g).to(like))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step(loss=loss)


def trained(factory, steps=3, seed=3):
    model = make_model(seed)
    opt = factory(model.parameters())
    train(model, opt, range(steps))
    return model, opt


def first_param(opt):
    return next(p for g in opt.param_groups for p in g["params"])


def scalar_names(opt):
    return _optimizer.COMMON_SCALARS + opt.SCALARS


def assert_same_tree(actual, expected, path="state_dict"):
    """Equality of nested dicts/lists with tensors compared bitwise (dtype, shape, bits)."""
    if torch.is_tensor(expected):
        assert torch.is_tensor(actual), f"{path}: {actual!r} is not a tensor"
        assert_bitwise_equal(actual, expected, path)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), \
            f"{path}: keys {list(actual) if isinstance(actual, dict) else actual} != {list(expected)}"
        for k in expected:
            assert_same_tree(actual[k], expected[k], f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- where the global scalars live ---------------------------------------------------------------
@configs
def test_scalars_live_in_the_first_parameters_state(factory):
    model, opt = trained(factory)
    first = first_param(opt)
    names = scalar_names(opt)
    scalars = opt.scalars
    assert list(scalars) == list(names)
    for i, n in enumerate(names):
        assert opt.state[first][n] is scalars[n], f"state[first][{n!r}] is not opt.scalars[{n!r}]"
        assert scalars[n].dim() == 0
        assert scalars[n].data_ptr() == opt._packed_scalars[i].data_ptr(), \
            f"scalars[{n!r}] is not a view of the packed buffer the step reads"
    sd = opt.state_dict()
    assert all(isinstance(k, int) for k in sd["state"]), list(sd["state"])
    assert set(names) <= set(sd["state"][0])
    assert not any(set(names) & set(st) for k, st in sd["state"].items() if k != 0)
    assert not any("scalars" in g for g in sd["param_groups"])


def test_an_entry_replaced_in_the_state_is_taken_by_the_next_step():
    """The state is the real thing: a tensor put in the first parameter's state replaces the
    value the step reads (as a hook would), and becomes a view of the packed buffer again."""
    model, opt = trained(lambda p: pf.Polyak(p, fused=False, foreach=False), steps=2)
    first = first_param(opt)
    opt.state[first]["step"] = torch.tensor(40.0)
    train(model, opt, range(2, 3))
    assert opt.scalars["step"].item() == 41.0
    assert opt.state[first]["step"] is opt.scalars["step"]


# ---- item 1: a failed add_param_group changes nothing --------------------------------------------
def bad_groups(cls, params):
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    q = torch.nn.Parameter(torch.randn(3))
    name, value = OTHER_GLOBAL[cls]
    return {
        "complex": ({"params": [z]}, ValueError, "complex"),
        "lr": ({"params": [q], "lr": -1.0}, ValueError, r"Invalid lr: -1.0"),
        "global_hparam": ({"params": [q], name: value}, ValueError, f"Invalid {name}"),
        "other_device": ({"params": [torch.nn.Parameter(torch.zeros(3, device="meta"))]},
                         ValueError, "one device"),
        "duplicate": ({"params": [params[0]]}, ValueError, "more than one parameter group"),
    }


@pytest.mark.parametrize("case", ["complex", "lr", "global_hparam", "other_device", "duplicate"])
@class_ids
def test_failed_add_param_group_leaves_the_optimizer_as_it_was(cls, case):
    model = make_model()
    opt = cls(model.parameters(), **REQUIRED[cls], fused=False, foreach=False)
    train(model, opt, range(2))
    groups_before = [(g, {k: v for k, v in g.items() if k != "params"}, list(g["params"]))
                     for g in opt.param_groups]
    before = snapshot(opt)
    group, error, pattern = bad_groups(cls, list(model.parameters()))[case]
    with pytest.raises(error, match=pattern):
        opt.add_param_group(group)
    assert len(opt.param_groups) == len(groups_before), "the rejected group was added"
    for g, (g0, hp0, ps0) in zip(opt.param_groups, groups_before):
        assert g is g0 and {k: v for k, v in g.items() if k != "params"} == hp0
        assert all(a is b for a, b in zip(g["params"], ps0)) and len(g["params"]) == len(ps0)
    assert_same_snapshot(snapshot(opt), before, what="after a refused add_param_group: ")
    own = {id(p) for g in opt.param_groups for p in g["params"]}
    rejected = [p for p in group["params"] if not p.is_meta and id(p) not in own]
    for p in rejected:
        p.grad = torch.ones_like(p)
    kept = [p.detach().clone() for p in rejected]
    train(model, opt, range(2, 3))          # the next step leaves the rejected parameter alone
    for p, k in zip(rejected, kept):
        assert torch.equal(p.detach(), k), "the step updated a parameter of the rejected group"


# ---- item 2: load_state_dict pre-hooks -----------------------------------------------------------
@configs
@pytest.mark.parametrize("returns", [True, False], ids=["returns_a_new_dict", "edits_in_place"])
def test_load_state_dict_pre_hook_edits_reach_the_scalars(factory, returns):
    _, saved = trained(factory)
    sd = copy.deepcopy(saved.state_dict())

    def hook(opt, state_dict):
        new = copy.deepcopy(state_dict) if returns else state_dict
        new["state"][0]["step"] = torch.tensor(5.0)
        new["param_groups"][0]["lr"] = 0.25
        return new if returns else None

    model = make_model()
    opt = factory(model.parameters())
    opt.register_load_state_dict_pre_hook(hook)
    opt.load_state_dict(sd)
    assert opt.scalars["step"].item() == 5.0
    assert opt.param_groups[0]["lr"] == 0.25
    assert not any("scalars" in g for g in opt.param_groups)
    for n in scalar_names(opt):
        if n != "step":
            assert_bitwise_equal(opt.scalars[n], saved.scalars[n], f"scalars[{n!r}]")


# ---- item 3: load_state_dict post-hooks ----------------------------------------------------------
@configs
def test_load_state_dict_post_hooks_see_the_restored_scalars(factory):
    _, saved = trained(factory)
    seen = {}

    def hook(opt):
        seen["scalars"] = {n: v.clone() for n, v in opt.scalars.items()}
        seen["state"] = {n: opt.state[first_param(opt)][n].clone() for n in scalar_names(opt)}

    model = make_model()
    opt = factory(model.parameters())
    opt.register_load_state_dict_post_hook(hook)
    opt.load_state_dict(copy.deepcopy(saved.state_dict()))
    assert seen["scalars"]["step"].item() == 3.0
    for what in ("scalars", "state"):
        for n, v in saved.scalars.items():
            assert_bitwise_equal(seen[what][n], v, f"post-hook's {what}[{n!r}]")


# ---- item 4: state_dict post-hooks ---------------------------------------------------------------
@configs
def test_state_dict_post_hooks_see_the_final_dict(factory):
    """Only parameter ids in "state", and nothing is edited after the hooks ran."""
    _, opt = trained(factory)
    seen = {}

    def hook(opt, state_dict):
        seen["keys"] = list(state_dict["state"])
        seen["groups"] = [set(g) for g in state_dict["param_groups"]]
        seen["copy"] = copy.deepcopy(state_dict)
        return state_dict

    opt.register_state_dict_post_hook(hook)
    sd = opt.state_dict()
    assert all(isinstance(k, int) for k in seen["keys"]), seen["keys"]
    assert not any("scalars" in g for g in seen["groups"])
    assert_same_tree(sd, seen["copy"])


@configs
def test_id_to_name_conversion_in_hooks_keeps_the_global_state(factory):
    """A state_dict post-hook that renames parameter ids to names and drops every other key of
    "state" (as id-to-name converters do), and a load pre-hook that maps the names back: the
    reloaded optimizer takes the same steps as the saved one."""
    model_a, opt_a = trained(factory)
    names = [n for n, _ in model_a.named_parameters()]

    def to_names(opt, sd):
        return {"state": {names[k]: v for k, v in sd["state"].items() if isinstance(k, int)},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                 for g in sd["param_groups"]]}

    def to_ids(opt, sd):
        return {"state": {names.index(k): v for k, v in sd["state"].items()},
                "param_groups": [{**g, "params": [names.index(n) for n in g["params"]]}
                                 for g in sd["param_groups"]]}

    opt_a.register_state_dict_post_hook(to_names)
    ckpt = through_bytes({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    model_b = make_model(seed=4)
    model_b.load_state_dict(ckpt["model"])
    opt_b = factory(model_b.parameters())
    opt_b.register_load_state_dict_pre_hook(to_ids)
    opt_b.load_state_dict(ckpt["opt"])
    assert_same_snapshot(snapshot(opt_b), snapshot(opt_a), what="after the named round trip: ")
    train(model_a, opt_a, range(3, 5))
    train(model_b, opt_b, range(3, 5))
    assert_same_snapshot(snapshot(opt_b), snapshot(opt_a), what="resumed: ")


# ---- item 5: repeated param groups (pytorch/pytorch#36831) ---------------------------------------
@configs
def test_repeated_param_groups_have_one_saved_form(factory):
    _, opt = trained(factory)
    _, opt_c = trained(factory)            # equal, not identical, parameters
    assert_same_tree(opt_c.state_dict(), opt.state_dict())   # deterministic
    opt_c.param_groups.extend(opt_c.param_groups)
    assert_same_tree(opt_c.state_dict()["param_groups"][-1], opt.state_dict()["param_groups"][-1])


# ---- item 6: no empty state entries --------------------------------------------------------------
@configs
def test_no_empty_state_entries(factory):
    model, opt = trained(factory)
    assert all(len(st) > 0 for st in opt.state.values()), \
        [k for k, st in opt.state.items() if not st]
    fresh = factory(make_model().parameters())
    fresh.load_state_dict(through_bytes(opt.state_dict()))
    assert all(len(st) > 0 for st in fresh.state.values())


# ---- item 7: hyperparameters given in the param groups -------------------------------------------
@class_ids
def test_global_hyperparameters_given_in_every_group(cls):
    """Every global hyperparameter given, with one value, in both groups: the optimizer takes the
    same steps as with the values given to the constructor (InexactPolyak's total_steps=10 to
    the constructor is replaced by the groups' 30)."""
    hp = ALL_GLOBALS[cls]
    model_a, model_b = make_model(), make_model()
    w_a, w_b = list(model_a.parameters()), list(model_b.parameters())
    opt_a = cls([{"params": w_a[:2]}, {"params": w_a[2:], "lr": 0.5}], **{**REQUIRED[cls], **hp},
                fused=False, foreach=False)
    opt_b = cls([{"params": w_b[:2], **hp}, {"params": w_b[2:], "lr": 0.5, **hp}],
                **REQUIRED[cls], fused=False, foreach=False)
    for name, value in hp.items():
        assert opt_b.defaults[name] == value
        assert all(g[name] == value for g in opt_b.param_groups)
    train(model_a, opt_a, range(4))
    train(model_b, opt_b, range(4))
    assert_same_snapshot(snapshot(opt_b), snapshot(opt_a), what="hyperparameters in the groups: ")


@pytest.mark.parametrize("cls", [c for c in CLASSES if not REQUIRED[c]], ids=lambda c: c.__name__)
def test_every_hyperparameter_in_the_groups_and_none_to_the_constructor(cls):
    """torch's test_optim builds optimizers this way (test_param_groups_weight_decay, ...)."""
    hp = dict(ALL_GLOBALS[cls], lr=0.7)
    model_a, model_b = make_model(), make_model()
    opt_a = cls(model_a.parameters(), **hp, fused=False, foreach=False)
    w = list(model_b.parameters())
    opt_b = cls([dict(params=w[:2], **hp), dict(params=w[2:], **hp)], fused=False, foreach=False)
    train(model_a, opt_a, range(4))
    train(model_b, opt_b, range(4))
    assert_same_snapshot(snapshot(opt_b), snapshot(opt_a), what="all in the groups: ")


def test_total_steps_given_in_every_group_with_none_to_the_constructor():
    """total_steps has no default; None (to be set later) plus T in every group gives T."""
    model_a, model_b = make_model(), make_model()
    w = list(model_b.parameters())
    opt_a = pf.InexactPolyak(model_a.parameters(), total_steps=30, fused=False, foreach=False)
    opt_b = pf.InexactPolyak([{"params": w[:2], "total_steps": 30},
                              {"params": w[2:], "total_steps": 30}], total_steps=None, fused=False, foreach=False)
    assert opt_b.defaults["total_steps"] == 30
    train(model_a, opt_a, range(3))
    train(model_b, opt_b, range(3))
    assert_same_snapshot(snapshot(opt_b), snapshot(opt_a), what="T from the groups: ")


@pytest.mark.parametrize("cls, name, value, pattern", [
    (pf.InexactPolyak, "total_steps", 10.5, r"Invalid total_steps: 10.5"),
    (pf.InexactPolyak, "track_best", 1, r"Invalid track_best: 1"),
    (pf.Polyak, "c", -1.0, r"Invalid c: -1.0"),
    (pf.DecSPS, "gamma_b", math.nan, r"Invalid gamma_b: nan"),
    (pf.DoG, "reps_rel", 0.0, r"Invalid reps_rel: 0.0"),
    (pf.ClippedSGD, "momentum", 1.0, r"Invalid momentum: 1.0"),
    (pf.NSGDM, "schedule", "fast", r"Invalid schedule: 'fast'"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_a_global_hyperparameter_given_in_the_groups_is_validated(cls, name, value, pattern):
    w = list(make_model().parameters())
    with pytest.raises(ValueError, match=pattern):
        cls([{"params": w[:2], name: value}, {"params": w[2:], name: value}], **REQUIRED[cls],
            fused=False, foreach=False)


def test_groups_giving_two_values_are_rejected():
    w = list(make_model().parameters())
    with pytest.raises(ValueError, match=r"Invalid total_steps: 5 .*every param group"):
        pf.InexactPolyak([{"params": w[:2], "total_steps": 5}, {"params": w[2:], "total_steps": 6}],
                         total_steps=10, fused=False, foreach=False)


def test_a_group_added_after_loading_takes_the_loaded_global_value():
    """The global value is the groups' one: a checkpoint's total_steps (10) wins over the
    constructor's (999), and a group added later takes it rather than the constructor's."""
    w = list(make_model().parameters())
    src = pf.InexactPolyak(w[:2], total_steps=10, fused=False, foreach=False)
    opt = pf.InexactPolyak(w[:2], total_steps=999, fused=False, foreach=False)
    opt.load_state_dict(src.state_dict())
    opt.add_param_group({"params": w[2:]})
    assert [g["total_steps"] for g in opt.param_groups] == [10, 10]
    with pytest.raises(ValueError, match=r"Invalid total_steps: 999"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "total_steps": 999})


# ---- item 8: errors at construction --------------------------------------------------------------
@fused_class_ids
def test_fused_true_without_a_device_for_the_kernels_fails_at_construction(cls, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"fused=True needs CUDA tensors.*TRITON_INTERPRET=1"):
        cls(make_model().parameters(), **REQUIRED[cls], fused=True)


@fused_class_ids
def test_a_group_the_kernels_cannot_run_on_is_refused_before_it_is_added(cls, monkeypatch):
    w = list(make_model().parameters())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt = cls(w[:2], **REQUIRED[cls], fused=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"fused=True needs CUDA tensors"):
        opt.add_param_group({"params": w[2:]})
    assert len(opt.param_groups) == 1


@fused_class_ids
def test_fused_true_on_meta_parameters_gets_the_librarys_message(cls):
    """Meta parameters may still be materialised in place (model.to_empty) before the first
    step, so the optimizer is built; a step on parameters that are still meta is refused by the
    library, not by Triton ("Cannot copy out of meta tensor")."""
    with torch.device("meta"):
        model = make_model()
    opt = cls(model.parameters(), **REQUIRED[cls], fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match=r"fused=True .*meta tensors"):
        opt.step(loss=1.0)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_an_optimizer_built_on_meta_parameters_steps_once_they_hold_data(fused, device):
    """Built before model.to_empty() swaps data into the same Parameter objects (what it does for
    FSDP2's DTensor parameters, and for any module under the swap flag used here): the scalars
    move to the parameters' device with them."""
    with torch.device("meta"):
        model = make_model()
    opt = pf.DoG(model.parameters(), reps_rel=1e-2, fused=fused)
    params = list(model.parameters())
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert all(a is b for a, b in zip(model.parameters(), params)), "to_empty made new Parameters"
    ref_model = make_model().to(device)
    with torch.no_grad():
        for p, q in zip(params, ref_model.parameters()):
            p.copy_(q)
    ref = pf.DoG(ref_model.parameters(), reps_rel=1e-2, fused=fused)
    train(model, opt, range(3))
    train(ref_model, ref, range(3))
    assert opt._packed_scalars.device == params[0].device
    assert_same_snapshot(snapshot(opt), snapshot(ref), what="built on meta: ")


# ---- casting on load: the scalars keep their dtype and bits --------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_first_parameter_does_not_round_the_scalars(dtype, fused, device):
    """torch.optim's load_state_dict casts floating state values to their parameter's dtype; the
    scalars (float32) sit in the state of a bf16/fp16 parameter and must come back unrounded."""
    def factory(p):
        return pf.AdaSPS(p, fused=fused)

    if not fused:
        device = torch.device("cpu")
    model = make_model(dtype=dtype).to(device)
    opt = factory(model.parameters())
    train(model, opt, range(3))
    gap_sum = opt.scalars["gap_sum"]
    assert gap_sum.dtype == torch.float32
    assert gap_sum.to(dtype).float() != gap_sum, "the test needs a value that the cast would round"
    ckpt = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()})
    model_b = make_model(seed=5, dtype=dtype).to(device)
    model_b.load_state_dict(ckpt["model"])
    opt_b = factory(model_b.parameters())
    opt_b.load_state_dict(ckpt["opt"])
    for n, v in opt.scalars.items():
        assert_bitwise_equal(opt_b.scalars[n], v, f"scalars[{n!r}] after loading")
    train(model, opt, range(3, 5))
    train(model_b, opt_b, range(3, 5))
    assert_same_snapshot(snapshot(opt_b), snapshot(opt), what=f"{dtype} resumed: ")


def test_float64_scalars_behind_a_float32_first_parameter_keep_their_bits():
    a = torch.nn.Parameter(torch.tensor([0.3, -0.7]))
    b = torch.nn.Parameter(torch.tensor([1.1, 0.2], dtype=torch.float64))
    opt = pf.AdaSPS([a, b], fused=False, foreach=False)
    for t in range(3):
        a.grad, b.grad = torch.tensor([0.5, t + 0.1]), torch.tensor([0.3, -0.2], dtype=torch.float64)
        opt.step(loss=1.0 / 3 + t)
    assert opt.scalars["gap_sum"].dtype == torch.float64
    fresh = pf.AdaSPS([a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()],
                      fused=False, foreach=False)
    fresh.load_state_dict(through_bytes(opt.state_dict()))
    for n, v in opt.scalars.items():
        assert_bitwise_equal(fresh.scalars[n], v, f"scalars[{n!r}]")


# ---- old checkpoints -----------------------------------------------------------------------------
OLD = {
    "inexact_polyak_best": lambda ps: pf.InexactPolyak(
        [{"params": ps[:1]}, {"params": ps[1:], "lr": 1 / 3}], total_steps=20,
        lower_bound=0.01, track_best=True, fused=False, foreach=False),
    "dog": lambda ps: pf.DoG(ps, reps_rel=1e-2, fused=False, foreach=False),
}


def old_model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def old_run(opt, m, steps):
    """The training of the script in the module docstring."""
    for t in steps:
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        if t == 1:
            m.weight.grad[0, 0] = math.nan
        opt.step(loss=loss)


def in_older_format(sd):
    """The format before commit e99eceb: the scalars under the key "scalars" of "state"."""
    groups = [dict(g) for g in sd["param_groups"]]
    return {"state": {**sd["state"], "scalars": groups[0].pop("scalars")}, "param_groups": groups}


@pytest.mark.parametrize("fmt", ["param_group", "state"])
@pytest.mark.parametrize("name", list(OLD))
def test_old_checkpoints_load_and_resume_bitwise(name, fmt):
    saved = torch.load(OLD_CHECKPOINT, weights_only=True)[name]
    old_sd = saved["opt"] if fmt == "param_group" else in_older_format(saved["opt"])
    old_scalars = saved["opt"]["param_groups"][0]["scalars"]
    model = old_model()
    model.load_state_dict(saved["model"])
    opt = OLD[name](list(model.parameters()))
    opt.load_state_dict(old_sd)
    assert list(opt.scalars) == list(old_scalars)
    for n, v in old_scalars.items():
        assert_bitwise_equal(opt.scalars[n], v, f"loaded scalars[{n!r}]")
    for i, p in enumerate(model.parameters()):
        for k, v in saved["opt"]["state"][i].items():
            assert_bitwise_equal(opt.state[p][k], v, f"loaded state[{i}][{k!r}]")
    assert not any("scalars" in g for g in opt.param_groups)
    assert "scalars" not in opt.state
    assert all(isinstance(k, int) for k in opt.state_dict()["state"])

    # The same saved values, written by hand in today's format (scalars in the first
    # parameter's state), loaded into a fresh optimizer: resuming from either is bitwise the same.
    # (Not compared bitwise with an uninterrupted run of today's code: the checkpoint's first
    # three steps were computed on another machine, whose float32 sums may round differently.)
    same_model = old_model()
    same_model.load_state_dict(saved["model"])
    same = OLD[name](list(same_model.parameters()))
    today = {"state": {i: dict(st) for i, st in saved["opt"]["state"].items()},
             "param_groups": [{k: v for k, v in g.items() if k != "scalars"}
                              for g in saved["opt"]["param_groups"]]}
    today["state"].setdefault(0, {}).update(old_scalars)
    same.load_state_dict(today)
    old_run(opt, model, range(3, 6))
    old_run(same, same_model, range(3, 6))
    assert_same_snapshot(snapshot(opt), snapshot(same),
                         what="old checkpoint resumed vs the same values in today's format: ")
    ref_model = old_model()
    ref = OLD[name](list(ref_model.parameters()))
    old_run(ref, ref_model, range(6))
    for a, e in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_an_optimizer_pickled_with_the_older_layout_unpickles():
    """An optimizer pickled whole by commit e9a6c3b held its scalars in opt.state["scalars"]
    (made here by moving them there: the pickle has no other trace of the version)."""
    model, opt = trained(lambda p: pf.DoG(p, fused=False, foreach=False))
    expected = {n: v.clone() for n, v in opt.scalars.items()}
    first = first_param(opt)
    opt.state["scalars"] = {n: opt.state[first].pop(n) for n in scalar_names(opt)}
    opt._live.views = opt._live.packed = None
    clone = pickle.loads(pickle.dumps(opt))
    assert "scalars" not in clone.state
    for n, v in expected.items():
        assert_bitwise_equal(clone.scalars[n], v, f"unpickled scalars[{n!r}]")


# ---- torch.distributed.checkpoint's helpers, every optimizer -------------------------------------
@configs
@pytest.mark.parametrize("steps", [0, 3], ids=["before_the_first_step", "after_3_steps"])
def test_distributed_checkpoint_helpers_round_trip(factory, steps):
    """get/set_optimizer_state_dict with their defaults (strict=True: every parameter that
    requires a gradient must have an entry in the saved "state")."""
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    model, opt = trained(factory, steps=steps)
    # (a copy, as a save and a load would make: loading a live dict shares its buffers)
    sd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    model_b = make_model(seed=4)
    model_b.load_state_dict(model.state_dict())
    opt_b = factory(model_b.parameters())
    set_optimizer_state_dict(model_b, opt_b, sd)
    assert_same_snapshot(snapshot(opt_b), snapshot(opt), what="after set_optimizer_state_dict: ")
    train(model, opt, range(steps, steps + 3))
    train(model_b, opt_b, range(steps, steps + 3))
    assert_same_snapshot(snapshot(opt_b), snapshot(opt), what="resumed through DCP: ")


# ---- more of torch's generic tests ---------------------------------------------------------------
@configs
def test_torchs_hook_patterns_and_a_step_after_them(factory):
    """test_state_dict_pre_post_hook and test_load_state_dict_post_hook of torch's test_optim:
    hooks that put non-parameter keys into opt.state; the optimizer still saves and steps."""
    model, opt = trained(factory)

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, state_dict):
        state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) == 1
        return state_dict

    def load_post(optimizer):
        optimizer.state["ran_load_state_dict_post_hook"] = True

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_state_dict_pre_hook"] and "test" not in sd["state"]
    opt.register_load_state_dict_post_hook(load_post)
    opt.load_state_dict(sd)
    assert opt.state["ran_load_state_dict_post_hook"] is True
    train(model, opt, range(3, 4))
    assert opt.scalars["step"].item() == 4.0


@configs
def test_a_step_saved_as_a_python_number_loads(factory):
    """test_load_nontensor_step: "step" entries turned into Python numbers still load."""
    model, opt = trained(factory)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].item()
    fresh = factory(make_model().parameters())
    fresh.load_state_dict(sd)
    assert fresh.scalars["step"].item() == 3.0
    assert fresh.scalars["step"].dtype == opt.scalars["step"].dtype


@configs
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_has_its_own_live_scalars(factory, how):
    model, opt = trained(factory)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for n, v in opt.scalars.items():
        assert_bitwise_equal(clone.scalars[n], v, f"copied scalars[{n!r}]")
    assert clone._packed_scalars.data_ptr() != opt._packed_scalars.data_ptr()
    before = snapshot(opt)
    params = [p for g in clone.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 0.1)
    clone.step(loss=2.0)
    assert clone.scalars["step"].item() == 4.0
    assert clone.state[params[0]]["step"] is clone.scalars["step"]
    assert_same_snapshot(snapshot(opt), before, what="the original after a step of its copy: ")

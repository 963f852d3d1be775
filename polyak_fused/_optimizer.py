"""What every optimizer of the package shares: the loss argument, the global scalar state,
validation, and the choice of path: the fused Triton kernels, the multi-tensor (foreach) path or
the eager reference (docs/paths.md).

A subclass declares:
  METHOD          the name of its step rule (the key of the fused kernels' METHOD flag);
  SCALARS         the names of its global scalar state, in order (one value for all params);
  BUFFERS         the names of its per-parameter state tensors;
  GLOBAL_HPARAMS  hyperparameters that define the one global step size, equal in every group;
  NEEDS_LOSS      whether step() must be given the loss;
and implements `_initial_scalars()` and `_run(...)`, which calls its functional form.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import warnings
from collections.abc import Sequence
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not
from typing import Callable

import torch

from . import _host_pass, distributed

#: sum(g^2) at or below this value counts as a zero gradient: the step is zero (never inf/NaN).
#: It is ||g|| <= 1e-8, the threshold of the SPS and SLS reference codes.
TINY_GRAD_SQ = 1e-16

#: Scalars every optimizer keeps: the number of steps taken and the number skipped because
#: the loss or a gradient was not finite.
COMMON_SCALARS = ("step", "skipped")


_grad_of = attrgetter("grad")


def _same_objects(a, b) -> bool:
    """Whether two sequences hold the same objects, in order (identity, not ==)."""
    return a is b or (len(a) == len(b) and all(map(is_, a, b)))


class _LrsByGroup(Sequence):
    """The lr of each tensor of a step, read from its param group when asked, so that a
    scheduler's change is seen without a per-tensor pass. `slots`: the group index of each tensor
    (the fused launcher keys its lr table on it); `values()`: the current lr of every group."""

    __slots__ = ("groups", "slots")

    def __init__(self, groups: list, slots: tuple):
        self.groups, self.slots = groups, slots

    def __len__(self):
        return len(self.slots)

    def __getitem__(self, i):
        return self.groups[self.slots[i]]["lr"]

    def values(self) -> list:
        return [group["lr"] for group in self.groups]


class _Collected:
    """What _collect found at the last step: the param_groups list, the params that had a .grad
    (a tuple), how many of them each group holds, and their lrs. The next step hands over the
    same tuple when the same params have a .grad (read by `host_pass`)."""

    __slots__ = ("groups", "params", "counts", "lrs")

    def __init__(self, groups, params, counts, lrs):
        self.groups, self.params, self.counts, self.lrs = groups, params, counts, lrs


def check_number(name: str, value, *, low=None, high=None, low_open=False, allow_inf=False):
    """Raise ValueError("Invalid <name>: <value>") unless value is a real number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"Invalid {name}: {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"Invalid {name}: {value} (must be {'>' if low_open else '>='} {low})")
    if high is not None and value > high:
        raise ValueError(f"Invalid {name}: {value} (must be <= {high})")


def check_lr(value):
    """A group's lr: a non-negative finite float, or a one-element tensor (for CUDA graphs)."""
    if torch.is_tensor(value):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"Invalid lr: a tensor lr must be one floating value, got {value!r}")
        return
    check_number("lr", value, low=0.0)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_fused_path(fused: bool | None, params: list[torch.Tensor]) -> bool:
    """fused=None picks Triton for CUDA tensors, True insists, False never."""
    if fused is False:
        return False
    on_cuda = all(p.is_cuda for p in params)
    fp64 = any(p.dtype == torch.float64 for p in params)
    if fused is None:
        return on_cuda and not fp64
    if fp64:
        raise RuntimeError(
            "fused=True does not take float64 parameters (the kernels compute in float32); "
            "use fused=False or fused=None for float64")
    if any(p.is_meta for p in params):
        raise RuntimeError(
            "fused=True needs parameters that hold data, got meta tensors: materialise the "
            "model (e.g. model.to_empty(device='cuda')) and build the optimizer on its parameters")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "fused=True needs CUDA tensors (or TRITON_INTERPRET=1 to run the Triton kernels on the "
            "CPU); got parameters on " + ", ".join(sorted({str(p.device) for p in params})))
    return True


def choose_path(fused: bool | None, foreach: bool | None, params: list[torch.Tensor]) -> str:
    """"fused", "foreach" or "reference", with torch.optim's meaning of the two switches:
    fused=True takes the kernels, foreach=True the foreach path, foreach=False the reference;
    with neither True (None: the default), the kernels where they take the tensors (CUDA, not
    float64), else the foreach path."""
    if fused is True:
        use_fused_path(True, params)  # (raises where the kernels cannot take the tensors)
        return "fused"
    if foreach is True:
        return "foreach"
    if foreach is False:
        return "reference"
    return "fused" if use_fused_path(fused, params) else "foreach"


def check_paths(fused, foreach) -> None:
    """Each switch is None, True or False, and at most one is True."""
    for name, value in (("fused", fused), ("foreach", foreach)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (expected None, True or False)")
    if fused is True and foreach is True:
        raise ValueError("Invalid foreach: True with fused=True: pick one path (fused=True takes "
                         "the Triton kernels, foreach=True the torch._foreach_* path)")


def as_loss_tensor(loss, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The loss as a 0-d tensor on the parameters' device, without a host sync."""
    if torch.is_tensor(loss):
        if loss.numel() != 1:
            raise ValueError(
                f"Invalid loss: expected a scalar (one element), got a tensor of shape "
                f"{tuple(loss.shape)}; reduce it (e.g. loss.mean()) first")
        if loss.is_complex() or not (loss.is_floating_point() or loss.dtype in
                                     (torch.int32, torch.int64)):
            raise ValueError(f"Invalid loss: expected a real floating scalar, got dtype {loss.dtype}")
        return loss.detach().reshape(()).to(device=device, dtype=dtype, non_blocking=True)
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.full((), float(loss), device=device, dtype=dtype)
    raise TypeError(f"Invalid loss: expected a 0-d tensor or a float, got {type(loss).__name__}")


def _list_every_parameter(optimizer, state_dict: dict) -> None:
    """state_dict post-hook: an empty entry in "state" for every parameter that has none."""
    for i in chain.from_iterable(g["params"] for g in state_dict["param_groups"]):
        state_dict["state"].setdefault(i, {})


def _in_current_format(state_dict: dict) -> dict:
    """A state_dict of an older format in the current one (a new dict; the caller's stays as it
    is). Up to commit e9a6c3b the global scalars were in param_groups[0]["scalars"], before
    commit e99eceb in state["scalars"]; now they are in the state of the first parameter."""
    state, groups = state_dict["state"], state_dict["param_groups"]
    if "scalars" not in state and not any("scalars" in g for g in groups):
        return state_dict
    groups = [dict(g) for g in groups]
    scalars = {}
    for g in groups:
        scalars.update(g.pop("scalars", {}))
    state = dict(state)
    scalars.update(state.pop("scalars", {}))
    first_id = next(chain.from_iterable(g["params"] for g in groups), None)
    if first_id is not None:
        state[first_id] = {**state.get(first_id, {}), **scalars}
    return {**state_dict, "state": state, "param_groups": groups}


_OWN_FILES = (os.path.dirname(os.path.abspath(__file__)),
              os.path.dirname(os.path.abspath(torch.__file__)))


def _caller_level() -> int:
    """The stacklevel of warnings.warn that names the user's line (the first frame outside this
    package and torch, whose optimizer wrappers sit between the user and step())."""
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_OWN_FILES):
        frame, level = frame.f_back, level + 1
    return level


def _require_triton() -> None:
    """fused=True is refused at construction where Triton cannot be imported."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "Invalid fused: True, but Triton cannot be imported (pip install triton; CUDA builds "
            "of torch bring it on Linux): the fused kernels need it. Use fused=None, which takes "
            "the kernels where they run and the other paths elsewhere") from err


def unwrap(optimizer):
    """The optimizer inside a framework's wrappers: accelerate's ``AcceleratedOptimizer`` and
    Lightning's ``LightningOptimizer`` keep it in ``.optimizer`` (unchanged if it is not
    wrapped)."""
    for _ in range(8):  # wrappers nest a few levels at most; never loop on a self-reference
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or isinstance(optimizer, PolyakFamilyOptimizer):
            break
        optimizer = inner
    return optimizer


def watch_loss(optimizer, loss: torch.Tensor) -> torch.Tensor:
    """``opt.watch_loss(loss)`` for the polyak_fused optimizer inside `optimizer`, which may be a
    framework's wrapper without that method (accelerate's ``AcceleratedOptimizer``, which
    ``accelerator.prepare`` returns). Returns ``loss``."""
    found = unwrap(optimizer)
    if not isinstance(found, PolyakFamilyOptimizer):
        raise TypeError(f"watch_loss: {type(optimizer).__name__} is not, and does not wrap, an "
                        f"optimizer of polyak_fused")
    return found.watch_loss(loss)


class _Live:
    """What step() reads and writes between calls, besides the torch.optim state: the watched
    loss pending for the next step, the flat gradients (flatten_grads), the packed scalar buffer
    and its views, the fused path's cache. One object, made with the optimizer and never
    rebound, so that a wrapper that forwards attribute reads (Lightning's LightningOptimizer)
    or copies the optimizer's __dict__ sees and changes the same values: a loss watched, or
    zero_grad() called, through the wrapper is the real optimizer's."""

    __slots__ = ("watched_loss", "flat_grads", "packed", "views", "fused_cache", "calls",
                 "warned", "lr_peaks", "last_loss")

    def __init__(self):
        self.watched_loss = None
        self.flat_grads = None
        self.packed = None
        self.views = None
        self.fused_cache = {}
        self.calls = 0          # step() calls that reached the step (host count: no sync)
        self.warned = set()     # the misuse warnings given once (_warn_once)
        self.lr_peaks = {}      # id(group) -> the largest float lr a scheduler has set
        self.last_loss = None   # the loss (a device tensor) of the last step, for diagnose()


class PolyakFamilyOptimizer(torch.optim.Optimizer):
    """Base class; see the module docstring. Not for direct use.

    Where the state lives, in torch.optim's own format (so that state_dict hooks,
    torch.distributed.checkpoint and FSDP see an ordinary optimizer):
      * per-parameter buffers (BUFFERS) in ``self.state[p]``, made at the first step;
      * the global scalars (COMMON_SCALARS + SCALARS), one 0-d tensor per name, in the state of
        the first parameter (id 0 in ``state_dict()``), as torch.optim.LBFGS keeps its global
        state. They are views of one packed device buffer, ``self._packed_scalars``, which the
        step reads and writes; ``opt.scalars`` returns the same views.
    A global hyperparameter (GLOBAL_HPARAMS) has one value, held by every param group.
    """

    METHOD: str = ""
    SCALARS: tuple[str, ...] = ()
    BUFFERS: tuple[str, ...] = ()
    GLOBAL_HPARAMS: tuple[str, ...] = ()
    NEEDS_LOSS: bool = True
    #: Whether the method defines a quantity over the whole iterate (DoG's distances, the best
    #: iterate): then every parameter takes part in the step, with None for a missing gradient
    #: (not stepped, its buffers unchanged, still counted in those quantities: docs/usage.md,
    #: "Parameters without a gradient"). Otherwise only the parameters with a .grad take part.
    WHOLE_ITERATE: bool = False
    #: What lr is to the method: "multiplier" (it multiplies a step size the method computes,
    #: 1.0 being the method, so a decaying schedule changes the method: warned in a plain loop,
    #: _check_lr_schedule, and refused by the training-framework integrations), "learning_rate"
    #: (ClippedSGD, NSGDM) or "cap" (MoMo: tau = min(lr / rho, t); a schedule on the cap is the
    #: method as its paper runs it).
    LR_ROLE: str = "multiplier"

    def __init__(self, params, defaults: dict, *, fused: bool | None, foreach: bool | None = None,
                 process_group=None, average_loss: bool = True):
        check_paths(fused, foreach)
        if fused is True:
            _require_triton()
        if "lr" in defaults:
            check_lr(defaults["lr"])
        self.fused, self.foreach = fused, foreach
        self.process_group, self.average_loss = distributed.check_options(process_group,
                                                                          average_loss)
        self._live = _Live()
        if not torch.is_tensor(params):      # (torch.optim raises its own TypeError for a tensor)
            params = list(params)
            if params and isinstance(params[0], dict):
                defaults = {**defaults, **self._global_hparams_of_groups(params, defaults)}
        super().__init__(params, defaults)
        # The global scalars exist from the start: the state is never empty, which is also how
        # torch.distributed.checkpoint knows not to run an initialising step() (without a loss).
        self._ensure_scalars()

    # ---- param groups -------------------------------------------------------------------------
    def _global_hparams_of_groups(self, groups: list[dict], defaults: dict) -> dict:
        """torch.optim lets any hyperparameter be given in the param groups. A global one may be
        when every group ends up with the same value: given in every group, that value replaces
        the constructor's (and becomes the default); given in some, it must equal the
        constructor's. Returns the values given in the groups, checked by the class itself."""
        given = {}
        for name in self.GLOBAL_HPARAMS:
            values = [g[name] for g in groups if name in g]
            if not values:
                continue
            in_effect = [g.get(name, defaults[name]) for g in groups]
            if any(v != in_effect[0] for v in in_effect):
                bad = next((v for v in values if v != defaults[name]), values[0])
                raise ValueError(
                    f"Invalid {name}: {bad!r} in a param group; {name} sets the one global step "
                    f"size, so every param group must have the same value (give it in every "
                    f"group, or only to the constructor, which has {defaults[name]!r})")
            given[name] = in_effect[0]
        if not given:
            return {}
        # The class's constructor is the one place that validates its hyperparameters: build a
        # throwaway optimizer with the groups' values to run those checks (and normalise them).
        accepted = inspect.signature(type(self)).parameters
        kwargs = {k: v for k, v in {**defaults, **given}.items() if k in accepted}
        probe = type(self)([torch.zeros(1)], **kwargs, fused=False)
        return {name: probe.defaults[name] for name in given}

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's, after this package's checks: a group that fails any check (torch's
        included) is not added, and the optimizer stays exactly as it was."""
        if isinstance(param_group, dict) and "params" in param_group:  # (else torch.optim raises)
            self._check_new_group(param_group)
        super().add_param_group(param_group)
        self._fused_cache.clear()
        self._live.views = None  # the first group makes the scalars; a float64 group makes
        self._ensure_scalars()   # them float64

    def _check_new_group(self, group: dict) -> None:
        params = group["params"]
        # torch.optim's normalisation, done here so that an iterator is read only once
        if torch.is_tensor(params):
            group["params"] = [params]
        elif not isinstance(params, set):         # (torch.optim refuses a set)
            group["params"] = list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in group["params"]]  # (name, p)
        tensors = [p for p in tensors if torch.is_tensor(p)]  # torch.optim refuses the others
        if any(p.is_complex() for p in tensors):
            raise ValueError(f"{type(self).__name__} does not support complex parameters")
        if "lr" in group:
            check_lr(group["lr"])
        current = {name: (self.param_groups[0] if self.param_groups else self.defaults)[name]
                   for name in self.GLOBAL_HPARAMS}
        for name, value in current.items():
            if name in group and group[name] != value:
                raise ValueError(
                    f"Invalid {name}: {group[name]!r} in a param group; {name} sets the one global "
                    f"step size and must equal the optimizer's ({value!r})")
        if tensors:
            self._device([p for g in self.param_groups for p in g["params"]] + tensors)
            if self.fused:  # (meta parameters may be materialised in place before the first
                use_fused_path(True, [p for p in tensors if not p.is_meta])  # step: checked then)
        # torch.optim would fill a missing value from the constructor's; the global value is
        # the groups' one (a loaded checkpoint's, for instance)
        group.update(current)

    # ---- global scalar state ------------------------------------------------------------------
    @property
    def scalars(self) -> dict[str, torch.Tensor]:
        """The global scalar state as 0-d device tensors (views into one packed buffer).

        Reading them never syncs; call .item() yourself outside the training loop if needed."""
        self._ensure_scalars()
        views = self._live.views
        if views is None:
            raise RuntimeError(f"{type(self).__name__} has no parameters, hence no global state")
        return dict(views)

    @classmethod
    def functional_state(cls, params, **kwargs) -> dict:
        """The state the functional form of this method takes, initialised exactly as the class
        initialises it: ``{"scalars": the packed global state, <buffer>: [one tensor per
        parameter], ...}`` (the buffer lists: ``best`` for InexactPolyak with track_best,
        ``x0`` for DoG, ``momentum_buffer`` for NSGDM and ClippedSGD with momentum,
        ``grad_avg`` for MoMo, ``grad_avg`` and ``grad_avg_sq`` for MoMoAdam). Takes the
        class's own arguments; keep the state and pass it to every call."""
        opt = cls(params, fused=False, **kwargs)
        params = [p for g in opt.param_groups for p in g["params"]]
        state = {"scalars": opt._packed_scalars}
        for name in opt.BUFFERS:
            state[name] = [opt._init_buffer(name, p) for p in params]
        return state

    def _initial_scalars(self) -> dict[str, float]:
        """Initial value of every name in SCALARS (besides step and skipped, which start at 0)."""
        return {}

    def _scalar_dtype(self) -> torch.dtype:
        params = [p for g in self.param_groups for p in g["params"]]
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    def _device(self, params=None) -> torch.device:
        if params is None:
            params = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(
                f"{type(self).__name__} needs all parameters on one device, got {sorted(map(str, devices))}")
        return devices.pop()

    def _first_param(self) -> torch.Tensor | None:
        """The parameter whose state holds the global scalars: id 0 of state_dict()."""
        return next((p for g in self.param_groups for p in g["params"]), None)

    def _ensure_scalars(self) -> None:
        """Make the first parameter's state hold, for every scalar name, a 0-d view of the packed
        buffer. An entry that is not that view (missing: a fresh optimizer; a new tensor: after
        load_state_dict, a deepcopy, unpickling or a user's edit) gives its value to the buffer
        and is replaced by the view. Runs at every step: the check that all is in place is a
        few identity comparisons."""
        first = self._first_param()
        if first is None:
            return
        views, packed = self._live.views, self._live.packed
        state = self.state.get(first)
        if (views is not None and state is not None and packed.device == first.device
                and all(state.get(name) is view for name, view in views.items())):
            return  # (a new device: parameters built on meta and materialised in place)
        names = COMMON_SCALARS + self.SCALARS
        device, dtype = self._device(), self._scalar_dtype()
        if packed is None or (packed.device, packed.dtype, packed.numel()) != (device, dtype,
                                                                                len(names)):
            packed = torch.empty(len(names), dtype=dtype, device=device)
        # (refilled in place otherwise, so that views held elsewhere, and a captured CUDA graph,
        # see the new values)
        initial = {"step": 0.0, "skipped": 0.0, **self._initial_scalars()}
        state = self.state[first]
        for i, name in enumerate(names):
            value = state.get(name)
            if torch.is_tensor(value) and not value.is_meta:  # (a meta tensor has no value)
                packed[i].copy_(value.detach().reshape(()))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                packed[i].fill_(float(value))              # e.g. a "step" saved as a number
            else:
                packed[i].fill_(initial[name])
        self._live.packed = packed
        self._live.views = {name: packed[i] for i, name in enumerate(names)}
        state.update(self._live.views)

    def state_dict(self) -> dict:
        """torch.optim's, with an entry for every parameter: the ones without state get an empty
        one (before the user's post-hooks, which see the final dict), since
        torch.distributed.checkpoint's set_optimizer_state_dict (strict by default) refuses a
        checkpoint that misses a parameter. The global scalars are in entry 0."""
        handle = self.register_state_dict_post_hook(_list_every_parameter, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's, which runs the hooks, with three steps of ours around them:
          * a checkpoint of an older format is first rewritten in the current one, so that the
            pre-hooks see the current format;
          * after the user's pre-hooks, the scalars are read as the (possibly edited) dict holds
            them: torch.optim then casts every floating state value to its parameter's dtype,
            which would round them to a bfloat16 first parameter's;
          * they are written into the packed buffer, and the empty entries of state_dict()
            dropped, before the user's post-hooks run, which thus see the restored state."""
        saved = {}

        def read_saved_scalars(_, sd):
            first_id = next(chain.from_iterable(g["params"] for g in sd["param_groups"]), None)
            entry = sd["state"].get(first_id, {})
            saved.update({n: entry[n] for n in COMMON_SCALARS + self.SCALARS if n in entry})

        def restore_scalars(_):
            for p in [p for p, st in self.state.items() if torch.is_tensor(p) and not st]:
                del self.state[p]
            first = self._first_param()
            if first is not None:
                self.state[first].update(saved)
                self._ensure_scalars()
                # the host's count of step() calls, for the warnings that need it (a read of
                # the device here, never in step())
                self._live.calls = int(self._live.packed[:2].sum().item())

        last_pre = self.register_load_state_dict_pre_hook(read_saved_scalars)
        first_post = self.register_load_state_dict_post_hook(restore_scalars, prepend=True)
        try:
            super().load_state_dict(_in_current_format(state_dict))
        finally:
            last_pre.remove()
            first_post.remove()

    def __getstate__(self):
        state = super().__getstate__()
        state["fused"] = self.fused
        state["foreach"] = self.__dict__.get("foreach")
        state["average_loss"] = self.__dict__.get("average_loss", True)
        return state  # process_group is not carried: a copy is a single-process optimizer

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("fused", None)
        self.__dict__.setdefault("foreach", None)
        self.__dict__.setdefault("average_loss", True)
        self.__dict__.setdefault("process_group", None)
        self._live = _Live()  # (the fused cache's tables point at the tensors of the original)
        old = self.state.pop("scalars", None)  # pickled before the scalars moved (e9a6c3b)
        first = self._first_param()
        if isinstance(old, dict) and first is not None:
            self.state[first].update(old)

    # ---- step ---------------------------------------------------------------------------------
    def _collect(self):
        """Params with a gradient, their grads, and each one's lr (by param group); validates.

        This is the host's per-tensor work of every step: it reads every .grad. On the fused
        path, when the same params have a .grad as at the last step (the common case), one call
        of the host pass (polyak_fused._host_pass, in C++) reads the grads and confirms it; the params tuple and
        the lrs of the last step are handed over again, so that what depends on them only is
        not looked at again (_param_set, the fused launcher's tables)."""
        groups = self.param_groups
        group_params = [group["params"] for group in groups]
        whole = self.WHOLE_ITERATE
        seen = self._fused_cache.get("collected")
        host_pass = self._fused_cache.get("host_pass")  # set when the last step was fused
        if seen is not None and host_pass is not None and seen.groups is groups:
            grads = host_pass.grads_of_groups(group_params, seen.params, seen.counts, whole)
            if grads is not None:
                return seen.params, grads, seen.lrs
        params, grads, slots, counts = [], [], [], []
        any_grad = False
        for k, ps in enumerate(group_params):
            gs = list(map(_grad_of, ps))
            has = list(map(is_not, gs, repeat(None)))
            any_grad = any_grad or any(has)
            if whole:  # every parameter takes part; None marks the ones not stepped
                params += ps
                grads += gs
                counts.append(len(ps))
            else:
                params += compress(ps, has)
                grads += compress(gs, has)
                counts.append(sum(has))
            slots += [k] * counts[-1]
        if not any_grad:  # nothing to step (torch.optim's rule)
            return (), [], _LrsByGroup(groups, ())
        same_params = seen is not None and _same_objects(seen.params, params)
        # A sparse gradient is refused here, before _param_set makes any state; except when the
        # last step took the fused path with these parameters: then the launcher refuses it
        # itself, before it launches anything, and this pass over the grads is saved.
        last = self._fused_cache.get("param_set")
        if not (same_params and last is not None and last[2] == "fused") and any(
                g is not None and g.is_sparse for g in grads):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        slots = tuple(slots)
        if same_params:  # the same tensors as before: hand over the same tuple
            params = seen.params
            lrs = seen.lrs if seen.lrs.slots == slots else _LrsByGroup(groups, slots)
        else:
            params, lrs = tuple(params), _LrsByGroup(groups, slots)
        self._fused_cache["collected"] = _Collected(groups, params, tuple(counts), lrs)
        return params, grads, lrs

    def _param_set(self, params):
        """What depends only on which parameters take part (cached until that set changes, a
        param group is added or a state is loaded): their device, the path, the state buffers."""
        cached = self._fused_cache.get("param_set")
        if cached is not None and (cached[0] is params or _same_objects(cached[0], params)) \
                and cached[1] == params[0].device:
            return cached[1], cached[2], cached[3]
        device = self._device(params)
        path = choose_path(self.fused, self.__dict__.get("foreach"), params)
        self._fused_cache["host_pass"] = _host_pass.implementation() if path == "fused" else None
        buffers = {name: [] for name in self.BUFFERS}
        for p in params if buffers else ():  # (no empty state entries, as in torch.optim)
            st = self.state[p]
            for name, out in buffers.items():
                if name not in st:
                    st[name] = self._init_buffer(name, p)
                out.append(st[name])
        buffers = {name: tuple(out) for name, out in buffers.items()}
        self._fused_cache["param_set"] = (params, device, path, buffers)
        return device, path, buffers

    @property
    def path(self) -> str:
        """The implementation a step takes on these parameters: "fused" (the Triton kernels),
        "foreach" (torch._foreach_* ops) or "reference" (the eager specification); set by the
        ``fused`` and ``foreach`` arguments and the parameters' device (docs/paths.md)."""
        params = [p for g in self.param_groups for p in g["params"]]
        return choose_path(self.fused, self.__dict__.get("foreach"), params)

    def flatten_grads(self) -> None:
        """Opt in to flat gradients: the optimizer keeps every gradient in one buffer per
        (device, dtype) and makes each trainable parameter's ``.grad`` a view of it (current
        gradients are copied in, missing ones are zeros). The host cost of a step then does not
        grow with the number of tensors; ``zero_grad()`` zeroes the buffers in place (the views
        stay, whatever ``set_to_none`` says). If something replaces a ``.grad`` or sets it to
        None (``model.zero_grad()``, ``p.grad = t``), the next step notices, takes the default
        path and installs the views again, with a warning. docs/host_path.md, "Flat gradients"."""
        from ._flat_grads import FlatGrads

        self._live.flat_grads = FlatGrads(type(self).__name__, self.param_groups)

    def _init_buffer(self, name: str, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- where the step's loss comes from --------------------------------------------------------
    #: torch.amp.GradScaler.step(opt) hands this optimizer its scale and inf flag as the
    #: attributes grad_scale and found_inf (device tensors) instead of unscaling .grad itself.
    _step_supports_amp_scaling = True

    def watch_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Register ``loss``, as the model returned it, as (a part of) the next step's loss.

        Every backward pass that reaches ``loss`` adds w * loss to the step's loss, where w is the
        gradient that reached ``loss`` in that backward: 1/N when you backpropagate loss / N
        (gradient accumulation), GradScaler's scale S when you backpropagate scaler.scale(loss),
        whatever a framework multiplies it by. So the step's loss is always the loss of the
        function whose gradient is in .grad (the scale S is divided out in step(), as it is from
        the gradients). A watched loss that no backward reaches adds nothing; a second backward
        through it (retain_graph=True) adds again, as it adds to .grad again.

        ``step()`` without ``loss=`` uses the sum and clears it; ``zero_grad()`` clears it with
        .grad. The sum stays on the device (no host sync) and the optimizer keeps no reference to
        ``loss`` or its graph. Returns ``loss``, so ``loss = opt.watch_loss(model(x).loss)`` works.
        """
        if not torch.is_tensor(loss) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                f"Invalid loss: watch_loss takes a floating 0-d tensor, got "
                f"{type(loss).__name__ if not torch.is_tensor(loss) else (loss.dtype, tuple(loss.shape))}")
        if not loss.requires_grad:
            raise ValueError(
                "Invalid loss: watch_loss needs the loss before backward(), a tensor that requires "
                "grad; this one does not (computed under torch.no_grad(), or detached?)")
        value = loss.detach().reshape(())
        dtype = self._packed_scalars.dtype
        live = self._live

        def add_to_step_loss(w):  # runs inside backward, with w = d(backpropagated)/d(loss)
            term = w.detach().reshape(()).to(dtype) * value.to(dtype)
            pending = live.watched_loss
            live.watched_loss = term if pending is None else pending + term

        loss.register_hook(add_to_step_loss)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, and drops what watched losses added since the last step. After
        flatten_grads(), zeroes the gradient buffers in place (the views stay)."""
        flat = self._live.flat_grads
        if flat is not None and flat.intact(self.param_groups):
            flat.zero_()
        else:
            super().zero_grad(set_to_none)
        self._live.watched_loss = None

    def _amp_scaling(self):
        """GradScaler's (grad_scale, found_inf) for this step, or (None, None) without one.

        torch.amp.GradScaler.step sets both attributes (and deletes them after the step). When
        the user called scaler.unscale_(opt) first, the gradients are already unscaled: torch then
        sets found_inf but grad_scale to None."""
        return self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")

    def _loss_for_step(self, loss, closure_loss, watched, grad_scale, found_inf):
        """The loss of the function whose gradient is in .grad (docs/usage.md, "The step's loss"):
        ``loss=`` as given; else the watched sum, divided by GradScaler's scale; else the
        closure's return value; else None."""
        if loss is not None:
            if watched is not None:
                raise ValueError(
                    "step() got loss= while a watched loss is pending (watch_loss() was reached "
                    "by a backward since the last step or zero_grad()); use one or the other: "
                    "step() alone takes the watched loss")
            return loss
        if watched is not None:
            if grad_scale is None and found_inf is not None:
                raise RuntimeError(
                    "GradScaler.unscale_(optimizer) ran before scaler.step(optimizer): the "
                    "gradients are unscaled, but the watched loss still carries the scaler's scale, "
                    "which the optimizer is not told. Drop the unscale_ call (the step divides the "
                    "scale out of the gradients and the loss itself, and clipping the gradient "
                    "before a Polyak step lengthens it), or do not watch the loss and pass it: "
                    "scaler.step(optimizer, loss=loss)")
            return watched if grad_scale is None else watched / grad_scale.reshape(()).to(
                device=watched.device, dtype=watched.dtype)
        return closure_loss

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, loss=None):
        """One optimizer step. The loss of the batch whose gradients are in .grad comes from
        ``loss=`` (a 0-d tensor, kept on the device, or a float), or from the losses registered
        with ``watch_loss()`` that a backward reached since the last step, or from ``closure``,
        which re-evaluates the model and returns the loss (if the closure's backward reaches a
        watched loss, the watched sum is used: frameworks hand over a closure whose return value
        is divided differently from the gradient). Under torch.amp.GradScaler, ``scaler.step(opt)``
        hands over the scale, which the step divides out of the gradients and the watched loss,
        and the inf flag, which skips the step. Returns the closure's value if one was given,
        else the loss the step used."""
        if closure is not None and loss is not None:
            raise ValueError("step() takes a closure or loss=, not both")
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        grad_scale, found_inf = self._amp_scaling()
        watched = self._live.watched_loss
        step_loss = self._loss_for_step(loss, closure_loss, watched, grad_scale, found_inf)
        self._live.watched_loss = None
        if self.NEEDS_LOSS and step_loss is None:
            raise ValueError(
                f"{type(self).__name__} computes its step size from the loss: call "
                f"opt.watch_loss(loss) before loss.backward() (or step(loss=loss) after it) with the "
                f"loss of the batch whose gradients are in .grad, or pass a closure")
        result = closure_loss if closure is not None else step_loss
        flat = self._live.flat_grads
        on_views = flat is not None and flat.intact(self.param_groups)
        # flat gradients: the token vouches for the gradients, and the launcher checks only a
        # few tensors per step (polyak_fused._kernels.polyak_step._Plan)
        self._fused_cache["grads_token"] = flat.token if on_views else None
        if on_views:
            params, grads, lrs = flat.lists
        else:
            params, grads, lrs = self._collect()
        if not params:
            return result
        self._ensure_scalars()
        scalars = self._packed_scalars
        loss_t = None if step_loss is None else as_loss_tensor(step_loss, scalars.device,
                                                                scalars.dtype)
        _, path, buffers = self._param_set(params)  # may create state: after every check
        amp = dict(grad_scale=grad_scale, found_inf=found_inf)
        self._live.calls += 1
        self._live.last_loss = loss_t
        if self.LR_ROLE == "multiplier":
            self._check_lr_schedule()
        with distributed.reduction_for(self, params, grads, buffers) as (params, grads, buffers):
            self._run(params, grads, buffers, lrs, loss_t,
                      dict(fused=path == "fused", foreach=path == "foreach"), amp)
        if flat is not None and not on_views:  # a .grad was not its view: put the views back
            flat.repair(self.param_groups)
        return result

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        """Call the method's functional form; path = dict(fused=..., foreach=...) (the one path
        taken is True), amp = dict(grad_scale=..., found_inf=...)."""
        raise NotImplementedError

    # ---- misuse that changes the method silently: warned once, without a host sync -----------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._live.warned:
            self._live.warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=_caller_level())

    def _check_lr_schedule(self) -> None:
        """A torch.optim.lr_scheduler marks each group with "initial_lr". When a float lr falls
        below the largest it has had, the schedule decays the multiplier of the method's step
        (warmups, which only raise it, are left alone). A tensor lr is not read (a sync)."""
        peaks = self._live.lr_peaks
        for group in self.param_groups:
            if "initial_lr" not in group:
                continue
            lr = group["lr"]
            if torch.is_tensor(lr):
                continue
            peak = peaks.get(id(group), lr)
            if lr < peak:
                self._warn_once(
                    "lr_schedule",
                    f"{type(self).__name__}: a learning-rate scheduler lowered lr from {peak:g} "
                    f"to {lr:g}. For this optimizer lr is not a learning rate but a multiplier on "
                    f"the step size the method computes (1.0 is the method), so a decaying "
                    f"schedule shrinks every step on top of the method's own rule. Leave lr at "
                    f"1.0 with no scheduler (a warmup that only raises lr is not warned about).")
            peaks[id(group)] = max(peak, lr)

    def diagnose(self) -> dict:
        """Why the steps are what they are, read when you ask (this reads device values: a host
        sync, so call it outside the training loop). Returns the counters, the last step's step
        size and loss, ||g|| of the gradients now in ``.grad``, the lower bound the step size is
        measured from (where the method has one), and ``"verdict"``: a sentence naming what makes
        the last step zero (a loss at or below the lower bound, a zero gradient) or skipped, or
        saying that it moved."""
        s = {k: float(v) for k, v in self.scalars.items()}
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        grad_sq = float(sum(g.detach().double().square().sum() for g in grads)) if grads else None
        last = None if self._live.last_loss is None else float(self._live.last_loss)
        bound = self._lower_bound()
        out = {**s, "last_loss": last, "grad_norm": None if grad_sq is None else grad_sq ** 0.5,
               "lower_bound": bound}
        size = s.get("step_size")
        if s["step"] + s["skipped"] == 0:
            verdict = "no step taken yet"
        elif last is not None and not math.isfinite(last):
            verdict = f"the last loss was {last}: the step was skipped (skipped = {s['skipped']:g})"
        elif size is not None and size == 0.0:
            if grad_sq is not None and grad_sq <= TINY_GRAD_SQ:
                verdict = ("the last step was zero: ||g||^2 <= 1e-16 (a zero gradient; is the loss "
                           "connected to the parameters?)")
            elif bound is not None and last is not None and last <= bound[1]:
                verdict = (f"the last step was zero: the loss {last:g} is at or below "
                           f"{bound[0]} = {bound[1]:g}, so the gap (f - {bound[0]})+ is 0 and the "
                           f"parameters stay where they are. Give a lower bound below every loss "
                           f"the model can reach (0 for cross-entropy and squared losses)")
            else:
                verdict = "the last step was zero"
        else:
            verdict = "the last step moved the parameters" if size is None or size > 0 else \
                f"the last step size was {size:g}"
        out["verdict"] = verdict
        return out

    def _lower_bound(self):
        """(name, value) of the lower bound the step size is measured from, or None."""
        for name in ("lower_bound", "f_star", "lb"):
            if name in self.defaults:
                return name, float(self.param_groups[0][name])
        return None

    def _hparams(self) -> dict:
        """The global hyperparameters, read from the param groups (all equal), so that
        load_state_dict brings back the saved ones, as torch.optim does."""
        return {name: self.param_groups[0][name] for name in self.GLOBAL_HPARAMS}

    # ---- what step() keeps between calls: in self._live (see _Live) --------------------------
    @property
    def _packed_scalars(self) -> torch.Tensor:
        """The packed global scalars (one device buffer): what the step reads and writes."""
        return self._live.packed

    @property
    def _fused_cache(self) -> dict:
        return self._live.fused_cache

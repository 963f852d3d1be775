"""Flat gradients, the opt-in mode of ``opt.flatten_grads()``: the optimizer owns the gradient
memory, one buffer per (device, dtype), and every parameter's ``.grad`` is a view of it. Backward
accumulates into the views in place, ``opt.zero_grad()`` zeroes each buffer with one fill, and a
step finds its tensors without looking at them one by one: its host cost does not grow with the
number of tensors (bench/NOTES.md, "Host cost").

How a step knows that the gradients are still the views, in O(1):
  * Each buffer's storage is shared by the buffer, the views we keep for the kernels
    (``internal``, never handed out) and the views installed as ``.grad`` (not kept by us). Its
    use count, read in C (``torch._C._storage_Use_Count``), is recorded after binding. When a
    ``.grad`` is replaced or set to None (``model.zero_grad()``, another optimizer's zero_grad,
    ``p.grad = t``, a backward with ``create_graph=True``) and nothing else keeps the old view,
    the view is freed and the count drops.
  * A higher count means someone keeps an extra view of a gradient; a step then checks every
    ``.grad`` (O(n)) rather than assume.
  * A gradient replaced while someone keeps a reference to the old view leaves the count as it
    was; the spot check (two parameters per step, in turn) finds it within n / 2 steps. So is a
    parameter that was frozen (requires_grad False, hence no view) when the views were made and
    has a .grad now. These are the cases the O(1) check does not see at once:
    docs/host_path.md, "Flat gradients".
  * The param groups (the list, each group's params list and its length) are compared by
    identity at every step.
When a check fails, the step takes the default path (it reads every ``.grad`` as it is) and the
views are installed again after it, with the gradient values kept.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from ._optimizer import _LrsByGroup

#: Parameters whose .grad a step compares with the installed view, in turn.
SPOT_CHECKS_PER_STEP = 2
#: Views start on 16-byte boundaries, so the kernels' vector loads apply to every tensor.
ALIGN_BYTES = 16

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class FlatGrads:
    """The flat buffers of one optimizer and the views installed as .grad (see the module doc)."""

    def __init__(self, optimizer_name: str, param_groups: list):
        self.name = optimizer_name
        self.warned = False
        self.bind(param_groups)

    # ---- binding ----------------------------------------------------------------------------
    def bind(self, param_groups: list) -> None:
        """Allocate the buffers for the trainable parameters of `param_groups`, copy their current
        gradients in (zeros where there is none) and install the views as .grad."""
        params, slots, frozen = [], [], []
        for k, group in enumerate(param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._check_param(p)
                    params.append(p)
                    slots.append(k)
                else:
                    frozen.append(p)
        self.frozen = tuple(frozen)  # no view; the spot check looks for a .grad appearing
        layout: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            layout.setdefault((p.device, p.dtype), []).append(i)
        offsets = [0] * len(params)
        self.buffers = []
        internal = [None] * len(params)
        for (device, dtype), idxs in layout.items():
            align = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
            total = 0
            for i in idxs:
                offsets[i] = total
                total += -(-params[i].numel() // align) * align
            flat = torch.zeros(total, dtype=dtype, device=device)
            self.buffers.append(flat)
            for i in idxs:
                internal[i] = self._view(flat, offsets[i], params[i])
        self.groups = param_groups
        self.group_params = [group["params"] for group in param_groups]
        self.group_lens = [len(ps) for ps in self.group_params]
        self.params = tuple(params)
        self.internal = tuple(internal)   # the kernels' views; never handed out
        self.offsets = offsets
        self.public: list = [None] * len(params)  # weak references to the views in .grad
        for i in range(len(params)):
            self._install(i)
        self.lists = (self.params, self.internal, _LrsByGroup(param_groups, tuple(slots)))
        self.token = object()  # the launcher's token for the internal views (see polyak_step_)
        self.spot_next = 0
        self._record_use_counts()

    def _check_param(self, p) -> None:
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor
        else:  # pragma: no cover - torch built without distributed
            DTensor = ()
        if isinstance(p, DTensor):
            raise ValueError(f"{self.name}.flatten_grads() does not take DTensor (FSDP2) "
                             f"parameters; their gradients live in FSDP's own buffers")
        if p.grad is not None and p.grad.layout != torch.strided:
            raise RuntimeError(f"{self.name} does not support sparse gradients")

    @staticmethod
    def _view(flat, offset, p):
        return flat[offset:offset + p.numel()].view(p.shape)

    def _install(self, i: int) -> None:
        """Make parameter i's .grad a fresh view of its slot, holding its current gradient."""
        p = self.params[i]
        view = self.internal[i].view(p.shape)  # a new tensor object on the same memory
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        p.grad = view
        self.public[i] = weakref.ref(view)

    def _record_use_counts(self) -> None:
        """What each buffer's storage use count is while every view is in place and nothing else
        holds one (the caller makes sure of that)."""
        if _use_count is None:  # torch without the C helper: check every .grad at every step
            self.use_counts = None
            return
        cdatas = [flat.untyped_storage()._cdata for flat in self.buffers]
        self.use_counts = [(cdata, _use_count(cdata)) for cdata in cdatas]

    # ---- per step ---------------------------------------------------------------------------
    def intact(self, param_groups: list) -> bool:
        """Whether every bound parameter's .grad is still its view (O(1), see the module doc)."""
        if param_groups is not self.groups or len(param_groups) != len(self.group_params):
            return False
        for group, params, n in zip(param_groups, self.group_params, self.group_lens):
            if group["params"] is not params or len(params) != n:
                return False
        if self.use_counts is None:
            return self.all_views()
        for cdata, expected in self.use_counts:
            count = _use_count(cdata)
            if count != expected:
                return count > expected and self.all_views()
        return self.spot_check()

    def spot_check(self) -> bool:
        """The next SPOT_CHECKS_PER_STEP parameters, in turn: a bound one's .grad is its view, a
        frozen one (requires_grad False when bound) has no .grad (one that has was unfrozen)."""
        n, total = len(self.params), len(self.params) + len(self.frozen)
        start = self.spot_next
        for i in range(start, min(start + SPOT_CHECKS_PER_STEP, total)):
            expected = self.public[i]() if i < n else None
            if (self.params[i] if i < n else self.frozen[i - n]).grad is not expected:
                return False
        end = start + SPOT_CHECKS_PER_STEP
        self.spot_next = end if end < total else 0
        return True

    def all_views(self) -> bool:
        return all(p.grad is ref() for p, ref in zip(self.params, self.public))

    def zero_(self) -> None:
        for flat in self.buffers:
            flat.zero_()

    def repair(self, param_groups: list) -> None:
        """After a step that found a .grad that is not its view: install the views again, keeping
        the gradient values (a new binding if the param groups changed)."""
        if not self.warned:
            warnings.warn(
                f"{self.name}.flatten_grads(): a gradient was replaced, set to None or is "
                f"referenced elsewhere, so this step looked at every tensor (the default path); "
                f"the views are installed again. If this happens at every step, the flat mode "
                f"saves nothing: clear gradients with opt.zero_grad(), not model.zero_grad(), "
                f"and do not assign .grad (docs/host_path.md, 'Flat gradients').", stacklevel=2)
            self.warned = True
        same_groups = param_groups is self.groups and all(
            group["params"] is params and len(params) == n
            for group, params, n in zip(param_groups, self.group_params, self.group_lens))
        if (not same_groups or len(param_groups) != len(self.group_params)
                or any(p.requires_grad for p in self.frozen)):
            self.bind(param_groups)
            return
        for i, (p, ref) in enumerate(zip(self.params, self.public)):
            if p.grad is not ref():
                self._install(i)
        self._record_use_counts()

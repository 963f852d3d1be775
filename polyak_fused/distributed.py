"""Distributed training: the step's global scalars reduced across ranks in one all-reduce.

Every step rule needs a few global numbers: the loss f and one or more sums over all parameters
(sum g^2, and for DoG sum (x - x0)^2 and sum x0^2). Each eager reference (and the fused path)
computes its local values and passes them through ``_eager.across_ranks``, which calls the
reduction this module sets up for the duration of ``PolyakFamilyOptimizer.step``:

* **One process** (torch.distributed not initialised, or a group of one rank): no reduction,
  nothing communicated; the only cost is one ``is_initialized()`` call per step.
* **Replicated parameters** (DDP: plain tensors and an initialised process group of more than
  one rank). DDP has already averaged the gradients, so the local sums are the global sums and
  are left alone; only the loss, which each rank computed on its own micro-batch, is averaged:
  one all-reduce of one element. Without it every rank takes a different step size and the
  replicas drift apart silently.
* **Sharded parameters** (FSDP2 ``fully_shard``: DTensor parameters and gradients). The step runs
  on the local shards (``to_local()``, zero-size shards included); the local sums are added over
  the shards and the loss averaged over the ranks, packed as ``[f / world, s_1, s_2, ...]`` in one
  SUM all-reduce. Sums of parameters replicated along a ``Replicate`` mesh dimension (HSDP) are
  divided by that dimension's size first, so that each shard counts once.

Every rank ends with the same reduced values, so every rank takes the same step (and skips the
same steps: a non-finite loss or shard on one rank makes the reduced value non-finite on all).
The all-reduce is issued on the device tensors, with no ``.item()``: no host sync.

Options (keyword arguments of every optimizer):
  ``process_group``: the group to reduce over. Default: the whole world for replicated
      parameters; the parameters' device mesh for sharded ones (a mesh smaller than the world
      with more than one dimension needs an explicit group). An explicit group must contain every
      rank of the mesh; sums from ranks holding different parameters (pipeline stages) add up.
  ``average_loss``: False when the loss you pass is already the same on every rank (you
      averaged it yourself). With replicated parameters nothing is then communicated at all.

Per-parameter state (``x0``, ``best``, ``momentum_buffer``) is created from the parameter
itself, so under FSDP2 it is a DTensor with the parameter's mesh and placements (the layout
torch.optim's own optimizers keep under FSDP2, and what ``opt.state_dict()`` then holds); the
step works on its local shard. The global scalar state (``opt.scalars``) is a plain tensor,
identical on every rank.
"""

from __future__ import annotations

import contextvars
import math
import weakref

import torch

#: The reduction of the step in progress (None: one process, or outside step()).
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("polyak_fused_reduction", default=None)


#: optimizer -> (key of its DTensor parameters, group, world size, replicas), checked once.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def current_reduction():
    """The callable ``(loss, *sums) -> (loss, *sums)`` of the step in progress, or None."""
    return _ACTIVE.get()


def check_options(process_group, average_loss):
    """Validate the distributed keyword arguments of an optimizer; returns them."""
    if not isinstance(average_loss, bool):
        raise ValueError(f"Invalid average_loss: {average_loss!r} (expected a bool)")
    if process_group is not None:
        if not (torch.distributed.is_available()
                and isinstance(process_group, torch.distributed.ProcessGroup)):
            raise ValueError(
                f"Invalid process_group: {process_group!r} (expected None or a "
                f"torch.distributed.ProcessGroup)")
    return process_group, average_loss


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _Scope:
    """Context of one step: sets the active reduction, yields the tensors `_run` works on."""

    __slots__ = ("tensors", "reduction", "token")

    def __init__(self, tensors, reduction):
        self.tensors = tensors
        self.reduction = reduction
        self.token = None

    def __enter__(self):
        if self.reduction is not None:
            self.token = _ACTIVE.set(self.reduction)
        return self.tensors

    def __exit__(self, *exc):
        if self.token is not None:
            _ACTIVE.reset(self.token)
            self.token = None
        return False


class _AllReduce:
    """One SUM all-reduce of ``[f / world, s_1 / r, s_2 / r, ...]`` over ``group``.

    ``reduce_sums``: add the sums over the ranks (sharded parameters); False leaves them as they
    are (replicated parameters, whose gradients DDP has already averaged). ``replicas``: how
    many ranks of the group hold each shard (the sums are divided by it)."""

    __slots__ = ("group", "world", "average_loss", "reduce_sums", "replicas")

    def __init__(self, group, world, average_loss, reduce_sums, replicas=1):
        self.group = group
        self.world = world
        self.average_loss = average_loss
        self.reduce_sums = reduce_sums
        self.replicas = replicas

    def __call__(self, loss, *sums):
        with_loss = loss is not None and self.average_loss
        parts = ([loss] if with_loss else []) + (list(sums) if self.reduce_sums else [])
        if not parts:
            return (loss, *sums)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        packed = torch.stack([p.reshape(()).to(dtype) for p in parts])
        if with_loss:
            packed[0] /= self.world
        if self.reduce_sums and self.replicas != 1:
            packed[int(with_loss):] /= self.replicas
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM, group=self.group)
        out = iter(packed.unbind())
        if with_loss:
            loss = next(out).to(loss.dtype)
        if self.reduce_sums:
            sums = tuple(next(out).to(s.dtype) for s in sums)
        return (loss, *sums)


def _sharded_layout(optimizer, params, grads, group):
    """Check that the DTensor parameters share one mesh and placement; return the group to
    reduce over, its size and the number of replicas of each shard in it."""
    mesh, placements = params[0].device_mesh, params[0].placements
    for p, g in zip(params, grads):
        if (p.device_mesh is not mesh and p.device_mesh != mesh) or p.placements != placements:
            raise ValueError(
                f"{type(optimizer).__name__} needs every DTensor parameter on one device mesh "
                f"with one placement; got {p.placements} on {p.device_mesh} and {placements} on "
                f"{mesh}")
        if g is not None and g.placements != p.placements:
            raise ValueError(
                f"{type(optimizer).__name__}: the gradient of a DTensor parameter must have the "
                f"parameter's placements {p.placements}, got {g.placements}")
    if any(pl.is_partial() for pl in placements):
        raise ValueError(f"{type(optimizer).__name__} does not take Partial parameters")
    replicas = math.prod(mesh.size(d) for d, pl in enumerate(placements) if pl.is_replicate())
    if group is None:
        if mesh.ndim == 1:
            group = mesh.get_group()
        elif mesh.size() != torch.distributed.get_world_size():
            raise ValueError(
                f"{type(optimizer).__name__}: the parameters' {mesh.ndim}-D device mesh does not "
                f"span the whole world; pass process_group= (a group containing every rank of "
                f"the mesh)")
    world = torch.distributed.get_world_size(group)
    if world % mesh.size() != 0:
        raise ValueError(
            f"{type(optimizer).__name__}: process_group has {world} ranks, which cannot contain "
            f"the {mesh.size()} ranks of the parameters' device mesh")
    return group, world, replicas


def _local(t):
    """The local shard of a DTensor, sharing its storage. `to_local()` returns this same tensor
    under no_grad, except for a Parameter, which gets a fresh view (3 ms per step for 1000
    parameters, measured on a 2-core CPU with torch 2.13), so read the attribute it returns."""
    local = getattr(t, "_local_tensor", None)
    return t.to_local() if local is None else local


def reduction_for(optimizer, params, grads, buffers):
    """The context ``step()`` runs ``_run`` in; ``with`` gives ``(params, grads, buffers)`` as
    ``_run`` must see them (local shards under FSDP2) and activates the cross-rank reduction."""
    if not _initialized():
        return _Scope((params, grads, buffers), None)
    group = getattr(optimizer, "process_group", None)
    average_loss = getattr(optimizer, "average_loss", True)
    from torch.distributed.tensor import DTensor

    kinds = {issubclass(k, DTensor) for k in {type(p) for p in params}}
    if True not in kinds:  # replicated parameters (DDP): average the loss, nothing else
        world = torch.distributed.get_world_size(group)
        reduction = _AllReduce(group, world, average_loss, reduce_sums=False) \
            if world > 1 and average_loss else None
        return _Scope((params, grads, buffers), reduction)
    if False in kinds:
        raise ValueError(
            f"{type(optimizer).__name__}: some parameters are DTensors (sharded) and some are "
            f"plain tensors; the global norm would count the plain ones once per rank. Shard every "
            f"parameter the optimizer holds (fully_shard the root module) or use one optimizer "
            f"per kind")
    if False in {issubclass(k, DTensor) for k in {type(g) for g in grads if g is not None}}:
        raise ValueError(f"{type(optimizer).__name__}: a DTensor parameter has a plain gradient")
    key = (group, tuple(map(id, params)))
    checked = _CHECKED.get(optimizer)
    if checked is None or checked[0] != key:  # first step, or another set of parameters
        checked = _CHECKED[optimizer] = (key, *_sharded_layout(optimizer, params, grads, group))
    _, group, world, replicas = checked
    local = ([_local(p) for p in params], [None if g is None else _local(g) for g in grads],
             {name: [_local(b) if isinstance(b, DTensor) else b for b in bufs]
              for name, bufs in buffers.items()})
    reduction = _AllReduce(group, world, average_loss, reduce_sums=True, replicas=replicas) \
        if world > 1 else None
    return _Scope(local, reduction)

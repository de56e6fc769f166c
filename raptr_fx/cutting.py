"""Width cuts: projections that compute only the kept hidden units or heads of a step.

A cut replaces ``forward`` on the projection instances of a :class:`~raptr_fx.units.WidthGroup`
(and keeps its state beside it, as ``_raptr_cut``); the class, parameters and state_dict keys are
untouched, like the depth gates:

* a producer computes only the kept rows: ``linear(x, W[kept], b[kept])``;
* the consumer reads only the kept columns: ``linear(h, W[:, kept]) * scale + b``.

The elementwise ops between them see the narrowed tensor, so the group's FLOPs fall to the kept
fraction. With every part kept, or in eval mode, the original forward runs, bit for bit.

A head group with a fused projection (``WidthGroup.rewrite``) cuts the kept heads' rows of each of
its q, k and v segments, and its attention module runs the rewritten graph of
:mod:`raptr_fx.head_rewrite` (sizes that follow the kept heads) while the cut is active. An
``nn.MultiheadAttention`` runs :func:`raptr_fx.mha_heads.multihead_attention` the same way: the kept
rows of ``in_proj_weight`` and the kept columns of ``out_proj``.

Parts not kept get exactly zero gradient (``index_select``'s backward), but an optimizer would
still move them through momentum and weight decay; :class:`FrozenParts` puts their values and
optimizer state back after ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import local_tensor, shard_offsets
from .errors import RaptrError
from .head_rewrite import rewritten_forward
from .mha_heads import multihead_attention
from .units import Projection, WidthGroup, projection_of

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["Cut", "CutState", "install_cuts", "remove_cuts", "is_cut", "FrozenParts", "kept_indices", "trial_cuts",
           "tensor_parallel_width_error", "is_dtensor", "local_part"]


class Cut:
    """What one cut projection reads at call time, kept on the module as ``_raptr_cut``.

    Under ``torch.compile`` every unit's graph reads the same fields: flags that are equal for the
    same projection of every unit, and the kept indices as a tensor (a graph input). Nothing here is
    a per-unit number, which would be a guard, so units of one class share one compiled graph.
    """

    def __init__(self, module: nn.Module, projection: Projection, producer: bool, width: int, scaled: bool,
                 always: bool = False, segments: tuple[int, ...] = (), parts: int = 0, weight: str = "weight",
                 bias: str = "bias"):
        self.module = module
        self.weight_name, self.bias_name = weight, bias  # nn.MultiheadAttention: in_proj_weight, in_proj_bias
        self.transposed = projection.transposed
        self.producer = producer
        self.width = width  # rows (producer) or columns (consumer) one part spans
        # A fused producer's rows per part in each of its segments (q, k, v), of ``parts`` parts each.
        self.segments, self.parts = segments, parts
        self.layout = (width, segments)  # cuts of one layout select the same rows
        self.scaled = scaled and not producer
        self.always = always  # the proof on fake tensors: cut whatever the training flag says
        self.kept: list[int] | None = None  # this step's kept parts; None: every part runs
        self.index: torch.Tensor | None = None  # their rows or columns, on the weight's device
        self.scale = 1.0
        self.original: Callable[..., Any] = module.forward
        self.instance_forward = module.__dict__.get("forward")  # the user's own override, if any

    def set(self, kept: list[int] | None, index: torch.Tensor | None, scale: float) -> None:
        self.kept = kept
        self.index = index
        self.scale = scale if self.scaled else 1.0

    def rows(self, parts: torch.Tensor | Sequence[int], device: torch.device | str) -> torch.Tensor:
        """The rows (producer) or columns (consumer) of ``parts``."""
        return kept_indices(parts, self.width, device, segments=self.segments, parts_total=self.parts)

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias this cut narrows."""
        return getattr(self.module, self.weight_name), getattr(self.module, self.bias_name)

    def index_on(self, device: torch.device) -> torch.Tensor:
        """The kept rows or columns on ``device``: moved since the draw (meta-device init, .to()), follow it."""
        assert self.index is not None  # called only while the cut is active
        if self.index.device != device:
            assert self.kept is not None  # set with the index
            self.index = self.rows(self.kept, device)
        return self.index


class _CutProjection(Protocol):
    """What :func:`_cut_forward` reads on the projection it is bound to (an nn.Linear or Conv1D),
    which torch would type as ``Tensor | Module`` on a plain nn.Module."""

    training: bool
    weight: torch.Tensor
    bias: torch.Tensor | None
    _raptr_cut: Cut


class _HeadsModule(Protocol):
    """What :func:`_heads_forward` reads on the attention module it is bound to."""

    training: bool
    _raptr_heads: RewrittenHeads


def _cut_forward(module: _CutProjection, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Stands in for a projection's ``forward`` (bound to it); see the module docstring."""
    cut = module._raptr_cut
    if cut.index is None or not (module.training or cut.always):
        return cut.original(x, *args, **kwargs)
    weight = module.weight
    if is_dtensor(weight):  # FSDP2 alone gives the forward plain tensors: this is tensor parallel
        raise RaptrError(tensor_parallel_width_error(f"{type(module).__name__}.weight", weight))
    return cut_linear(x, weight, module.bias, cut.index_on(weight.device), producer=cut.producer,
                      transposed=cut.transposed, scale=cut.scale)


def tensor_parallel_width_error(name: str, weight: DTensor) -> str:
    placements = ", ".join(repr(p) for p in weight.placements)
    return (f"width cuts do not support tensor parallel: {name} is a DTensor sharded as ({placements}) on "
            f"{weight.device_mesh}, so each rank holds a shard of the rows or columns a cut selects. Cut "
            "depth only with tensor parallel (a schedule without width), or use width without "
            "parallelize_module (FSDP2's fully_shard is fine)")


class CutState:
    """The kept parts of every group for one step, pushed to each group's cuts."""

    def __init__(self, groups: Sequence[WidthGroup]):
        self.groups = list(groups)
        self.kept: list[list[int] | None] = [None] * len(self.groups)  # None: every part runs
        self.kept_tensors: list[torch.Tensor | None] = [None] * len(self.groups)  # the same, sorted, on the CPU
        self.cuts: list[list[Cut]] = [[] for _ in self.groups]  # per group, in module order

    def set(self, kept: Sequence[torch.Tensor | Sequence[int] | None], scale: Sequence[float],
            devices: Sequence[torch.device]) -> None:
        """This step's kept parts per group (None: all), consumer scales, and each group's weight device."""
        for g, (cuts, parts, factor, device) in enumerate(zip(self.cuts, kept, scale, devices)):
            parts = None if parts is None else torch.as_tensor(parts, dtype=torch.long)
            self.kept_tensors[g] = parts
            self.kept[g] = None if parts is None else parts.tolist()
            by_layout: dict[Any, torch.Tensor | None] = {}  # the cuts of a group mostly share one layout
            for cut in cuts:
                if cut.layout not in by_layout:
                    by_layout[cut.layout] = None if parts is None else cut.rows(parts, device)
                cut.set(self.kept[g], by_layout[cut.layout], factor)

    def dropped(self, g: int) -> torch.Tensor:
        """The parts group ``g`` does not keep this step (sorted, on the CPU)."""
        mask = torch.ones(self.groups[g].parts, dtype=torch.bool)
        mask[self.kept_tensors[g]] = False
        return mask.nonzero().flatten()


def kept_indices(parts: torch.Tensor | Sequence[int], width: int, device: torch.device | str = "cpu", *,
                 segments: Sequence[int] = (), parts_total: int = 0) -> torch.Tensor:
    """The rows (or columns) of ``parts``, each spanning ``width`` contiguous rows; with ``segments``
    (a fused projection: q, k and v one after another, each of ``parts_total`` parts), the rows of
    ``parts`` in every segment, segment ``s`` spanning ``segments[s]`` rows per part."""
    if segments:
        offsets = itertools.accumulate((parts_total * w for w in segments[:-1]), initial=0)
        return torch.cat([offset + kept_indices(parts, w) for offset, w in zip(offsets, segments)]).to(device)
    base = torch.as_tensor(parts, dtype=torch.long)
    if width == 1:
        return base.to(device)
    return (base[:, None] * width + torch.arange(width)).flatten().to(device)


def cut_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, *,
               producer: bool, transposed: bool, scale: float = 1.0) -> torch.Tensor:
    """A projection restricted to ``index``: its output rows (producer) or input columns (consumer)."""
    out_dim = 1 if transposed else 0  # Conv1D keeps weight as [in, out]
    if producer:
        weight = weight.index_select(out_dim, index)
        bias = bias.index_select(0, index) if bias is not None else None
        return F.linear(x, weight.t() if transposed else weight, bias)
    weight = weight.index_select(1 - out_dim, index)
    weight = weight.t() if transposed else weight
    if scale == 1.0:
        return F.linear(x, weight, bias)  # one addmm, as nn.Linear runs it
    out = F.linear(x, weight) * scale
    return out if bias is None else out + bias


class RewrittenHeads:
    """An attention module whose code fixes its head count (``WidthGroup.rewrite``), kept on it as
    ``_raptr_heads``: its rewritten forward runs while its fused producer's cut is active."""

    def __init__(self, module: nn.Module, rewritten: Callable[..., Any], cut: Cut):
        self.module = module
        self.rewritten = rewritten
        self.cut = cut  # the fused producer's: the rewrite runs exactly when it cuts
        self.original: Callable[..., Any] = module.forward
        self.instance_forward = module.__dict__.get("forward")


def multihead_forward(module: nn.MultiheadAttention, rows: Cut, columns: Cut) -> Callable[..., Any]:
    """``module``'s forward computing only the kept heads (:mod:`raptr_fx.mha_heads`): the rows of
    ``in_proj_weight`` that ``rows`` keeps, the columns of ``out_proj`` that ``columns`` keeps."""
    out_proj = module.out_proj
    head_dim = module.head_dim

    def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = rows.parameters()
        if is_dtensor(weight):
            raise RaptrError(tensor_parallel_width_error(f"{type(module).__name__}.in_proj_weight", weight))
        index = rows.index_on(weight.device)
        in_bias = bias.index_select(0, index) if bias is not None else None
        columns_index = columns.index_on(out_proj.weight.device)
        heads = columns_index.view(-1, head_dim)[:, 0] // head_dim
        values, weights = multihead_attention(module, weight.index_select(0, index), in_bias, heads, *args, **kwargs)
        out = cut_linear(values, out_proj.weight, out_proj.bias, columns_index, producer=False, transposed=False,
                         scale=columns.scale)
        return out, weights

    return forward


def _heads_forward(module: _HeadsModule, *args: Any, **kwargs: Any) -> Any:
    """Stands in for a rewritten attention module's ``forward`` (bound to it)."""
    heads = module._raptr_heads
    cut = heads.cut
    if cut.index is None or not (module.training or cut.always):
        return heads.original(*args, **kwargs)
    return heads.rewritten(*args, **kwargs)


_STATE = {_cut_forward: "_raptr_cut", _heads_forward: "_raptr_heads"}  # each replaced forward, its state


def is_cut(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) in _STATE


def install_cuts(model: nn.Module, groups: Sequence[WidthGroup], state: CutState, scaled: bool,
                 always: bool = False) -> list[Cut | RewrittenHeads]:
    """Cut the projections of ``groups`` (and rewrite the attention modules of fused head groups);
    all or nothing."""
    modules = dict(model.named_modules())
    installed: list[Cut | RewrittenHeads] = []
    cut_by: dict[str, str] = {}  # projection -> the group cutting it
    try:
        for g, group in enumerate(groups):
            if isinstance(modules[group.modules[0]], nn.MultiheadAttention):  # in_proj_weight: no projection module
                installed.append(_install_multihead(modules[group.modules[0]], group, state.cuts[g], scaled, always,
                                                    cut_by))
                continue
            for position in range(len(group.modules)):
                producer = position < len(group.modules) - 1
                segments = group.rewrite.segments if group.rewrite and producer else ()
                for name in group.cut_targets(position):  # a linear layer with an adapter: its projections
                    module = modules[name]
                    projection = projection_of(name, module)
                    if projection is None:
                        raise TypeError(f"{name} of width group {group.name} is no longer a Linear or Conv1D")
                    if name in cut_by or is_cut(module):  # a second cut would call the first as its forward
                        raise RaptrError(f"{name} of width group {group.name} is already cut (by "
                                         f"{cut_by.get(name, 'an earlier transform')}): a projection can be cut "
                                         "by one width group only")
                    cut_by[name] = group.name
                    cut = Cut(module, projection, producer, group.part_widths[position], scaled, always,
                              segments, group.parts)
                    module._raptr_cut = cut
                    module.forward = types.MethodType(_cut_forward, module)
                    state.cuts[g].append(cut)
                    installed.append(cut)
            if group.rewrite is not None:
                attention = modules[group.rewrite.module]
                leaves = [modules[m] for m in group.modules]
                heads = RewrittenHeads(attention, rewritten_forward(attention, group.rewrite, leaves), state.cuts[g][0])
                _bind_heads(attention, heads)
                installed.append(heads)
    except BaseException:
        remove_cuts(model)
        raise
    return installed


def _install_multihead(module: nn.MultiheadAttention, group: WidthGroup, cuts: list[Cut], scaled: bool,
                       always: bool, cut_by: dict[str, str]) -> RewrittenHeads:
    """Replace an ``nn.MultiheadAttention``'s forward; its two cuts (the q, k, v rows of its
    ``in_proj_weight``, the columns of ``out_proj``) only carry each step's indices."""
    name = group.modules[0]
    if name in cut_by or is_cut(module):
        raise RaptrError(f"{name} of width group {group.name} is already cut (by "
                         f"{cut_by.get(name, 'an earlier transform')}): a projection can be cut by one width group only")
    cut_by[name] = group.name
    head_dim = group.part_widths[-1]
    rows = Cut(module, Projection(name, module.embed_dim, 3 * module.embed_dim, False), True, group.part_widths[0],
               scaled, always, (head_dim,) * 3, group.parts, weight="in_proj_weight", bias="in_proj_bias")
    out_projection = projection_of(group.consumer, module.out_proj)
    assert out_projection is not None  # out_proj is an nn.Linear
    columns = Cut(module.out_proj, out_projection, False, head_dim, scaled, always)
    cuts.extend((rows, columns))
    heads = RewrittenHeads(module, multihead_forward(module, rows, columns), rows)
    _bind_heads(module, heads)
    return heads


def _bind_heads(module: nn.Module, heads: RewrittenHeads) -> None:
    """Run ``heads`` in place of ``module``'s forward (:func:`_heads_forward`)."""
    # torch's stub of Module.__setattr__ takes tensors and modules only; a plain attribute is fine
    module._raptr_heads = heads  # type: ignore[assignment]
    module.forward = types.MethodType(_heads_forward, module)


def remove_cuts(model: nn.Module) -> int:
    removed = 0
    for module in model.modules():
        if is_cut(module):
            replaced = module.__dict__.pop(_STATE[module.__dict__["forward"].__func__])
            del module.forward
            if replaced.instance_forward is not None:
                module.forward = replaced.instance_forward
            removed += 1
    return removed


@contextlib.contextmanager
def trial_cuts(model: nn.Module, groups: Sequence[WidthGroup]) -> Iterator[None]:
    """Cut each group to about half of its parts (the first ones) while the block runs."""
    state = CutState(groups)
    modules = dict(model.named_modules())
    try:
        install_cuts(model, groups, state, scaled=False, always=True)
        state.set([list(range(max(1, g.parts // 2))) for g in groups], [1.0] * len(groups),
                  [modules[g.cut_targets(-1)[0]].weight.device for g in groups])
        yield
    finally:
        remove_cuts(model)


# -- optimizer: parts not kept stay as they were ------------------------------------------------
class FrozenParts:
    """Saves the rows and columns of parts not kept before ``optimizer.step()`` and writes them
    back after it: parameters and every optimizer state tensor of the parameter's shape (Adam's
    moments, SGD's momentum). Groups in a unit dropped whole this step are skipped: the optimizer
    leaves those parameters alone already. The choice rests on the step's decisions, not on
    gradients, so an optimizer whose ``step(closure)`` runs the backward is handled too."""

    def __init__(self, state: CutState, running_units: Callable[[], set[str]]):
        self.state = state
        self.running_units = running_units
        # (parameter, dim, indices not kept on this rank, their values, their optimizer state)
        self.saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def slices(self) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        """(parameter, dim, indices not kept) for every cut parameter of this step."""
        running = self.running_units()
        for g, (group, cuts) in enumerate(zip(self.state.groups, self.state.cuts)):
            if self.state.kept[g] is None or group.unit not in running:
                continue
            dropped = self.state.dropped(g)
            by_layout: dict[tuple[Any, torch.device], torch.Tensor] = {}
            for cut in cuts:
                module = cut.module
                if not module.training:  # eval mode ran the whole projection: its gradient is real
                    continue
                weight, bias = cut.parameters()
                key = (cut.layout, weight.device)
                if key not in by_layout:
                    by_layout[key] = cut.rows(dropped, weight.device)
                out_dim = 1 if cut.transposed else 0  # Conv1D keeps weight as [in, out]
                yield weight, out_dim if cut.producer else 1 - out_dim, by_layout[key]
                if cut.producer and bias is not None:
                    yield bias, 0, by_layout[key]

    def save(self, optimizer: torch.optim.Optimizer) -> None:
        self.saved.clear()
        for param, dim, index in self.slices():
            local_index = _local_index(param, dim, index)
            states = {key: local_part(value).index_select(dim, local_index)
                      for key, value in _shaped_state(optimizer, param).items()}
            self.saved.append((param, dim, local_index, local_part(param).detach().index_select(dim, local_index), states))

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for param, dim, local_index, value, states in self.saved:
                _write_back(local_part(param), dim, local_index, value)
                for key, tensor in _shaped_state(optimizer, param).items():
                    local_state = local_part(tensor)
                    # State made by this very step (the first one) starts at zero for parts not kept.
                    before = states.get(key)
                    if before is None:
                        before = torch.zeros(value.shape, dtype=local_state.dtype, device=local_state.device)
                    _write_back(local_state, dim, local_index, before)
        self.saved.clear()


def _write_back(tensor: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> None:
    """``tensor.index_copy_(dim, index, values)``; columns of a matrix go through ``scatter_``,
    about twice as fast there on the CPU (measured: 33 us against 75 us for 128 x 256 of 512)."""
    if tensor.dim() == 2 and dim == 1:
        tensor.scatter_(1, index.view(1, -1).expand(tensor.shape[0], -1), values)
    else:
        tensor.index_copy_(dim, index, values)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a plain tensor is its own; an FSDP2 parameter (or its optimizer
    state) is a DTensor, whose local shard shares storage with it, so writes land in the shard."""
    return local_tensor(tensor) if is_dtensor(tensor) else tensor


def _local_index(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``index`` (global positions along ``dim``) within the part of ``tensor`` this rank holds.

    An FSDP2 DTensor is sharded along dim 0: each rank writes back the rows it holds; a dimension
    it holds whole (a consumer's columns) keeps its global indices.
    """
    if not is_dtensor(tensor) or not any(p.is_shard(dim) for p in tensor.placements):
        return index
    local = local_tensor(tensor)
    offsets = shard_offsets(tensor)
    start, rows = offsets[dim], local.shape[dim]
    index = index.to(local.device)
    inside = index[(index >= start) & (index < start + rows)]
    return inside - start


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


_DTensor = _dtensor_class()  # imported once: _cut_forward asks at every call, also while dynamo traces it


def is_dtensor(tensor: torch.Tensor) -> TypeGuard[DTensor]:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _shaped_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors of ``param`` shaped like it (``.get``: no entry is created)."""
    state = optimizer.state.get(param, {})
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == param.shape}

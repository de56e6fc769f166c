"""What the analysis finds, as plain values: units (:class:`Block`) and width groups (:class:`WidthGroup`).

Run-time code (gates, cuts, the controller) reads these and nothing else of the analysis, so it
imports this module, never ``discovery`` or ``width``. ``find_blocks`` and ``find_width_groups``
make them; ``raptr_fx.Block`` and ``raptr_fx.WidthGroup`` are the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from .skipping import OutputSlot

if TYPE_CHECKING:  # the annotation only: the rewrite's planning is analysis
    from .head_rewrite import HeadRewrite

__all__ = ["Block", "OutputSlot", "WidthGroup", "Projection", "projection_of", "Granularity", "DropRule",
           "WidthKind", "KINDS"]

Granularity = Literal["layer", "branch"]
DropRule = Literal["identity", "zero"]
WidthKind = Literal["mlp", "heads"]
KINDS: tuple[WidthKind, ...] = ("mlp", "heads")


@dataclass(frozen=True)
class Block:
    """One candidate unit of the model, in stream order.

    Example:
        >>> blocks = raptr_fx.find_blocks(model)
        >>> [b.name for b in blocks if b.droppable]
        ['transformer.h.0', 'transformer.h.1', ...]
    """

    name: str  # qualified module name, as in model.named_modules()
    index: int  # position in stream order among all candidates
    drop: DropRule  # identity: skipped, returns its input; zero: skipped, returns zeros
    module_type: str  # class name of the module
    params: int  # number of parameters inside the unit
    flops_share: float | None  # share of the model's forward FLOPs (needs example inputs)
    droppable: bool = True
    reason: str | None = None  # why the unit cannot be dropped
    stream_position: int | None = None  # positional index of the stream argument of forward
    stream_name: str | None = None  # parameter name of the stream argument of forward
    # What the unit returns: "tensor" (the stream), or a "tuple", "list" or "dict" whose elements
    # output_slots describe (the stream, an input passed through, a constant), so a gate can rebuild it.
    output_container: str = "tensor"
    output_slots: tuple[OutputSlot, ...] = ()
    # Weights outside the unit that only its branch uses (a parent's norm or layer scale): counted in
    # params and flops_share, frozen with the unit; the modules holding them are skipped with it.
    owned: tuple[str, ...] = ()  # qualified parameter names
    owned_before: tuple[str, ...] = ()  # modules only the unit reads: skipped, they return zeros
    owned_after: tuple[str, ...] = ()  # zero units: modules on the branch after it: skipped, they return zeros


@dataclass(frozen=True)
class WidthGroup:
    """One width group of a unit: MLP hidden units or attention heads that a step can cut.

    Example:
        >>> [(g.unit, g.kind, g.size) for g in raptr_fx.find_width_groups(model, inputs)]
        [('model.layers.0', 'heads', 4), ('model.layers.0', 'mlp', 128), ...]
    """

    unit: str  # the unit (residual block) it lies in, as in find_blocks
    kind: WidthKind  # "mlp" (hidden units) or "heads" (attention heads)
    size: int  # hidden units H, or query heads
    modules: tuple[str, ...]  # producer projections, then the consumer projection
    droppable: bool = True
    reason: str | None = None  # why it cannot be cut
    parts: int = 0  # what a cut samples: hidden units, or key/value heads (with their query heads)
    # Rows (producers) or columns (consumer) of each module that one part spans, in module order.
    part_widths: tuple[int, ...] = ()
    params: int = 0  # parameters in the group's projections
    flops_share: float | None = None  # share of the model's forward FLOPs that scales with the cut
    # Per module, the projections a cut narrows when it is a linear layer with an adapter (its base
    # and adapter projections); empty: every module is itself the projection cut.
    targets: tuple[tuple[str, ...], ...] = ()
    rewrite: HeadRewrite | None = None  # heads of a fused projection: the attention module's rewrite

    @property
    def name(self) -> str:
        """Unique within a model: the innermost module holding all its projections, and the kind
        (``model.layers.0.mlp:mlp``, ``encoder.layer.0.attention:heads``)."""
        if len(self.modules) == 1:
            return f"{self.modules[0]}:{self.kind}"
        paths = [m.split(".") for m in self.modules]
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return f"{'.'.join(common) or self.unit}:{self.kind}"

    @property
    def producers(self) -> tuple[str, ...]:
        return self.modules[:-1]

    @property
    def consumer(self) -> str:
        return self.modules[-1]

    def cut_targets(self, position: int) -> tuple[str, ...]:
        """The projections a cut of ``modules[position]`` narrows: the module, or for a linear layer
        with an adapter, its projections that write its output (producer) or read its input (consumer)."""
        return self.targets[position] if self.targets else (self.modules[position],)


@dataclass(frozen=True)
class Projection:
    """A module that maps one feature dimension to another: ``nn.Linear`` or ``Conv1D``."""

    name: str
    in_features: int
    out_features: int
    transposed: bool  # weight stored as [in, out] (Hugging Face Conv1D)


def projection_of(name: str, module: nn.Module) -> Projection | None:
    if isinstance(module, nn.Linear):
        return Projection(name, module.in_features, module.out_features, False)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return Projection(name, weight.shape[0], weight.shape[1], True)
    return None

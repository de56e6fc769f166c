"""Find the units of a model a training step can skip: the look-up half of raptr_fx.

``find_blocks`` answers one question: which parts of this model can be skipped
in a training step, and how?

* ``identity`` units are what a user calls a layer (``transformer.h.3``,
  ``model.layers.3``, ``encoder.layer.3``, ``layer2.1``): a module whose input
  is the stream and whose output is the stream after one or more residual
  updates. Skipped, it returns its input.
* ``zero`` units are residual branches that are whole modules added to the
  stream by their parent (``x = x + self.attns[i](x)``). Skipped, they return
  zeros, so the parent adds nothing.

:func:`discover` runs the analysis once: the probe (``probe.py``), the trace
(``tracing.py``), the residual adds (``residuals.py``) and the module graph
(``module_graph.py``). Two readers take it from there: ``unit_choice.py``
chooses the units, with the facts ``unit_facts.py`` gathers and the verdicts of
``skipping.py``, and ``width.py`` finds the width groups inside them. The
returned :class:`Discovery` keeps what was computed, so no reader traces or
probes again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .errors import RaptrError
from .module_graph import ModuleGraph
from .probe import Probe, probe
from .residuals import Residual, dataflow_graph, find_residuals
from .tracing import ExampleInputs, TracedModel, normalize_example_inputs, trace
from .unit_choice import UnitChoice
from .unit_facts import UnitFactFinder
from .units import Block, Granularity
from .untouched import as_discovered
from .wrappers import seen_through

__all__ = ["Block", "Discovery", "discover", "find_blocks"]


@dataclass
class Discovery:
    """Everything ``find_blocks`` learned; the CLI renders it."""

    model_type: str
    blocks: list[Block]
    tracer: str
    total_params: int
    granularity: Granularity
    traced: TracedModel
    residuals: list[Residual]
    probe: str | None = None  # "fake" (fake tensors), "real" (one real forward pass), None (no inputs)
    # Refused layers whose residual branches are units in their place (a layer taking its stream in a
    # dict, a projection or scaled shortcut in one sublayer). Not in ``blocks``: no unit overlaps another.
    replaced: list[Block] = field(default_factory=list)
    # What the analysis computed once, for its readers (``width.py``), so none traces or probes again:
    # the dataflow graph of ``traced`` with each module's region, the probe's record (None without
    # example inputs) and the example inputs as ``(args, kwargs)``, on the model's device.
    module_graph: ModuleGraph | None = field(default=None, repr=False)
    measured: Probe | None = field(default=None, repr=False)
    inputs: ExampleInputs | None = field(default=None, repr=False)

    @property
    def droppable(self) -> list[Block]:
        return [b for b in self.blocks if b.droppable]


def find_blocks(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    granularity: Granularity = "layer",
    **tracer_options: Any,
) -> list[Block]:
    """Find the units of ``model`` that RaPTr can skip, in stream order.

    Args:
        model: any ``nn.Module``; it is not changed.
        example_inputs: a tensor, a tuple of positional args or a dict of keyword args.
            Needed for models symbolic tracing cannot handle (Hugging Face transformers),
            and for FLOPs shares and shape checks.
        granularity: ``"layer"`` (default) or ``"branch"`` (each residual branch on its own).
        **tracer_options: passed to ``torch.fx`` tracing: ``leaf_modules``,
            ``autowrap_functions``, ``autowrap_modules``, ``concrete_args``.

    Returns:
        Every candidate, droppable or not; ``Block.reason`` says why one is not.

    Example:
        >>> blocks = raptr_fx.find_blocks(model, (torch.zeros(1, 16, dtype=torch.long),))
    """
    return discover(model, example_inputs, granularity=granularity, **tracer_options).blocks


def discover(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    granularity: Granularity = "layer",
    **tracer_options: Any,
) -> Discovery:
    """Like :func:`find_blocks`, but returns the whole analysis: the tracer used, totals, and what
    the readers of the analysis take from it (the traced graph, module graph, probe and inputs).

    Example:
        >>> discovery = raptr_fx.discover(model, inputs)
        >>> groups = raptr_fx.width.width_groups(model, discovery)  # no second trace or probe
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if granularity not in ("layer", "branch"):
        raise ValueError(f"granularity must be 'layer' or 'branch', got {granularity!r}")
    inputs = _on_model_device(model, normalize_example_inputs(example_inputs))
    # Nothing the passes run may stay in the model (caches of proxies or fakes, rebound attributes);
    # an instance forward that wraps the class's (Accelerate's autocast) is looked through, and a
    # direct ``layer.forward(...)`` call is seen as the layer's call.
    # Blocks wrapped by torch.compile or activation checkpointing are seen as the user's modules;
    # each unit keeps its slot's name, where the outermost wrapper (and so its gate) sits.
    with seen_through(model) as real_name:
        with as_discovered(model):
            # The probe runs first: inputs the model rejects get their own error, not a tracing error.
            measured = probe(model, inputs) if inputs is not None else None
            traced = trace(model, inputs, tracer_options)
        if measured is not None and not traced.call_counts:
            traced.call_counts.update(measured.call_counts)
        graph = dataflow_graph(traced)
        residuals = find_residuals(traced, graph)
        links = find_residuals(traced, graph, parameter_free=True)
        module_graph = ModuleGraph(traced, graph)
        choice = UnitChoice(model, module_graph, residuals, links, measured,
                            UnitFactFinder(model, module_graph, measured), granularity)
        blocks = choice.blocks()
    blocks = [replace(b, name=real_name(b.name), owned=tuple(map(real_name, b.owned)),
                      owned_before=tuple(map(real_name, b.owned_before)),
                      owned_after=tuple(map(real_name, b.owned_after))) for b in blocks]
    replaced = [replace(b, name=real_name(b.name)) for b in choice.replaced]
    return Discovery(
        model_type=type(model).__name__,
        blocks=blocks,
        tracer=traced.tracer,
        total_params=sum(p.numel() for p in model.parameters()),
        granularity=granularity,
        traced=traced,
        residuals=residuals,
        probe=measured.mode if measured is not None else None,
        replaced=replaced,
        module_graph=module_graph,
        measured=measured,
        inputs=inputs,
    )


def _on_model_device(model: nn.Module, inputs: ExampleInputs | None) -> ExampleInputs | None:
    """A model on the meta device gets its example inputs moved there too (it has no data to run)."""
    tensors = [*model.parameters(), *model.buffers()]
    if inputs is None or not tensors or any(t.device.type != "meta" for t in tensors):
        return inputs

    def to_meta(value: Any) -> Any:
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    args, kwargs = inputs
    return tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()}


def no_blocks_error(discovery: Discovery) -> RaptrError:
    """No unit can be dropped: either no residual unit was found, or every one was refused (say why)."""
    refused = [b for b in discovery.blocks if not b.droppable]
    if not refused:
        return RaptrError(
            f"{discovery.model_type} has no droppable residual blocks (traced with {discovery.tracer}). "
            "RaPTr needs residual connections x + f(x); concatenation skips (U-Net, DenseNet) do not qualify. "
            "Run `raptr-fx graph` to see what was traced."
        )
    shown = 6
    lines = "\n".join(f"  - {b.name}: {b.reason}" for b in refused[:shown])
    more = f"\n  - ... and {len(refused) - shown} more" if len(refused) > shown else ""
    return RaptrError(
        f"{discovery.model_type} has no droppable residual blocks: all {len(refused)} residual units found "
        f"were refused (traced with {discovery.tracer}):\n{lines}{more}\n"
        "Run `raptr-fx inspect` to see every unit and its reason."
    )

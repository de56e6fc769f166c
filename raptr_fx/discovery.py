"""Group residual adds into droppable units: the look-up half of raptr_fx.

``find_blocks`` answers one question: which parts of this model can be skipped
in a training step, and how?

* ``identity`` units are what a user calls a layer (``transformer.h.3``,
  ``model.layers.3``, ``encoder.layer.3``, ``layer2.1``): a module whose input
  is the stream and whose output is the stream after one or more residual
  updates. Skipped, it returns its input.
* ``zero`` units are residual branches that are whole modules added to the
  stream by their parent (``x = x + self.attns[i](x)``). Skipped, they return
  zeros, so the parent adds nothing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import networkx as nx
from torch import fx, nn

from .errors import RaptrError
from .probe import Probe, probe
from .residuals import Residual, dataflow_graph, find_residuals
from .tracing import TracedModel, normalize_example_inputs, trace

__all__ = ["Block", "Discovery", "discover", "find_blocks"]

Granularity = Literal["layer", "branch"]
DropRule = Literal["identity", "zero"]


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
    """Like :func:`find_blocks`, but returns the whole analysis (tracer used, graph, totals)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if granularity not in ("layer", "branch"):
        raise ValueError(f"granularity must be 'layer' or 'branch', got {granularity!r}")
    inputs = normalize_example_inputs(example_inputs)
    traced = trace(model, inputs, tracer_options)
    measured = probe(model, inputs) if inputs is not None else None
    if measured is not None and not traced.call_counts:
        traced.call_counts.update(measured.call_counts)
    graph = dataflow_graph(traced)
    residuals = find_residuals(traced, graph)
    blocks = _Grouping(model, traced, graph, residuals, measured).blocks(granularity)
    return Discovery(
        model_type=type(model).__name__,
        blocks=blocks,
        tracer=traced.tracer,
        total_params=sum(p.numel() for p in model.parameters()),
        granularity=granularity,
        traced=traced,
        residuals=residuals,
    )


class _Grouping:
    """Assign residual adds to modules; one instance per discovery."""

    def __init__(self, model: nn.Module, traced: TracedModel, graph: nx.DiGraph,
                 residuals: list[Residual], measured: Probe | None):
        self.model = model
        self.modules = dict(model.named_modules())
        self.traced = traced
        self.graph = graph
        self.residuals = residuals
        self.measured = measured
        self.order = {n: i for i, n in enumerate(traced.graph.nodes)}
        self.regions: dict[str, set[fx.Node]] = {}
        for node, scope in traced.scopes.items():
            for name in scope:
                self.regions.setdefault(name, set()).add(node)
        self.param_ndim = {name: p.dim() for name, p in model.named_parameters()}

    # -- module boundaries -------------------------------------------------------------
    def inputs(self, name: str) -> list[fx.Node]:
        region = self.regions[name]
        found = {p for n in region for p in self.graph.predecessors(n)
                 if p not in region and self.traced.is_value(p)}
        return sorted(found, key=self.order.__getitem__)

    def outputs(self, name: str) -> list[fx.Node]:
        region = self.regions[name]
        user_outputs = set(self.traced.user_outputs)
        found = [n for n in region if self.traced.is_value(n) and (
            n in user_outputs or any(s not in region and s.op != "output" for s in self.graph.successors(n)))]
        return sorted(found, key=self.order.__getitem__)

    def contained(self, name: str, residual: Residual) -> bool:
        region = self.regions[name]
        return residual.add in region and residual.branch_nodes <= region and residual.shortcut <= region

    # -- identity units ----------------------------------------------------------------
    def layer_candidates(self) -> dict[str, list[Residual]]:
        """Modules whose input is the stream and whose output is the stream after residual updates."""
        candidates = {}
        for name in self.regions:
            inside = [r for r in self.residuals if self.contained(name, r)]
            if not inside:
                continue
            first = inside[0]
            if first.origin not in self.inputs(name):
                continue
            stream_outputs = [o for o in self.outputs(name)
                              if o is first.add or first.add in nx.ancestors(self.graph, o)]
            if len(stream_outputs) == 1:
                candidates[name] = inside
        return candidates

    def layer_units(self) -> dict[str, list[Residual]]:
        """The candidates a user would call layers, with their residual adds."""
        candidates = self.layer_candidates()

        def strictly_inside(inner: str, outer: str) -> bool:
            return inner.startswith(outer + ".")

        own = {}  # candidates with residual adds of their own, not only their children's
        for name, inside in candidates.items():
            covered = {r for other, rs in candidates.items() if strictly_inside(other, name) for r in rs}
            if any(r not in covered for r in inside):
                own[name] = inside
        chosen: dict[str, list[Residual]] = {}
        # Outermost first; a unit never swallows two or more other units (a stage of layers).
        for name in sorted(own, key=lambda n: n.count(".")):
            if any(strictly_inside(name, c) for c in chosen):
                continue
            inner = [o for o in own if strictly_inside(o, name)]
            maximal = [o for o in inner if not any(strictly_inside(o, p) for p in inner)]
            if len(maximal) <= 1:
                chosen[name] = own[name]
        return chosen

    # -- zero units --------------------------------------------------------------------
    def branch_module(self, residual: Residual) -> str | None:
        """The module whose output is the residual branch, looking through dropout and layer scale."""
        scope = self.traced.scopes[residual.add]
        depth = len(scope)
        node = residual.branch
        while True:
            node_scope = self.traced.scopes[node]
            if len(node_scope) > depth and node_scope[:depth] == scope:
                name = node_scope[depth]
                if self.outputs(name) != [node]:
                    return None
                if any(p.startswith(name + ".") for p in residual.params):
                    return name
                inputs = [n for n in self.inputs(name) if n in residual.branch_nodes]
            else:
                inputs = [n for n in node.all_input_nodes if n in residual.branch_nodes]
            if len(inputs) != 1:
                return None
            node = inputs[0]

    # -- assembly ----------------------------------------------------------------------
    def blocks(self, granularity: Granularity) -> list[Block]:
        units: list[tuple[int, str, DropRule, list[Residual]]] = []
        covered: set[Residual] = set()
        if granularity == "layer":
            for name, inside in self.layer_units().items():
                covered.update(inside)
                units.append((self.order[inside[0].add], name, "identity", inside))
        loose: dict[str, list[Residual]] = {}
        for residual in self.residuals:
            if residual in covered:
                continue
            name = self.branch_module(residual)
            key = name if name is not None else f"<branch at {residual.add.name}>"
            loose.setdefault(key, []).append(residual)
        for key, rs in loose.items():
            units.append((self.order[rs[0].add], key, "zero", rs))
        units.sort(key=lambda u: u[0])
        blocks: dict[str, Block] = {}
        for _, name, drop, rs in units:
            module_name = name.split("@")[0]  # a shared module's later calls are named ``layer@1``
            if module_name not in blocks:
                blocks[module_name] = self.block(len(blocks), module_name, drop, rs)
        return list(blocks.values())

    def block(self, index: int, name: str, drop: DropRule, residuals: list[Residual]) -> Block:
        module = self.modules.get(name)
        if module is None:  # a branch that is no single module
            names = frozenset().union(*(r.params for r in residuals))
            params = sum(self.model.get_parameter(n).numel() for n in names)
            return Block(name, index, drop, "-", params, None, False,
                         "the branch is not one module call; use granularity='layer'")
        params = sum(p.numel() for p in module.parameters())
        flops = None
        if self.measured is not None and self.measured.total_flops:
            flops = self.measured.flops.get(name, 0) / self.measured.total_flops
        reason, position, arg_name = self.check(name, module, drop, residuals)
        return Block(name, index, drop, type(module).__name__, params, flops, reason is None, reason,
                     position, arg_name)

    def check(self, name: str, module: nn.Module, drop: DropRule,
              residuals: list[Residual]) -> tuple[str | None, int | None, str | None]:
        """Why the unit cannot be dropped (None if it can), and which argument is its stream."""
        calls = self.traced.call_counts.get(name, 1)
        if calls > 1:
            return f"called {calls} times per forward (shared weights): one gate cannot tell the calls apart", None, None
        projection = next((r for r in residuals if r.shortcut), None)
        if drop == "identity" and projection is not None:
            shortcut = sorted({s for n in projection.shortcut for s in self.traced.scopes[n][-1:]})
            where = f" ({', '.join(shortcut)})" if shortcut else ""
            shapes = self.shape_change(name)
            shapes = f" and changes the stream's shape{shapes}" if shapes else ""
            return (f"its shortcut is a projection{where}, not the identity{shapes}: "
                    "skipping it would change the stream"), None, None
        if drop == "zero":
            outside = [p for r in residuals for p in r.params
                       if not p.startswith(name + ".") and self.param_ndim.get(p, 0) > 1]
            if outside:
                return f"the branch also runs weights outside {name} ({outside[0]}); use granularity='layer'", None, None
        call = self.measured.calls.get(name) if self.measured else None
        if call is not None and call.output_shape is None:
            return f"returns a {call.output_type}, not one tensor", None, None
        if self.traced.returns_tensor.get(name) is False:
            return "returns a tuple or other container, not one tensor", None, None
        position = self.stream_argument(name, residuals[0])
        if position is None:
            return "cannot tell which argument of forward carries the stream", None, None
        shapes = self.shape_change(name, position)
        if shapes:
            return f"it changes the stream's shape{shapes}", None, None
        return None, *_argument_slot(module, position)

    def stream_argument(self, name: str, residual: Residual) -> int | str | None:
        if name in self.traced.call_args:
            for key, node in self.traced.call_args[name].items():
                if node is residual.origin or node in residual.branch_nodes:
                    return key
            return None
        if self.measured is None or name not in self.measured.calls:
            return 0
        call = self.measured.calls[name]
        return next((k for k, shape in call.arg_shapes.items() if shape == call.output_shape), None)

    def shape_change(self, name: str, position: int | str | None = None) -> str:
        if self.measured is None or name not in self.measured.calls:
            return ""
        call = self.measured.calls[name]
        before = call.arg_shapes.get(position if position is not None else 0)
        if before is None or call.output_shape is None or before == call.output_shape:
            return ""
        return f" from {list(before)} to {list(call.output_shape)}"


def _argument_slot(module: nn.Module, key: int | str) -> tuple[int | None, str | None]:
    """(position, name) of a forward argument given as a position or a keyword."""
    params = list(inspect.signature(module.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(key, int):
        return key, positional[key].name if key < len(positional) else None
    position = next((i for i, p in enumerate(positional) if p.name == key), None)
    return position, key


def no_blocks_error(discovery: Discovery) -> RaptrError:
    return RaptrError(
        f"{discovery.model_type} has no droppable residual blocks (traced with {discovery.tracer}). "
        "RaPTr needs residual connections x + f(x); concatenation skips (U-Net, DenseNet) do not qualify. "
        "Run `raptr-fx graph` to see what was traced."
    )

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

This module chooses the units (:class:`_Grouping`); whether each one can be
skipped, and how its output is rebuilt, is judged in ``skipping.py``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from .errors import RaptrError
from .probe import Call, Probe, probe
from .residuals import Residual, dataflow_graph, find_residuals, op_name
from .skipping import ObservedOutput, Owned, UnitFacts, judge, shared_reason
from .tracing import ExampleInputs, TracedModel, normalize_example_inputs, trace
from .units import Block, DropRule, Granularity
from .untouched import class_forward, direct_calls, untouched
from .wrappers import seen_through

__all__ = ["Block", "Discovery", "discover", "find_blocks"]

# Modules an owned module may be without example inputs to check its shapes: they keep their input's.
_SHAPE_KEEPING = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
# What may run on a skipped branch's zeros after the unit, keeping them zeros: a layer scale
# (``gamma * f(x)``), reshapes and casts, dropout, activations with f(0) = 0.
_ZERO_KEEPING = {"mul", "mul_", "rmul", "neg", "getitem", "to", "_to_copy", "alias", "clone", "contiguous",
                 "detach", "type", "float", "half", "bfloat16", "view", "reshape", "_unsafe_view", "flatten",
                 "unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "dropout",
                 "native_dropout", "relu", "gelu", "silu", "tanh"}
_ZERO_KEEPING_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh)


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
    inputs = _on_model_device(model, normalize_example_inputs(example_inputs))
    # Nothing the passes run may stay in the model (caches of proxies or fakes, rebound attributes);
    # an instance forward that wraps the class's (Accelerate's autocast) is looked through, and a
    # direct ``layer.forward(...)`` call is seen as the layer's call.
    # Blocks wrapped by torch.compile or activation checkpointing are seen as the user's modules;
    # each unit keeps its slot's name, where the outermost wrapper (and so its gate) sits.
    with seen_through(model) as real_name:
        with untouched(model), class_forward(model), direct_calls(model):
            # The probe runs first: inputs the model rejects get their own error, not a tracing error.
            measured = probe(model, inputs) if inputs is not None else None
            traced = trace(model, inputs, tracer_options)
        if measured is not None and not traced.call_counts:
            traced.call_counts.update(measured.call_counts)
        graph = dataflow_graph(traced)
        residuals = find_residuals(traced, graph)
        links = find_residuals(traced, graph, parameter_free=True)
        grouping = _Grouping(model, traced, graph, residuals, measured, links)
        blocks = grouping.blocks(granularity)
    blocks = [replace(b, name=real_name(b.name), owned=tuple(map(real_name, b.owned)),
                      owned_before=tuple(map(real_name, b.owned_before)),
                      owned_after=tuple(map(real_name, b.owned_after))) for b in blocks]
    replaced = [replace(b, name=real_name(b.name)) for b in grouping.replaced]
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


class _Grouping:
    """Choose the units (assign residual adds to modules) and gather the facts that
    ``skipping.judge`` decides droppability from; one instance per discovery."""

    def __init__(self, model: nn.Module, traced: TracedModel, graph: nx.DiGraph,
                 residuals: list[Residual], measured: Probe | None, links: list[Residual] = ()):
        self.model = model
        self.granularity: Granularity = "layer"  # set by blocks()
        # Parameter-free adds x + g(x): a layer's stream may start with one (FNet: LN(x + fft(x))).
        self.links = list(links)
        self.modules = dict(model.named_modules())
        self.traced = traced
        self.graph = graph
        self.residuals = residuals
        self.measured = measured
        self.order = {n: i for i, n in enumerate(traced.graph.nodes)}
        self.regions: dict[str, set[fx.Node]] = {}
        self.late_starts: dict[str, str | None] = {}  # module -> why it is no layer, see late_start
        self._fed: set[fx.Node] | None = None  # see fed()
        self._readers: dict[str, list[fx.Node]] | None = None  # see readers()
        self.candidates: dict[str, list[Residual]] | None = None  # see layer_candidates
        self.stacks: set[str] = set()  # candidates that are stacks of layers, see stack
        self.replaced: list[Block] = []  # refused layers whose branches are units instead, see layer_or_inner
        self.droppable_layers: list[str] | None = None  # branch granularity: what layer granularity gates
        for node, scope in traced.scopes.items():
            for name in scope:
                self.regions.setdefault(name, set()).add(node)

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
        if self.candidates is not None:
            return self.candidates
        candidates = self.candidates = {}
        for name in self.regions:
            inside = self.stream_updates(name)
            if not inside or inside[0].origin not in self.inputs(name):
                continue
            if len(self.stream_outputs(name, inside[0].add)) == 1:
                candidates[name] = inside
        return candidates

    def stream_updates(self, name: str) -> list[Residual]:
        """The residual adds inside module ``name``, after the add that starts its stream, if any."""
        inside = [r for r in self.residuals if self.contained(name, r)]
        if not inside:
            return []
        inputs = self.inputs(name)
        # A stream update that is no unit on the module's input starts its stream (FNet's Fourier
        # mixing, MRA's bias-only attention, then post-LN): skipped, the layer returns that input,
        # removing the update with the rest.
        starts = [r for r in self.links if self.contained(name, r) and r.origin in inputs
                  and self.order[r.add] < self.order[inside[0].add]]
        return starts[:1] + inside

    def stream_outputs(self, name: str, first_add: fx.Node) -> list[fx.Node]:
        """The outputs of module ``name`` that carry the stream after its first residual add."""
        return [o for o in self.outputs(name) if o is first_add or first_add in nx.ancestors(self.graph, o)]

    def layer_units(self, within: str | None = None) -> dict[str, list[Residual]]:
        """The candidates a user would call layers (inside module ``within``), with their residual adds.
        Chosen stacks of layers (see :meth:`stack`) are recorded in ``self.stacks``."""
        candidates = {n: rs for n, rs in self.layer_candidates().items() if within is None or _inside(n, within)}
        own = {}  # candidates with residual adds of their own, not only their children's
        for name, inside in candidates.items():
            covered = {r for other, rs in candidates.items() if _inside(other, name) for r in rs}
            if any(r not in covered for r in inside):
                own[name] = inside
        chosen: dict[str, list[Residual]] = {}
        # Outermost first. A unit holds at most one other unit, or several sublayers of different
        # classes (T5Block: self-attention, cross-attention, feed-forward); several units of one
        # class, or an nn.Sequential of them, are a stage of layers (ResNet's layer1), not a layer.
        for name in sorted(candidates, key=lambda n: n.count(".")):
            if any(_inside(name, c) for c in chosen):
                continue
            inner = [o for o in own if _inside(o, name)]
            maximal = [o for o in inner if not any(_inside(o, p) for p in inner)]
            if len(maximal) <= 1 and name in own:
                chosen[name] = own[name]
                covered = {r for o in maximal for r in candidates[o]}
                if self.stack(name, [r for r in own[name] if r not in covered], maximal):
                    self.stacks.add(name)
            elif len(maximal) > 1 and self.sublayers(name, maximal):
                chosen[name] = candidates[name]
        return chosen

    def sublayers(self, name: str, inner: list[str]) -> bool:
        """True when the units inside ``name`` are the different sublayers of one layer."""
        if isinstance(self.modules.get(name), (nn.Sequential, nn.ModuleList)):
            return False
        classes = [type(self.modules[n]) for n in inner if n in self.modules]
        return len(classes) == len(inner) and len(set(classes)) == len(classes)

    def stack(self, name: str, residuals: list[Residual], inner: list[str]) -> bool:
        """True when module ``name`` holds the residual updates of several entries of one ModuleList or
        nn.Sequential, entries that repeat (``for attn, ff in self.layers: x = attn(x) + x; ...``): a
        stack of layers, not a layer, whatever it runs after them (a final norm). Entries of different
        classes are the sublayers of one layer, as in :meth:`sublayers`."""
        parts = [self.branch_module(r) for r in residuals] + inner
        entries = {self.list_entry(name, part.split("@")[0]) for part in parts if part is not None}
        by_list: dict[str, list[type]] = {}
        for entry in entries - {None}:
            by_list.setdefault(entry.rpartition(".")[0], []).append(type(self.modules[entry]))
        return any(len(set(classes)) < len(classes) for classes in by_list.values())

    def list_entry(self, outer: str, name: str) -> str | None:
        """The outermost module from ``outer`` down to ``name`` that is an entry of a ModuleList or
        nn.Sequential inside ``outer`` (``layers.2`` for ``layers.2.0``), if any."""
        parts = name.split(".")
        for end in range(outer.count(".") + 2 if outer else 1, len(parts)):
            if isinstance(self.modules.get(".".join(parts[:end])), (nn.ModuleList, nn.Sequential)):
                entry = ".".join(parts[:end + 1])
                return entry if entry in self.modules else None
        return None

    # -- zero units --------------------------------------------------------------------
    def branch_module(self, residual: Residual) -> str | None:
        """The module whose output is the residual branch, looking through dropout and layer scale.

        On a chain of modules that only the branch reads (a parent's norm before it or after it), the
        one holding most of the weights (more than twice the others'): the unit owns the rest (see
        ``ownership``)."""
        scope = self.traced.scopes[residual.add]
        node = residual.branch
        found, weights = None, 0
        while True:
            node_scope = self.traced.scopes[node]
            # The branch may run in a sibling of the add's module: a library's ``residual_fn(block(x), x)``.
            depth = _common_depth(scope, node_scope)
            if len(node_scope) > depth:
                name = node_scope[depth]
                if self.outputs(name) != [node]:
                    return found
                if any(p.startswith(name + ".") for p in residual.params):
                    size = sum(p.numel() for p in self.modules[name].parameters())
                    if found is None or size > 2 * weights:
                        found, weights = name, size
                inputs = [n for n in self.inputs(name) if n in residual.branch_nodes]
            else:
                inputs = [n for n in node.all_input_nodes if n in residual.branch_nodes]
            if len(inputs) != 1 or found is not None and any(
                    u not in residual.branch_nodes for u in self.graph.successors(inputs[0])):
                return found
            node = inputs[0]

    # -- assembly ----------------------------------------------------------------------
    def blocks(self, granularity: Granularity) -> list[Block]:
        self.granularity = granularity
        units = self.plan() if granularity == "layer" else self.branch_units(self.residuals)
        blocks: dict[str, Block] = {}
        for unit in sorted(units, key=lambda u: u.start):
            if unit.block.name not in blocks:  # a shared module's calls are one unit
                blocks[unit.block.name] = replace(unit.block, index=len(blocks))
        return list(blocks.values())

    def plan(self, within: str | None = None) -> list[_Unit]:
        """The units inside module ``within`` (the whole model for None) at layer granularity: the
        layers, and each residual branch no layer holds as a zero unit."""
        units: list[_Unit] = []
        covered: set[Residual] = set()
        for name, inside in self.layer_units(within).items():
            covered.update(inside)
            units += self.layer_or_inner(name, inside)
        rest = [r for r in self.residuals if r not in covered and (within is None or self.contained(within, r))]
        return units + self.branch_units(rest)

    def layer_or_inner(self, name: str, inside: list[Residual]) -> list[_Unit]:
        """Layer ``name`` as one unit, or the units inside it: a stack's layers or branches, or the
        plain branches of a refused layer (modules holding all their branch's weights), where one of
        them can be skipped. A refused layer made of sublayers that are layers themselves (T5's block
        0, whose attention computes the position bias) stays one refused unit: its names stay stable."""
        whole = _Unit(self.order[inside[0].add], self.block(0, _module_name(name), "identity", inside))
        stack = name in self.stacks
        if whole.block.droppable and not stack:
            return [whole]
        inner = [u for u in self.plan(name) if stack or u.plain]
        if any(u.block.droppable for u in inner):
            if not stack:
                self.replaced.append(whole.block)
            return inner
        # A stack none of whose parts can be skipped stays one unit when it can be (a conv block looping
        # over its convolutions); refused either way, its parts' reasons say more than the stack's.
        return inner if stack and inner and not whole.block.droppable else [whole]

    def branch_units(self, residuals: list[Residual]) -> list[_Unit]:
        """One zero unit per branch module, for residual adds no layer holds."""
        loose: dict[str, list[Residual]] = {}
        for residual in residuals:
            name = self.branch_module(residual)
            key = name if name is not None else f"<branch at {residual.add.name}>"
            loose.setdefault(key, []).append(residual)
        units = []
        for key, rs in loose.items():
            name = _module_name(key)
            plain = all(p.startswith(name + ".") for r in rs for p in r.params)
            units.append(_Unit(self.order[rs[0].add], self.block(0, name, "zero", rs), plain))
        return units

    def block(self, index: int, name: str, drop: DropRule, residuals: list[Residual]) -> Block:
        module = self.modules.get(name)
        if module is None:  # a branch that is no single module
            names = frozenset().union(*(r.params for r in residuals))
            params = sum(self.model.get_parameter(n).numel() for n in names)
            return Block(name, index, drop, "-", params, None, False,
                         f"the branch is not one module call; {self.zero_fix(residuals[0])}")
        params = sum(p.numel() for p in module.parameters())
        flops = None
        if self.measured is not None and self.measured.total_flops:
            flops = self.measured.flops.get(name, 0) / self.measured.total_flops
        if name not in self.regions:  # only a later call (``name@1``) of a shared module holds the adds
            calls = max(self.traced.call_counts.get(name, 2), 2)
            return Block(name, index, drop, type(module).__name__, params, flops, False, shared_reason(calls))
        facts = self.facts(name, module, drop, residuals)
        verdict = judge(facts)
        owned = facts.owned if not facts.owned.refused else Owned()
        params += sum(self.model.get_parameter(p).numel() for p in owned.params)
        if flops is not None:
            flops += sum(self.measured.flops.get(m, 0) for m in owned.before + owned.after) / self.measured.total_flops
        return Block(name, index, drop, type(module).__name__, params, flops, verdict.reason is None,
                     verdict.reason, verdict.stream_position, verdict.stream_name,
                     verdict.output_container, verdict.output_slots, owned.params, owned.before, owned.after)

    def zero_fix(self, residual: Residual) -> str:
        """What to do about a refused zero unit: at layer granularity, the modules around its add
        were tried as layers already, so asking for granularity='layer' would not help."""
        if self.granularity == "branch" and any(self.contained(n, residual) for n in self.layers_at_layer_granularity()):
            return "use granularity='layer'"
        scope = self.traced.scopes.get(residual.add, ())
        if scope:
            name = scope[-1]
            if name not in self.late_starts:  # one answer per module, however many branches it holds
                self.late_starts[name] = self.late_start(name)
            if self.late_starts[name]:
                return self.late_starts[name]
        return "no module around it is a layer (one taking the stream as an input and returning it once)"

    def layers_at_layer_granularity(self) -> list[str]:
        """The droppable layers that layer granularity gates (asked at branch granularity, so that a
        refused branch's hint names a granularity that would help)."""
        if self.droppable_layers is None:
            self.droppable_layers = []  # no recursion while planning
            granularity, replaced = self.granularity, list(self.replaced)
            self.granularity = "layer"
            try:
                self.droppable_layers = [u.block.name for u in self.plan()
                                         if u.block.drop == "identity" and u.block.droppable]
            finally:
                self.granularity, self.replaced = granularity, replaced
        return self.droppable_layers

    def late_start(self, name: str) -> str | None:
        """Why module ``name`` is no layer when it returns the stream once but runs weights on it
        before its first residual add (RWKV's block 0 normalizes it first)."""
        inside = self.stream_updates(name)
        inputs = self.inputs(name)
        if not inside or inside[0].origin in inputs or len(self.stream_outputs(name, inside[0].add)) != 1:
            return None
        origin = inside[0].origin
        # Not ids (a model embedding them is no layer); a torch.fx graph has no dtypes to tell them by.
        streams = [i for i in inputs if self.traced.is_float(i)]
        fed = set().union(*(nx.descendants(self.graph, i) for i in streams))
        between = (nx.ancestors(self.graph, origin) | {origin}) & self.regions[name] & fed
        weights = sorted({self.traced.scopes[n][-1] for n in between if self.traced.param_uses.get(n)})
        if not weights:
            return None
        return (f"{name} is no layer: it runs {', '.join(weights)} on the stream before its first residual add "
                "(skipped, it would return its input, not their output)")

    # -- facts for the judgement (skipping.judge) ----------------------------------------
    def facts(self, name: str, module: nn.Module, drop: DropRule, residuals: list[Residual]) -> UnitFacts:
        call = self.measured.calls.get(name) if self.measured else None
        output = self.observed_output(name, call)
        return UnitFacts(
            name=name,
            module=module,
            drop=drop,
            calls=self.traced.call_counts.get(name, 1),
            projection=self.projection(residuals),
            shortcut_scale=next((r.shortcut_scale for r in residuals if r.shortcut_scale is not None), None),
            zero_fix=self.zero_fix(residuals[0]) if drop == "zero" else "",
            owned=self.ownership(name, drop, residuals, output),
            output=output,
            computed_from=self.computed_from(name, output),
            unread=self.unread_outputs(name, output),
            stream_node=self.stream_node(name, drop, residuals),
            stream_argument=self.stream_argument(name, residuals[0]),
            arg_shapes=call.arg_shapes if call else None,
            output_shape=call.output_shape if call else None,
        )

    def observed_output(self, name: str, call: Call | None) -> ObservedOutput | None:
        """What the unit returns: the probe sees real structures, torch.fx sees graph nodes; merge both."""
        traced = self.traced.call_outputs.get(name)
        if call is None:
            if traced is not None and traced.container == "tensor" and self.indexed(name):
                # A leaf module's result is one opaque node; indexing it shows it is a container.
                return ObservedOutput("result its caller indexes into (pass example inputs to see what it holds)")
            return traced
        seen = call.output
        if traced is not None and [leaf.key for leaf in traced.leaves] == [leaf.key for leaf in seen.leaves]:
            leaves = [replace(leaf, node=mine.node) for leaf, mine in zip(seen.leaves, traced.leaves)]
            return replace(seen, leaves=leaves)
        return seen

    def indexed(self, name: str) -> bool:
        """A leaf module's result (one opaque node) that its caller indexes: a container.
        A traced module's tensor result sliced by its caller (``x[:, 0]``) is still a tensor."""
        return any(node.op == "call_module" and user.op == "call_function" and user.target is operator.getitem
                   for node in self.outputs(name) for user in node.users)

    def unread_outputs(self, name: str, output: ObservedOutput | None) -> frozenset[int | str]:
        """Computed output elements that nothing outside the unit reads in the traced forward
        (``(hidden, attn_weights)`` without ``output_attentions``): a skip can return None there."""
        if output is None or output.container == "tensor":
            return frozenset()
        region = self.regions[name]
        user_outputs = set(self.traced.user_outputs)
        outputs = self.outputs(name)
        unread = set()
        for leaf in output.leaves:
            if leaf.kind != "tensor":
                continue
            if leaf.node is not None:  # torch.fx: any reader at all, shape queries included
                if leaf.node not in user_outputs and all(u in region for u in leaf.node.users):
                    unread.add(leaf.key)
            elif self.traced.tracer == "torch.export":  # the unit's outputs read outside, by shape
                if not any(_shape(o) == leaf.shape for o in outputs):
                    unread.add(leaf.key)
            elif len(outputs) == 1 and outputs[0] not in user_outputs:  # a torch.fx leaf module: one node
                indices = [u.args[1] for u in outputs[0].users]
                if all(u.op == "call_function" and u.target is operator.getitem for u in outputs[0].users):
                    if leaf.key not in indices:
                        unread.add(leaf.key)
        return frozenset(unread)

    def computed_from(self, name: str, output: ObservedOutput | None) -> dict[int | str, list[str]]:
        """For each computed output element: the parameters inside the unit it is computed from."""
        if output is None or output.container == "tensor":
            return {}
        region = self.regions[name]
        found = {}
        for leaf in output.leaves:
            if leaf.kind != "tensor":
                continue
            # torch.fx gives the node; with torch.export, find it among the unit's outputs by shape.
            nodes = [leaf.node] if leaf.node is not None else [
                o for o in self.outputs(name) if _shape(o) == leaf.shape]
            params = {p for node in nodes for n in (nx.ancestors(self.graph, node) | {node}) & region
                      for p in self.traced.param_uses.get(n, ())}
            found[leaf.key] = sorted(params)
        return found

    def projection(self, residuals: list[Residual]) -> list[str] | None:
        """The modules of the first projection shortcut, or None when every shortcut is the identity."""
        residual = next((r for r in residuals if r.shortcut), None)
        if residual is None:
            return None
        return sorted({s for n in residual.shortcut for s in self.traced.scopes[n][-1:]})

    # -- what a unit owns outside its module -----------------------------------------------
    def ownership(self, name: str, drop: DropRule, residuals: list[Residual],
                  output: ObservedOutput | None) -> Owned:
        """The weights outside unit ``name`` that only its branch uses, and the modules holding them.

        Before the unit: what only the unit consumes (a parent's norm feeding a branch, a weight
        standardized for it). After it, zero units only: what the branch runs on the unit's result
        before the add (a parent's layer scale ``gamma``, a post-norm of its output).
        """
        region = self.regions[name]
        before = self.only_for(region, self.inputs_of(region), self.kept_when_skipped(name, drop, residuals, output))
        after = self.branch_after(name, residuals) if drop == "zero" else set()
        params = sorted(self.outside_params(name, before | after))
        if not params:
            return Owned()
        fed = self.fed()
        mine = region | before | after
        mine |= self.only_for(mine, self.inputs_of(after) - mine, fed)  # ``gamma.view(...)``: weights only
        readers = self.readers()
        shared = tuple(p for p in params if any(n not in mine for n in readers[p]))
        if shared:
            return Owned(shared=shared)
        before_modules = self.owned_modules(name, before)
        after_modules = self.owned_modules(name, after)
        loose = tuple(sorted({p for n in before if n in fed for p in self.outside_params(name, {n})
                              if not any(p.startswith(m + ".") for m in before_modules)}))
        reshaping = tuple((m, change) for m in before_modules + after_modules
                          if (change := self.reshaping(m)) is not None)
        not_zero: tuple[str, ...] = ()
        if after and self.outside_params(name, after):
            in_module = lambda n: any(s in after_modules for s in self.traced.scopes[n])  # noqa: E731
            not_zero = tuple(self.op_label(n) for n in sorted(after, key=self.order.__getitem__)
                             if not in_module(n) and not self.keeps_zeros(n, region | after))
        return Owned(tuple(params), tuple(before_modules), tuple(after_modules),
                     loose=loose, reshaping=reshaping, not_zero=not_zero)

    def inputs_of(self, nodes: set[fx.Node]) -> set[fx.Node]:
        return {p for n in nodes for p in self.graph.predecessors(n) if p not in nodes}

    def only_for(self, consumers: set[fx.Node], start: set[fx.Node], kept: set[fx.Node] | None) -> set[fx.Node]:
        """The nodes, from ``start`` back, that run only for ``consumers``: each of their users is one
        of them or another such node. ``kept`` nodes (and the model's inputs) are never among them;
        None: nothing is (they cannot be told apart)."""
        if kept is None:
            return set()
        dead: set[fx.Node] = set()
        pending = set(start)
        seen = set(pending)
        while pending:  # latest first: a node's users are decided before the node
            node = max(pending, key=self.order.__getitem__)
            pending.remove(node)
            if node in kept or node.op == "placeholder" and node in self.traced.user_inputs:
                continue
            users = list(self.graph.successors(node))
            if users and all(u in consumers or u in dead for u in users):
                dead.add(node)
                for p in self.graph.predecessors(node):
                    if p not in consumers and p not in seen:
                        seen.add(p)
                        pending.add(p)
        return dead

    def branch_after(self, name: str, residuals: list[Residual]) -> set[fx.Node]:
        """The nodes of a zero unit's branch after it, outside it (a parent's layer scale or post-norm)."""
        region = self.regions[name]
        return {node for residual in residuals for node in residual.branch_nodes - region
                if any(a in region for a in nx.ancestors(self.graph, node))}

    def outside_params(self, name: str, nodes: set[fx.Node]) -> set[str]:
        return {p for n in nodes for p in self.traced.param_uses.get(n, ()) if not p.startswith(name + ".")}

    def fed(self) -> set[fx.Node]:
        """The nodes computed from the model's inputs (the rest are computed from weights alone)."""
        if self._fed is None:
            inputs = self.traced.user_inputs
            self._fed = set(inputs).union(*(nx.descendants(self.graph, i) for i in inputs))
        return self._fed

    def readers(self) -> dict[str, list[fx.Node]]:
        """Each parameter's reading nodes."""
        if self._readers is None:
            self._readers = {}
            for node, params in self.traced.param_uses.items():
                for p in params:
                    self._readers.setdefault(p, []).append(node)
        return self._readers

    def owned_modules(self, name: str, nodes: set[fx.Node]) -> list[str]:
        """The outermost modules with weights that run only as ``nodes``, once per forward, outside unit ``name``."""
        found: list[str] = []
        scopes = {s for n in nodes for s in self.traced.scopes[n]}
        for module_name in sorted(scopes, key=lambda s: (s.count("."), s)):
            module = self.modules.get(module_name)
            if (module is None or module_name == name or module_name.startswith(name + ".")
                    or any(module_name.startswith(f + ".") for f in found)
                    or next(module.parameters(), None) is None):
                continue
            if self.regions[module_name] <= nodes and self.traced.call_counts.get(module_name, 1) == 1:
                found.append(module_name)
        return found

    def reshaping(self, name: str) -> str | None:
        """How owned module ``name`` may not keep its input's shape (None: it keeps it). A skipped
        unit's owned module returns zeros shaped like its first argument in its output's place."""
        call = self.measured.calls.get(name) if self.measured else None
        if call is not None:
            before, after = call.arg_shapes.get(0), call.output_shape
            if before is not None and before == after:
                return None
            if before is None or after is None:
                return "does not take and return one tensor"
            return f"changes its input's shape from {list(before)} to {list(after)}"
        if isinstance(self.modules[name], _SHAPE_KEEPING) and 0 in self.traced.call_args.get(name, {}):
            return None
        return "may change its input's shape (pass example inputs to check)"

    def keeps_zeros(self, node: fx.Node, branch: set[fx.Node]) -> bool:
        """Whether ``node`` maps an all-zero branch value to zeros (``gamma * f(x)``, a reshape, dropout)."""
        if node.op == "call_module":
            return isinstance(self.modules.get(str(node.target)), _ZERO_KEEPING_MODULES)
        name = op_name(node).removeprefix("__").removesuffix("__")
        if name in ("div", "truediv", "div_"):
            return bool(node.args) and node.args[0] in branch  # zeros divided, not dividing
        return name in _ZERO_KEEPING

    def op_label(self, node: fx.Node) -> str:
        return str(node.target) if node.op == "call_module" else (op_name(node) or node.name)

    def kept_when_skipped(self, name: str, drop: DropRule, residuals: list[Residual],
                          output: ObservedOutput | None) -> set[fx.Node] | None:
        """The unit's argument nodes a skipped unit still returns (the stream of an identity unit,
        pass-through elements); None when they cannot be told apart (torch.export, no call record)."""
        returned = [leaf.source for leaf in (output.leaves if output else []) if leaf.kind == "input"]
        if drop == "zero" and not returned:
            return set()  # returns zeros: its argument's values are not used
        args = self.traced.call_args.get(name)
        if args is None:
            return None
        kept = {args[key] for key in returned if key in args}
        if drop == "identity":
            kept.add(residuals[0].origin)
        return kept

    def stream_node(self, name: str, drop: DropRule, residuals: list[Residual]) -> fx.Node | None:
        """The graph node of the unit's stream output: after its residual adds, or its branch."""
        if drop == "identity":
            found = self.stream_outputs(name, residuals[0].add)
        else:
            found = [o for o in self.outputs(name) if o is residuals[0].branch or o in residuals[0].branch_nodes]
        return found[0] if len(found) == 1 else None

    def stream_argument(self, name: str, residual: Residual) -> int | str | None:
        if name in self.traced.call_args:
            for key, node in self.traced.call_args[name].items():
                if node is residual.origin or node in residual.branch_nodes:
                    return key
            return None
        if self.measured is None or name not in self.measured.calls:
            return 0
        call = self.measured.calls[name]
        shape = call.output_shape or next((leaf.shape for leaf in call.output.leaves if leaf.kind == "tensor"), None)
        return next((k for k, s in call.arg_shapes.items() if s == shape), None)


@dataclass
class _Unit:
    """A unit being chosen: its block, where its first residual add is, whether it is a plain branch."""

    start: int  # graph position of its first residual add: units are listed in stream order
    block: Block
    plain: bool = False  # a zero unit whose module holds every weight its branch reads


def _module_name(name: str) -> str:
    """The module of a call: a shared module's later calls are named ``layer@1`` in the graph."""
    return name.split("@")[0]


def _inside(inner: str, outer: str) -> bool:
    return inner.startswith(outer + ".")


def _common_depth(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """How many outer modules two scopes share."""
    depth = 0
    while depth < min(len(a), len(b)) and a[depth] == b[depth]:
        depth += 1
    return depth


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


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

"""Choose the units: assign residual adds to the modules a training step can skip.

* At layer granularity, a module whose input is the stream and whose output is the stream after
  one or more residual updates is an ``identity`` unit (a layer); a stack of layers (a ResNet
  stage) is not one, its layers are. A refused layer gives way to the plain branches inside it.
* Each residual branch no layer holds is a ``zero`` unit (``granularity="branch"``: every branch).

For each unit chosen, :class:`~raptr_fx.unit_facts.UnitFactFinder` gathers the facts and
``skipping.judge`` gives the verdict; :meth:`UnitChoice.blocks` returns them as blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx
from torch import nn

from .module_graph import ModuleGraph
from .probe import Probe
from .residuals import Residual
from .skipping import Owned, judge, shared_reason
from .unit_facts import UnitFactFinder
from .units import Block, DropRule, Granularity

__all__ = ["UnitChoice"]


class UnitChoice:
    """The units of one discovery at one granularity (:meth:`blocks`), with the refused layers whose
    branches are units in their place (``replaced``)."""

    def __init__(self, model: nn.Module, module_graph: ModuleGraph, residuals: list[Residual],
                 links: list[Residual], measured: Probe | None, fact_finder: UnitFactFinder,
                 granularity: Granularity = "layer"):
        self.model = model
        self.granularity = granularity
        # Parameter-free adds x + g(x): a layer's stream may start with one (FNet: LN(x + fft(x))).
        self.links = list(links)
        self.modules = dict(model.named_modules())
        self.module_graph = module_graph
        self.traced = module_graph.traced
        self.graph = module_graph.graph
        self.regions = module_graph.regions
        self.order = module_graph.order
        self.residuals = residuals
        self.measured = measured
        self.fact_finder = fact_finder
        self.late_starts: dict[str, str | None] = {}  # module -> why it is no layer, see late_start
        self.candidates: dict[str, list[Residual]] | None = None  # see layer_candidates
        self.stacks: set[str] = set()  # candidates that are stacks of layers, see stack
        self.replaced: list[Block] = []  # refused layers whose branches are units instead, see layer_or_inner
        self.droppable_layers: list[str] | None = None  # branch granularity: what layer granularity gates

    # -- identity units ----------------------------------------------------------------
    def layer_candidates(self) -> dict[str, list[Residual]]:
        """Modules whose input is the stream and whose output is the stream after residual updates."""
        if self.candidates is not None:
            return self.candidates
        candidates = self.candidates = {}
        for name in self.regions:
            inside = self.stream_updates(name)
            if not inside or inside[0].origin not in self.module_graph.inputs(name):
                continue
            if len(self.module_graph.stream_outputs(name, inside[0].add)) == 1:
                candidates[name] = inside
        return candidates

    def stream_updates(self, name: str) -> list[Residual]:
        """The residual adds inside module ``name``, after the add that starts its stream, if any."""
        inside = [r for r in self.residuals if self.module_graph.contained(name, r)]
        if not inside:
            return []
        inputs = self.module_graph.inputs(name)
        # A stream update that is no unit on the module's input starts its stream (FNet's Fourier
        # mixing, MRA's bias-only attention, then post-LN): skipped, the layer returns that input,
        # removing the update with the rest.
        starts = [r for r in self.links if self.module_graph.contained(name, r) and r.origin in inputs
                  and self.order[r.add] < self.order[inside[0].add]]
        return starts[:1] + inside

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
        listed = (self.list_entry(name, part.split("@")[0]) for part in parts if part is not None)
        entries = {entry for entry in listed if entry is not None}
        by_list: dict[str, list[type]] = {}
        for entry in entries:
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
                if self.module_graph.outputs(name) != [node]:
                    return found
                if any(p.startswith(name + ".") for p in residual.params):
                    size = sum(p.numel() for p in self.modules[name].parameters())
                    if found is None or size > 2 * weights:
                        found, weights = name, size
                inputs = [n for n in self.module_graph.inputs(name) if n in residual.branch_nodes]
            else:
                inputs = [n for n in node.all_input_nodes if n in residual.branch_nodes]
            if len(inputs) != 1 or found is not None and any(
                    u not in residual.branch_nodes for u in self.graph.successors(inputs[0])):
                return found
            node = inputs[0]

    # -- assembly ----------------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """The units, in stream order, numbered."""
        units = self.plan() if self.granularity == "layer" else self.branch_units(self.residuals)
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
        rest = [r for r in self.residuals
                if r not in covered and (within is None or self.module_graph.contained(within, r))]
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
        facts = self.fact_finder.facts(name, module, drop, residuals,
                                       self.zero_fix(residuals[0]) if drop == "zero" else "")
        verdict = judge(facts)
        owned = facts.owned if not facts.owned.refused else Owned()
        params += sum(self.model.get_parameter(p).numel() for p in owned.params)
        if flops is not None:
            assert self.measured is not None  # flops are only set from a measurement
            flops += sum(self.measured.flops.get(m, 0) for m in owned.before + owned.after) / self.measured.total_flops
        return Block(name, index, drop, type(module).__name__, params, flops, verdict.reason is None,
                     verdict.reason, verdict.stream_position, verdict.stream_name,
                     verdict.output_container, verdict.output_slots, owned.params, owned.before, owned.after)

    def zero_fix(self, residual: Residual) -> str:
        """What to do about a refused zero unit: at layer granularity, the modules around its add
        were tried as layers already, so asking for granularity='layer' would not help."""
        if self.granularity == "branch" and any(self.module_graph.contained(n, residual)
                                                 for n in self.layers_at_layer_granularity()):
            return "use granularity='layer'"
        scope = self.traced.scopes.get(residual.add, ())
        if scope:
            name = scope[-1]
            if name not in self.late_starts:  # one answer per module, however many branches it holds
                self.late_starts[name] = self.late_start(name)
            late = self.late_starts[name]
            if late:
                return late
        return "no module around it is a layer (one taking the stream as an input and returning it once)"

    def layers_at_layer_granularity(self) -> list[str]:
        """The droppable layers that layer granularity gates (asked at branch granularity, so that a
        refused branch's hint names a granularity that would help)."""
        if self.droppable_layers is None:
            # A choice of its own: at layer granularity, zero_fix does not ask this again.
            at_layer = UnitChoice(self.model, self.module_graph, self.residuals, self.links, self.measured,
                                  self.fact_finder, "layer")
            self.droppable_layers = [u.block.name for u in at_layer.plan()
                                     if u.block.drop == "identity" and u.block.droppable]
        return self.droppable_layers

    def late_start(self, name: str) -> str | None:
        """Why module ``name`` is no layer when it returns the stream once but runs weights on it
        before its first residual add (RWKV's block 0 normalizes it first)."""
        inside = self.stream_updates(name)
        inputs = self.module_graph.inputs(name)
        if not inside or inside[0].origin in inputs or len(self.module_graph.stream_outputs(name, inside[0].add)) != 1:
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

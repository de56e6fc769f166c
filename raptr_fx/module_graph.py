"""A traced model's dataflow graph with the region of every module: facts both analyses read.

Discovery computes it once (:class:`~raptr_fx.discovery.Discovery` keeps it as ``module_graph``);
choosing the units (``unit_choice``), judging them (``unit_facts``) and finding width groups
(``width``) ask it where a module's computation starts and ends.
"""

from __future__ import annotations

import networkx as nx
from torch import fx

from .residuals import Residual
from .tracing import TracedModel

__all__ = ["ModuleGraph"]


class ModuleGraph:
    """The dataflow graph of a traced model (``residuals.dataflow_graph``) and each module's region:
    the graph nodes that run inside the module (a shared module's later calls are ``name@1``).

    Example:
        >>> graph = raptr_fx.discover(model, inputs).module_graph
        >>> graph.inputs("transformer.h.0")  # the value nodes its computation reads from outside it
        [transformer_drop]
    """

    def __init__(self, traced: TracedModel, graph: nx.DiGraph):
        self.traced = traced
        self.graph = graph
        self.order = {n: i for i, n in enumerate(traced.graph.nodes)}
        self.regions: dict[str, set[fx.Node]] = {}
        for node, scope in traced.scopes.items():
            for name in scope:
                self.regions.setdefault(name, set()).add(node)

    def inputs(self, name: str) -> list[fx.Node]:
        """The value nodes outside module ``name`` that its computation reads, in graph order."""
        region = self.regions[name]
        found = {p for n in region for p in self.graph.predecessors(n)
                 if p not in region and self.traced.is_value(p)}
        return sorted(found, key=self.order.__getitem__)

    def outputs(self, name: str) -> list[fx.Node]:
        """The value nodes of module ``name`` read outside it (or returned by the model), in graph order."""
        region = self.regions[name]
        user_outputs = set(self.traced.user_outputs)
        found = [n for n in region if self.traced.is_value(n) and (
            n in user_outputs or any(s not in region and s.op != "output" for s in self.graph.successors(n)))]
        return sorted(found, key=self.order.__getitem__)

    def contained(self, name: str, residual: Residual) -> bool:
        """Whether the residual add, its branch and its shortcut all run inside module ``name``."""
        region = self.regions[name]
        return residual.add in region and residual.branch_nodes <= region and residual.shortcut <= region

    def stream_outputs(self, name: str, first_add: fx.Node) -> list[fx.Node]:
        """The outputs of module ``name`` that carry the stream after its first residual add."""
        return [o for o in self.outputs(name) if o is first_add or first_add in nx.ancestors(self.graph, o)]


"""What both width-group finders read: the projections inside the units, on discovery's graph.

A projection is an ``nn.Linear`` or Hugging Face's ``Conv1D`` (``weight`` stored as ``[in,
out]``), or a linear layer with an adapter (``base(x) + B(A(x)) * s``, LoRA; see
``residuals.Adapter``) taken as one projection named after the module holding both. The MLP
finder (``mlp_groups.py``) and the head finder (``head_groups.py``) walk the module graph
between projections; :class:`WidthFacts` says where each projection's output is, how often it
runs, and which of an adapted layer's projections a cut narrows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import torch
from torch import fx, nn

from .module_graph import ModuleGraph
from .residuals import find_adapters
from .tracing import is_shape_query
from .units import Projection, WidthGroup, projection_of

__all__ = ["WidthFacts"]


class WidthFacts:
    """The projections of a model inside its module graph's regions, and where their outputs are.

    Example:
        >>> facts = WidthFacts(model, raptr_fx.discover(model, inputs).module_graph)  # nanoGPT
        >>> facts.projections["transformer.h.0.mlp.c_fc"]
        Projection(name='transformer.h.0.mlp.c_fc', in_features=16, out_features=64, transposed=False)
    """

    def __init__(self, model: nn.Module, module_graph: ModuleGraph):
        self.model = model
        self.module_graph = module_graph
        self.traced = module_graph.traced
        self.graph = module_graph.graph
        modules = dict(model.named_modules())
        self.modules = modules
        self.projections = {name: p for name, m in modules.items()
                            if (p := projection_of(name, m)) is not None and name in module_graph.regions}
        # A linear layer with an adapter is one projection; the ones inside it are its parts.
        self.adapted: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {}
        for adapted in sorted({a.module for a in find_adapters(self.traced, self.graph)}, key=lambda n: n.count(".")):
            if not any(adapted.startswith(outer + ".") for outer in self.adapted):  # not a part of one already
                self.adapt(adapted)
        self.output_of: dict[fx.Node, str] = {}  # a projection's output node -> its name
        for name in self.projections:
            outputs = module_graph.outputs(name)
            if len(outputs) == 1:
                self.output_of[outputs[0]] = name
        self.calls = self.traced.call_counts
        self.order = module_graph.order

    def adapt(self, name: str) -> None:
        """Make the linear layer ``name`` and its adapter one projection (see the module docstring)."""
        region = self.module_graph.regions[name]
        inner = {p: self.module_graph.regions[p] for p in self.projections if p.startswith(name + ".")}
        parts = [self.projections.pop(p) for p in inner]
        owner = {n: p for p, nodes in inner.items() for n in nodes}

        def reaches_another(part: str, backwards: bool) -> bool:
            """Whether ``part`` reads (backwards) or feeds another projection inside ``name``."""
            stack = list(self.module_graph.inputs(part) if backwards else self.module_graph.outputs(part))
            seen = set()
            while stack:
                node = stack.pop()
                if node in seen or node not in region:
                    continue
                seen.add(node)
                if owner.get(node, part) != part:
                    return True
                stack.extend(self.graph.predecessors(node) if backwards else self.graph.successors(node))
            return False

        writers = tuple(p.name for p in parts if not reaches_another(p.name, backwards=False))
        readers = tuple(p.name for p in parts if not reaches_another(p.name, backwards=True))
        raw = sorted({w for n in region - owner.keys() for w in self.traced.param_uses.get(n, ())})
        ins = {p.in_features for p in parts if p.name in readers}
        outs = {p.out_features for p in parts if p.name in writers}
        problem = None
        if raw:
            problem = (f"{name} is a linear layer with an adapter, and it runs weights that are no nn.Linear or "
                       f"Conv1D projection ({', '.join(raw)}): a cut could not narrow them with the layer")
        elif len(ins) != 1 or len(outs) != 1:
            problem = f"the projections of {name} and its adapter do not all read and write the same features"
        weight = getattr(self.modules[name], "weight", None)
        if ins and outs:
            features = (min(ins), max(outs))
        elif isinstance(weight, torch.Tensor) and weight.dim() == 2:  # all weights its own: [out, in]
            features = (weight.shape[1], weight.shape[0])
        else:
            return  # no projection we can size: no group will hold it
        self.projections[name] = Projection(name, *features, False)
        self.adapted[name] = (writers, readers, problem)

    def through_adapters(self, group: WidthGroup) -> WidthGroup:
        """Cut a linear layer with an adapter through its projections (or refuse, saying why not)."""
        if not any(m in self.adapted for m in group.modules):
            return group
        last = len(group.modules) - 1
        targets = tuple((self.adapted[m][0] if i < last else self.adapted[m][1]) if m in self.adapted else (m,)
                        for i, m in enumerate(group.modules))
        group = replace(group, targets=targets)
        problem = next((self.adapted[m][2] for m in group.modules if m in self.adapted and self.adapted[m][2]), None)
        return group if problem is None or not group.droppable else replace(group, droppable=False, reason=problem)

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The inputs of ``node`` that carry tensor data: tensors, or tuples of them (``split``)."""
        return [a for a in node.all_input_nodes if not is_shape_query(a) and (
            self.traced.is_value(a) or (a.op != "get_attr" and isinstance(a.meta.get("val"), (tuple, list))))]

    def call_problem(self, modules: Iterable[str]) -> str | None:
        """Why projections that run more than once per forward (shared weights) cannot be cut, if any do."""
        for name in modules:
            if self.calls.get(name, 1) > 1:
                return f"{name} runs {self.calls[name]} times per forward (shared weights)"
        return None

    def first_node(self, name: str) -> int:
        """Where module ``name`` first runs, in graph order (inside a leaf module: where that runs)."""
        while name and name not in self.module_graph.regions:
            name = name.rpartition(".")[0]
        return min((self.order[n] for n in self.module_graph.regions.get(name, ())), default=0)

    def params(self, modules: Iterable[str]) -> int:
        """Parameters in ``modules``."""
        return sum(p.numel() for m in modules for p in self.modules[m].parameters())

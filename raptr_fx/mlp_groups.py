"""MLP width groups: projections that make H hidden units and the one that reads them back.

Producers map the stream to H hidden units (``fc``, or ``gate`` and ``up`` of a gated MLP), only
elementwise ops run between them (activation, the gating product, dropout), and one consumer maps
H back (``c_fc -> gelu -> c_proj``; ``down(act(gate(x)) * up(x))``). Producers computing k of the H
rows and the consumer reading the same k columns compute exactly the sub-MLP of those k units.
:class:`MlpGroupFinder` finds them by walking back from each projection's input.
"""

from __future__ import annotations

import operator
from dataclasses import replace

from torch import fx, nn

from .residuals import op_name
from .units import Projection, WidthGroup
from .width_facts import WidthFacts

__all__ = ["MlpGroupFinder"]

_ELEMENTWISE = {
    "gelu", "relu", "silu", "sigmoid", "tanh", "erf", "exp", "neg", "abs", "pow", "sqrt", "square",
    "mul", "add", "sub", "div", "truediv", "clamp", "clamp_min", "clamp_max", "hardtanh", "leaky_relu",
    "elu", "selu", "celu", "softplus", "mish", "relu6", "hardswish", "hardsigmoid", "log_sigmoid",
    "dropout", "native_dropout", "feature_dropout", "to", "_to_copy", "type", "float", "half", "bfloat16",
    "clone", "contiguous", "alias", "detach", "gelu_", "relu_", "silu_", "mul_", "add_", "dropout_",
}
_ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.LeakyReLU,
                        nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.Softplus,
                        nn.Hardtanh)


class MlpGroupFinder:
    """The MLP groups of each unit (:meth:`mlp_groups`), cuttable or refused with the reason."""

    def __init__(self, facts: WidthFacts):
        self.facts = facts

    def mlp_groups(self, unit: str, region: set[fx.Node], inside: list[Projection]) -> list[WidthGroup]:
        """The groups whose consumer is one of the projections ``inside`` unit ``unit`` (``region``)."""
        groups = []
        for consumer in inside:
            inputs = self.facts.module_graph.inputs(consumer.name)
            if len(inputs) != 1:
                continue
            found = self.hidden_path(inputs[0], region, consumer.name)
            if found is None:
                continue  # not an MLP consumer (attention output, first projection of the unit)
            producers, problem = found
            modules = (*sorted(producers, key=lambda n: self.facts.first_node(n)), consumer.name)
            hidden = consumer.in_features
            group = WidthGroup(unit, "mlp", hidden, modules, parts=hidden, part_widths=(1,) * len(modules),
                               params=self.facts.params(modules))
            problem = problem or self.mlp_problem(producers, consumer)
            groups.append(group if problem is None else replace(group, droppable=False, reason=problem))
        return groups

    def hidden_path(self, start: fx.Node, region: set[fx.Node], consumer: str) -> tuple[set[str], str | None] | None:
        """Walk back from a consumer's input through elementwise ops to the producer projections.

        None when the walk meets no producer at all or a non-elementwise op first (this projection
        is not an MLP consumer); else the producers and, if any, why the path cannot be cut.
        """
        producers: set[str] = set()
        path: set[fx.Node] = set()
        stack = [start]
        problem = None
        while stack:
            node = stack.pop()
            if node in path:
                continue
            if node in self.facts.output_of and node in region:
                producers.add(self.facts.output_of[node])
                continue
            if node not in region or not self.elementwise(node):
                return None
            path.add(node)
            wide = [p for p in self.facts.traced.param_uses.get(node, ())
                    if self.facts.model.get_parameter(p).numel() > 1]
            if wide and problem is None:
                problem = f"the hidden units pass through a parameter of their own ({wide[0]}), which a cut would need to narrow too"
            stack.extend(self.facts.tensor_inputs(node))
        if not producers:
            return None
        # Nothing else may read the hidden activations: they would see a narrowed tensor.
        if problem is None:
            allowed = path | {n for p in (*producers, consumer) for n in self.facts.module_graph.regions[p]}
            readers = sorted({user.name for node in allowed - self.facts.module_graph.regions[consumer]
                              for user in self.facts.graph.successors(node) if user not in allowed})
            if readers:
                problem = f"the hidden units are also read outside the MLP (by {readers[0]})"
        return producers, problem

    def elementwise(self, node: fx.Node) -> bool:
        """Whether ``node`` acts on each hidden unit on its own (a cut computes it for the kept ones)."""
        if node.op == "call_module":
            return isinstance(self.facts.modules.get(str(node.target)), _ELEMENTWISE_MODULES)
        if node.op not in ("call_function", "call_method"):
            return False
        if node.target is operator.getitem:  # element 0 of native_dropout's (output, mask)
            source, index = node.args[0], node.args[1]
            return isinstance(source, fx.Node) and op_name(source) == "native_dropout" and isinstance(index, int) and index == 0
        return op_name(node) in _ELEMENTWISE

    def mlp_problem(self, producers: set[str], consumer: Projection) -> str | None:
        """Why producers and consumer are no hidden layer a cut can narrow, if they are not."""
        for name in sorted(producers):
            producer = self.facts.projections[name]
            if producer.out_features != consumer.in_features:
                return (f"{name} makes {producer.out_features} features but {consumer.name} reads "
                        f"{consumer.in_features}: not one hidden layer")
        return self.facts.call_problem((*producers, consumer.name))

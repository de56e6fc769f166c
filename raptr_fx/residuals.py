"""Find residual adds in a traced graph.

A residual add combines the stream ``x`` with a branch computed from ``x``::

    x + f(x)      f(x) + x      torch.add(x, f(x))      x += f(x)
    x + gamma * f(x)                      (layer scale)
    x + attn(ln(x)) + mlp(ln(x))          (parallel branches)
    proj(x) + f(x)                        (projection shortcut)

Not residual: ``f(x) + g(x)`` where neither side is the stream, adds of
parameters or constants (position embeddings), concatenation skips.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import networkx as nx
import torch
from torch import fx

from .tracing import TracedModel, is_shape_query

__all__ = ["Residual", "dataflow_graph", "find_residuals"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_ADD_ATEN = {"aten.add.Tensor", "aten.add_.Tensor"}
# Ops that pass the stream on unchanged in value (export records RMSNorm's ``x.to(float32)`` this way).
_PASS_THROUGH = {"to", "_to_copy", "alias", "clone", "contiguous", "detach", "type", "float"}
# A projection shortcut is short (conv + norm); a residual branch is longer than its shortcut.
_MAX_SHORTCUT_OPS = 3


@dataclass(frozen=True, eq=False)
class Residual:
    """One residual add: ``add = stream + branch``, the branch computed from ``origin``."""

    add: fx.Node
    stream: fx.Node  # the operand that carries the stream into the add
    branch: fx.Node  # the operand the branch computed
    origin: fx.Node  # the stream value the branch was computed from
    branch_nodes: frozenset[fx.Node]  # every node on a path origin -> branch
    params: frozenset[str]  # parameters the branch reads
    shortcut: frozenset[fx.Node] = frozenset()  # projection shortcut nodes; empty for identity


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS or str(node.target) in _ADD_ATEN
    return node.op == "call_method" and node.target in _ADD_METHODS


def dataflow_graph(traced: TracedModel) -> nx.DiGraph:
    """The graph of value flow: shape queries cut, so ``arange(x.size(1))`` does not depend on ``x``."""
    graph = nx.DiGraph()
    for node in traced.graph.nodes:
        graph.add_node(node)
        for arg in node.all_input_nodes:
            if not is_shape_query(arg):
                graph.add_edge(arg, node)
    return graph


def _before_pass_through(node: fx.Node) -> fx.Node:
    while True:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op not in ("call_method", "call_function") or str(name).split(".")[0] not in _PASS_THROUGH:
            return node
        inputs = [a for a in node.all_input_nodes if not is_shape_query(a)]
        if len(inputs) != 1:
            return node
        node = inputs[0]


def _compute_ops(nodes: frozenset[fx.Node]) -> int:
    return sum(1 for n in nodes if not (n.op == "call_function" and n.target is operator.getitem))


def find_residuals(traced: TracedModel, graph: nx.DiGraph) -> list[Residual]:
    """Every residual add of ``traced``, in graph order."""
    ancestors: dict[fx.Node, set[fx.Node]] = {}
    descendants: dict[fx.Node, set[fx.Node]] = {}
    order = {n: i for i, n in enumerate(traced.graph.nodes)}

    def anc(node: fx.Node) -> set[fx.Node]:
        if node not in ancestors:
            ancestors[node] = nx.ancestors(graph, node)
        return ancestors[node]

    def path(origin: fx.Node, end: fx.Node) -> frozenset[fx.Node]:
        if origin not in descendants:
            descendants[origin] = nx.descendants(graph, origin)
        return frozenset(descendants[origin] & anc(end)) | {end}

    def params_of(nodes: frozenset[fx.Node]) -> frozenset[str]:
        return frozenset().union(*(traced.param_uses.get(n, frozenset()) for n in nodes))

    def carries_data(node: fx.Node) -> bool:
        """The stream is computed from the caller's inputs and is floating point (not ids or masks)."""
        fed = node in user_inputs or not user_inputs.isdisjoint(anc(node))
        return fed and traced.is_float(node)

    user_inputs = set(traced.user_inputs)
    found: dict[fx.Node, Residual] = {}
    for node in traced.graph.nodes:
        if not is_add(node):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2 or not all(traced.is_value(a) for a in operands):
            continue
        residual = _classify(node, *operands, anc=anc, path=path, params_of=params_of, found=found, order=order)
        if residual is not None and residual.params and carries_data(residual.origin):
            origin = _before_pass_through(residual.origin)
            if origin is not residual.origin:
                residual = replace(residual, origin=origin,
                                   branch_nodes=residual.branch_nodes | path(origin, residual.origin))
            found[node] = residual
    return list(found.values())


def _classify(add, u, v, *, anc, path, params_of, found, order) -> Residual | None:
    # x + f(x): one operand is computed from the other.
    for stream, branch in ((v, u), (u, v)):
        if stream in anc(branch):
            nodes = path(stream, branch)
            return Residual(add, stream, branch, stream, nodes, params_of(nodes))
    # (x + f(x)) + g(x): a second branch from the same origin, added to the updated stream.
    for stream, branch in ((u, v), (v, u)):
        previous = found.get(stream)
        if previous is not None and previous.origin in anc(branch):
            nodes = path(previous.origin, branch)
            return Residual(add, stream, branch, previous.origin, nodes, params_of(nodes))
    # proj(x) + f(x): both sides computed from x, one a short parametrised shortcut.
    common = anc(u) & anc(v)
    if not common:
        return None
    origin = max(common, key=order.__getitem__)
    for shortcut, branch in ((u, v), (v, u)):
        short_nodes, branch_nodes = path(origin, shortcut), path(origin, branch)
        if (
            _compute_ops(short_nodes) <= _MAX_SHORTCUT_OPS
            and _compute_ops(branch_nodes) > _compute_ops(short_nodes)
            and params_of(short_nodes)
        ):
            return Residual(add, shortcut, branch, origin, branch_nodes, params_of(branch_nodes), short_nodes)
    return None

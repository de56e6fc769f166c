"""Find residual adds in a traced graph.

A residual add combines the stream ``x`` with a branch computed from ``x``::

    x + f(x)      f(x) + x      torch.add(x, f(x))      x += f(x)
    x + gamma * f(x)                      (layer scale)
    x + attn(ln(x)) + mlp(ln(x))          (parallel branches)
    proj(x) + f(x)                        (projection shortcut)
    a * x + b * f(x)                      (constant-scaled shortcut: MiniMax, Beam; never skippable)
    q + attn(q, context=x)                (q a learned token: the stream starts from weights)

Not residual: ``f(x) + g(x)`` where neither side is the stream, adds of
parameters or constants (position embeddings), concatenation skips, and a linear layer with an
adapter, ``W x + B(A(x))`` inside one module (LoRA): two linear maps of the module's input that
both run weights sum to one linear map, so dropping either side changes a weight, not the depth
(:func:`find_adapters` lists them).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import networkx as nx
import torch
from torch import fx, nn

from .tracing import TracedModel, is_shape_query

__all__ = ["Adapter", "Residual", "dataflow_graph", "find_adapters", "find_residuals"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_ADD_ATEN = {"aten.add.Tensor", "aten.add_.Tensor"}
# Ops that pass the stream on unchanged in value (export records RMSNorm's ``x.to(float32)`` this way),
# and reshapes: the values stay, only the layout changes (a unit that does not restore the shape is
# caught by the shape check).
_PASS_THROUGH = {"to", "_to_copy", "alias", "clone", "contiguous", "detach", "type", "float",
                 "view", "reshape", "_unsafe_view", "flatten", "unflatten"}
# Ops that read only their input's shape, dtype and device (``torch.ones_like(x)`` builds a mask):
# no data flows from the input to them.
_METADATA_FACTORIES = {"ones_like", "zeros_like", "empty_like", "full_like", "new_ones", "new_zeros",
                       "new_empty", "new_full"}
# ``a.expand_as(b)`` and the like: the values are a's, b gives only its shape or dtype
# (GPT-NeoX-Japanese adds ``dense_bias.expand_as(residual)``: no shortcut through the residual).
_LIKE_SECOND = {"expand_as", "view_as", "reshape_as", "type_as"}
# Ops linear in the one operand they read from a value (the other is a weight, a constant or a mask):
# a path of them from x is a linear (affine, with biases) map of x.
_LINEAR = {"linear", "matmul", "mm", "bmm", "addmm", "conv1d", "conv2d", "conv3d", "convolution", "t",
           "transpose", "permute", "neg", "mul", "mul_", "rmul", "div", "div_", "truediv", "dropout",
           "native_dropout", "feature_dropout", "alpha_dropout", "dropout_", *_PASS_THROUGH}
_SUMS = {"add", "add_", "iadd", "radd", "sub", "sub_", "isub"}  # of linear maps: linear whatever they add
_LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.dropout._DropoutNd, nn.Identity)
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
    shortcut_scale: float | None = None  # the shortcut is ``x * shortcut_scale`` (a constant, no weights)


@dataclass(frozen=True, eq=False)
class Adapter:
    """``base(x) + adapter(x)`` inside one module: both sides linear maps of the module's input ``x``
    that run weights (LoRA's ``W x + B(A(x)) * s``). One linear layer, not a residual add."""

    add: fx.Node
    module: str  # the module whose forward adds them: the linear layer with its adapter
    origin: fx.Node  # the module's input both sides are computed from
    nodes: frozenset[fx.Node]  # both sides, origin -> each operand of the add


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS or str(node.target) in _ADD_ATEN
    return node.op == "call_method" and node.target in _ADD_METHODS


def dataflow_graph(traced: TracedModel) -> nx.DiGraph:
    """The graph of value flow: shape queries cut, so ``arange(x.size(1))`` does not depend on ``x``."""
    graph = nx.DiGraph()
    order = {n: i for i, n in enumerate(traced.graph.nodes)}
    for node in traced.graph.nodes:
        graph.add_node(node)
        if op_name(node) in _METADATA_FACTORIES:
            continue
        for arg in node.all_input_nodes:
            if is_shape_query(arg) or (op_name(node) in _LIKE_SECOND and arg is not node.args[0]):
                continue
            graph.add_edge(arg, node)
        if _is_inplace(node):
            # ``h.add_(y)`` updates h: later readers of h read the update (torch.fx records them as
            # readers of h itself; torch.export's functional graph needs no help).
            target = node.args[0]
            for user in target.users:
                if order[user] > order[node] and not is_shape_query(user):
                    graph.add_edge(node, user)
    return graph


def _is_inplace(node: fx.Node) -> bool:
    name = op_name(node)
    return (node.op == "call_method" and name.endswith("_") and not name.startswith("_")
            and bool(node.args) and isinstance(node.args[0], fx.Node))


def op_name(node: fx.Node) -> str:
    """``clone`` for ``x.clone()``, ``torch.clone`` and ``aten.clone.default`` alike."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return str(getattr(node.target, "__name__", "")).split(".")[0]
    return ""


def _linear_in(origin: fx.Node, nodes: frozenset[fx.Node]) -> bool:
    """Every node of ``nodes`` (a path from ``origin``) is linear in what it reads from the path."""
    on_path = nodes | {origin}
    for node in nodes:
        reads = [a for a in node.all_input_nodes if a in on_path]
        name = op_name(node).removeprefix("__").removesuffix("__")
        if node.op == "call_module":
            stack = list(node.meta.get("nn_module_stack", {}).values())
            kind = stack[-1][1] if stack else None
            linear = isinstance(kind, type) and (issubclass(kind, _LINEAR_MODULES) or kind.__name__ == "Conv1D")
        elif node.op == "call_function" and node.target is operator.getitem:  # native_dropout's output
            source = node.args[0]
            linear = isinstance(source, fx.Node) and op_name(source) == "native_dropout" and bool(node.args[1] == 0)
        elif name in _SUMS:
            linear = True
        else:  # one operand from the path (x * x is not linear); a division divides it
            linear = name in _LINEAR and len(reads) == 1 and not (name.startswith("div") and node.args[0] not in on_path)
        if not linear:
            return False
    return True


def _before_pass_through(node: fx.Node, scopes: dict[fx.Node, tuple[str, ...]], within: tuple[str, ...]) -> fx.Node:
    """The value ``node`` copies, views or casts, walking back through such ops inside module ``within``.

    The walk stays inside the add's module: a reshape at the end of the previous layer belongs to
    that layer, so the stream a layer receives stays its input.
    """
    while (op_name(node) in _PASS_THROUGH and node.args and isinstance(node.args[0], fx.Node)
           and scopes.get(node, ())[:len(within)] == within):
        node = node.args[0]  # the tensor is the first argument; the rest are sizes, dtypes, devices
    return node


def _compute_ops(nodes: frozenset[fx.Node]) -> int:
    return sum(1 for n in nodes if not (n.op == "call_function" and n.target is operator.getitem))


class _Ancestry:
    """Every node's ancestors as a bitmask over graph order, built in one pass.

    Graph order is topological (arguments come before their users), so each mask is the OR of
    its predecessors' masks. Membership is one bit test and a path is found among the few nodes
    between its ends: no graph search per add, which was quadratic on 80-layer models.
    """

    def __init__(self, graph: nx.DiGraph, nodes: list[fx.Node]):
        self.nodes = nodes
        self.index = {n: i for i, n in enumerate(nodes)}
        self.bits: dict[fx.Node, int] = {}
        for node in nodes:
            mask = 0
            for parent in graph.predecessors(node):
                mask |= self.bits[parent] | (1 << self.index[parent])
            self.bits[node] = mask

    def is_ancestor(self, node: fx.Node, of: fx.Node) -> bool:
        return bool(self.bits[of] >> self.index[node] & 1)

    def any_ancestor(self, nodes: set[fx.Node], of: fx.Node) -> bool:
        return any(self.is_ancestor(n, of) for n in nodes)

    def latest_common(self, u: fx.Node, v: fx.Node) -> fx.Node | None:
        """The last node (in graph order) that both ``u`` and ``v`` are computed from."""
        common = self.bits[u] & self.bits[v]
        return self.nodes[common.bit_length() - 1] if common else None

    def path(self, origin: fx.Node, end: fx.Node) -> frozenset[fx.Node]:
        """Every node on a path ``origin -> end``, ``end`` included."""
        start = self.index[origin] + 1
        between = self.bits[end] >> start  # ancestors of end that come after origin
        found = {end}
        while between:
            low = between & -between
            node = self.nodes[start + low.bit_length() - 1]
            if self.is_ancestor(origin, node):
                found.add(node)
            between ^= low
        return frozenset(found)


def _add_operands(node: fx.Node, traced: TracedModel) -> list[fx.Node] | None:
    """The two tensor operands of an add, or None for anything else."""
    if not is_add(node):
        return None
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return operands if len(operands) == 2 and all(traced.is_value(a) for a in operands) else None


def _adapter(add: fx.Node, u: fx.Node, v: fx.Node, *, ancestry: _Ancestry, traced: TracedModel) -> Adapter | None:
    """``add`` as a linear layer with an adapter: ``u`` and ``v`` linear maps of one input of the
    module holding the add, computed inside it, each running weights of its own."""
    scope = traced.scopes.get(add, ())
    origin = ancestry.latest_common(u, v)
    if not scope or origin is None:
        return None

    def inside(node: fx.Node) -> bool:
        return traced.scopes.get(node, ())[:len(scope)] == scope

    if inside(_before_pass_through(origin, traced.scopes, scope)):
        return None  # computed from a value inside the module: not its input
    sides = [ancestry.path(origin, side) for side in (u, v)]
    for nodes in sides:
        params = set().union(*(traced.param_uses.get(n, ()) for n in nodes))
        if not params or not all(inside(n) for n in nodes) or not _linear_in(origin, nodes):
            return None
    return Adapter(add, scope[-1], origin, sides[0] | sides[1])


def find_adapters(traced: TracedModel, graph: nx.DiGraph) -> list[Adapter]:
    """Every add of a linear layer and its adapter (see :class:`Adapter`), in graph order."""
    ancestry = _Ancestry(graph, list(traced.graph.nodes))
    found = []
    for node in traced.graph.nodes:
        operands = _add_operands(node, traced)
        if operands is not None and (adapter := _adapter(node, *operands, ancestry=ancestry, traced=traced)):
            found.append(adapter)
    return found


def find_residuals(traced: TracedModel, graph: nx.DiGraph, parameter_free: bool = False) -> list[Residual]:
    """Every residual add of ``traced``, in graph order.

    A branch without parameters (``x + x ** 3`` inside a GELU) is no residual unit: nothing to
    drop. ``parameter_free=True`` returns instead the adds that update the stream without being a
    unit: ``x + g(x)`` with no weights in g (FNet's Fourier mixing) and ``x + c`` with c computed
    without any input (a bias; MRA's attention adds only its output bias when its CUDA kernel is
    missing). A layer whose stream starts with one is still a layer (see ``UnitChoice.layer_candidates``).
    """
    ancestry = _Ancestry(graph, list(traced.graph.nodes))

    def params_of(nodes: frozenset[fx.Node]) -> frozenset[str]:
        return frozenset().union(*(traced.param_uses.get(n, frozenset()) for n in nodes))

    def source(node: fx.Node, add: fx.Node) -> fx.Node:
        return _before_pass_through(node, traced.scopes, traced.scopes.get(add, ()))

    def fed(node: fx.Node) -> bool:
        return node in user_inputs or ancestry.any_ancestor(user_inputs, node)

    def carries_data(residual: Residual) -> bool:
        """The stream is floating point (not ids or masks) and computed from the caller's inputs, or
        starts from weights alone, a learned token its branch reads the inputs into (class attention,
        attention pooling: ``q = attn(q, context=x) + q``, ``q`` a parameter expanded to the batch)."""
        origin = residual.origin
        if not traced.is_float(origin):
            return False
        return fed(origin) or learned_token(residual)

    def learned_token(residual: Residual) -> bool:
        """A branch with weights of its own reads the inputs into a stream of weights that keeps its
        shape. Not a recurrence's state on weights (RWKV's ``max(state + decay, key)``: its branch
        reads only the decay, which broadcasts over the batch)."""
        if not fed(residual.branch):
            return False
        origin_weights = frozenset().union(*(traced.param_uses.get(n, frozenset())
                                             for n in nx.ancestors(graph, residual.origin) | {residual.origin}))
        shapes = [_shape(residual.origin), _shape(residual.add)]
        return bool(residual.params - origin_weights) and (None in shapes or shapes[0] == shapes[1])

    user_inputs = set(traced.user_inputs)
    found: dict[fx.Node, Residual] = {}
    for node in traced.graph.nodes:
        operands = _add_operands(node, traced)
        if operands is None:
            continue
        residual = _classify(node, *operands, ancestry=ancestry, params_of=params_of, found=found,
                             source=lambda n, add=node: source(n, add), traced=traced)
        if residual is None and parameter_free:
            residual = _offset(node, *operands, fed=fed)
        if residual is not None and bool(residual.params) != parameter_free and carries_data(residual):
            origin = source(residual.origin, node)
            if origin is not residual.origin:
                residual = replace(residual, origin=origin,
                                   branch_nodes=residual.branch_nodes | ancestry.path(origin, residual.origin))
            found[node] = residual
    return list(found.values())


def _classify(add, u, v, *, ancestry: _Ancestry, params_of, found, source, traced: TracedModel) -> Residual | None:
    # x + f(x): one operand is computed from the other, or from the value it copies
    # (``h = x.clone(); h += f(x)``).
    for stream, branch in ((v, u), (u, v)):
        for origin in (stream, source(stream)):
            if ancestry.is_ancestor(origin, branch):
                nodes = ancestry.path(origin, branch)
                return Residual(add, stream, branch, origin, nodes, params_of(nodes))
    # (x + f(x)) + g(x): a second branch from the same origin, added to the updated stream.
    for stream, branch in ((u, v), (v, u)):
        previous = found.get(stream)
        if previous is not None and ancestry.is_ancestor(previous.origin, branch):
            nodes = ancestry.path(previous.origin, branch)
            return Residual(add, stream, branch, previous.origin, nodes, params_of(nodes))
    # W x + B(A(x)) inside one module: a linear layer with an adapter, not a shortcut and a branch.
    if _adapter(add, u, v, ancestry=ancestry, traced=traced) is not None:
        return None
    # proj(x) + f(x): both sides computed from x, one a short parametrised shortcut.
    origin = ancestry.latest_common(u, v)
    if origin is None:
        return None
    # a * x + f(x): a shortcut scaled by a constant (the branch's own scale is part of the branch).
    for shortcut, branch in ((u, v), (v, u)):
        short_nodes, branch_nodes = ancestry.path(origin, shortcut), ancestry.path(origin, branch)
        short_params, branch_params = params_of(short_nodes), params_of(branch_nodes)
        scale = _constant_scale(short_nodes)
        if (
            _compute_ops(short_nodes) <= _MAX_SHORTCUT_OPS
            and _compute_ops(branch_nodes) > _compute_ops(short_nodes)
            and (short_params or scale is not None)
            # m * x + (1 - m) * shift(x) mixes two views of x by the shortcut's weights (RWKV's time
            # mix): a branch with no weights of its own has nothing to drop.
            and not (short_params and branch_params <= short_params)
        ):
            return Residual(add, shortcut, branch, origin, branch_nodes, branch_params, short_nodes, scale)
    return None


def _offset(add: fx.Node, u: fx.Node, v: fx.Node, *, fed) -> Residual | None:
    """``x + c``, c computed from no input at all (parameters, constants): a stream update with
    nothing computed from the stream, so it has no branch and no weights of a branch."""
    for stream, value in ((u, v), (v, u)):
        if fed(stream) and not fed(value):
            return Residual(add, stream, value, stream, frozenset(), frozenset())
    return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _constant_scale(short_nodes: frozenset[fx.Node]) -> float | None:
    """``c`` when the shortcut is one multiplication (or division) of the stream by a Python number.

    Only a number: ``q * cos + rotate_half(q) * sin`` (rotary embeddings) scales by a tensor and
    is no residual.
    """
    computing = [n for n in short_nodes if op_name(n) not in _PASS_THROUGH]
    if len(computing) != 1 or len(computing[0].args) != 2:
        return None
    node = computing[0]
    name = op_name(node).removeprefix("__").removesuffix("__")
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(tensors) != 1 or len(numbers) != 1:
        return None
    if name in ("mul", "rmul"):
        return float(numbers[0])
    if name in ("div", "truediv") and node.args[1] == numbers[0] and numbers[0] != 0:
        return 1.0 / float(numbers[0])
    return None

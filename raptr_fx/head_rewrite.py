"""Cut the heads of an attention whose code fixes their count: a rewrite of its traced graph.

nanoGPT splits one fused projection by a constant size and views to a head count stored on the
module; timm reshapes it to ``(B, N, 3, heads, head_dim)``::

    q, k, v = self.c_attn(x).split(c, dim=2)
    q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
    ...
    y = y.transpose(1, 2).contiguous().view(b, t, c)

With the fused projection computing only the kept heads' rows of each of its segments, those
sizes are wrong. The attention module is traced once (``torch.fx``) and its graph walked from the
fused projection to the output projection, following the axis that carries the heads through
splits, views, transposes and the attention op (:func:`plan_head_rewrite`, at discovery, on fake
tensors). Every size argument that fixes the heads' extent (the split size ``c``, the view's
``self.n_head``, the final ``view(b, t, c)``) is recorded; any other op that reads the heads is a
refusal naming it. At install, :func:`rewritten_forward` replaces each recorded argument ``v`` by
``v // parts * kept``, where ``kept`` is read from the fused projection's output width: the sizes
follow the kept count from the data, as ``view(b, t, -1, head_dim)`` would, so under
``torch.compile`` a kept size is a shape (one graph per kept size, no per-unit guard).

The rewritten code runs with the attention module as ``self`` (its live submodules, parameters and
buffers: FSDP2, ``load_state_dict(assign=True)`` and ``.to()`` are followed) while the cut is
active; in eval mode, with every head kept, and after ``remove()`` the module's own forward runs.
The graph is traced in training mode: ``self.training`` branches take their training side.
"""

from __future__ import annotations

import math
import operator
import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from .residuals import op_name
from .tracing import is_shape_query
from .untouched import untouched

__all__ = ["HeadRewrite", "plan_head_rewrite", "rewritten_forward"]


@dataclass(frozen=True)
class HeadRewrite:
    """How to rewrite an attention module so its fused projection's heads can be cut.

    Example:
        >>> group.rewrite
        HeadRewrite(module='transformer.h.0.attn', producer='c_attn', consumer='c_proj', parts=4,
                    segments=(24, 24, 24), resized=(('split', 1, -1), ('view', 3, -1), ...))
    """

    module: str  # the attention module whose forward is rewritten
    producer: str  # the fused projection, relative to ``module``
    consumer: str  # the output projection, relative to ``module``
    parts: int  # key/value heads (each with its query heads)
    rows: int  # rows of the producer one part spans, all segments together
    # Rows one part spans in each segment of the producer (q, k, v one after another); () when a
    # part's rows are contiguous (a per-head layout): the cut then selects them as one block.
    segments: tuple[int, ...]
    # (node, argument, item of a size list or -1): the size arguments that follow the kept parts.
    resized: tuple[tuple[str, int | str, int], ...]


class Refusal(Exception):
    """The graph does something to the heads that the rewrite cannot follow."""


# -- tracing ------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with the group's projections as leaves (Hugging Face's Conv1D is none)."""

    def __init__(self, leaves: Iterable[nn.Module]):
        super().__init__()
        self.leaves = set(leaves)
        self.record_stack_traces = True  # refusals quote the model's line

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, module_qualified_name)


def trace_attention(module: nn.Module, leaves: Iterable[nn.Module]) -> fx.GraphModule:
    """The attention module's forward as a graph, traced once in training mode."""
    with untouched(module):  # puts every training flag back too
        module.train()
        try:
            graph = _LeafTracer(leaves).trace(module)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is a refusal with its cause
            text = str(exc).strip().splitlines()
            raise Refusal(f"torch.fx cannot trace {type(module).__name__}.forward ({type(exc).__name__}: "
                          f"{text[0] if text else ''})") from exc
    return fx.GraphModule(module, graph, type(module).__name__)


# -- the plan: follow the heads' axis -------------------------------------------------------------
@dataclass(frozen=True)
class _Axis:
    """The dimension of a tensor that carries the heads, as row-major factors; one (``scaled``)
    is the parts a cut samples, the others are fixed (segments, query heads per part, head_dim)."""

    dim: int
    factors: tuple[tuple[int, bool], ...]


# Ops that act on each element (or each head) on its own: the heads' axis passes through.
_POINTWISE = {
    "contiguous", "clone", "float", "half", "bfloat16", "to", "type_as", "detach", "mul", "add", "sub", "div",
    "truediv", "neg", "exp", "tanh", "sigmoid", "relu", "gelu", "silu", "dropout", "masked_fill", "where",
    "softmax", "log_softmax", "pow", "sqrt", "rsqrt", "square", "abs", "clamp", "float_power", "cos", "sin",
    "mul_", "add_", "div_", "masked_fill_", "softmax_", "type",
}
_DIM_ARG = {"softmax", "log_softmax"}  # pointwise along every dimension but the one they reduce
_SIZES = {"view", "reshape"}
_ATTENTION = {"scaled_dot_product_attention"}
_MATMULS = {"matmul", "bmm", "__matmul__"}
_NORMS = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_ELEMENTWISE_MODULES = (nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU, nn.Softmax)


def _describe(node: fx.Node) -> str:
    """``view`` at ``q = q.view(b, t, self.n_head, c // self.n_head)``: the op and the model's line."""
    name = op_name(node) or str(node.target)
    lines = (node.meta.get("stack_trace") or "").splitlines()
    # Pairs of 'File "...", line N' and the code; the model's own frame is the last outside torch.
    code = [lines[i + 1].strip() for i in range(len(lines) - 1)
            if lines[i].strip().startswith("File ") and f"{os.sep}torch{os.sep}" not in lines[i]]
    return f"`{name}` at `{code[-1]}`" if code else f"`{name}`"


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dim(d: Any, ndim: int) -> int:
    return d + ndim if isinstance(d, int) and d < 0 else d


def _arg(node: fx.Node, position: int, key: str, default: Any = None) -> Any:
    return node.args[position] if len(node.args) > position else node.kwargs.get(key, default)


def _regroup(in_shape: Sequence[int], axis: _Axis, out_shape: Sequence[int]) -> _Axis | None:
    """Where a view/reshape puts the heads: the output dimension holding the scaled factor, and its
    factors; None when a dimension mixes part of the heads' factors with another dimension."""
    flat: list[tuple[int, bool]] = []
    for i, size in enumerate(in_shape):
        flat.extend(axis.factors if i == axis.dim else [(size, False)])
    flat = [f for f in flat if f[0] != 1 or f[1]]
    found, position = None, 0
    for j, size in enumerate(out_shape):
        taken: list[tuple[int, bool]] = []
        product = 1
        while product < size:
            if position >= len(flat):
                return None
            factor, scaled = flat[position]
            if size % (product * factor) == 0:
                taken.append(flat[position])
                product *= factor
                position += 1
            elif not scaled and size % product == 0 and factor % (size // product) == 0:
                need = size // product  # a fixed factor split over two output dimensions
                taken.append((need, False))
                flat[position] = (factor // need, False)
                product = size
            else:
                return None
        if any(scaled for _, scaled in taken):
            found = _Axis(j, tuple(taken))
    return found if position == len(flat) else None


class _Walk:
    """One pass over the attention graph, from the fused projection to the output projection."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], producer: str, consumer: str,
                 start: tuple[tuple[int, bool], ...], consumer_width: int):
        self.graph = graph
        self.modules = modules
        self.producer, self.consumer = producer, consumer
        self.start = start
        self.consumer_width = consumer_width
        self.axes: dict[fx.Node, Any] = {}  # tensor -> _Axis; a split's tuple -> tuple of _Axis | None
        self.sizes: dict[fx.Node, int] = {}  # x.size() of a tensor with heads -> the heads' dimension
        self.following: set[fx.Node] = set()  # ints computed from the heads' extent: they follow the cut
        self.resized: list[tuple[str, int | str, int]] = []
        self.reached = False

    def run(self) -> list[tuple[str, int | str, int]]:
        for node in self.graph.nodes:
            if node.op == "call_module" and node.target == self.producer:
                shape = _shape(node)
                if shape is None:
                    raise Refusal(f"no shape for {self.producer}'s output")
                self.axes[node] = _Axis(len(shape) - 1, self.start)
                continue
            inputs = node.all_input_nodes
            if not any(a in self.axes or a in self.sizes or a in self.following for a in inputs):
                continue
            self.visit(node)
        if not self.reached:
            raise Refusal(f"the heads of {self.producer} never reach {self.consumer}")
        return self.resized

    def refuse(self, node: fx.Node, why: str) -> None:
        raise Refusal(f"{_describe(node)} {why}")

    # -- dispatch -------------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        name = op_name(node)
        if node.op == "output":
            self.refuse(node, "returns a tensor that still has the heads: a cut would change the module's output")
        if node.op == "call_module":
            return self.module_call(node)
        if is_shape_query(node):
            if node.target is getattr and node.args[1] == "shape" or name == "size":
                return self.size_query(node)
            if name == "numel" and node.args[0] in self.axes:
                self.following.add(node)
            return None  # dtype, device, dim(): the same with fewer heads
        if node.target is operator.getitem:
            return self.getitem(node)
        if not any(a in self.axes for a in node.all_input_nodes):  # arithmetic on sizes
            if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
                self.following.add(node)
                return None
            return self.check_sizes(node, set())
        if name in _SIZES:
            return self.reshape(node)
        if name in ("transpose", "swapaxes"):
            return self.transpose(node)
        if name == "permute":
            return self.permute(node)
        if name in ("split", "chunk"):
            return self.split(node, name)
        if name == "unbind":
            return self.unbind(node)
        if name in _ATTENTION:
            return self.attention(node)
        if name in _MATMULS:
            return self.matmul(node)
        if name in _POINTWISE:
            return self.pointwise(node, name)
        self.refuse(node, "reads the heads, and the rewrite cannot follow it")

    def module_call(self, node: fx.Node) -> None:
        axis = self.axes.get(node.args[0]) if node.args else None
        if axis is None:
            self.refuse(node, "reads a size computed from the heads")
        module = self.modules[str(node.target)]
        shape = _shape(node.args[0])
        if node.target == self.consumer:
            factors = axis.factors
            if axis.dim != len(shape) - 1 or not factors[0][1] or math.prod(f for f, _ in factors[1:]) != self.consumer_width:
                self.refuse(node, f"reads the heads in an order its columns do not have ({factors})")
            self.reached = True
            return None
        if isinstance(module, _ELEMENTWISE_MODULES):
            self.axes[node] = axis
            return None
        if isinstance(module, _NORMS):
            normalized = getattr(module, "normalized_shape", None) or (1,)
            if axis.dim < len(shape) - len(normalized):
                self.axes[node] = axis
                return None
        self.refuse(node, f"({type(module).__name__}) reads the heads, and the rewrite cannot follow it")

    def size_query(self, node: fx.Node) -> None:
        axis = self.axes.get(node.args[0])
        if axis is None:
            self.refuse(node, "reads the shape of a size")
        ndim = len(_shape(node.args[0]))
        dim = _arg(node, 1, "dim") if node.op == "call_method" else None
        if dim is None:
            self.sizes[node] = axis.dim
        elif _dim(dim, ndim) == axis.dim:
            self.following.add(node)

    def getitem(self, node: fx.Node) -> None:
        source, index = node.args
        if source in self.sizes:  # b, t, c = x.size()
            if isinstance(index, int) and _dim(index, len(_shape(source.args[0]))) == self.sizes[source]:
                self.following.add(node)
            return None
        if isinstance(self.axes.get(source), tuple):  # q, k, v = qkv.split(...)
            picked = self.axes[source][index]
            if picked is not None:
                self.axes[node] = picked
            return None
        if source in self.following:
            self.following.add(node)
            return None
        axis = self.axes.get(source)
        if axis is None:
            return self.check_sizes(node, set())
        # Indexing: whole ints drop a dimension before the heads, slices must leave the heads whole.
        items = index if isinstance(index, tuple) else (index,)
        for dim, item in enumerate(items):
            if item is Ellipsis or item is None or isinstance(item, fx.Node):
                self.refuse(node, "indexes the heads with an index the rewrite cannot follow")
            if dim == axis.dim and item != slice(None):
                self.refuse(node, "indexes into the heads")
        dropped = sum(isinstance(i, int) for i in items[:axis.dim])
        self.axes[node] = _Axis(axis.dim - dropped, axis.factors)
        return None

    # -- ops on the heads ---------------------------------------------------------------------------
    def reshape(self, node: fx.Node) -> None:
        axis, source = self.axes[node.args[0]], node.args[0]
        listed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
        sizes = list(node.args[1]) if listed else list(node.args[1:])
        if not sizes:
            self.refuse(node, "is given its sizes by keyword")
        out = _regroup(_shape(source), axis, _shape(node))
        if out is None:
            self.refuse(node, "mixes the heads with another dimension")
        self.axes[node] = out
        positions = [(1, j) if listed else (1 + j, -1) for j in range(len(sizes))]
        for j, (size, position) in enumerate(zip(sizes, positions)):
            if j == out.dim:
                self.resize(node, size, position)
            elif isinstance(size, fx.Node) and size in self.following:
                self.refuse(node, "sizes a dimension without the heads from the heads' extent")

    def resize(self, node: fx.Node, size: Any, position: tuple[int | str, int]) -> None:
        """Record ``size`` (an argument of ``node``) as one that follows the kept count."""
        if size == -1 or (isinstance(size, fx.Node) and size in self.following):
            return  # sized from the data already
        if not isinstance(size, (int, fx.Node)):
            self.refuse(node, f"takes a size the rewrite cannot follow ({size!r})")
        self.resized.append((node.name, *position))

    def transpose(self, node: fx.Node) -> None:
        axis = self.axes[node.args[0]]
        ndim = len(_shape(node))
        a, b = (_dim(d, ndim) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
        self.axes[node] = _Axis(b if axis.dim == a else a if axis.dim == b else axis.dim, axis.factors)

    def permute(self, node: fx.Node) -> None:
        axis = self.axes[node.args[0]]
        order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        order = [_dim(d, len(order)) for d in order]
        self.axes[node] = _Axis(order.index(axis.dim), axis.factors)

    def split(self, node: fx.Node, name: str) -> None:
        source, axis = node.args[0], self.axes[node.args[0]]
        shape = _shape(source)
        dim = _dim(_arg(node, 2, "dim", 0), len(shape))
        pieces = node.meta.get("val")
        count = len(pieces) if isinstance(pieces, (tuple, list)) else None
        if count is None:
            self.refuse(node, "has no shapes")
        if dim != axis.dim:
            self.axes[node] = (axis,) * count
            return None
        lead, rest = axis.factors[0], axis.factors[1:]
        widths = {p.shape[dim] for p in pieces}
        if lead[1] or lead[0] % count or len(widths) != 1:
            self.refuse(node, f"splits the heads' axis into {[p.shape[dim] for p in pieces]}: not into equal "
                        "segments each holding every head (a grouped key/value layout is not supported)")
        piece = ((lead[0] // count, False),) if lead[0] != count else ()
        self.axes[node] = (_Axis(dim, piece + rest),) * count
        if name == "split":
            size, key = (node.args[1], 1) if len(node.args) > 1 else next(
                (node.kwargs[k], k) for k in ("split_size", "split_size_or_sections") if k in node.kwargs)
            if isinstance(size, (list, tuple)):
                for j, item in enumerate(size):
                    self.resize(node, item, (key, j))
            else:
                self.resize(node, size, (key, -1))

    def unbind(self, node: fx.Node) -> None:
        axis = self.axes[node.args[0]]
        dim = _dim(_arg(node, 1, "dim", 0), len(_shape(node.args[0])))
        if dim == axis.dim:
            self.refuse(node, "unbinds the heads' axis")
        count = len(node.meta["val"])
        self.axes[node] = (_Axis(axis.dim - (dim < axis.dim), axis.factors),) * count

    def attention(self, node: fx.Node) -> None:
        q, k, v = node.args[:3]
        axes = [self.axes.get(a) for a in (q, k, v)]
        ndim = len(_shape(q))
        if any(a is None for a in axes) or len({a.dim for a in axes}) != 1 or axes[0].dim >= ndim - 2:
            self.refuse(node, "gets query, key and value without the heads on one batch dimension")
        self.check_broadcast(node, axes[0].dim, [node.kwargs.get("attn_mask", _arg(node, 3, "attn_mask"))])
        self.axes[node] = axes[0]

    def matmul(self, node: fx.Node) -> None:
        left, right = (self.axes.get(a) for a in node.args[:2])
        ndim = len(_shape(node))
        if left is None or right is None or left.dim != right.dim or left.dim >= ndim - 2:
            self.refuse(node, "multiplies along the heads")
        self.axes[node] = left

    def pointwise(self, node: fx.Node, name: str) -> None:
        shape = _shape(node)
        if shape is None:
            self.refuse(node, "has no shape")
        ndim = len(shape)
        tracked = [(a, self.axes[a]) for a in node.all_input_nodes if isinstance(self.axes.get(a), _Axis)]
        dims = {a.dim + ndim - len(_shape(t)) for t, a in tracked}
        if len(dims) != 1 or len({a.factors for _, a in tracked}) != 1:
            self.refuse(node, "combines tensors whose heads do not line up")
        dim = dims.pop()
        if name in _DIM_ARG and _dim(_arg(node, 1, "dim"), ndim) == dim:
            self.refuse(node, "reduces over the heads")
        others = [a for a in node.all_input_nodes if a not in self.axes]
        self.check_broadcast(node, dim, others)
        self.check_sizes(node, {t for t, _ in tracked})
        self.axes[node] = _Axis(dim, tracked[0][1].factors)

    def check_broadcast(self, node: fx.Node, dim: int, others: Iterable[Any]) -> None:
        """A tensor combined with the heads must broadcast over them (a [b, 1, t, t] mask)."""
        ndim = len(_shape(node))
        for other in others:
            shape = _shape(other)
            if shape is None:
                continue
            at = dim - (ndim - len(shape))
            if 0 <= at < len(shape) and shape[at] != 1:
                self.refuse(node, f"combines the heads with {other.name}, shaped {list(shape)}, which has them too")

    def check_sizes(self, node: fx.Node, tensors: set[fx.Node]) -> None:
        """A size computed from the heads' extent may only size the heads."""
        if any(a in self.following or a in self.sizes for a in node.all_input_nodes if a not in tensors):
            self.refuse(node, "uses a size computed from the heads")


def _layouts(parts: int, segments: tuple[int, ...]) -> list[tuple[tuple[tuple[int, bool], ...], tuple[int, ...]]]:
    """The layouts the fused projection's rows may have: (factors of its output axis, the cut's
    segments). q, k and v one after another (nanoGPT's split, timm's reshape(3, heads, d)), or
    each head's q, k and v together (GPT-NeoX's view(b, t, heads, 3 * d))."""
    if len(set(segments)) != 1:
        return []
    count, width = len(segments), segments[0]
    return [(((count, False), (parts, True), (width, False)), segments),
            (((parts, True), (count * width, False)), ())]


def plan_head_rewrite(module: nn.Module, name: str, producer: str, consumer: str, parts: int,
                      segments: tuple[int, ...], consumer_width: int, leaves: Iterable[nn.Module],
                      arg_shapes: dict[int | str, tuple[int, ...]], like: torch.Tensor) -> HeadRewrite:
    """Trace ``module`` and find the size arguments that fix its heads (see the module docstring).

    Args:
        name: the module's name in the model; ``producer``/``consumer`` are relative to it.
        parts: key/value heads; ``segments``: rows one part spans in each of the producer's q, k, v.
        consumer_width: columns of the output projection one part spans.
        arg_shapes: the shapes of the tensor arguments of the module's first call (the probe's);
            they are made with the dtype and device of ``like`` (the producer's weight).

    Raises:
        Refusal: with the op that fixes the heads in a way the rewrite cannot follow.
    """
    layouts = _layouts(parts, segments)
    if not layouts:
        raise Refusal(f"{producer}'s query, key and value segments differ in size ({list(segments)} rows per "
                      "key/value head): a grouped key/value fused layout is not supported")
    traced = trace_attention(module, leaves)
    _propagate(traced, arg_shapes, like)
    modules = dict(traced.named_modules())
    first: Refusal | None = None
    for factors, cut_segments in layouts:
        try:
            resized = _Walk(traced.graph, modules, producer, consumer, factors, consumer_width).run()
        except Refusal as refusal:
            first = first or refusal
            continue
        return HeadRewrite(name, producer, consumer, parts, sum(segments), cut_segments, tuple(resized))
    raise first


def _propagate(traced: fx.GraphModule, arg_shapes: dict[int | str, tuple[int, ...]], like: torch.Tensor) -> None:
    from ._compat import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = []
    for i, node in enumerate(placeholders):
        shape = arg_shapes.get(i, arg_shapes.get(node.target))
        if shape is None:
            if not node.args:
                raise Refusal(f"the attention's argument {node.target} was no tensor in the probe: not traced")
            values.append(node.args[0])  # its default
            continue
        with mode:
            values.append(torch.empty(shape, dtype=like.dtype, device=like.device))
    try:
        with torch.no_grad():
            FakeTensorProp(traced, mode).propagate(*values)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).strip().splitlines()
        raise Refusal(f"its traced graph fails on fake tensors ({type(exc).__name__}: "
                      f"{text[0] if text else ''})") from exc


# -- the rewrite ------------------------------------------------------------------------------------
def rewritten_forward(module: nn.Module, rewrite: HeadRewrite, leaves: Iterable[nn.Module]) -> Callable[..., Any]:
    """``module``'s forward with the sizes of ``rewrite.resized`` following the kept parts, bound
    to ``module`` (a function of the call's arguments)."""
    traced = trace_attention(module, leaves)
    resize_heads(traced.graph, rewrite)
    traced.recompile()
    return types.MethodType(type(traced).forward, module)


def resize_heads(graph: fx.Graph, rewrite: HeadRewrite) -> None:
    """The pass: ``kept = producer_output.size(-1) // rows_per_part`` after the fused projection,
    and each recorded size ``v`` replaced by ``v // parts * kept``."""
    nodes = {n.name: n for n in graph.nodes}
    producer = next((n for n in graph.nodes if n.op == "call_module" and n.target == rewrite.producer), None)
    missing = [name for name, _, _ in rewrite.resized if name not in nodes]
    if producer is None or missing:
        raise RuntimeError(f"{rewrite.module}'s graph changed since its heads were planned: "
                           f"no {missing[0] if missing else rewrite.producer}")
    with graph.inserting_after(producer):
        width = graph.call_method("size", (producer, -1))
    with graph.inserting_after(width):
        kept = graph.call_function(operator.floordiv, (width, rewrite.rows))
    for new in (width, kept):
        new.meta.update({k: v for k, v in producer.meta.items() if k in ("stack_trace", "nn_module_stack")})
    for name, key, item in rewrite.resized:
        node = nodes[name]
        holder = node.args[key] if isinstance(key, int) else node.kwargs[key]
        size = holder[item] if item >= 0 else holder
        with graph.inserting_before(node):
            per_part = size // rewrite.parts if isinstance(size, int) else graph.call_function(
                operator.floordiv, (size, rewrite.parts))
            new = graph.call_function(operator.mul, (per_part, kept))
        for created in (new, per_part):
            if isinstance(created, fx.Node):
                created.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        if item >= 0:
            holder = type(holder)(new if j == item else s for j, s in enumerate(holder))
            new_value = holder
        else:
            new_value = new
        if isinstance(key, int):
            node.args = tuple(new_value if j == key else a for j, a in enumerate(node.args))
        else:
            node.kwargs = {**node.kwargs, key: new_value}
    graph.lint()

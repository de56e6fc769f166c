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

A grouped key/value layout (q, k and v segments of different sizes) is followed through its
split; separate q, k and v projections start the walk at each; einops ``rearrange`` is traced as
one call and read from its pattern. Python branches on sizes and arguments are decided on fake
tensors shaped like the example's call and asserted in the graph (:class:`_LeafTracer`).

The rewritten code runs with the attention module as ``self`` (its live submodules, parameters and
buffers: FSDP2, ``load_state_dict(assign=True)`` and ``.to()`` are followed) while the cut is
active; in eval mode, with every head kept, and after ``remove()`` the module's own forward runs.
The graph is traced in training mode: ``self.training`` branches take their training side.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
import traceback
import types
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, NoReturn, Sequence, cast

import torch
from torch import fx, nn

from ._compat import FakeTensorMode, tracer_patches_reverted
from .errors import RaptrError
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
    producer: str  # the fused projection (separate ones: the query's), relative to ``module``
    consumer: str  # the output projection, relative to ``module``
    parts: int  # key/value heads (each with its query heads)
    rows: int  # rows of the producer one part spans, all segments together
    # Rows one part spans in each segment of the producer (q, k, v one after another); () when a
    # part's rows are contiguous (a per-head layout): the cut then selects them as one block.
    segments: tuple[int, ...]
    # (node, argument, item of a size list or -1): the size arguments that follow the kept parts.
    resized: tuple[tuple[str, int | str, int], ...]
    # The shapes of the module's tensor arguments (position or name) it was traced for: branches on
    # sizes are decided for them, at discovery and again at install.
    example: tuple[tuple[int | str, tuple[int, ...]], ...] = field(default=(), repr=False)
    # Tensor arguments that default to None and were tensors in the example (an attention mask,
    # which Hugging Face builds on fake tensors but not for sdpa on real ones), and the resized
    # sizes of the graph traced without them (None: it cannot be cut): a call picks by presence.
    optional: tuple[str, ...] = ()
    resized_without: tuple[tuple[str, int | str, int], ...] | None = field(default=None, repr=False)


class Refusal(Exception):
    """The graph does something to the heads that the rewrite cannot follow."""


# -- tracing ------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with the group's projections as leaves (Hugging Face's Conv1D is none).

    Given the shapes of the module's arguments (``example``), Python control flow on sizes is
    decided on fake tensors (``if q_len > 1 and mask is None``: a branch on a shape, taken as the
    example takes it), ``*x.shape[:-1]`` unpacks to its items, and each decision is kept in the
    graph as a ``torch._assert``: a call that would branch the other way fails loudly. Hugging
    Face's attention code needs both. A forward behind a ``functools.wraps`` decorator (argument
    renaming) is traced unwrapped, and ``**kwargs`` as the example's tensors passed in it.
    """

    def __init__(self, leaves: Iterable[nn.Module], example: dict[int | str, tuple[int, ...]] | None = None,
                 like: torch.Tensor | None = None, opaque: tuple[Callable[..., Any], ...] = ()):
        super().__init__(autowrap_functions=opaque)
        self.leaves = set(leaves)
        self.example, self.like = example, like
        self.specialized: dict[str, Any] = {}
        self.record_stack_traces = True  # refusals quote the model's line

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> Any:
        root_fn = inspect.unwrap(root_fn)
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if root_fn.__code__.co_flags & inspect.CO_VARKEYWORDS:
            # **kwargs holds the example's tensors passed by a name the signature does not have
            named = set(inspect.signature(root_fn).parameters)
            args[-1] = {key: self.create_proxy("placeholder", key, (None,), {}) for key in (self.example or {})
                        if isinstance(key, str) and key not in named}
        return fn, args

    def _proxy_placeholder(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("**"):
            return None  # a pytree leaf (a dict would make torch.fx flatten the arguments); filled below
        placeholder = super()._proxy_placeholder(name, *args, **kwargs)
        if self.example is None or name.startswith("*"):
            return placeholder
        # Branches on an argument (``if mask is None``) are taken as in the example: assert the same.
        if name in self.specialized:  # no tensor in the example: its default
            value = self.specialized[name]
            check = self.create_proxy("call_function", operator.is_ if value is None else operator.eq,
                                      (placeholder, value), {})
        else:  # a tensor: ``mask is None`` was False
            value = "a tensor"
            check = self.create_proxy("call_function", operator.is_not, (placeholder, None), {})
        message = (f"{type(self.root).__name__}.forward was traced for its heads' cut with {name}={value!s} (as in the "
                   f"example call) and is called with another {name}: pass {name} as in the example in training "
                   "(use_cache=False, for a cache) or cut only the MLPs (width_kinds=('mlp',))")
        self.create_proxy("call_function", torch._assert, (check, message), {})
        return value if name in self.specialized else placeholder

    def to_bool(self, obj: fx.Proxy) -> bool:
        decided = bool(self.evaluate(obj))
        condition = obj if decided else self.create_proxy("call_function", operator.not_, (obj,), {})
        self.create_proxy("call_function", torch._assert, (condition, _SPECIALIZED), {})
        return decided

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self) if self.example is not None else super().proxy(node)

    def iter(self, obj: fx.Proxy) -> Any:
        value = self.evaluate(obj)
        if not isinstance(value, (tuple, list)):
            return super().iter(obj)
        # torch.fx sets Proxy's magic methods (__getitem__) at import time: its stubs do not declare them
        return iter([obj[i] for i in range(len(value))])  # type: ignore[index]

    def evaluate(self, obj: fx.Proxy) -> Any:
        """The value of a node traced so far, on fake tensors shaped like the example's."""
        if self.example is None:
            raise fx.proxy.TraceError(f"{obj.node.name} is branched on or unpacked, and no example shapes are known")
        node = obj.node  # an attribute's node is made on first use: before the copy
        graph = fx.Graph()
        copied: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(self.graph, copied)
        graph.output(copied[node])
        with tracer_patches_reverted():  # run the modules themselves, not the tracer's patched calls
            return _run_fake(fx.GraphModule(self.root, graph), self.example, self.like)


class _ConcreteProxy(fx.Proxy):
    """A proxy whose ``len()`` is its example value's (``(*x.shape[:-1], -1, d)`` asks for it),
    and whose ``dtype`` is the example's, asserted (``torch.finfo(q.dtype).min``)."""

    def __getattr__(self, name: str) -> Any:
        attribute = super().__getattr__(name)
        if name != "dtype":
            return attribute
        value = cast(_LeafTracer, self.tracer).evaluate(attribute)  # made by _LeafTracer.proxy only
        same = self.tracer.create_proxy("call_function", operator.eq, (attribute, value), {})
        self.tracer.create_proxy("call_function", torch._assert, (same, f"{self.node.name} was traced as {value}"), {})
        return value

    def __len__(self) -> int:
        value = cast(_LeafTracer, self.tracer).evaluate(self)
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"len() of {self.node.name}, which is no tuple in the example")
        return len(value)


_SPECIALIZED = ("raptr_fx traced this attention for a branch on a size that this call takes the other way; "
                "run it with every head (or in eval), or report the model")


def trace_attention(module: nn.Module, leaves: Iterable[nn.Module], example: dict[int | str, tuple[int, ...]] | None = None,
                    like: torch.Tensor | None = None) -> fx.GraphModule:
    """The attention module's forward as a graph, traced once in training mode; branches on sizes
    decided for arguments shaped as ``example`` (made like ``like``: its dtype and device)."""
    with untouched(module):  # puts every training flag back too
        module.train()
        try:
            tracer = _LeafTracer(leaves, example, like, _opaque_functions(module))
            tracer.specialized = _specialized_args(module, example)
            graph = tracer.trace(module)
            return fx.GraphModule(module, graph, type(module).__name__)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is a refusal with its cause
            raise Refusal(f"torch.fx cannot trace {type(module).__name__}.forward{_line_of(exc, module)} "
                          f"({_first_line(exc)})") from exc


def _opaque_functions(module: nn.Module) -> tuple[Callable[..., Any], ...]:
    """einops' functions the module's code calls by name (``from einops import rearrange``): they
    check their argument's type and know no torch.fx proxy, so they are traced as one call each
    (a ``rearrange`` the walk reads from its pattern)."""
    names = inspect.unwrap(type(module).forward).__globals__
    return tuple(f for f in names.values() if callable(f) and not isinstance(f, type)
                 and getattr(f, "__module__", "").split(".")[0] == "einops")


def _line_of(exc: BaseException, module: nn.Module) -> str:
    """`` at `q, k, v = rearrange(...)` ``: the line of the module's forward that failed, if any."""
    code = inspect.unwrap(type(module).forward).__code__
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.name == code.co_name
              and f.filename == code.co_filename]
    return f" at `{frames[-1].line}`" if frames and frames[-1].line else ""


def _specialized_args(module: nn.Module, example: dict[int | str, tuple[int, ...]] | None) -> dict[str, Any]:
    """The arguments that were no tensor in the example call, at their defaults (``cache=None``,
    ``output_attentions=False``): Python branches on them are taken as the example took them,
    and the graph asserts that a call passes the same."""
    if example is None:
        return {}
    parameters = list(inspect.signature(inspect.unwrap(type(module).forward)).parameters.values())[1:]
    return {p.name: p.default for i, p in enumerate(parameters)
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and i not in example and p.name not in example
            and (p.default is None or type(p.default) in (bool, int, float, str))}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _run_fake(traced: fx.GraphModule, example: dict[int | str, tuple[int, ...]], like: torch.Tensor | None) -> Any:
    """Run ``traced`` on fake tensors shaped as ``example`` (keyed by position or name), filling
    each node's ``meta["val"]``; an argument not in it takes its default."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = []
    for i, node in enumerate(n for n in traced.graph.nodes if n.op == "placeholder"):
        shape = example.get(i, example.get(node.target))
        if shape is None:
            if not node.args:
                raise Refusal(f"the attention's argument {node.target} was no tensor in the probe: not traced")
            values.append(node.args[0])  # its default
            continue
        with mode:
            values.append(torch.empty(shape, dtype=like.dtype if like is not None else None,
                                      device=like.device if like is not None else None))
    with torch.no_grad():
        return FakeTensorProp(traced, mode).propagate(*values)


# -- the plan: follow the heads' axis -------------------------------------------------------------
@dataclass(frozen=True)
class _Axis:
    """The dimension of a tensor that carries the heads, as row-major factors; one (``scaled``)
    is the parts a cut samples, the others are fixed (segments, query heads per part, head_dim)."""

    dim: int
    factors: tuple[tuple[int, bool], ...]


@dataclass(frozen=True)
class _Segments:
    """A fused projection's output dimension holding q, k and v one after another, each a segment
    of ``parts`` parts of a different width (a grouped key/value layout): only a split into them
    can be followed."""

    dim: int
    parts: int
    widths: tuple[int, ...]


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


def _tensor_shape(node: Any) -> tuple[int, ...]:
    """The shape of a tensor the walk follows: :func:`_propagate` gave each its fake value."""
    shape = _shape(node)
    assert shape is not None
    return shape


def _source(node: fx.Node) -> fx.Node:
    """The tensor an op on the heads reads first: a node (the caller looks it up in ``_Walk.axes``)."""
    return cast(fx.Node, node.args[0])


def _listed(node: fx.Node) -> tuple[list[Any], bool]:
    """The arguments after the tensor, given one by one or as one list (``x.view(b, t, c)``,
    ``x.view((b, t, c))``), and whether as one list."""
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1]), True
    return list(node.args[1:]), False


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
                 start: tuple[tuple[int, bool], ...] | _Segments, consumer_width: int,
                 others: dict[str, tuple[tuple[int, bool], ...]] | None = None):
        self.graph = graph
        self.modules = modules
        self.producer, self.consumer = producer, consumer
        self.starts = {producer: start, **(others or {})}  # separate key and value projections: theirs too
        self.consumer_width = consumer_width
        self.axes: dict[fx.Node, Any] = {}  # tensor -> _Axis; a split's tuple -> tuple of _Axis | None
        self.sizes: dict[fx.Node, int] = {}  # x.size() of a tensor with heads -> the heads' dimension
        self.following: set[fx.Node] = set()  # ints computed from the heads' extent: they follow the cut
        self.resized: list[tuple[str, int | str, int]] = []
        self.reached = False

    def run(self) -> list[tuple[str, int | str, int]]:
        for node in self.graph.nodes:
            if node.op == "call_module" and node.target in self.starts:
                shape, start = _shape(node), self.starts[node.target]
                if shape is None:
                    raise Refusal(f"no shape for {node.target}'s output")
                last = len(shape) - 1
                self.axes[node] = replace(start, dim=last) if isinstance(start, _Segments) else _Axis(last, start)
                continue
            inputs = node.all_input_nodes
            if not any(a in self.axes or a in self.sizes or a in self.following for a in inputs):
                continue
            self.visit(node)
        if not self.reached:
            raise Refusal(f"the heads of {self.producer} never reach {self.consumer}")
        return self.resized

    def refuse(self, node: fx.Node, why: str) -> NoReturn:
        raise Refusal(f"{_describe(node)} {why}")

    def axis_of(self, arg: Any) -> Any:
        """What ``axes`` holds for an op's argument (None for one that is no node: a constant)."""
        return self.axes.get(arg) if isinstance(arg, fx.Node) else None

    # -- dispatch -------------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        name = op_name(node)
        if node.op == "output":
            self.refuse(node, "returns a tensor that still has the heads: a cut would change the module's output")
        segmented = any(isinstance(self.axes.get(a), _Segments) for a in node.all_input_nodes)
        if segmented and name != "split" and not is_shape_query(node):
            self.refuse(node, "reads the fused projection's query, key and value segments (of different sizes) "
                        "at once: only a split into them can be followed")
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
        if name == "rearrange" and getattr(node.target, "__module__", "").startswith("einops"):
            return self.rearrange(node)
        if name == "repeat_interleave":
            return self.repeat_interleave(node)
        if name == "expand":
            return self.expand(node)
        if name in _ATTENTION:
            return self.attention(node)
        if name in _MATMULS:
            return self.matmul(node)
        if name in _POINTWISE:
            return self.pointwise(node, name)
        self.refuse(node, "reads the heads, and the rewrite cannot follow it")

    def module_call(self, node: fx.Node) -> None:
        source = node.args[0] if node.args else None
        axis = self.axis_of(source)
        if axis is None:
            self.refuse(node, "reads a size computed from the heads")
        module = self.modules[str(node.target)]
        if node.target == self.consumer:
            factors, last = axis.factors, len(_tensor_shape(source)) - 1
            if axis.dim != last or not factors[0][1] or math.prod(f for f, _ in factors[1:]) != self.consumer_width:
                self.refuse(node, f"reads the heads in an order its columns do not have ({factors})")
            self.reached = True
            return None
        if isinstance(module, _ELEMENTWISE_MODULES):
            self.axes[node] = axis
            return None
        if isinstance(module, _NORMS):
            normalized = getattr(module, "normalized_shape", None) or (1,)
            if axis.dim < len(_tensor_shape(source)) - len(normalized):
                self.axes[node] = axis
                return None
        self.refuse(node, f"({type(module).__name__}) reads the heads, and the rewrite cannot follow it")

    def size_query(self, node: fx.Node) -> None:
        source = _source(node)
        axis = self.axes.get(source)
        if axis is None:
            self.refuse(node, "reads the shape of a size")
        ndim = len(_tensor_shape(source))
        dim = _arg(node, 1, "dim") if node.op == "call_method" else None
        if dim is None:
            self.sizes[node] = axis.dim
        elif _dim(dim, ndim) == axis.dim:
            self.following.add(node)

    def getitem(self, node: fx.Node) -> None:
        source, index = node.args
        if not isinstance(source, fx.Node):  # a constant indexed by a size from the heads: no axis, as below
            return self.check_sizes(node, set())
        if source in self.sizes:  # b, t, c = x.size()
            if isinstance(index, int) and _dim(index, len(_tensor_shape(source.args[0]))) == self.sizes[source]:
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
        # Indexing: whole ints drop a dimension, None adds one, slices must leave the heads whole.
        items = list(index) if isinstance(index, tuple) else [index]
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at:at + 1] = [slice(None)] * (len(_tensor_shape(source)) - sum(i is not None for i in items) + 1)
        dim, out = 0, 0  # the input and output dimension the next item indexes
        for item in items:
            if isinstance(item, fx.Node) or not isinstance(item, (int, slice, type(None))):
                self.refuse(node, "indexes the heads with an index the rewrite cannot follow")
            if item is None:
                out += 1
                continue
            if dim == axis.dim:
                if item != slice(None):
                    self.refuse(node, "indexes into the heads")
                break
            dim, out = dim + 1, out + (not isinstance(item, int))
        self.axes[node] = _Axis(out + axis.dim - dim, axis.factors)
        return None

    # -- ops on the heads ---------------------------------------------------------------------------
    def reshape(self, node: fx.Node) -> None:
        source = _source(node)
        axis = self.axes[source]
        sizes, listed = _listed(node)
        if not sizes:
            self.refuse(node, "is given its sizes by keyword")
        out = _regroup(_tensor_shape(source), axis, _tensor_shape(node))
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
        axis = self.axes[_source(node)]
        ndim = len(_tensor_shape(node))
        a, b = (_dim(d, ndim) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
        self.axes[node] = _Axis(b if axis.dim == a else a if axis.dim == b else axis.dim, axis.factors)

    def permute(self, node: fx.Node) -> None:
        axis = self.axes[_source(node)]
        order, _ = _listed(node)
        order = [_dim(d, len(order)) for d in order]
        self.axes[node] = _Axis(order.index(axis.dim), axis.factors)

    def split(self, node: fx.Node, name: str) -> None:
        source = _source(node)
        axis = self.axes[source]
        dim = _dim(_arg(node, 2, "dim", 0), len(_tensor_shape(source)))
        pieces = node.meta.get("val")
        if not isinstance(pieces, (tuple, list)):
            self.refuse(node, "has no shapes")
        count = len(pieces)
        if dim != axis.dim:
            if isinstance(axis, _Segments):
                self.refuse(node, "splits the fused projection's output along another dimension than its rows")
            self.axes[node] = (axis,) * count
            return None
        widths = [p.shape[dim] for p in pieces]
        if isinstance(axis, _Segments):  # q, k and v of a grouped key/value layout
            if widths != [axis.parts * w for w in axis.widths]:
                self.refuse(node, f"splits the fused projection's {sum(widths)} rows into {widths}, not into its "
                            f"query, key and value ({[axis.parts * w for w in axis.widths]})")
            self.axes[node] = tuple(_Axis(dim, ((axis.parts, True), (w, False))) for w in axis.widths)
        else:
            lead, rest = axis.factors[0], axis.factors[1:]
            if lead[1] or lead[0] % count or len(set(widths)) != 1:
                self.refuse(node, f"splits the heads' axis into {widths}: not into equal segments each holding "
                            "every head")
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

    def rearrange(self, node: fx.Node) -> None:
        """einops' ``rearrange(x, 'b n (three h d) -> three b h n d', three=3, h=heads)``: a reshape
        to the pattern's axes, a permute and a reshape to its output groups; the size given for
        the axis that holds the heads follows the kept count."""
        source, pattern = _source(node), _arg(node, 1, "pattern")
        axis = self.axes[source]
        if len(node.args) != 2 or not isinstance(pattern, str) or "->" not in pattern or "..." in pattern:
            self.refuse(node, "has a pattern the rewrite cannot read")
        left, right = (_einops_groups(side) for side in pattern.split("->"))
        sizes: dict[str, Any] = {k: v for k, v in node.kwargs.items() if k != "pattern"}
        if left is None or right is None:
            self.refuse(node, "has a pattern the rewrite cannot read")
        in_shape = _tensor_shape(source)
        if len(left) != len(in_shape) or any(isinstance(v, fx.Node) for v in sizes.values()):
            self.refuse(node, "has a pattern the rewrite cannot read")
        lengths: dict[str, int] = {}
        for group, extent in zip(left, in_shape):
            known = math.prod(sizes.get(a, 1) for a in group)
            unknown = [a for a in group if a not in sizes]
            if len(unknown) > 1 or extent % known:
                self.refuse(node, "has a pattern the rewrite cannot read")
            lengths.update({a: sizes.get(a, extent // known) for a in group})
        names = [a for group in left for a in group]
        split = _regroup(in_shape, axis, [lengths[a] for a in names])
        if split is None or sorted(names) != sorted(a for group in right for a in group):
            self.refuse(node, "mixes the heads with another dimension")
        heads = names[split.dim]
        order = [a for group in right for a in group]
        out = _regroup([lengths[a] for a in order], _Axis(order.index(heads), split.factors), _tensor_shape(node))
        if out is None:
            self.refuse(node, "mixes the heads with another dimension")
        self.axes[node] = out
        if heads in sizes:
            self.resize(node, sizes[heads], (heads, -1))

    def repeat_interleave(self, node: fx.Node) -> None:
        """``k.repeat_interleave(n, dim=1)``: each key/value head repeated for its query heads."""
        axis = self.axes[_source(node)]
        repeats, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if not isinstance(repeats, int) or dim is None:
            self.refuse(node, "repeats the heads by a count the rewrite cannot follow")
        if _dim(dim, len(_tensor_shape(node))) == axis.dim:
            self.axes[node] = _Axis(axis.dim, axis.factors + ((repeats, False),))
        else:
            self.axes[node] = axis

    def expand(self, node: fx.Node) -> None:
        """``k[:, :, None].expand(b, kv_heads, n_rep, t, d)``: the heads' size follows the kept count."""
        source = _source(node)
        axis = self.axes[source]
        sizes, listed = _listed(node)
        dim = axis.dim + len(sizes) - len(_tensor_shape(source))
        self.axes[node] = _Axis(dim, axis.factors)
        for j, size in enumerate(sizes):
            if j == dim:
                self.resize(node, size, (1, j) if listed else (1 + j, -1))
            elif isinstance(size, fx.Node) and size in self.following:
                self.refuse(node, "sizes a dimension without the heads from the heads' extent")

    def unbind(self, node: fx.Node) -> None:
        source = _source(node)
        axis = self.axes[source]
        dim = _dim(_arg(node, 1, "dim", 0), len(_tensor_shape(source)))
        if dim == axis.dim:
            self.refuse(node, "unbinds the heads' axis")
        count = len(node.meta["val"])
        self.axes[node] = (_Axis(axis.dim - (dim < axis.dim), axis.factors),) * count

    def attention(self, node: fx.Node) -> None:
        q, k, v = node.args[:3]
        found = [self.axis_of(a) for a in (q, k, v)]
        ndim = len(_tensor_shape(q))
        axes = [a for a in found if a is not None]
        if len(axes) != 3 or len({a.dim for a in axes}) != 1 or axes[0].dim >= ndim - 2:
            self.refuse(node, "gets query, key and value without the heads on one batch dimension")
        query, key, value = (a.factors for a in axes)
        # enable_gqa pairs query head i with key/value head i // (query heads per key/value head):
        # the query's factors are the key's followed by the query heads of each.
        grouped = node.kwargs.get("enable_gqa", False) and query[:len(key)] == key
        if key != value or (query != key and not grouped):
            self.refuse(node, f"pairs query heads {query} with key/value heads {key}, {value} that a cut would not "
                        "keep together")
        self.check_broadcast(node, axes[0].dim, [node.kwargs.get("attn_mask", _arg(node, 3, "attn_mask"))])
        self.axes[node] = axes[0]

    def matmul(self, node: fx.Node) -> None:
        left, right = (self.axis_of(a) for a in node.args[:2])
        ndim = len(_tensor_shape(node))
        if left is None or right is None or left.dim != right.dim or left.dim >= ndim - 2:
            self.refuse(node, "multiplies along the heads")
        if left.factors != right.factors:
            self.refuse(node, f"multiplies heads {left.factors} with heads {right.factors} that a cut would not keep "
                        "together")
        self.axes[node] = left

    def pointwise(self, node: fx.Node, name: str) -> None:
        shape = _shape(node)
        if shape is None:
            self.refuse(node, "has no shape")
        ndim = len(shape)
        tracked = [(a, self.axes[a]) for a in node.all_input_nodes if isinstance(self.axes.get(a), _Axis)]
        dims = {a.dim + ndim - len(_tensor_shape(t)) for t, a in tracked}
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
        ndim = len(_tensor_shape(node))
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


def _einops_groups(side: str) -> list[list[str]] | None:
    """``'b n (three h d)'`` as ``[['b'], ['n'], ['three', 'h', 'd']]``; None for what this reads not."""
    groups: list[list[str]] = []
    inner: list[str] | None = None
    for token in side.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(" and inner is None:
            inner = []
        elif token == ")" and inner is not None:
            groups.append(inner)
            inner = None
        elif token.isidentifier() and inner is not None:
            inner.append(token)
        elif token.isidentifier():
            groups.append([token])
        else:
            return None
    return groups if inner is None else None


def _layouts(parts: int, segments: tuple[int, ...]) -> list[tuple[tuple[tuple[int, bool], ...] | _Segments,
                                                                    tuple[int, ...]]]:
    """The layouts the fused projection's rows may have: (factors of its output axis, the cut's
    segments). q, k and v one after another (nanoGPT's split, timm's reshape(3, heads, d); with
    segments of different sizes, a grouped key/value layout split into them), or each part's q, k
    and v together (GPT-NeoX's view(b, t, heads, 3 * d))."""
    count, width = len(segments), sum(segments)
    by_part = (((parts, True), (width, False)), ())
    if len(set(segments)) != 1:
        return [(_Segments(-1, parts, segments), segments), by_part]
    return [(((count, False), (parts, True), (segments[0], False)), segments), by_part]


def plan_head_rewrite(module: nn.Module, name: str, producer: str, consumer: str, parts: int,
                      segments: tuple[int, ...], consumer_width: int, leaves: Iterable[nn.Module],
                      arg_shapes: dict[int | str, tuple[int, ...]], like: torch.Tensor,
                      others: tuple[tuple[str, int], ...] = ()) -> HeadRewrite:
    """Trace ``module`` and find the size arguments that fix its heads (see the module docstring).

    Args:
        name: the module's name in the model; ``producer``/``consumer`` are relative to it.
        parts: key/value heads; ``segments``: rows one part spans in each of the producer's q, k, v.
        consumer_width: columns of the output projection one part spans.
        arg_shapes: the shapes of the tensor arguments of the module's first call (the probe's);
            they are made with the dtype and device of ``like`` (the producer's weight).
        others: separate key and value projections (relative to ``module``) and the rows one part
            spans in each; ``producer`` is then the query projection and ``segments`` its rows per part.

    Raises:
        Refusal: with the op that fixes the heads in a way the rewrite cannot follow.
    """
    layouts = _layouts(parts, segments) if not others else [(((parts, True), (sum(segments), False)), ())]
    starts: dict[str, tuple[tuple[int, bool], ...]] = {other: ((parts, True), (width, False)) for other, width in others}
    traced = trace_attention(module, leaves, arg_shapes, like)
    _propagate(traced, arg_shapes, like)
    modules = dict(traced.named_modules())
    first: Refusal | None = None
    for factors, cut_segments in layouts:
        try:
            resized = _Walk(traced.graph, modules, producer, consumer, factors, consumer_width, starts).run()
        except Refusal as refusal:
            first = first or refusal
            continue
        optional = _optional_tensors(module, arg_shapes)
        without = None
        if optional:  # the same module called without them: planned too, or refused there
            shapes = {k: v for k, v in arg_shapes.items() if _name_of(module, k) not in optional}
            try:
                bare = trace_attention(module, leaves, shapes, like)
                _propagate(bare, shapes, like)
                without = tuple(_Walk(bare.graph, dict(bare.named_modules()), producer, consumer, factors,
                                      consumer_width, starts).run())
            except Refusal:
                pass
        return HeadRewrite(name, producer, consumer, parts, sum(segments), cut_segments, tuple(resized),
                           tuple(arg_shapes.items()), optional, without)
    assert first is not None  # there is a layout, and each was refused
    raise first


def _parameters(module: nn.Module) -> list[inspect.Parameter]:
    return list(inspect.signature(inspect.unwrap(type(module).forward)).parameters.values())[1:]


def _name_of(module: nn.Module, key: int | str) -> str | None:
    """The parameter an example key (a position or a name) binds to."""
    parameters = _parameters(module)
    return key if isinstance(key, str) else parameters[key].name if key < len(parameters) else None


def _optional_tensors(module: nn.Module, arg_shapes: dict[int | str, tuple[int, ...]]) -> tuple[str, ...]:
    defaults = {p.name: p.default for p in _parameters(module)}
    names = [_name_of(module, k) for k in arg_shapes]
    return tuple(n for n in names if n in defaults and defaults[n] is None)


def _propagate(traced: fx.GraphModule, arg_shapes: dict[int | str, tuple[int, ...]], like: torch.Tensor) -> None:
    try:
        _run_fake(traced, arg_shapes, like)
    except Refusal:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Refusal(f"its traced graph fails on fake tensors ({_first_line(exc)})") from exc


# -- the rewrite ------------------------------------------------------------------------------------
def rewritten_forward(module: nn.Module, rewrite: HeadRewrite, leaves: Iterable[nn.Module]) -> Callable[..., Any]:
    """``module``'s forward with the sizes of ``rewrite.resized`` following the kept parts, bound
    to ``module`` (a function of the call's arguments)."""
    example = dict(rewrite.example)
    forward = _rewritten(module, rewrite, leaves, example)
    if rewrite.optional:  # traced with them, and without them (or a clear error for calls without)
        without = rewrite.resized_without
        bare = {k: v for k, v in example.items() if _name_of(module, k) not in rewrite.optional}
        absent = (_rewritten(module, replace(rewrite, resized=without), leaves, bare) if without is not None
                  else None)
        signature = inspect.signature(types.MethodType(inspect.unwrap(type(module).forward), module))
        with_them = forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs).arguments
            if any(bound.get(name) is not None for name in rewrite.optional):
                return with_them(*args, **kwargs)
            if absent is None:
                raise RaptrError(f"{rewrite.module}'s heads are cut for calls passing {', '.join(rewrite.optional)} "
                                 "(as the example did), and this call passes none: cut only the MLPs of this "
                                 "model (width_kinds=('mlp',))")
            return absent(*args, **kwargs)

    return forward


def _rewritten(module: nn.Module, rewrite: HeadRewrite, leaves: Iterable[nn.Module],
               example: dict[int | str, tuple[int, ...]]) -> Callable[..., Any]:
    like = getattr(module.get_submodule(rewrite.producer), "weight", None)
    traced = trace_attention(module, leaves, example, like)
    resize_heads(traced.graph, rewrite)
    traced.recompile()
    forward = types.MethodType(type(traced).forward, module)
    if not any(p.kind is p.VAR_KEYWORD for p in _parameters(module)):
        return forward
    accepted = set(inspect.signature(forward).parameters)

    def without_flags(*args: Any, **kwargs: Any) -> Any:
        """``**kwargs`` was traced with the example's tensors in it: flags passed in it
        (``use_cache=False``) are dropped, anything else is an error."""
        extra = {k: v for k, v in kwargs.items() if k not in accepted}
        passed = [k for k, v in extra.items() if v is not None and not isinstance(v, bool)]
        if passed:
            raise RaptrError(f"{rewrite.module} runs its rewritten forward while its heads are cut, traced with "
                             f"the example's **kwargs; it was called with {passed[0]}={extra[passed[0]]!r}. Cut only "
                             "the MLPs of this model (width_kinds=('mlp',)), or call it without that argument")
        return forward(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    return without_flags


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

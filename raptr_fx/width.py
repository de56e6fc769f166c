"""Find the width groups of a model: MLP hidden units and attention heads that can be cut.

A width group is a set of projections inside one unit whose shared hidden dimension can be
narrowed for a training step without touching anything else:

* ``mlp``: producers that map the stream to H hidden units (``fc``, or ``gate`` and ``up`` of a
  gated MLP), only elementwise ops between them (activation, the gating product, dropout), and
  one consumer that maps H back (``c_fc -> gelu -> c_proj``; ``down(act(gate(x)) * up(x))``).
  Producers computing k of the H rows and the consumer reading the same k columns compute
  exactly the sub-MLP of those k units.
* ``heads``: query, key and value projections feeding one attention op (``scaled_dot_product_
  attention``, or ``matmul -> softmax -> matmul``) and the output projection after it. The parts
  are key/value heads, each with the query heads that share it (grouped-query attention), so a
  cut keeps whole heads. Separate projections need code that sizes its reshapes from the data
  (``view(b, t, -1, head_dim)``, as Hugging Face models do); a head count fixed in the code is
  caught by the probe below and reported. A fused projection split into q, k and v by sizes
  fixed in the code (nanoGPT's ``c_attn(x).split(c, dim=2)``, timm's ``qkv(x).reshape(B, N, 3,
  heads, head_dim)``) is cut through a rewrite of its attention module's graph
  (:mod:`raptr_fx.head_rewrite`, ``WidthGroup.rewrite``), or refused with the op it cannot follow.

Each group is proved on fake tensors: the model runs with the group's projections cut and every
unit's output keeps its shape. Projections are ``nn.Linear`` or Hugging Face's ``Conv1D``
(``weight`` stored as ``[in, out]``).

A linear layer with an adapter (``base(x) + B(A(x)) * s``, LoRA; see ``residuals.Adapter``) is one
projection, named after the module holding both: a producer cut keeps the same rows of every
projection in it that writes its output (``base`` and ``B``), a consumer cut the same columns of
every one that reads its input (``base`` and ``A``). One whose adapter runs weights that are no
such projection (a raw parameter of its own) cannot be cut, and its groups say so.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, Iterable, Literal

import torch
from torch import fx, nn

from .discovery import Discovery, _Grouping, _on_model_device, discover
from .head_rewrite import HeadRewrite, Refusal, plan_head_rewrite
from .probe import Probe, probe
from .residuals import _op_name, dataflow_graph, find_adapters
from .tracing import ExampleInputs, is_shape_query, normalize_example_inputs
from .untouched import untouched
from .wrappers import seen_through

__all__ = ["WidthGroup", "find_width_groups", "width_groups"]

WidthKind = Literal["mlp", "heads"]
KINDS: tuple[WidthKind, ...] = ("mlp", "heads")

# Ops that act on each hidden unit on its own: a cut hidden layer computes them for the kept units only.
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
_ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_cudnn_attention"}
_MATMULS = {"matmul", "bmm", "einsum"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}


@dataclass(frozen=True)
class WidthGroup:
    """One width group of a unit: MLP hidden units or attention heads that a step can cut.

    Example:
        >>> [(g.unit, g.kind, g.size) for g in raptr_fx.find_width_groups(model, inputs)]
        [('model.layers.0', 'heads', 4), ('model.layers.0', 'mlp', 128), ...]
    """

    unit: str  # the unit (residual block) it lies in, as in find_blocks
    kind: WidthKind  # "mlp" (hidden units) or "heads" (attention heads)
    size: int  # hidden units H, or query heads
    modules: tuple[str, ...]  # producer projections, then the consumer projection
    droppable: bool = True
    reason: str | None = None  # why it cannot be cut
    parts: int = 0  # what a cut samples: hidden units, or key/value heads (with their query heads)
    # Rows (producers) or columns (consumer) of each module that one part spans, in module order.
    part_widths: tuple[int, ...] = ()
    params: int = 0  # parameters in the group's projections
    flops_share: float | None = None  # share of the model's forward FLOPs that scales with the cut
    # Per module, the projections a cut narrows when it is a linear layer with an adapter (its base
    # and adapter projections); empty: every module is itself the projection cut.
    targets: tuple[tuple[str, ...], ...] = ()
    rewrite: HeadRewrite | None = None  # heads of a fused projection: the attention module's rewrite

    @property
    def name(self) -> str:
        """Unique within a model: the innermost module holding all its projections, and the kind
        (``model.layers.0.mlp:mlp``, ``encoder.layer.0.attention:heads``)."""
        if len(self.modules) == 1:
            return f"{self.modules[0]}:{self.kind}"
        paths = [m.split(".") for m in self.modules]
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return f"{'.'.join(common) or self.unit}:{self.kind}"

    @property
    def producers(self) -> tuple[str, ...]:
        return self.modules[:-1]

    @property
    def consumer(self) -> str:
        return self.modules[-1]

    def cut_targets(self, position: int) -> tuple[str, ...]:
        """The projections a cut of ``modules[position]`` narrows: the module, or for a linear layer
        with an adapter, its projections that write its output (producer) or read its input (consumer)."""
        return self.targets[position] if self.targets else (self.modules[position],)


@dataclass(frozen=True)
class Projection:
    """A module that maps one feature dimension to another: ``nn.Linear`` or ``Conv1D``."""

    name: str
    in_features: int
    out_features: int
    transposed: bool  # weight stored as [in, out] (Hugging Face Conv1D)


def projection_of(name: str, module: nn.Module) -> Projection | None:
    if isinstance(module, nn.Linear):
        return Projection(name, module.in_features, module.out_features, False)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return Projection(name, weight.shape[0], weight.shape[1], True)
    return None


def find_width_groups(model: nn.Module, example_inputs: Any = None, **tracer_options: Any) -> list[WidthGroup]:
    """Find the MLP and attention-head groups of ``model`` that width-wise RaPTr can cut.

    Args:
        model: any ``nn.Module``; it is not changed.
        example_inputs: a tensor, a tuple of positional args or a dict of keyword args. Needed
            for attention heads (their count is read from shapes), for the proof that a cut
            keeps every unit's output shape, and for FLOPs shares.
        **tracer_options: passed to tracing, as in :func:`find_blocks`.

    Returns:
        Every group found, cuttable or not (``WidthGroup.reason`` says why not), in unit order.

    Example:
        >>> groups = raptr_fx.find_width_groups(model, {"input_ids": torch.zeros(1, 16, dtype=torch.long)})
    """
    discovery = discover(model, example_inputs, **tracer_options)
    return width_groups(model, discovery, discovery_inputs(model, example_inputs))


def discovery_inputs(model: nn.Module, example_inputs: Any) -> ExampleInputs | None:
    """Example inputs as discovery uses them: ``(args, kwargs)``, on the meta device for a meta model."""
    return _on_model_device(model, normalize_example_inputs(example_inputs))


def width_groups(model: nn.Module, discovery: Discovery, inputs: ExampleInputs | None) -> list[WidthGroup]:
    """The width groups inside the units of ``discovery`` (see :func:`find_width_groups`)."""
    with seen_through(model) as real_name:  # discovery's graph names the modules inside wrappers as unwrapped
        groups = _width_groups_seen_through(model, discovery, inputs)
    return [replace(g, unit=real_name(g.unit), modules=tuple(real_name(m) for m in g.modules),
                    rewrite=g.rewrite and replace(g.rewrite, module=real_name(g.rewrite.module))) for g in groups]


def _width_groups_seen_through(model: nn.Module, discovery: Discovery, inputs: ExampleInputs | None) -> list[WidthGroup]:
    traced = discovery.traced
    if inputs is not None and not _has_shapes(traced):
        _propagate_shapes(model, traced, inputs)
    finder = _Finder(model, discovery)
    # Units may nest (a refused outer candidate and a branch inside it): a projection is cut by one group.
    groups = finder.without_overlaps([g for block in discovery.blocks if block.name in finder.grouping.regions
                                      for g in finder.unit_groups(block.name)])
    if inputs is None:
        return [g if g.kind == "mlp" or not g.droppable else
                replace(g, droppable=False, reason="pass example inputs to count its heads") for g in groups]
    measured = probe(model, inputs)
    groups = [_planned(model, g, measured) if g.rewrite is not None and g.droppable else g for g in groups]
    groups = _with_flops(groups, measured)
    return prove(model, inputs, groups, measured)


# -- shapes -------------------------------------------------------------------------------------
def _has_shapes(traced: Any) -> bool:
    return any(isinstance(n.meta.get("val"), torch.Tensor) for n in traced.graph.nodes)


def _propagate_shapes(model: nn.Module, traced: Any, inputs: ExampleInputs) -> None:
    """torch.fx graphs carry no shapes: run the graph once on fake tensors to fill ``meta["val"]``."""
    from ._compat import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    args, kwargs = inputs
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    values = list(args) + [kwargs[n.target] for n in placeholders[len(args):] if n.target in kwargs]
    if len(values) != len(placeholders):
        return  # defaults or concrete args we cannot line up: leave the graph without shapes
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in values]
    try:  # the graph runs the model's modules: leave nothing behind in them (caches, states)
        with untouched(model), torch.no_grad():
            FakeTensorProp(fx.GraphModule(model, traced.graph), mode).propagate(*fakes)
    except Exception:  # the probe reports what the model rejects; shapes are a best effort
        return


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


# -- the graph walks ------------------------------------------------------------------------------
class _Finder:
    def __init__(self, model: nn.Module, discovery: Discovery):
        self.model = model
        self.traced = discovery.traced
        graph = dataflow_graph(discovery.traced)
        self.grouping = _Grouping(model, discovery.traced, graph, discovery.residuals, None)
        self.graph = graph
        modules = dict(model.named_modules())
        self.modules = modules
        self.projections = {name: p for name, m in modules.items()
                            if (p := projection_of(name, m)) is not None and name in self.grouping.regions}
        # A linear layer with an adapter is one projection; the ones inside it are its parts.
        self.adapted: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {}
        for adapted in sorted({a.module for a in find_adapters(discovery.traced, graph)}, key=lambda n: n.count(".")):
            if not any(adapted.startswith(outer + ".") for outer in self.adapted):  # not a part of one already
                self.adapt(adapted)
        self.output_of: dict[fx.Node, str] = {}  # a projection's output node -> its name
        for name in self.projections:
            outputs = self.grouping.outputs(name)
            if len(outputs) == 1:
                self.output_of[outputs[0]] = name
        self.calls = discovery.traced.call_counts
        self.order = {n: i for i, n in enumerate(discovery.traced.graph.nodes)}

    def adapt(self, name: str) -> None:
        """Make the linear layer ``name`` and its adapter one projection (see the module docstring)."""
        region = self.grouping.regions[name]
        inner = {p: self.grouping.regions[p] for p in self.projections if p.startswith(name + ".")}
        parts = [self.projections.pop(p) for p in inner]
        owner = {n: p for p, nodes in inner.items() for n in nodes}

        def reaches_another(part: str, backwards: bool) -> bool:
            """Whether ``part`` reads (backwards) or feeds another projection inside ``name``."""
            stack = list(self.grouping.inputs(part) if backwards else self.grouping.outputs(part))
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
        targets = tuple(self.adapted[m][0 if i < last else 1] if m in self.adapted else (m,)
                        for i, m in enumerate(group.modules))
        group = replace(group, targets=targets)
        problem = next((self.adapted[m][2] for m in group.modules if m in self.adapted and self.adapted[m][2]), None)
        return group if problem is None or not group.droppable else replace(group, droppable=False, reason=problem)

    def unit_groups(self, unit: str) -> list[WidthGroup]:
        region = self.grouping.regions[unit]
        inside = [p for p in self.projections.values() if p.name.startswith(unit + ".")]
        groups = self.head_groups(unit, region) + self.mlp_groups(unit, region, inside)
        groups = [self.through_adapters(g) for g in groups]
        groups += self.expert_refusals(unit, groups)
        groups.sort(key=lambda g: self.first_node(g.consumer))
        return self.without_overlaps(groups)

    # -- MLP ------------------------------------------------------------------------------------
    def mlp_groups(self, unit: str, region: set[fx.Node], inside: list[Projection]) -> list[WidthGroup]:
        groups = []
        for consumer in inside:
            inputs = self.grouping.inputs(consumer.name)
            if len(inputs) != 1:
                continue
            found = self.hidden_path(inputs[0], region, consumer.name)
            if found is None:
                continue  # not an MLP consumer (attention output, first projection of the unit)
            producers, problem = found
            modules = (*sorted(producers, key=lambda n: self.first_node(n)), consumer.name)
            hidden = consumer.in_features
            group = WidthGroup(unit, "mlp", hidden, modules, parts=hidden, part_widths=(1,) * len(modules),
                               params=self.params(modules))
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
            if node in self.output_of and node in region:
                producers.add(self.output_of[node])
                continue
            if node not in region or not self.elementwise(node):
                return None
            path.add(node)
            wide = [p for p in self.traced.param_uses.get(node, ()) if self.model.get_parameter(p).numel() > 1]
            if wide and problem is None:
                problem = f"the hidden units pass through a parameter of their own ({wide[0]}), which a cut would need to narrow too"
            stack.extend(self.tensor_inputs(node))
        if not producers:
            return None
        # Nothing else may read the hidden activations: they would see a narrowed tensor.
        if problem is None:
            allowed = path | {n for p in (*producers, consumer) for n in self.grouping.regions[p]}
            readers = sorted({user.name for node in allowed - self.grouping.regions[consumer]
                              for user in self.graph.successors(node) if user not in allowed})
            if readers:
                problem = f"the hidden units are also read outside the MLP (by {readers[0]})"
        return producers, problem

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The inputs of ``node`` that carry tensor data: tensors, or tuples of them (``split``)."""
        return [a for a in node.all_input_nodes if not is_shape_query(a) and (
            self.traced.is_value(a) or (a.op != "get_attr" and isinstance(a.meta.get("val"), (tuple, list))))]

    def elementwise(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules.get(str(node.target)), _ELEMENTWISE_MODULES)
        if node.op not in ("call_function", "call_method"):
            return False
        if node.target is operator.getitem:  # element 0 of native_dropout's (output, mask)
            source = node.args[0]
            return isinstance(source, fx.Node) and _op_name(source) == "native_dropout" and node.args[1] == 0
        return _op_name(node) in _ELEMENTWISE

    def mlp_problem(self, producers: set[str], consumer: Projection) -> str | None:
        for name in sorted(producers):
            producer = self.projections[name]
            if producer.out_features != consumer.in_features:
                return (f"{name} makes {producer.out_features} features but {consumer.name} reads "
                        f"{consumer.in_features}: not one hidden layer")
        return self.call_problem((*producers, consumer.name))

    def call_problem(self, modules: Iterable[str]) -> str | None:
        for name in modules:
            if self.calls.get(name, 1) > 1:
                return f"{name} runs {self.calls[name]} times per forward (shared weights)"
        return None

    # -- attention heads ----------------------------------------------------------------------------
    def head_groups(self, unit: str, region: set[fx.Node]) -> list[WidthGroup]:
        groups = []
        for node in self.traced.graph.nodes:
            if node not in region:
                continue
            core = self.attention_core(node)
            if core is not None:
                groups.append(self.head_group(unit, region, *core))
        return [g for g in groups if g is not None]

    def attention_core(self, node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, str] | None:
        """(query, key, value, output, op) of an attention op, or None."""
        name = _op_name(node)
        if name in _ATTENTION_OPS and len(node.args) >= 3 and all(isinstance(a, fx.Node) for a in node.args[:3]):
            out = node
            if not isinstance(node.meta.get("val"), torch.Tensor) and node.meta.get("val") is not None:
                out = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
            return node.args[0], node.args[1], node.args[2], out, name
        if name not in _SOFTMAX or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        scores = self.walk_to(node.args[0], _MATMULS, backwards=True)
        weighted = self.walk_to(node, _MATMULS, backwards=False)
        if scores is None or weighted is None or len(scores.args) < 2 or len(weighted.args) < 2:
            return None
        if not all(isinstance(a, fx.Node) for a in (*scores.args[:2], weighted.args[1])):
            return None
        return scores.args[0], scores.args[1], weighted.args[1], weighted, name

    def walk_to(self, node: fx.Node, ops: set[str], *, backwards: bool, limit: int = 8) -> fx.Node | None:
        """The nearest op in ``ops`` along a chain of single-tensor steps (mask adds, scaling, dropout)."""
        for _ in range(limit):
            if node is None:
                return None
            if _op_name(node) in ops:
                return node
            if backwards:
                values = [a for a in node.all_input_nodes if self.traced.is_value(a) and _shape(a) == _shape(node)]
                node = values[0] if values else None
            else:
                users = [u for u in node.users if not is_shape_query(u)]
                node = users[0] if len(users) == 1 else None
        return None

    def nearest_projections(self, node: fx.Node, region: set[fx.Node], *, backwards: bool) -> set[str]:
        found: set[str] = set()
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in seen or current not in region:
                continue
            seen.add(current)
            if backwards and current in self.output_of:
                found.add(self.output_of[current])
                continue
            if not backwards:
                hit = next((p for p in self.projections if current in self.grouping.regions[p]), None)
                if hit is not None and current is not node:
                    found.add(hit)
                    continue
                stack.extend(u for u in self.graph.successors(current))
            else:
                stack.extend(self.tensor_inputs(current))
        return found

    def head_group(self, unit: str, region: set[fx.Node], query: fx.Node, key: fx.Node, value: fx.Node,
                   out: fx.Node, op: str) -> WidthGroup | None:
        sources = [self.nearest_projections(n, region, backwards=True) for n in (query, key, value)]
        consumers = self.nearest_projections(out, region, backwards=False)
        named = sorted(set().union(*sources) | consumers, key=self.first_node)
        if not any(sources):  # projected by something else (1x1 convolutions): no group to cut, but say so
            return WidthGroup(unit, "heads", 0, (unit,), droppable=False,
                              reason=f"the {op} attention's query, key and value come from no nn.Linear or "
                              "Conv1D projection (1x1 convolutions, say): its heads are not cut")
        group = WidthGroup(unit, "heads", 0, tuple(named), params=self.params(named))

        def refuse(reason: str) -> WidthGroup:
            return replace(group, droppable=False, reason=reason)

        if any(len(s) != 1 for s in sources):
            which = [n for n, s in zip(("query", "key", "value"), sources) if len(s) != 1]
            return refuse(f"the attention's {which[0]} is not the output of one projection in {unit}")
        q, k, v = (next(iter(s)) for s in sources)
        if len({q, k, v}) == 2:
            return refuse(f"two of query, key and value come from one projection ({q if q in (k, v) else k}), "
                          "the third from another: not supported")
        if len(consumers) != 1:
            return refuse(f"the attention output feeds {len(consumers)} projections in {unit}, not one")
        o = next(iter(consumers))
        group = replace(group, modules=(q, o) if q == k == v else (q, k, v, o))
        q_shape, k_shape, v_shape = _shape(query), _shape(key), _shape(value)
        if q_shape is None or k_shape is None or v_shape is None:
            return refuse("pass example inputs to count its heads")
        if len(q_shape) != 4:
            return refuse(f"the query reaching {op} is shaped {list(q_shape)}, not [batch, heads, tokens, "
                          "head_dim]: no head dimension to cut")
        heads, head_dim = q_shape[1], q_shape[3]
        if q == k == v:
            return self.fused_head_group(group, refuse, heads, head_dim, k_shape[1], v_shape[-1])
        pq, pk, pv, po = (self.projections[n] for n in (q, k, v, o))
        if pq.out_features != heads * head_dim or pk.out_features % head_dim:
            return refuse(f"{q} makes {pq.out_features} features, not {heads} heads of {head_dim}")
        kv_heads = pk.out_features // head_dim
        if kv_heads == 0 or heads % kv_heads or pv.out_features % kv_heads:
            return refuse(f"{heads} query heads cannot be grouped over {kv_heads} key/value heads")
        value_dim = pv.out_features // kv_heads
        per_group = heads // kv_heads
        if po.in_features != heads * value_dim:
            return refuse(f"{o} reads {po.in_features} features, not {heads} heads of {value_dim}")
        group = replace(group, size=heads, parts=kv_heads,
                        part_widths=(per_group * head_dim, head_dim, value_dim, per_group * value_dim))
        if kv_heads < 2:
            return refuse("it has one key/value head: a cut would keep all heads or none")
        problem = self.call_problem(group.modules)
        return group if problem is None else refuse(problem)

    def fused_head_group(self, group: WidthGroup, refuse: Any, heads: int, head_dim: int, kv_heads: int,
                         value_dim: int) -> WidthGroup:
        """Query, key and value split from one projection: cut through a rewrite of the attention
        module's graph, planned once shapes are known (:func:`_planned`)."""
        fused, o = group.modules
        if kv_heads == 0 or heads % kv_heads:
            return refuse(f"{heads} query heads cannot be grouped over {kv_heads} key/value heads")
        per_group = heads // kv_heads
        segments = (per_group * head_dim, head_dim, value_dim)  # rows per key/value head of q, k and v
        pf, po = self.projections[fused], self.projections[o]
        if pf.out_features != kv_heads * sum(segments):
            return refuse(f"{fused} makes {pf.out_features} features, not query, key and value of {heads} "
                          f"heads of {head_dim}")
        if po.in_features != heads * value_dim:
            return refuse(f"{o} reads {po.in_features} features, not {heads} heads of {value_dim}")
        module = ".".join(_common_prefix(fused.split("."), o.split("."))) or group.unit
        start = len(module) + 1
        group = replace(group, size=heads, parts=kv_heads, part_widths=(sum(segments), per_group * value_dim),
                        rewrite=HeadRewrite(module, fused[start:], o[start:], kv_heads, sum(segments), segments, ()))
        if kv_heads < 2:
            return refuse("it has one key/value head: a cut would keep all heads or none")
        problem = self.call_problem((*group.modules, module))
        return group if problem is None else refuse(problem)

    # -- the rest -------------------------------------------------------------------------------
    def expert_refusals(self, unit: str, groups: list[WidthGroup]) -> list[WidthGroup]:
        """Weights a cut cannot narrow: experts stored as one 3-D parameter ([experts, out, in]) and
        ``nn.MultiheadAttention``'s packed ``in_proj_weight``; no group, so say why."""
        covered = {m for g in groups for m in g.modules}
        found = []
        for name, module in self.modules.items():
            if not name.startswith(unit + ".") or any(name.startswith(c) for c in covered):
                continue
            if isinstance(module, nn.MultiheadAttention):
                found.append(WidthGroup(unit, "heads", module.num_heads, (name,), droppable=False,
                                        params=self.params([name]),
                                        reason="nn.MultiheadAttention packs query, key and value into one "
                                        "in_proj_weight and runs F.multi_head_attention_forward, which takes "
                                        "head_dim as embed_dim // num_heads: fewer heads would need its forward "
                                        "replaced, which is not supported: its heads are not cut"))
                continue
            # [experts, out, in]: a matrix per expert. A [heads, 1, 1] scale (a per-head logit
            # temperature) is 3-D too, but holds no matrix to cut.
            stacked = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and min(p.shape) > 1]
            if stacked:
                found.append(WidthGroup(unit, "mlp", 0, (name,), droppable=False, params=self.params([name]),
                                        reason=f"its experts keep their weights in one 3-D parameter "
                                        f"({name}.{stacked[0]}): cutting expert hidden units is not supported"))
        return found

    def without_overlaps(self, groups: list[WidthGroup]) -> list[WidthGroup]:
        """A projection cut by two groups would need both cuts at once: the later group is refused."""
        owner: dict[str, str] = {}
        result = []
        for group in groups:
            if group.droppable:
                shared = next((m for m in group.modules if m in owner), None)
                if shared is not None:
                    group = replace(group, droppable=False,
                                    reason=f"{shared} is also a projection of the {owner[shared]} group")
                else:
                    owner.update({m: group.name for m in group.modules})
            result.append(group)
        return result

    def first_node(self, name: str) -> int:
        """Where module ``name`` first runs, in graph order."""
        return min((self.order[n] for n in self.grouping.regions.get(name, ())), default=0)

    def params(self, modules: Iterable[str]) -> int:
        return sum(p.numel() for m in modules for p in self.modules[m].parameters())


# -- FLOPs and the proof --------------------------------------------------------------------------
def _with_flops(groups: list[WidthGroup], measured: Probe) -> list[WidthGroup]:
    if not measured.total_flops:
        return groups
    result = []
    for group in groups:
        modules = list(group.modules)
        if group.kind == "heads" and group.droppable:
            # The attention op's own FLOPs shrink with the heads too: count the module holding the projections.
            common = _common_parent(group.producers)
            modules = [common, *[m for m in modules if not m.startswith(common + ".")]] if common else modules
        flops = sum(measured.flops.get(m, 0) for m in modules)
        result.append(replace(group, flops_share=flops / measured.total_flops))
    return result


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    common = []
    for x, y in zip(a[:-1], b[:-1]):
        if x != y:
            break
        common.append(x)
    return common


def _planned(model: nn.Module, group: WidthGroup, measured: Probe) -> WidthGroup:
    """A fused head group with its rewrite planned on the attention module's traced graph, or
    refused with the op the rewrite cannot follow."""
    request = group.rewrite
    modules = dict(model.named_modules())
    call = measured.calls.get(request.module)
    fused = f"query, key and value are split from one fused projection ({group.producers[0]})"
    if call is None:
        return replace(group, droppable=False, rewrite=None,
                       reason=f"{fused}, and {request.module} did not run in the probe")
    try:
        planned = plan_head_rewrite(modules[request.module], request.module, request.producer, request.consumer,
                                    request.parts, request.segments, group.part_widths[-1],
                                    [modules[m] for m in group.modules], call.arg_shapes,
                                    modules[group.cut_targets(0)[0]].weight)
    except Refusal as refusal:
        return replace(group, droppable=False, rewrite=None, reason=f"{fused}; its heads cannot be cut: {refusal}")
    return replace(group, rewrite=planned)


def _common_parent(names: Iterable[str]) -> str | None:
    parents = {n.rpartition(".")[0] for n in names}
    return parents.pop() if len(parents) == 1 else None


def unit_outputs(measured: Probe, units: Iterable[str]) -> dict[str, Any]:
    """Each unit's output shape(s), as the probe saw them."""
    shapes = {}
    for unit in units:
        call = measured.calls.get(unit)
        if call is not None:
            shapes[unit] = (call.output_shape, [leaf.shape for leaf in call.output.leaves])
    return shapes


def prove(model: nn.Module, inputs: ExampleInputs, groups: list[WidthGroup], measured: Probe) -> list[WidthGroup]:
    """Run the model on fake tensors with the groups cut; refuse each group whose cut fails or
    changes a unit's output shape. All groups are tried at once first, then one by one."""
    from .cutting import trial_cuts

    candidates = [g for g in groups if g.droppable]
    if not candidates:
        return groups
    units = {g.unit for g in candidates}
    expected = unit_outputs(measured, units)

    def failure(trial: list[WidthGroup]) -> str | None:
        try:  # a trial leaves nothing in the model, whatever the model's forward does under a cut
            with untouched(model), trial_cuts(model, trial):
                seen = probe(model, inputs)
        except Exception as exc:  # noqa: BLE001 - any error is the model refusing the cut
            exc = exc.__cause__ or exc  # the probe wraps the model's own error
            text = str(exc).strip().splitlines()
            return f"{type(exc).__name__}: {text[0] if text else ''}"
        changed = [u for u in {g.unit for g in trial} if unit_outputs(seen, [u]).get(u) != expected.get(u)]
        return f"the cut changes the output shape of {changed[0]}" if changed else None

    if failure(candidates) is None:
        return groups
    refused = {}
    for group in candidates:
        problem = failure([group])
        if problem is not None:
            refused[group.name] = problem
    return [replace(g, droppable=False, reason="the model fails with this group cut, so its code fixes the "
                    f"width somewhere (a reshape or split to a constant size): {refused[g.name]}")
            if g.name in refused else g for g in groups]

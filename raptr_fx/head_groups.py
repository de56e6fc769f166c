"""Attention-head width groups: the query, key and value projections of one attention op and
the output projection after it.

The op is ``scaled_dot_product_attention`` or ``matmul -> softmax -> matmul``. The parts a cut
samples are key/value heads, each with the query heads that share it (grouped-query attention), so
a cut keeps whole heads. Separate projections need code that sizes its reshapes from the data
(``view(b, t, -1, head_dim)``, as Hugging Face models do); a head count fixed in the code is caught
by the width proof (``width.prove``) and reported. A fused projection split into q, k and v by
sizes fixed in the code (nanoGPT's ``c_attn(x).split(c, dim=2)``, timm's ``qkv(x).reshape(B, N, 3,
heads, head_dim)``) is cut through a rewrite of its attention module's graph
(:mod:`raptr_fx.head_rewrite`, ``WidthGroup.rewrite``, planned by :func:`with_rewrite_planned`),
or refused with the op it cannot follow.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from .head_rewrite import HeadRewrite, Refusal, plan_head_rewrite
from .probe import Probe
from .residuals import op_name
from .tracing import is_shape_query
from .units import WidthGroup
from .width_facts import WidthFacts

__all__ = ["HeadGroupFinder", "with_rewrite_planned"]

_ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_cudnn_attention"}
_MATMULS = {"matmul", "bmm", "einsum"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}


class HeadGroupFinder:
    """The attention-head groups of each unit (:meth:`head_groups`), cuttable or refused with the reason."""

    def __init__(self, facts: WidthFacts):
        self.facts = facts

    def head_groups(self, unit: str, region: set[fx.Node]) -> list[WidthGroup]:
        """One group per attention op in unit ``unit`` (``region``)."""
        groups = []
        for node in self.facts.traced.graph.nodes:
            if node not in region:
                continue
            core = self.attention_core(node)
            # torch.export traces into nn.MultiheadAttention: its heads are the module's group.
            if core is not None and not any(isinstance(self.facts.modules.get(m), nn.MultiheadAttention)
                                            for m in self.facts.traced.scopes.get(node, ())):
                groups.append(self.head_group(unit, region, *core))
        return [g for g in groups if g is not None]

    def attention_core(self, node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, str] | None:
        """(query, key, value, output, op) of an attention op, or None."""
        name = op_name(node)
        if name in _ATTENTION_OPS and len(node.args) >= 3:
            query, key, value = node.args[:3]
            if isinstance(query, fx.Node) and isinstance(key, fx.Node) and isinstance(value, fx.Node):
                out = node
                if not isinstance(node.meta.get("val"), torch.Tensor) and node.meta.get("val") is not None:
                    out = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
                return query, key, value, out, name
        if name not in _SOFTMAX or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        scores = self.walk_to(node.args[0], _MATMULS, backwards=True)
        weighted = self.walk_to(node, _MATMULS, backwards=False)
        if scores is None or weighted is None or len(scores.args) < 2 or len(weighted.args) < 2:
            return None
        query, key, value = scores.args[0], scores.args[1], weighted.args[1]
        if not (isinstance(query, fx.Node) and isinstance(key, fx.Node) and isinstance(value, fx.Node)):
            return None
        return query, key, value, weighted, name

    def walk_to(self, node: fx.Node, ops: set[str], *, backwards: bool, limit: int = 8) -> fx.Node | None:
        """The nearest op in ``ops`` along a chain of single-tensor steps (mask adds, scaling, dropout)."""
        current: fx.Node | None = node
        for _ in range(limit):
            if current is None:
                return None
            if op_name(current) in ops:
                return current
            if backwards:
                values = [a for a in current.all_input_nodes
                          if self.facts.traced.is_value(a) and _shape(a) == _shape(current)]
                current = values[0] if values else None
            else:
                users = [u for u in current.users if not is_shape_query(u)]
                current = users[0] if len(users) == 1 else None
        return None

    def nearest_projections(self, node: fx.Node, region: set[fx.Node], *, backwards: bool) -> set[str]:
        """The first projections met from ``node`` inside ``region``: whose outputs it reads
        (``backwards``), or that read it."""
        found: set[str] = set()
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in seen or current not in region:
                continue
            seen.add(current)
            if backwards and current in self.facts.output_of:
                found.add(self.facts.output_of[current])
                continue
            if not backwards:
                hit = next((p for p in self.facts.projections if current in self.facts.module_graph.regions[p]), None)
                if hit is not None and current is not node:
                    found.add(hit)
                    continue
                stack.extend(u for u in self.facts.graph.successors(current))
            else:
                stack.extend(self.facts.tensor_inputs(current))
        return found

    def nearest_modules(self, node: fx.Node, region: set[fx.Node]) -> list[str]:
        """The modules nearest before ``node`` (a query projected by a convolution, say)."""
        found, seen, stack = [], set(), [node]
        while stack:
            current = stack.pop()
            if current in seen or current not in region:
                continue
            seen.add(current)
            if current.op == "call_module" and str(current.target) in self.facts.modules:
                found.append(str(current.target))
                continue
            stack.extend(self.facts.tensor_inputs(current))
        return found

    def head_group(self, unit: str, region: set[fx.Node], query: fx.Node, key: fx.Node, value: fx.Node,
                   out: fx.Node, op: str) -> WidthGroup | None:
        """The group of the attention op whose query, key, value and output are given, or its refusal."""
        sources = [self.nearest_projections(n, region, backwards=True) for n in (query, key, value)]
        consumers = self.nearest_projections(out, region, backwards=False)
        named = sorted(set().union(*sources) | consumers, key=self.facts.first_node)
        if not any(sources):  # projected by something else (1x1 convolutions): no group to cut, but say so
            modules = sorted({m for n in (query, key, value) for m in self.nearest_modules(n, region)},
                             key=self.facts.first_node)
            listed = ", ".join(f"{m} ({type(self.facts.modules[m]).__name__})" for m in modules) or "no module"
            return WidthGroup(unit, "heads", 0, (unit,), droppable=False,
                              reason=f"the {op} attention's query, key and value come from {listed}, no nn.Linear or "
                              "Conv1D projection: its heads are not cut")
        group = WidthGroup(unit, "heads", 0, tuple(named), params=self.facts.params(named))

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
        pq, pk, pv, po = (self.facts.projections[n] for n in (q, k, v, o))
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
        problem = self.facts.call_problem(group.modules)
        return group if problem is None else refuse(problem)

    def fused_head_group(self, group: WidthGroup, refuse: Any, heads: int, head_dim: int, kv_heads: int,
                         value_dim: int) -> WidthGroup:
        """Query, key and value split from one projection: cut through a rewrite of the attention
        module's graph, planned once shapes are known (:func:`with_rewrite_planned`)."""
        fused, o = group.modules
        pf, po = self.facts.projections[fused], self.facts.projections[o]
        kv_rows = pf.out_features - heads * head_dim
        if kv_rows != kv_heads * (head_dim + value_dim) and kv_rows > 0 and kv_rows % (head_dim + value_dim) == 0:
            kv_heads = kv_rows // (head_dim + value_dim)  # repeated for their query heads before the attention op
        if kv_heads == 0 or heads % kv_heads:
            return refuse(f"{heads} query heads cannot be grouped over {kv_heads} key/value heads")
        per_group = heads // kv_heads
        segments = (per_group * head_dim, head_dim, value_dim)  # rows per key/value head of q, k and v
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
        problem = self.facts.call_problem((*group.modules, module))
        return group if problem is None else refuse(problem)


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    common = []
    for x, y in zip(a[:-1], b[:-1]):
        if x != y:
            break
        common.append(x)
    return common


def with_rewrite_planned(model: nn.Module, group: WidthGroup, measured: Probe) -> WidthGroup:
    """A fused head group with its rewrite planned on the attention module's traced graph, or
    refused with the op the rewrite cannot follow."""
    request = group.rewrite
    assert request is not None  # planned only for groups that ask for a rewrite
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


def with_rewrite_for_separate(model: nn.Module, group: WidthGroup, measured: Probe) -> WidthGroup:
    """A group of separate q, k and v projections whose cut failed the proof (a head count fixed
    in the code, ``view(b, t, self.n_head, d)``), with a rewrite of its attention module planned,
    or its refusal with the op the rewrite cannot follow added."""
    module = _common_parent(group.modules)
    if module is None or module not in measured.calls:
        return group
    modules = dict(model.named_modules())
    q, k, v, o = (m[len(module) + 1:] for m in group.modules)
    try:
        planned = plan_head_rewrite(modules[module], module, q, o, group.parts, (group.part_widths[0],),
                                    group.part_widths[-1], [modules[m] for m in group.modules],
                                    measured.calls[module].arg_shapes, modules[group.cut_targets(0)[0]].weight,
                                    others=((k, group.part_widths[1]), (v, group.part_widths[2])))
    except Refusal as refusal:
        return replace(group, reason=f"{group.reason}; a rewrite of {module} cannot follow its heads either: {refusal}")
    return replace(group, droppable=True, reason=None, rewrite=planned)


def _common_parent(names: tuple[str, ...]) -> str | None:
    parents = {n.rpartition(".")[0] for n in names}
    return parents.pop() if len(parents) == 1 else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None

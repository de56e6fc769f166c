"""Gather the facts about a unit that ``skipping.judge`` decides its droppability from.

``unit_choice`` decides which modules are units; for each one, :class:`UnitFactFinder` reads the
module graph and the probe: what the unit returns and which of its outputs anyone reads, where its
stream enters and leaves, whether its shortcut is a projection, and which weights outside it only
its branch uses (a parent's norm or layer scale), with the modules holding them. It decides
nothing: ``skipping.judge`` turns the facts into the verdict.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import networkx as nx
import torch
from torch import fx, nn

from .module_graph import ModuleGraph
from .probe import Call, Probe
from .residuals import Residual, op_name
from .skipping import ObservedOutput, Owned, UnitFacts
from .units import DropRule

__all__ = ["UnitFactFinder"]

# Modules an owned module may be without example inputs to check its shapes: they keep their input's.
_SHAPE_KEEPING = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
# What may run on a skipped branch's zeros after the unit, keeping them zeros: a layer scale
# (``gamma * f(x)``), reshapes and casts, dropout, activations with f(0) = 0.
_ZERO_KEEPING = {"mul", "mul_", "rmul", "neg", "getitem", "to", "_to_copy", "alias", "clone", "contiguous",
                 "detach", "type", "float", "half", "bfloat16", "view", "reshape", "_unsafe_view", "flatten",
                 "unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "dropout",
                 "native_dropout", "relu", "gelu", "silu", "tanh"}
_ZERO_KEEPING_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh)


class UnitFactFinder:
    """The facts about each chosen unit (:meth:`facts`), read from the module graph and the probe;
    one instance per discovery, caching what several units share (:meth:`fed`, :meth:`readers`)."""

    def __init__(self, model: nn.Module, module_graph: ModuleGraph, measured: Probe | None):
        self.model = model
        self.modules = dict(model.named_modules())
        self.module_graph = module_graph
        self.traced = module_graph.traced
        self.graph = module_graph.graph
        self.regions = module_graph.regions
        self.order = module_graph.order
        self.measured = measured
        self._fed: set[fx.Node] | None = None  # see fed()
        self._readers: dict[str, list[fx.Node]] | None = None  # see readers()

    def facts(self, name: str, module: nn.Module, drop: DropRule, residuals: list[Residual],
              zero_fix: str = "") -> UnitFacts:
        """What ``skipping.judge`` decides unit ``name`` from; ``zero_fix``: the chooser's hint for a
        refused zero unit (see ``UnitChoice.zero_fix``)."""
        call = self.measured.calls.get(name) if self.measured else None
        output = self.observed_output(name, call)
        return UnitFacts(
            name=name,
            module=module,
            drop=drop,
            calls=self.traced.call_counts.get(name, 1),
            projection=self.projection(residuals),
            shortcut_scale=next((r.shortcut_scale for r in residuals if r.shortcut_scale is not None), None),
            zero_fix=zero_fix,
            owned=self.ownership(name, drop, residuals, output),
            output=output,
            computed_from=self.computed_from(name, output),
            unread=self.unread_outputs(name, output),
            stream_node=self.stream_node(name, drop, residuals),
            stream_argument=self.stream_argument(name, residuals[0]),
            arg_shapes=call.arg_shapes if call else None,
            output_shape=call.output_shape if call else None,
        )

    def observed_output(self, name: str, call: Call | None) -> ObservedOutput | None:
        """What the unit returns: the probe sees real structures, torch.fx sees graph nodes; merge both."""
        traced = self.traced.call_outputs.get(name)
        if call is None:
            if traced is not None and traced.container == "tensor" and self.indexed(name):
                # A leaf module's result is one opaque node; indexing it shows it is a container.
                return ObservedOutput("result its caller indexes into (pass example inputs to see what it holds)")
            return traced
        seen = call.output
        if traced is not None and [leaf.key for leaf in traced.leaves] == [leaf.key for leaf in seen.leaves]:
            leaves = [replace(leaf, node=mine.node) for leaf, mine in zip(seen.leaves, traced.leaves)]
            return replace(seen, leaves=leaves)
        return seen

    def indexed(self, name: str) -> bool:
        """A leaf module's result (one opaque node) that its caller indexes: a container.
        A traced module's tensor result sliced by its caller (``x[:, 0]``) is still a tensor."""
        return any(node.op == "call_module" and user.op == "call_function" and user.target is operator.getitem
                   for node in self.module_graph.outputs(name) for user in node.users)

    def unread_outputs(self, name: str, output: ObservedOutput | None) -> frozenset[int | str]:
        """Computed output elements that nothing outside the unit reads in the traced forward
        (``(hidden, attn_weights)`` without ``output_attentions``): a skip can return None there."""
        if output is None or output.container == "tensor":
            return frozenset()
        region = self.regions[name]
        user_outputs = set(self.traced.user_outputs)
        outputs = self.module_graph.outputs(name)
        unread = set()
        for leaf in output.leaves:
            if leaf.kind != "tensor":
                continue
            if leaf.node is not None:  # torch.fx: any reader at all, shape queries included
                if leaf.node not in user_outputs and all(u in region for u in leaf.node.users):
                    unread.add(leaf.key)
            elif self.traced.tracer == "torch.export":  # the unit's outputs read outside, by shape
                if not any(_shape(o) == leaf.shape for o in outputs):
                    unread.add(leaf.key)
            elif len(outputs) == 1 and outputs[0] not in user_outputs:  # a torch.fx leaf module: one node
                indices = [u.args[1] for u in outputs[0].users]
                if all(u.op == "call_function" and u.target is operator.getitem for u in outputs[0].users):
                    if leaf.key not in indices:
                        unread.add(leaf.key)
        return frozenset(unread)

    def computed_from(self, name: str, output: ObservedOutput | None) -> dict[int | str, list[str]]:
        """For each computed output element: the parameters inside the unit it is computed from."""
        if output is None or output.container == "tensor":
            return {}
        region = self.regions[name]
        found = {}
        for leaf in output.leaves:
            if leaf.kind != "tensor":
                continue
            # torch.fx gives the node; with torch.export, find it among the unit's outputs by shape.
            nodes = [leaf.node] if leaf.node is not None else [
                o for o in self.module_graph.outputs(name) if _shape(o) == leaf.shape]
            params = {p for node in nodes for n in (nx.ancestors(self.graph, node) | {node}) & region
                      for p in self.traced.param_uses.get(n, ())}
            found[leaf.key] = sorted(params)
        return found

    def projection(self, residuals: list[Residual]) -> list[str] | None:
        """The modules of the first projection shortcut, or None when every shortcut is the identity."""
        residual = next((r for r in residuals if r.shortcut), None)
        if residual is None:
            return None
        return sorted({s for n in residual.shortcut for s in self.traced.scopes[n][-1:]})

    # -- what a unit owns outside its module -----------------------------------------------
    def ownership(self, name: str, drop: DropRule, residuals: list[Residual],
                  output: ObservedOutput | None) -> Owned:
        """The weights outside unit ``name`` that only its branch uses, and the modules holding them.

        Before the unit: what only the unit consumes (a parent's norm feeding a branch, a weight
        standardized for it). After it, zero units only: what the branch runs on the unit's result
        before the add (a parent's layer scale ``gamma``, a post-norm of its output).
        """
        region = self.regions[name]
        before = self.only_for(region, self.inputs_of(region), self.kept_when_skipped(name, drop, residuals, output))
        after = self.branch_after(name, residuals) if drop == "zero" else set()
        params = sorted(self.outside_params(name, before | after))
        if not params:
            return Owned()
        fed = self.fed()
        mine = region | before | after
        mine |= self.only_for(mine, self.inputs_of(after) - mine, fed)  # ``gamma.view(...)``: weights only
        readers = self.readers()
        shared = tuple(p for p in params if any(n not in mine for n in readers[p]))
        if shared:
            return Owned(shared=shared)
        before_modules = self.owned_modules(name, before)
        after_modules = self.owned_modules(name, after)
        loose = tuple(sorted({p for n in before if n in fed for p in self.outside_params(name, {n})
                              if not any(p.startswith(m + ".") for m in before_modules)}))
        reshaping = tuple((m, change) for m in before_modules + after_modules
                          if (change := self.reshaping(m)) is not None)
        not_zero: tuple[str, ...] = ()
        if after and self.outside_params(name, after):
            in_module = lambda n: any(s in after_modules for s in self.traced.scopes[n])  # noqa: E731
            not_zero = tuple(self.op_label(n) for n in sorted(after, key=self.order.__getitem__)
                             if not in_module(n) and not self.keeps_zeros(n, region | after))
        return Owned(tuple(params), tuple(before_modules), tuple(after_modules),
                     loose=loose, reshaping=reshaping, not_zero=not_zero)

    def inputs_of(self, nodes: set[fx.Node]) -> set[fx.Node]:
        return {p for n in nodes for p in self.graph.predecessors(n) if p not in nodes}

    def only_for(self, consumers: set[fx.Node], start: set[fx.Node], kept: set[fx.Node] | None) -> set[fx.Node]:
        """The nodes, from ``start`` back, that run only for ``consumers``: each of their users is one
        of them or another such node. ``kept`` nodes (and the model's inputs) are never among them;
        None: nothing is (they cannot be told apart)."""
        if kept is None:
            return set()
        dead: set[fx.Node] = set()
        pending = set(start)
        seen = set(pending)
        while pending:  # latest first: a node's users are decided before the node
            node = max(pending, key=self.order.__getitem__)
            pending.remove(node)
            if node in kept or node.op == "placeholder" and node in self.traced.user_inputs:
                continue
            users = list(self.graph.successors(node))
            if users and all(u in consumers or u in dead for u in users):
                dead.add(node)
                for p in self.graph.predecessors(node):
                    if p not in consumers and p not in seen:
                        seen.add(p)
                        pending.add(p)
        return dead

    def branch_after(self, name: str, residuals: list[Residual]) -> set[fx.Node]:
        """The nodes of a zero unit's branch after it, outside it (a parent's layer scale or post-norm)."""
        region = self.regions[name]
        return {node for residual in residuals for node in residual.branch_nodes - region
                if any(a in region for a in nx.ancestors(self.graph, node))}

    def outside_params(self, name: str, nodes: set[fx.Node]) -> set[str]:
        return {p for n in nodes for p in self.traced.param_uses.get(n, ()) if not p.startswith(name + ".")}

    def fed(self) -> set[fx.Node]:
        """The nodes computed from the model's inputs (the rest are computed from weights alone)."""
        if self._fed is None:
            inputs = self.traced.user_inputs
            self._fed = set(inputs).union(*(nx.descendants(self.graph, i) for i in inputs))
        return self._fed

    def readers(self) -> dict[str, list[fx.Node]]:
        """Each parameter's reading nodes."""
        if self._readers is None:
            self._readers = {}
            for node, params in self.traced.param_uses.items():
                for p in params:
                    self._readers.setdefault(p, []).append(node)
        return self._readers

    def owned_modules(self, name: str, nodes: set[fx.Node]) -> list[str]:
        """The outermost modules with weights that run only as ``nodes``, once per forward, outside unit ``name``."""
        found: list[str] = []
        scopes = {s for n in nodes for s in self.traced.scopes[n]}
        for module_name in sorted(scopes, key=lambda s: (s.count("."), s)):
            module = self.modules.get(module_name)
            if (module is None or module_name == name or module_name.startswith(name + ".")
                    or any(module_name.startswith(f + ".") for f in found)
                    or next(module.parameters(), None) is None):
                continue
            if self.regions[module_name] <= nodes and self.traced.call_counts.get(module_name, 1) == 1:
                found.append(module_name)
        return found

    def reshaping(self, name: str) -> str | None:
        """How owned module ``name`` may not keep its input's shape (None: it keeps it). A skipped
        unit's owned module returns zeros shaped like its first argument in its output's place."""
        call = self.measured.calls.get(name) if self.measured else None
        if call is not None:
            before, after = call.arg_shapes.get(0), call.output_shape
            if before is not None and before == after:
                return None
            if before is None or after is None:
                return "does not take and return one tensor"
            return f"changes its input's shape from {list(before)} to {list(after)}"
        if isinstance(self.modules[name], _SHAPE_KEEPING) and 0 in self.traced.call_args.get(name, {}):
            return None
        return "may change its input's shape (pass example inputs to check)"

    def keeps_zeros(self, node: fx.Node, branch: set[fx.Node]) -> bool:
        """Whether ``node`` maps an all-zero branch value to zeros (``gamma * f(x)``, a reshape, dropout)."""
        if node.op == "call_module":
            return isinstance(self.modules.get(str(node.target)), _ZERO_KEEPING_MODULES)
        name = op_name(node).removeprefix("__").removesuffix("__")
        if name in ("div", "truediv", "div_"):
            return bool(node.args) and node.args[0] in branch  # zeros divided, not dividing
        return name in _ZERO_KEEPING

    def op_label(self, node: fx.Node) -> str:
        return str(node.target) if node.op == "call_module" else (op_name(node) or node.name)

    def kept_when_skipped(self, name: str, drop: DropRule, residuals: list[Residual],
                          output: ObservedOutput | None) -> set[fx.Node] | None:
        """The unit's argument nodes a skipped unit still returns (the stream of an identity unit,
        pass-through elements); None when they cannot be told apart (torch.export, no call record)."""
        returned = [leaf.source for leaf in (output.leaves if output else []) if leaf.kind == "input"]
        if drop == "zero" and not returned:
            return set()  # returns zeros: its argument's values are not used
        args = self.traced.call_args.get(name)
        if args is None:
            return None
        kept = {args[key] for key in returned if key in args}
        if drop == "identity":
            kept.add(residuals[0].origin)
        return kept

    def stream_node(self, name: str, drop: DropRule, residuals: list[Residual]) -> fx.Node | None:
        """The graph node of the unit's stream output: after its residual adds, or its branch."""
        if drop == "identity":
            found = self.module_graph.stream_outputs(name, residuals[0].add)
        else:
            found = [o for o in self.module_graph.outputs(name)
                     if o is residuals[0].branch or o in residuals[0].branch_nodes]
        return found[0] if len(found) == 1 else None

    def stream_argument(self, name: str, residual: Residual) -> int | str | None:
        if name in self.traced.call_args:
            for key, node in self.traced.call_args[name].items():
                if node is residual.origin or node in residual.branch_nodes:
                    return key
            return None
        if self.measured is None or name not in self.measured.calls:
            return 0
        call = self.measured.calls[name]
        shape = call.output_shape or next((leaf.shape for leaf in call.output.leaves if leaf.kind == "tensor"), None)
        return next((k for k, s in call.arg_shapes.items() if s == shape), None)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None

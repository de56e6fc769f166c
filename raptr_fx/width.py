"""Find the width groups of a model: MLP hidden units and attention heads that can be cut.

A width group is a set of projections inside one unit whose shared hidden dimension can be
narrowed for a training step without touching anything else:

* ``mlp``: producers that map the stream to H hidden units and one consumer that maps H back,
  with only elementwise ops between them (``mlp_groups.py``);
* ``heads``: query, key and value projections feeding one attention op and the output projection
  after it, cut by whole key/value heads; a fused q/k/v projection through a rewrite of its
  attention module's graph (``head_groups.py``, ``head_rewrite.py``); an ``nn.MultiheadAttention``
  (its own, or inside ``nn.TransformerEncoderLayer``/``DecoderLayer``) as ``(attention,
  attention.out_proj)``, its forward replaced while cut (``mha_heads.py``).

Width-group finding reads what :func:`~raptr_fx.discovery.discover` computed (its module graph,
probe and example inputs): it neither traces nor probes the model again. Both finders read the
projections of :class:`~raptr_fx.width_facts.WidthFacts`; this module runs them over the units,
groups ``nn.MultiheadAttention``'s packed heads, refuses what no group can cut (experts in one
3-D parameter) and
proves each group.

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

from dataclasses import replace
from typing import Any, Iterable

import torch
from torch import fx, nn

from .cutting import trial_cuts
from .discovery import Discovery, discover
from .errors import RaptrError
from .head_groups import HeadGroupFinder, with_rewrite_for_separate, with_rewrite_planned
from .mha_heads import multihead_problem
from .mlp_groups import MlpGroupFinder
from .probe import Probe, probe
from .tracing import ExampleInputs
from .units import Projection, WidthGroup
from .untouched import as_discovered, untouched
from .width_facts import WidthFacts
from .wrappers import seen_through

__all__ = ["WidthGroup", "Projection", "find_width_groups", "width_groups"]


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
    return width_groups(model, discovery)


def width_groups(model: nn.Module, discovery: Discovery) -> list[WidthGroup]:
    """The width groups inside the units of ``discovery`` (see :func:`find_width_groups`), from
    what it computed: its module graph, probe and example inputs. ``model`` is the model it analysed.

    Example:
        >>> discovery = raptr_fx.discover(model, inputs)
        >>> groups = width_groups(model, discovery)
    """
    if discovery.module_graph is None:
        raise ValueError("the Discovery has no module graph: make it with raptr_fx.discover(model, ...)")
    with seen_through(model) as real_name:  # discovery's graph names the modules inside wrappers as unwrapped
        groups = _width_groups_seen_through(model, discovery)
    return [replace(g, unit=real_name(g.unit), modules=tuple(real_name(m) for m in g.modules),
                    rewrite=g.rewrite and replace(g.rewrite, module=real_name(g.rewrite.module))) for g in groups]


def _width_groups_seen_through(model: nn.Module, discovery: Discovery) -> list[WidthGroup]:
    traced, inputs = discovery.traced, discovery.inputs
    if inputs is not None and not _has_shapes(traced):
        _propagate_shapes(model, traced, inputs)  # once: the shapes stay in the discovery's graph
    assert discovery.module_graph is not None  # width_groups checked it
    facts = WidthFacts(model, discovery.module_graph)
    finders = HeadGroupFinder(facts), MlpGroupFinder(facts)
    # Units may nest (a refused outer candidate and a branch inside it): a projection is cut by one group.
    groups = without_overlaps([g for block in discovery.blocks if block.name in facts.module_graph.regions
                               for g in unit_groups(facts, *finders, block.name)])
    if inputs is None:
        return [g if g.kind == "mlp" or not g.droppable else
                replace(g, droppable=False, reason="pass example inputs to count its heads") for g in groups]
    measured = discovery.measured
    assert measured is not None  # discover probes the model whenever it has example inputs
    groups = [with_rewrite_planned(model, g, measured) if g.rewrite is not None and g.droppable else g
              for g in groups]
    groups = _with_flops(groups, measured)
    return _with_rewrites(model, inputs, prove(model, inputs, groups, measured), measured)


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


# -- the units' groups ---------------------------------------------------------------------------
def unit_groups(facts: WidthFacts, heads: HeadGroupFinder, mlps: MlpGroupFinder, unit: str) -> list[WidthGroup]:
    """The groups of unit ``unit``: its heads and MLPs, and what no group can cut; of two groups
    sharing a projection, the later is refused."""
    region = facts.module_graph.regions[unit]
    inside = [p for p in facts.projections.values() if p.name.startswith(unit + ".")]
    groups = heads.head_groups(unit, region) + mlps.mlp_groups(unit, region, inside)
    groups = [facts.through_adapters(g) for g in groups]
    groups += packed_weight_groups(facts, unit, groups)
    groups.sort(key=lambda g: facts.first_node(g.consumer))
    return without_overlaps(groups)


def packed_weight_groups(facts: WidthFacts, unit: str, groups: list[WidthGroup]) -> list[WidthGroup]:
    """Weights no projection module holds: ``nn.MultiheadAttention``'s packed ``in_proj_weight``, a
    head group of its own; experts stored as one 3-D parameter ([experts, out, in]), refused with why."""
    covered = {m for g in groups for m in g.modules}
    found = []
    for name, module in facts.modules.items():
        if not name.startswith(unit + ".") or any(name.startswith(c) for c in covered):
            continue
        if isinstance(module, nn.MultiheadAttention):
            found.append(multihead_group(facts, unit, name, module))
            continue
        # [experts, out, in]: a matrix per expert. A [heads, 1, 1] scale (a per-head logit
        # temperature) is 3-D too, but holds no matrix to cut.
        stacked = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and min(p.shape) > 1]
        if stacked:
            found.append(WidthGroup(unit, "mlp", 0, (name,), droppable=False, params=facts.params([name]),
                                    reason=f"its experts keep their weights in one 3-D parameter "
                                    f"({name}.{stacked[0]}): cutting expert hidden units is not supported"))
    return found


def multihead_group(facts: WidthFacts, unit: str, name: str, module: nn.MultiheadAttention) -> WidthGroup:
    """Its parts are heads: the q, k and v rows of ``in_proj_weight``, the columns of ``out_proj``."""
    group = WidthGroup(unit, "heads", module.num_heads, (name, f"{name}.out_proj"), parts=module.num_heads,
                       part_widths=(3 * module.head_dim, module.head_dim), params=facts.params([name]))
    problem = multihead_problem(module) or facts.call_problem([name])
    return group if problem is None else replace(group, droppable=False,
                                                 reason=f"nn.MultiheadAttention {name}: {problem}")


def without_overlaps(groups: list[WidthGroup]) -> list[WidthGroup]:
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


# -- FLOPs and the proof --------------------------------------------------------------------------
def _with_flops(groups: list[WidthGroup], measured: Probe) -> list[WidthGroup]:
    if not measured.total_flops:
        return groups
    result = []
    for group in groups:
        modules = list(group.modules)
        if group.kind == "heads" and group.droppable:
            # The attention op's own FLOPs shrink with the heads too: count the module holding the
            # projections (nn.MultiheadAttention holds its output projection: itself).
            holder = group.producers[0]
            common = holder if group.consumer.startswith(holder + ".") else _common_parent(group.producers)
            if common:
                modules = [common, *[m for m in modules if m != common and not m.startswith(common + ".")]]
        flops = sum(measured.flops.get(m, 0) for m in modules)
        result.append(replace(group, flops_share=flops / measured.total_flops))
    return result


_PROOF_FAILED = "the model fails with this group cut"


def _with_rewrites(model: nn.Module, inputs: ExampleInputs, groups: list[WidthGroup], measured: Probe) -> list[WidthGroup]:
    """Separate q, k and v projections whose code fixes the head count fail the proof: cut them
    through a rewrite of their attention module as fused ones are (proved again), or add to the
    refusal the op that stops it (:func:`~raptr_fx.head_groups.with_rewrite_for_separate`)."""
    retried = {g.name: with_rewrite_for_separate(model, g, measured) for g in groups
               if g.kind == "heads" and not g.droppable and g.rewrite is None and len(g.modules) == 4
               and (g.reason or "").startswith(_PROOF_FAILED)}
    if not retried:
        return groups
    retried.update({g.name: g for g in prove(model, inputs, _with_flops(list(retried.values()), measured), measured)})
    return [retried.get(g.name, g) for g in groups]


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
    candidates = [g for g in groups if g.droppable]
    if not candidates:
        return groups
    units = {g.unit for g in candidates}
    expected = unit_outputs(measured, units)

    def failure(trial: list[WidthGroup]) -> str | None:
        try:  # a trial leaves nothing in the model, whatever the model's forward does under a cut; it
            # sees the model as discovery's probe did, whose record it is compared with
            with as_discovered(model), trial_cuts(model, trial):
                seen = probe(model, inputs)
        except Exception as raised:  # noqa: BLE001 - any error is the model refusing the cut
            exc = raised.__cause__ or raised  # the probe wraps the model's own error
            if isinstance(exc, RaptrError) or "heads' cut" in str(exc):  # a rewritten forward's own guard
                return str(exc).strip()
            text = str(exc).strip().splitlines()
            return ("the model's code fixes the width somewhere (a reshape or split to a constant size): "
                    f"{type(exc).__name__}: {text[0] if text else ''}")
        changed = [u for u in {g.unit for g in trial} if unit_outputs(seen, [u]).get(u) != expected.get(u)]
        return f"the cut changes the output shape of {changed[0]}" if changed else None

    if failure(candidates) is None:
        return groups
    refused = {}
    for group in candidates:
        problem = failure([group])
        if problem is not None:
            refused[group.name] = problem
    return [replace(g, droppable=False, reason=f"{_PROOF_FAILED}: {refused[g.name]}")
            if g.name in refused else g for g in groups]

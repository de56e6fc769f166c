"""Discovery results as plain data (rows and totals), for tables, JSON and DOT."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .discovery import Discovery
from .residuals import is_add
from .units import WidthGroup

__all__ = ["summary", "to_json", "to_dot", "width_summary", "width_to_json"]


def summary(discovery: Discovery) -> dict[str, Any]:
    """Totals shown under the table: units, parameters and compute inside droppable units."""
    droppable = discovery.droppable
    params = sum(b.params for b in droppable)
    shares = [b.flops_share for b in droppable]
    return {
        "model": discovery.model_type,
        "tracer": discovery.tracer,
        "probe": discovery.probe,  # "fake" (fake tensors), "real" (one real pass) or None (no example inputs)
        "granularity": discovery.granularity,
        "units": len(discovery.blocks),
        "droppable_units": len(droppable),
        "total_params": discovery.total_params,
        "droppable_params": params,
        "droppable_params_share": params / discovery.total_params if discovery.total_params else 0.0,
        "droppable_flops_share": sum(shares) if droppable and None not in shares else None,
    }


def to_json(discovery: Discovery) -> dict[str, Any]:
    return {**summary(discovery), "blocks": [dataclasses.asdict(b) for b in discovery.blocks],
            "replaced": [dataclasses.asdict(b) for b in discovery.replaced]}


def width_summary(model_type: str, groups: Sequence[WidthGroup]) -> dict[str, Any]:
    """Totals under the width table: groups found and cuttable, compute in cuttable groups."""
    cuttable = [g for g in groups if g.droppable]
    shares = [g.flops_share for g in cuttable]
    return {
        "model": model_type,
        "groups": len(groups),
        "cuttable_groups": len(cuttable),
        "cuttable_by_kind": {kind: sum(g.kind == kind for g in cuttable) for kind in ("mlp", "heads")},
        "cuttable_flops_share": sum(shares) if cuttable and None not in shares else None,
    }


def width_to_json(model_type: str, groups: Sequence[WidthGroup]) -> dict[str, Any]:
    return {**width_summary(model_type, groups), "width_groups": [dataclasses.asdict(g) for g in groups]}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(discovery: Discovery) -> str:
    """The traced graph in Graphviz DOT: residual adds red, stream edges bold, one cluster per unit."""
    traced = discovery.traced
    stream_edges = {(r.stream, r.add) for r in discovery.residuals}
    residual_adds = {r.add for r in discovery.residuals}
    ids = {node: f"n{i}" for i, node in enumerate(traced.graph.nodes)}
    lines = ["digraph raptr_fx {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    clustered: set = set()
    for block in discovery.blocks:
        members = [n for n, scope in traced.scopes.items()
                   if any(s.split("@")[0] == block.name for s in scope) and n not in clustered]
        if not members:
            continue
        clustered.update(members)
        color = "darkgreen" if block.droppable else "gray50"
        label = f"{block.name} [{block.drop}]" + ("" if block.droppable else f" not droppable: {block.reason}")
        lines.append(f"  subgraph cluster_{block.index} {{")
        lines.append(f"    label={_quote(label)}; color={color}; style=rounded;")
        lines.extend(f"    {ids[n]};" for n in members)
        lines.append("  }")
    for node in traced.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        style = ', color=red, style=filled, fillcolor="#ffdddd"' if node in residual_adds else ""
        if is_add(node) and node not in residual_adds:
            style = ", color=gray"
        lines.append(f"  {ids[node]} [label={_quote(f'{node.name}: {node.op} {target}')}{style}];")
    for node in traced.graph.nodes:
        for arg in node.all_input_nodes:
            bold = " [penwidth=3]" if (arg, node) in stream_edges else ""
            lines.append(f"  {ids[arg]} -> {ids[node]}{bold};")
    lines.append("}")
    return "\n".join(lines) + "\n"

"""Rich rendering of the rows raptr_fx.report builds."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table

from raptr_fx import Schedule, StagePlan
from raptr_fx.discovery import Discovery
from raptr_fx.report import summary, width_summary
from raptr_fx.width import WidthGroup
from raptr_fx.schedules import overall_compute

_BAR_WIDTH = 30
_PROBES = {"fake": "fake tensors (no compute, no memory)", "real": "one real forward pass"}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def discovery_table(discovery: Discovery, console: Console) -> None:
    table = Table(title=f"{discovery.model_type}: droppable blocks", title_justify="left")
    for column, justify in (("#", "right"), ("block", "left"), ("type", "left"), ("params", "right"),
                            ("FLOPs", "right"), ("drop rule", "left")):
        table.add_column(column, justify=justify)
    for block in discovery.blocks:
        rule = block.drop if block.droppable else "[red]kept[/red] (see below)"
        table.add_row(str(block.index), block.name, block.module_type, f"{block.params:,}",
                      _percent(block.flops_share), rule)
    console.print(table)
    for block in discovery.blocks:
        if not block.droppable:
            console.print(f"[red]x[/red] {block.name} cannot be dropped: {block.reason}")
        elif block.owned:
            console.print(f"{block.name} also owns {_owned(block)}: skipped and frozen with it")
    for layer in discovery.replaced:
        console.print(f"[yellow]>[/yellow] {layer.name} is no unit: {layer.reason}; "
                      "its residual branches are the units instead")
    totals = summary(discovery)
    console.print(
        f"Units: {totals['droppable_units']} droppable of {totals['units']} found "
        f"({totals['granularity']} granularity)\n"
        f"Parameters in droppable units: {totals['droppable_params']:,} of {totals['total_params']:,} "
        f"({_percent(totals['droppable_params_share'])})\n"
        f"Compute in droppable units: {_percent(totals['droppable_flops_share'])} of forward FLOPs"
        + ("" if totals["droppable_flops_share"] is not None else " (needs example inputs)") + "\n"
        f"Tracer: {totals['tracer']}"
        + (f"; probe: {_PROBES[totals['probe']]}" if totals["probe"] else "")
    )


def _owned(block) -> str:
    """What a unit owns outside it: its modules (before or after it), then loose parameters (a layer scale)."""
    modules = [f"{m} (before it)" for m in block.owned_before] + [f"{m} (after it)" for m in block.owned_after]
    loose = [p for p in block.owned if not any(p.startswith(m + ".") for m in block.owned_before + block.owned_after)]
    return ", ".join(modules + loose)


def width_table(model_type: str, groups: Sequence[WidthGroup], console: Console) -> None:
    table = Table(title=f"{model_type}: width groups", title_justify="left")
    for column, justify in (("unit", "left"), ("kind", "left"), ("size", "right"), ("parts", "right"),
                            ("params", "right"), ("FLOPs", "right"), ("projections", "left")):
        table.add_column(column, justify=justify)
    for group in groups:
        unit_prefix = group.unit + "."
        modules = ", ".join(m.removeprefix(unit_prefix) for m in group.modules)
        parts = str(group.parts) if group.droppable else "[red]kept[/red]"
        table.add_row(group.unit, group.kind, str(group.size or "-"), parts, f"{group.params:,}",
                      _percent(group.flops_share), modules)
    console.print(table)
    for group in groups:
        if not group.droppable:
            console.print(f"[red]x[/red] {group.name} cannot be cut: {group.reason}")
    totals = width_summary(model_type, groups)
    by_kind = totals["cuttable_by_kind"]
    console.print(
        f"Groups: {totals['cuttable_groups']} cuttable of {totals['groups']} found "
        f"({by_kind['mlp']} MLP, {by_kind['heads']} attention)\n"
        f"Compute in cuttable groups: {_percent(totals['cuttable_flops_share'])} of forward FLOPs"
        + ("" if totals["cuttable_flops_share"] is not None else " (needs example inputs)"))


def schedule_table(schedule: Schedule, rows: Sequence[StagePlan], units: int, console: Console) -> None:
    table = Table(title=f"{schedule.describe()} on {units} blocks", title_justify="left")
    with_width = any(row.width < 1.0 for row in rows)
    columns = ("stage", "steps", "active", "keep p", *(("width",) if with_width else ()), "compute", "")
    for column in columns:
        table.add_column(column, justify="left" if column == "" else "right")
    for row in rows:
        free = [p for i, p in enumerate(row.keep) if i not in schedule.fixed(units)]
        keep = f"{free[0]:.3f}" if free else "-"
        bar = "#" * round(_BAR_WIDTH * row.compute)
        width = (f"{row.width:.2f}",) if with_width else ()
        table.add_row(str(row.stage), f"{row.steps:,}" if row.steps is not None else "open",
                      f"{row.active:.1f}", keep, *width, _percent(row.compute), bar)
    console.print(table)
    total = overall_compute(rows)
    if total is not None:
        console.print(f"Block compute: {_percent(total)} of full training; saved: {_percent(1 - total)}")

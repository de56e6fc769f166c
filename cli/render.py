"""Rich rendering of the rows raptr_fx.report builds."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table

from raptr_fx import Schedule, StagePlan
from raptr_fx.discovery import Discovery
from raptr_fx.report import summary
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


def schedule_table(schedule: Schedule, rows: Sequence[StagePlan], units: int, console: Console) -> None:
    table = Table(title=f"{schedule.describe()} on {units} blocks", title_justify="left")
    for column in ("stage", "steps", "active", "keep p", "compute", ""):
        table.add_column(column, justify="left" if column == "" else "right")
    for row in rows:
        free = [p for i, p in enumerate(row.keep) if i not in schedule.fixed(units)]
        keep = f"{free[0]:.3f}" if free else "-"
        bar = "#" * round(_BAR_WIDTH * row.compute)
        table.add_row(str(row.stage), f"{row.steps:,}" if row.steps is not None else "open",
                      f"{row.active:.1f}", keep, _percent(row.compute), bar)
    console.print(table)
    total = overall_compute(rows)
    if total is not None:
        console.print(f"Block compute: {_percent(total)} of full training; saved: {_percent(1 - total)}")

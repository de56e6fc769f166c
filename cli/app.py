"""``raptr-fx``: a thin typer layer over raptr_fx.

Every library error (RaptrError, ValueError from bad options) is caught here and
printed as one styled line with exit code 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import typer
from rich.console import Console

import raptr_fx
from raptr_fx import RaptrError
from raptr_fx.discovery import Discovery, no_blocks_error
from raptr_fx.report import to_dot, to_json, width_to_json

from .discover import load_model
from .hf import PREFIX as HF_PREFIX
from .hf import load_hf
from .render import discovery_table, schedule_table, width_table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="RaPTr for any PyTorch model: find droppable blocks, plan schedules.")

MODEL_HELP = ("A .py file defining the model, an import string package.module[:NAME], or hf:ARCH / "
              "hf:CONFIG_PATH (a Hugging Face architecture built from its config, no weights).")
Overrides = typer.Option(None, "--set", help="hf: targets: override a config field, e.g. --set num_hidden_layers=80 "
                         "(repeatable).")
ModelName = typer.Option(None, "--model", "-m", help="Which model in the file (attribute name).")
InputShape = typer.Option(None, "--input-shape", help="Example input shape, e.g. 2,16 (overrides the file's "
                          "example_inputs).")
InputDtype = typer.Option("float", "--input-dtype", help="float (random normal) or long (token ids 0/1).")
Granularity = typer.Option("layer", "--granularity", "-g", help="layer (default) or branch.")
Debug = typer.Option(False, "--debug", help="Show the Python traceback on errors.")


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _guard(debug: bool, action: Callable[[], None]) -> None:
    """Run a command body; turn project errors into one styled line and exit code 1."""
    try:
        action()
    except (RaptrError, ValueError) as exc:
        if debug:
            raise
        Console(stderr=True, highlight=False).print(f"[bold red]Error:[/bold red] {exc}")
        raise typer.Exit(code=1) from None


def _example_inputs(file_inputs: Any, shape: str | None, dtype: str) -> Any:
    if shape is None:
        return file_inputs
    try:
        dims = [int(d) for d in shape.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise RaptrError(f"--input-shape {shape!r} is not a list of integers like 2,16") from None
    if dtype == "long":
        return (torch.randint(0, 2, dims),)
    if dtype == "float":
        return (torch.randn(dims),)
    raise RaptrError(f"--input-dtype must be float or long, got {dtype!r}")


def _load(target: str, model: str | None, shape: str | None, dtype: str,
          overrides: list[str] | None) -> tuple[torch.nn.Module, Any]:
    """The user's model and its example inputs."""
    if target.startswith(HF_PREFIX):
        loaded = load_hf(target, overrides or [])
    elif overrides:
        raise RaptrError(f"--set overrides config fields of hf: targets; {target} is a model file")
    else:
        loaded = load_model(target, model)
    return loaded.model, _example_inputs(loaded.example_inputs, shape, dtype)


def _discover(target: str, model: str | None, shape: str | None, dtype: str, granularity: str,
              require_blocks: bool = True, overrides: list[str] | None = None) -> Discovery:
    loaded_model, inputs = _load(target, model, shape, dtype, overrides)
    discovery = raptr_fx.discover(loaded_model, inputs, granularity=granularity)
    if require_blocks and not discovery.blocks:
        raise no_blocks_error(discovery)
    return discovery


@app.command()
def inspect(
    target: str = typer.Argument(..., help=MODEL_HELP),
    model: Optional[str] = ModelName,
    input_shape: Optional[str] = InputShape,
    input_dtype: str = InputDtype,
    granularity: str = Granularity,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    width: bool = typer.Option(False, "--width", help="List the width groups (MLP hidden units, attention "
                               "heads) that width-wise RaPTr can cut, instead of the blocks."),
    overrides: Optional[list[str]] = Overrides,
    debug: bool = Debug,
) -> None:
    """List the droppable blocks of a model (or, with --width, its cuttable width groups)."""

    def action() -> None:
        if width:
            loaded_model, inputs = _load(target, model, input_shape, input_dtype, overrides)
            groups = raptr_fx.find_width_groups(loaded_model, inputs)
            if as_json:
                typer.echo(json.dumps(width_to_json(type(loaded_model).__name__, groups), indent=2))
            else:
                width_table(type(loaded_model).__name__, groups, _console())
            return
        discovery = _discover(target, model, input_shape, input_dtype, granularity, overrides=overrides)
        if as_json:
            typer.echo(json.dumps(to_json(discovery), indent=2))
        else:
            discovery_table(discovery, _console())

    _guard(debug, action)


@app.command()
def graph(
    target: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the DOT file."),
    model: Optional[str] = ModelName,
    input_shape: Optional[str] = InputShape,
    input_dtype: str = InputDtype,
    granularity: str = Granularity,
    overrides: Optional[list[str]] = Overrides,
    debug: bool = Debug,
) -> None:
    """Write the traced graph as Graphviz DOT: residual adds, stream edges and blocks marked."""

    def action() -> None:
        # A graph with no blocks is still worth drawing: it shows why none were found.
        discovery = _discover(target, model, input_shape, input_dtype, granularity, require_blocks=False,
                              overrides=overrides)
        output.write_text(to_dot(discovery))
        _console().print(f"wrote {output} ({len(discovery.traced.graph.nodes)} nodes, "
                         f"{len(discovery.residuals)} residual adds, {len(discovery.droppable)} droppable blocks); "
                         f"render with: dot -Tsvg {output} -o {output.with_suffix('.svg')}")

    _guard(debug, action)


@app.command()
def schedule(
    spec: Optional[str] = typer.Argument(None, help='RaPTr schedule, active blocks per stage, e.g. "6-8-10-12" '
                                         "(omit it with --width for width-wise RaPTr alone)."),
    steps: int = typer.Option(..., "--steps", help="Total optimizer steps."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Number of blocks (or use --model)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Count the blocks of this model file (or "
                                        "import string, :NAME picks one) and weigh them by FLOPs."),
    sampling: str = typer.Option("bernoulli", "--sampling", help="bernoulli or exact."),
    width: Optional[str] = typer.Option(None, "--width", help='Width kept per stage, e.g. "0.5-0.67-0.83-1": '
                                        "the fraction of each MLP and attention-head group."),
    debug: bool = Debug,
) -> None:
    """Show a RaPTr schedule: steps, active blocks, keep probability, width and compute per stage."""

    def action() -> None:
        if spec is None and width is None:
            raise RaptrError('give a schedule like "6-8-10-12", --width "0.5-0.67-0.83-1", or both')
        if spec is None:
            plan_schedule: raptr_fx.RaPTr = raptr_fx.WidthRaPTr(width, total_steps=steps)
        else:
            plan_schedule = raptr_fx.RaPTr(spec, total_steps=steps, sampling=sampling, width=width)
        weights = None
        if model is not None:
            loaded_model, inputs = _load(model, None, None, "float", None)
            discovery = raptr_fx.discover(loaded_model, inputs)
            if not discovery.droppable:
                raise no_blocks_error(discovery)
            blocks = discovery.droppable
            count = len(blocks)
            if width is not None:  # weigh by FLOPs with the groups' share: what Controller.plan() shows
                ctl = raptr_fx.transform(loaded_model, plan_schedule, example_inputs=inputs)
                rows = ctl.plan()
                ctl.remove()
                schedule_table(plan_schedule, rows, count, _console())
                return
            if blocks and all(b.flops_share is not None for b in blocks):
                weights = [b.flops_share for b in blocks]
            else:
                weights = [float(b.params) for b in blocks]
        elif layers is not None:
            count = layers
        else:
            raise RaptrError("give --layers N or --model model.py")
        if count <= 0:
            raise ValueError(f"--layers must be positive, got {count}")
        rows = raptr_fx.plan(plan_schedule, count, weights)
        schedule_table(plan_schedule, rows, count, _console())
        if width is not None:
            _console().print("Width cuts are not counted in compute without --model: their share of each "
                             "block's FLOPs is unknown.")

    _guard(debug, action)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""raptr-fx: golden output at a fixed width, JSON, DOT, and every error path."""

import json
import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raptr_fx_cli.app import app

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
EXAMPLE = str(ROOT / "examples" / "nanogpt.py")


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, list(args), env={"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})

    return invoke


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


FIXTURES_IMPORT = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"


def write(tmp_path, body: str, name: str = "model.py") -> str:
    """A model file that can import the test fixtures."""
    path = tmp_path / name
    path.write_text(FIXTURES_IMPORT + textwrap.dedent(body))
    return str(path)


def test_inspect_golden(cli):
    result = cli("inspect", EXAMPLE)
    assert result.exit_code == 0, result.output
    golden("inspect_nanogpt.txt", result.output)


def test_inspect_resnet_shows_why_a_block_is_kept(cli, tmp_path):
    path = write(tmp_path, """
        from tests.fixtures.models import ResNet, images
        model = ResNet()
        example_inputs = images
    """)
    result = cli("inspect", path)
    assert result.exit_code == 0, result.output
    golden("inspect_resnet.txt", result.output)


def test_inspect_json(cli):
    result = cli("inspect", EXAMPLE, "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["model"] == "GPT" and data["tracer"] == "torch.fx"
    assert [b["name"] for b in data["blocks"]] == [f"transformer.h.{i}" for i in range(12)]
    assert data["droppable_units"] == 12 and 0.9 < data["droppable_flops_share"] < 1.0
    assert data["blocks"][0]["drop"] == "identity" and data["blocks"][0]["params"] == 111840


def test_inspect_branch_granularity(cli):
    result = cli("inspect", EXAMPLE, "--granularity", "branch", "--json")
    names = [b["name"] for b in json.loads(result.output)["blocks"]]
    assert names[:2] == ["transformer.h.0.attn", "transformer.h.0.mlp"] and len(names) == 24


def test_input_shape_and_model_name(cli, tmp_path):
    path = write(tmp_path, """
        from tests.fixtures.models import GPT, sequential_mlp
        gpt = GPT(n_layer=2)
        mlp = sequential_mlp(3)
    """)
    result = cli("inspect", path, "--model", "gpt", "--input-shape", "2,8", "--input-dtype", "long", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["droppable_units"] == 2 and data["droppable_flops_share"] is not None
    result = cli("inspect", f"{path}:mlp", "--json")
    assert json.loads(result.output)["droppable_units"] == 3


def test_import_string(cli, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    result = cli("inspect", "tests.fixtures.models:sequential_mlp", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["droppable_units"] == 4


def test_graph_writes_dot(cli, tmp_path):
    out = tmp_path / "model.dot"
    result = cli("graph", EXAMPLE, "-o", str(out))
    assert result.exit_code == 0, result.output
    dot = out.read_text()
    assert dot.startswith("digraph raptr_fx {") and dot.rstrip().endswith("}")
    assert dot.count("subgraph cluster_") == 12
    assert 'label="transformer.h.0 [identity]"' in dot and "penwidth=3" in dot and "fillcolor" in dot


def test_schedule_golden(cli):
    result = cli("schedule", "6-8-10-12", "--steps", "100000", "--layers", "12")
    assert result.exit_code == 0, result.output
    golden("schedule_6_8_10_12.txt", result.output)


def test_schedule_from_model_file(cli):
    result = cli("schedule", "6-12", "--steps", "10", "--model", EXAMPLE)
    assert result.exit_code == 0, result.output
    assert "RaPTr 6-12 on 12 blocks" in result.output and "saved: 25.0%" in result.output


@pytest.mark.parametrize("args, message", [
    (["schedule", "6-8-10-14", "--steps", "100", "--layers", "12"], r"active=14 is outside [2, 12]"),
    (["schedule", "6-8", "--steps", "100"], "give --layers N or --model model.py"),
    (["schedule", "a-b", "--steps", "100", "--layers", "4"], "is not of the form"),
])
def test_schedule_errors(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def error_cases(tmp_path):
    unet = "from tests.fixtures.models import UNet\nmodel = UNet()\n"
    dynamic = "from tests.test_discovery import DataDependent\nmodel = DataDependent()\n"
    return {
        "missing file": ([str(tmp_path / "nope.py")], "file not found"),
        "no model": ([write(tmp_path, "x = 1\n", "empty.py")], "no model found in"),
        "raises on import": ([write(tmp_path, "raise RuntimeError('boom')\n", "bad.py")],
                             "raised RuntimeError on import: boom"),
        "untraceable": ([write(tmp_path, dynamic, "dyn.py")], "could not trace DataDependent"),
        "no blocks": ([write(tmp_path, unet, "unet.py")], "UNet has no droppable residual blocks"),
        "several": ([write(tmp_path, "from tests.fixtures.models import GPT\na = GPT()\nb = GPT()\n",
                           "two.py")], "several models"),
        "unknown name": ([EXAMPLE, "--model", "nothing"], "has no attribute 'nothing'"),
        "bad shape": ([EXAMPLE, "--input-shape", "two"], "is not a list of integers"),
    }


@pytest.mark.parametrize("case", ["missing file", "no model", "raises on import", "untraceable", "no blocks",
                                  "several", "unknown name", "bad shape"])
def test_inspect_errors_are_one_styled_line(cli, tmp_path, case):
    args, message = error_cases(tmp_path)[case]
    result = cli("inspect", *args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(cli, tmp_path):
    path = write(tmp_path, "raise RuntimeError('boom')\n", "bad.py")
    result = cli("inspect", path, "--debug")
    assert result.exit_code == 1
    assert result.exception is not None and "boom" in str(result.exception)

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


# --- issue 8: model files without a make_* factory, hf: targets ----------------------------------
ISSUE_FILE = """
    import torch
    from torch import nn

    class ResidualMLP(nn.Module):
        def __init__(self, d=16, depth=5):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(depth)])

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    def build():
        return ResidualMLP()
"""

CLASSES_FILE = """
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.fc = nn.Linear(d, d)

        def forward(self, x):
            return x + self.fc(x)

    class Net(nn.Module):  # contains Layer: Net is the model
        def __init__(self, depth=3):
            super().__init__()
            self.layers = nn.Sequential(*[Layer() for _ in range(depth)])

        def forward(self, x):
            return self.layers(x)

    class NeedsArguments(nn.Module):
        def __init__(self, width):
            super().__init__()
"""


@pytest.mark.parametrize("body, model, units", [
    (ISSUE_FILE, "ResidualMLP", 5),  # a zero-argument function of any name returning a module
    (CLASSES_FILE, "Net", 3),  # the outermost class that builds without arguments
    ("from torch import nn\nfrom tests.fixtures.models import GPT\n\ndef get():\n    model = GPT(n_layer=2)\n"
     "    return model\n", "GPT", 2),  # returns a local built from a module class
])
def test_model_file_loading_rules(cli, tmp_path, body, model, units):
    result = cli("inspect", write(tmp_path, body), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == model and data["droppable_units"] == units


def test_several_candidates_are_listed_with_how_to_pick(cli, tmp_path):
    body = CLASSES_FILE + "\n    class Other(nn.Module):\n        def forward(self, x):\n            return x\n"
    path = write(tmp_path, body)
    result = cli("inspect", path)
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert (f"several models in {path} (nn.Module classes that build without arguments: Net, Other): pick one "
            f"with --model NAME or {path}:NAME, e.g. --model Net") in text
    assert cli("inspect", path, "--model", "Net", "--json").exit_code == 0


def _needs_transformers():
    return pytest.importorskip("transformers")


def test_inspect_hf_golden(cli):
    _needs_transformers()
    result = cli("inspect", "hf:gpt2", "--set", "n_layer=2")
    assert result.exit_code == 0, result.output
    golden("inspect_hf_gpt2.txt", result.output)


def test_inspect_hf_t5_json(cli):
    _needs_transformers()
    result = cli("inspect", "hf:t5", "--set", "num_layers=2", "--set", "num_decoder_layers=2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == "T5ForConditionalGeneration" and data["probe"] == "fake"
    assert [(b["name"], b["droppable"]) for b in data["blocks"]] == [
        ("encoder.block.0", False), ("encoder.block.1", True), ("decoder.block.0", False), ("decoder.block.1", True)]
    assert data["blocks"][1]["output_slots"][1] == {"key": 1, "role": "input", "source_position": 2,
                                                    "source_name": "position_bias", "value": None}


def test_inspect_hf_local_config_and_graph(cli, tmp_path):
    transformers = _needs_transformers()
    transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    for target in (f"hf:{tmp_path}", f"hf:{tmp_path / 'config.json'}"):
        result = cli("inspect", target, "--set", "num_hidden_layers=4", "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["model"] == "LlamaForCausalLM" and data["droppable_units"] == 4
    out = tmp_path / "llama.dot"
    result = cli("graph", f"hf:{tmp_path}", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text().count("subgraph cluster_") == 3


@pytest.mark.parametrize("args, message", [
    (["hf:lama"], "hf:lama is neither a local config (file or directory) nor an architecture transformers knows"),
    (["hf:gpt2", "--set", "n_layers=2"], "--set n_layers: GPT2Config has no field 'n_layers'; did you mean n_layer"),
    (["hf:gpt2", "--set", "n_layer"], "--set 'n_layer' is not of the form key=value"),
    ([EXAMPLE, "--set", "n_layer=2"], "--set overrides config fields of hf: targets"),
])
def test_inspect_hf_errors(cli, args, message):
    _needs_transformers()
    result = cli("inspect", *args)
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_bad_input_shape_is_an_inputs_error(cli):
    result = cli("inspect", EXAMPLE, "--input-shape", "2,8", "--input-dtype", "float")
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert text.startswith("Error: GPT fails on the example inputs model(tensor[2, 8] float32): RuntimeError:")


def test_inspect_hf_t5_golden(cli):
    _needs_transformers()
    result = cli("inspect", "hf:t5", "--set", "num_layers=3", "--set", "num_decoder_layers=2")
    assert result.exit_code == 0, result.output
    golden("inspect_hf_t5.txt", result.output)


def test_inspect_width_golden(cli):
    result = cli("inspect", EXAMPLE, "--width")
    assert result.exit_code == 0, result.output
    golden("inspect_width_nanogpt.txt", result.output)


def test_inspect_width_json_hf_llama(cli):
    _needs_transformers()
    result = cli("inspect", "hf:llama", "--set", "num_hidden_layers=2", "--set", "hidden_size=64",
                 "--set", "intermediate_size=128", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2",
                 "--width", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["cuttable_groups"] == 4 and data["cuttable_by_kind"] == {"mlp": 2, "heads": 2}
    heads = data["width_groups"][0]
    assert heads["kind"] == "heads" and heads["size"] == 4 and heads["parts"] == 2 and heads["droppable"]


def test_schedule_with_width_golden(cli):
    result = cli("schedule", "--width", "0.5-0.67-0.83-1", "--steps", "1000", "--model", EXAMPLE)
    assert result.exit_code == 0, result.output
    golden("schedule_width_nanogpt.txt", result.output)


def test_schedule_width_without_model_says_it_is_not_counted(cli):
    result = cli("schedule", "6-8-10-12", "--width", "0.5-0.67-0.83-1", "--steps", "100", "--layers", "12")
    assert result.exit_code == 0, result.output
    assert "x width 0.5-0.67-0.83-1" in result.output and "not counted in compute without --model" in result.output
    result = cli("schedule", "--steps", "100", "--layers", "12")
    assert result.exit_code == 1 and "give a schedule" in result.output

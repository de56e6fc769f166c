"""torchvision's classification, video and segmentation models through find_blocks and transform.

Each model is built with random weights (``weights=None``), run on a small input and checked by
``zoo.check_model`` (``find_blocks`` leaves the model untouched, eval bitwise the plain model, no
gradient in dropped units, ``remove()`` restores everything). The units a person would name are
read off the model's own modules: each residual block of torchvision's block classes whose
shortcut is the identity (``BasicBlock``/``Bottleneck`` without ``downsample``, ``MBConv`` and
``InvertedResidual`` with ``use_res_connect``, ``CNBlock``, ``EncoderBlock``, Swin blocks, ...).
A model is fully right when every one of those is a droppable unit; a model with no residual
block (VGG, DenseNet, Inception) is right when nothing is offered.

torchvision needs its own torch build (see the README's "Benchmarks"); in a separate venv:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 networkx rich typer \\
        && /tmp/tv/bin/pip install --no-deps -e .
    /tmp/tv/bin/python benchmarks/torchvision_zoo.py                 # every model (about 20 minutes)
    /tmp/tv/bin/python benchmarks/torchvision_zoo.py --sample        # a few models (about a minute)
    /tmp/tv/bin/python benchmarks/torchvision_zoo.py --only resnet18,vit_b_16 --out tv.md
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchvision  # noqa: E402
from torchvision import models  # noqa: E402
from benchmarks.zoo import add_sweep_arguments, check_model, chosen, one_line, report, sweep, tensors  # noqa: E402

FAMILIES = {"classification": models, "video": models.video, "segmentation": models.segmentation}
SAMPLE = ["resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t", "r3d_18",
          "lraspp_mobilenet_v3_large"]
IMAGE = 64
# Models whose input size is fixed by their construction (positional tables, partition windows).
INPUT_SIZES = {"maxvit_t": 224, "mvit_v1_b": 224, "mvit_v2_s": 224, "inception_v3": 96, "s3d": 224, "vit_h_14": 56}
FRAMES = {"mvit_v1_b": 16, "mvit_v2_s": 16, "s3d": 16}
BUILD_OPTIONS = {"vit_h_14": {"image_size": 56}, "vit": {"image_size": IMAGE},
                 "inception_v3": {"aux_logits": False, "init_weights": False},
                 "googlenet": {"aux_logits": False, "init_weights": False}}
COLUMNS = {"model": "model", "family": "family"}  # the table's first columns: result key -> heading


def expected_units(model: nn.Module) -> list[str]:
    """The residual blocks with an identity shortcut, by torchvision's own block classes."""
    found = []
    maxvit_layers: list[str] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if any(name.startswith(layer + ".") for layer in maxvit_layers):
            continue
        if kind == "MaxVitLayer":
            # MBConv, window and grid attention in one nn.Sequential: that is the layer (the paper's
            # MaxViT block) when the MBConv keeps the stream, else its two attention layers are the units.
            maxvit_layers.append(name)
            mbconv = module.layers.MBconv
            if isinstance(mbconv.proj, nn.Identity):
                found.append(f"{name}.layers")
            else:
                found += [f"{name}.layers.window_attention", f"{name}.layers.grid_attention"]
            continue
        if kind in ("BasicBlock", "Bottleneck"):
            identity = module.downsample is None
        elif kind in ("MBConv", "FusedMBConv", "InvertedResidual"):
            identity = getattr(module, "use_res_connect", False)  # ShuffleNet's has none: it concatenates
        elif kind == "_InvertedResidual":  # MNASNet
            identity = module.apply_residual
        elif kind == "ResBottleneckBlock":  # RegNet
            identity = module.proj is None
        elif kind == "MultiscaleBlock":  # MViT: pooled or projected shortcuts are no identity
            identity = module.pool_skip is None and module.project is None
        elif kind in ("CNBlock", "EncoderBlock", "SwinTransformerBlock", "SwinTransformerBlockV2"):
            identity = True
        else:
            continue
        if identity:
            found.append(name)
    return found


def build(name: str, family: str) -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    options = next((v for k, v in BUILD_OPTIONS.items() if name.startswith(k)), {})
    torch.manual_seed(0)
    model = models.get_model(name, weights=None, **({"weights_backbone": None} if family == "segmentation" else {}),
                             **options).eval()
    size = INPUT_SIZES.get(name, IMAGE)
    generator = torch.Generator().manual_seed(0)
    shape = (1, 3, FRAMES.get(name, 4), size, size) if family == "video" else (2, 3, size, size)
    x = torch.randn(*shape, generator=generator)
    with torch.no_grad():
        reference = [t.clone() for t in tensors(model(x))]
    return model, x, reference


def check(name: str, family: str) -> dict[str, Any]:
    result: dict[str, Any] = {"model": name, "family": family}
    try:
        model, x, reference = build(name, family)
    except Exception as exc:
        return {**result, "status": "unbuildable", "detail": one_line(exc)}
    expected = expected_units(model)
    result["layers"] = len(expected)
    result.update(check_model(model, x, lambda m: m(x), reference))
    if result["status"] == "refused" and not expected:
        result["status"] = "ok"  # nothing to offer, and nothing was
        result["detail"] = "no residual block"
    elif result["status"] == "checked":
        missing = [n for n in expected if n not in result["unit_names"]]
        result["missing"] = missing
        result["status"] = "fewer units" if missing else "ok"
    result.pop("unit_names", None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(parser, "resnet18,vit_b_16", len(SAMPLE), 600.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [(name, family) for family, module in FAMILIES.items()
             for name in models.list_models(module=module)]
    wanted = chosen([n for n, _ in names], args, SAMPLE)
    names = [(n, f) for n, f in names if n in wanted]
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}: {len(names)} models", flush=True)
    cases = [({"model": name, "family": family}, functools.partial(check, name, family)) for name, family in names]
    report(sweep(cases, args.timeout, args.json), COLUMNS, "models", args.out)

if __name__ == "__main__":
    main()

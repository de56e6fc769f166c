"""``hf:`` targets: a Hugging Face architecture built from its config on the meta device.

    raptr-fx inspect hf:llama --set num_hidden_layers=80 --set hidden_size=8192
    raptr-fx inspect hf:path/to/config.json      (or a directory holding config.json)

No weights are downloaded or allocated: the config is one transformers ships (an
architecture name such as ``llama``, ``gpt2``, ``t5``) or a local file, the model is
built on ``meta``, and discovery probes it with fake tensors. This is how a user
sizes RaPTr for a large model before training it.
"""

from __future__ import annotations

import ast
import difflib
import inspect
from pathlib import Path
from typing import Any

import torch

from raptr_fx import RaptrError
from raptr_fx.integrations._compat import auto_class_builds

from .discover import Loaded

PREFIX = "hf:"
SEQUENCE_LENGTH = 16  # example inputs: one sequence of this many tokens (fewer if the model allows fewer)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise RaptrError("hf: targets need transformers: pip install 'raptr-fx[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def load_config(spec: str, overrides: list[str]) -> Any:
    """The config named by ``spec`` (architecture name or local path), with ``--set`` overrides applied."""
    transformers = _transformers()
    path = Path(spec)
    if path.exists():
        try:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise RaptrError(f"cannot read a transformers config from {path}: {exc}") from exc
    else:
        known = list(transformers.CONFIG_MAPPING.keys())
        if spec not in known:
            close = difflib.get_close_matches(spec, known, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RaptrError(f"hf:{spec} is neither a local config (file or directory) nor an architecture "
                             f"transformers knows (e.g. llama, gpt2, t5, bert){hint}")
        config = transformers.AutoConfig.for_model(spec)
    for item in overrides:
        _override(config, item)
    return config


def _override(config: Any, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RaptrError(f"--set {item!r} is not of the form key=value (e.g. --set num_hidden_layers=80)")
    fields = config.to_dict()
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RaptrError(f"--set {key}: {type(config).__name__} has no field {key!r}{hint}")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = text.strip()  # a plain string, such as an activation name
    setattr(config, key, value)


def build(config: Any) -> torch.nn.Module:
    """The model class for the config, on the meta device: the architecture's own, else a head model."""
    transformers = _transformers()
    auto_classes = [transformers.AutoModelForCausalLM, transformers.AutoModel]
    if getattr(config, "is_encoder_decoder", False):
        auto_classes.insert(0, transformers.AutoModelForSeq2SeqLM)
    named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
    try:
        with torch.device("meta"):
            for cls in named:
                if cls is not None:
                    return cls(config)
            for auto in auto_classes:
                if auto_class_builds(auto, config):
                    return auto.from_config(config)
    except Exception as exc:
        raise RaptrError(f"cannot build {type(config).__name__} on the meta device: "
                         f"{type(exc).__name__}: {exc}") from exc
    raise RaptrError(f"no transformers model class for {type(config).__name__}")


def example_inputs(model: torch.nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """Inputs made from the config: token ids (and decoder ids for encoder-decoders) or images."""
    parameters = inspect.signature(model.forward).parameters
    if "input_ids" in parameters:
        limit = getattr(config, "max_position_embeddings", None) or SEQUENCE_LENGTH
        ids = torch.zeros(1, min(SEQUENCE_LENGTH, limit), dtype=torch.long, device="meta")
        inputs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
            inputs["decoder_input_ids"] = ids
        return inputs
    if "pixel_values" in parameters and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.zeros(1, channels, size, size, device="meta")}
    raise RaptrError(f"cannot make example inputs for {type(model).__name__} from its config: "
                     "give --input-shape (and --input-dtype)")


def load_hf(target: str, overrides: list[str]) -> Loaded:
    spec = target[len(PREFIX):]
    if not spec:
        raise RaptrError("hf: needs an architecture or a config path, e.g. hf:llama or hf:./config.json")
    config = load_config(spec, overrides)
    model = build(config)
    return Loaded(target, model, example_inputs(model, config))

"""Every architecture of the installed transformers, built tiny, through find_blocks and transform.

For each model type with a causal-LM, seq2seq-LM, masked-LM or image-classification head, a tiny
config is built (2 layers, hidden 32, float32, CPU, dropout off, no cache; see ``tiny_config``)
and checked by ``zoo.check_model``: droppable units against the config's layer count (fewer or none:
the refusal reasons), ``find_blocks`` leaving the model untouched, eval bitwise the plain model,
no gradient in dropped units, and ``remove()`` restoring everything.

Each model runs in a forked child with a timeout (the parent imports torch and transformers once,
so a child costs little). A type whose tiny config does not build, or whose plain forward fails,
is "unbuildable" and not counted.

    python benchmarks/hf_zoo.py                    # every architecture (about 15 minutes on one core)
    python benchmarks/hf_zoo.py --sample           # the fixed CI sample (about a minute)
    python benchmarks/hf_zoo.py --build-only       # only whether each tiny config builds and runs
    python benchmarks/hf_zoo.py --only bloom,t5 --out zoo.md
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from benchmarks.zoo import add_sweep_arguments, check_model, chosen, one_line, report, sweep, tensors  # noqa: E402

LAYERS = 2
HIDDEN = 32
HEADS = 2
VOCAB = 256
SEQ = 8
IMAGE = 32
MAX_TINY_PARAMS = 10_000_000  # a tiny config that leaves a large table (hash embeddings) is not tiny
MAX_DEPTH_ONLY_PARAMS = 40_000_000  # a fallback config keeping its widths must stay quick to check

# A fixed sample for CI: dense decoders, sparse MoE, Bloom-style (hidden, attn_weights) layers,
# T5-style position-bias tuples, encoder-decoders, masked LMs and vision encoders.
SAMPLE = ["llama", "gpt2", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "bloom", "gpt_neo", "mpt",
          "roformer", "t5", "switch_transformers", "longt5", "bart", "bert", "roberta", "vit", "resnet",
          "convnext", "mistral", "falcon", "phi"]
COLUMNS = {"type": "model type", "class": "class"}  # the table's first columns: result key -> heading

# Heads in order of preference: one model class per model type.
TASKS = [("causal", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"), ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
         ("masked", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"), ("image", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")]

LAYER_FIELDS = {"num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                "num_decoder_layers", "num_encoder_layers", "num_self_attends_per_block"}
WIDTH_FIELDS = {"hidden_size", "d_model", "n_embd", "dim", "embed_dim", "hidden_dim", "n_embed", "d_embed",
                "word_embed_proj_dim", "embedding_size", "emb_dim", "d_latents", "lru_width"}
FFN_FIELDS = {"intermediate_size", "d_ff", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
              "moe_intermediate_size", "shared_expert_intermediate_size", "inner_hidden_size", "hidden_dim_ffn"}
HEAD_FIELDS = {"num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
               "decoder_attention_heads"}
EXPERT_FIELDS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
TOP_K_FIELDS = {"num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k", "num_experts_per_token",
                "experts_per_token"}
KV_HEAD_FIELDS = {"num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num", "index_n_heads"}
HEAD_DIM_FIELDS = {"head_dim", "d_kv", "attention_head_size", "kv_channels", "v_head_dim", "qk_head_dim",
                   "index_head_dim", "attention_head_dim"}
GROUP_FIELDS = {"num_groups", "n_groups", "mamba_n_groups", "num_norm_groups"}
SSM_HEAD_FIELDS = [("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("mamba_num_heads", "mamba_head_dim", "mamba_expand"),
                   ("n_mamba_heads", "mamba_headdim", "mamba_expand")]
STATE_FIELDS = {"state_size", "mamba_d_state", "d_state", "ssm_state_size"}


# --- tiny configs ---------------------------------------------------------------------------------
# A config is rebuilt from keyword arguments, not edited after construction: its __post_init__
# then derives what depends on the shrunk sizes (head_dim, num_key_value_heads, layer_types) as
# it does for a real checkpoint. Fields whose declared default is None are such derived values
# and are left out unless a rule sets them.
def tiny_config(config_class: type, start: Any = None, widths: bool = True) -> Any:
    """A tiny instance of ``config_class`` (from ``start``, an instance, or its defaults).

    ``widths=False`` shrinks only depth, vocabulary, experts and dropout: the fallback for
    architectures whose sizes are tied together in ways the generic rules do not know
    (vision backbones with derived channel counts).
    """
    default = start if start is not None else config_class()
    declared = {f.name: f.default for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(
        config_class) else {}
    values = {k: v for k, v in vars(default).items() if not k.startswith("_")}
    old_layers = {v for k, v in values.items() if k in LAYER_FIELDS and isinstance(v, int) and v > LAYERS}
    per_layer = {k: v for k, v in values.items() if isinstance(v, (list, tuple)) and len(v) in old_layers}
    kept_layers = _kept_layers(per_layer.values())
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if declared and key not in declared:
            continue  # set by __post_init__ from other fields
        if isinstance(value, transformers.PretrainedConfig):
            kwargs[key] = tiny_config(type(value), value, widths)
            continue
        if key == "attention_layers" and "attention_types" in values:
            continue  # GPT-Neo expands it from attention_types
        if key in per_layer:  # per-layer lists (layer_types, block_types): the same layers in each
            new = [value[i] for i in kept_layers]  # (a derived default may not follow the layer count)
        elif value is not None and declared.get(key, 0) is None and _derived(key) and key != "attention_types":
            continue  # __post_init__ derived it: it derives it again from the shrunk sizes
        else:
            new = _tiny_value(key, value, values, widths)
        kwargs[key] = new
    for key, value in _consistent(kwargs, widths).items():
        kwargs[key] = value
    if "use_cache" in values:
        kwargs["use_cache"] = False
    return config_class(**kwargs)


def _kept_layers(per_layer_lists: Any) -> list[int]:
    """The LAYERS layer indices kept: the first layer of each kind first (a hybrid model keeps
    one attention and one linear-attention layer, a MoE model one dense and one sparse layer)."""
    firsts: list[int] = []
    for values in per_layer_lists:
        seen = set()
        for i, value in enumerate(values):
            if repr(value) not in seen:
                seen.add(repr(value))
                if i not in firsts:
                    firsts.append(i)
    kept = sorted(firsts[:LAYERS])
    for i in range(LAYERS):
        if len(kept) < LAYERS and i not in kept:
            kept.append(i)
    return sorted(kept)


def _derived(key: str) -> bool:
    """Fields a config derives in __post_init__ when left None (sizes and per-layer lists)."""
    return key.endswith(("_dim", "_heads", "_size", "_types", "_type", "_layers", "_ratio", "_pattern")) or key in (
        "head_dim", "layer_types", "num_key_value_heads", "rope_parameters")


def _consistent(kwargs: dict[str, Any], widths: bool) -> dict[str, Any]:
    """Sizes that must agree with each other after shrinking (state-space heads, rotary dims)."""
    fixed: dict[str, Any] = {}
    if not widths:
        return fixed
    head = HIDDEN // HEADS
    # State-space (Mamba-2) mixers: heads * head_dim == expand * hidden.
    ssm_heads = list(SSM_HEAD_FIELDS)
    if "state_size" in kwargs:  # a Mamba-2 config names them plainly
        ssm_heads.append(("num_heads", "head_dim", "expand"))
    for heads_key, dim_key, expand_key in ssm_heads:
        if heads_key in kwargs and dim_key in kwargs:
            fixed[dim_key] = head
            fixed[heads_key] = max(1, int((kwargs.get(expand_key) or 2) * HIDDEN) // head)
    if isinstance(kwargs.get("mamba_d_ssm"), int):  # the mixer's inner width, set apart from expand
        fixed["mamba_d_ssm"] = int((kwargs.get("mamba_expand") or 2) * HIDDEN)
        if "mamba_n_heads" in kwargs:
            fixed["mamba_d_head"] = fixed["mamba_d_ssm"] // fixed.get("mamba_n_heads", kwargs["mamba_n_heads"])
    if isinstance(kwargs.get("rotary_dim"), int):  # partial rotary within one head
        fixed["rotary_dim"] = min(kwargs["rotary_dim"], head // 2)
    return fixed


def layer_count(config: Any, task: str) -> int:
    """The layers the model of ``task`` builds from ``config``: what units are counted against."""
    def first(*names: str) -> int:
        return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), 0)

    encoder = first("encoder_layers", "num_encoder_layers", "num_layers", "num_hidden_layers")
    decoder = first("decoder_layers", "num_decoder_layers")
    if task == "seq2seq" and decoder:
        return encoder + decoder
    if decoder:  # a causal LM of an encoder-decoder family: its decoder alone
        return decoder
    count = first("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_self_attends_per_block")
    if not count and isinstance(getattr(config, "depths", None), (list, tuple)):
        count = sum(config.depths)
    if not count:  # a composite config: its text or vision part
        for sub in ("text_config", "decoder", "vision_config"):
            if isinstance(getattr(config, sub, None), transformers.PretrainedConfig):
                return layer_count(getattr(config, sub), task)
    return count


def _tiny_value(key: str, value: Any, values: dict[str, Any], widths: bool = True) -> Any:
    # A default of None that the model reads as a size (a checkpoint always sets it): set it.
    if value is None and widths and key in KV_HEAD_FIELDS | HEAD_DIM_FIELDS:
        value = 0  # derived by the model as num_heads or hidden // heads
    if value is None and key in EXPERT_FIELDS | TOP_K_FIELDS | {"vocab_size"}:
        value = VOCAB if key == "vocab_size" else 4
    if value is None and key in ("pad_token_id", "n_shared_experts"):
        return 1  # the example ids start at 4: nothing is padding
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        return value
    if isinstance(value, float):
        return 0.0 if "dropout" in key or key.endswith("_drop") or "drop_path" in key or "layerdrop" in key else value
    original = value
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        if key == "attention_types" and all(isinstance(v, list) and len(v) == 2 for v in value):
            pattern = value[0][0]  # GPT-Neo: [[pattern, repeats]] spelling out the layers
            return [[pattern, max(1, LAYERS // len(pattern))]]
        if key == "depths" and all(isinstance(v, int) for v in value):
            # One layer per stage, two in the first: a stage's first layer projects its shortcut
            # in most backbones, the second keeps the identity.
            return [2] + [1] * (len(value) - 1)
        if not widths:
            return original
        if key in ("hidden_sizes", "embed_dims", "dims") and all(isinstance(v, int) for v in value):
            return [HIDDEN * (i + 1) for i in range(len(value))]
        if key in ("num_heads", "num_attention_heads") and all(isinstance(v, int) for v in value):
            return [1] * len(value)
        return original
    if key in LAYER_FIELDS:
        return LAYERS if value > LAYERS else value
    if key in EXPERT_FIELDS or (key.endswith(("_experts", "expert_num")) and value > 4):
        return 4  # routed experts (and LongCat's zero experts); shared experts stay as they are
    if key in ("n_group", "topk_group"):  # expert groups: one group of the 4 experts
        return 1
    if key in TOP_K_FIELDS:
        return min(value, 2)
    if "vocab" in key and value > VOCAB:  # vocab_size, and extra tables (BLT's hash n-gram vocabulary)
        return VOCAB
    if key.endswith("_token_id") and value >= VOCAB:
        return VOCAB - 1
    if key == "max_position_embeddings" and value > 512:
        return 512
    if not widths:
        return value
    if key in WIDTH_FIELDS:
        return HIDDEN
    if key in FFN_FIELDS or key.endswith(("_intermediate_size", "ffn_hidden_size", "_ffn_dim")):
        return 2 * HIDDEN
    if key in HEAD_FIELDS or key in KV_HEAD_FIELDS:
        return HEADS  # as many key/value heads as query heads: any grouping rule holds
    if key == "head_dim" and "qk_rope_head_dim" in values:  # multi-head latent attention: rope part
        return HIDDEN // HEADS // 2
    if key in HEAD_DIM_FIELDS:
        return HIDDEN // HEADS
    if key in ("qk_rope_head_dim", "qk_nope_head_dim"):
        return HIDDEN // HEADS // 2
    if key in ("kv_lora_rank", "q_lora_rank"):
        return HIDDEN // 2
    if key in GROUP_FIELDS:
        return 1  # one group divides any channel or head count
    if key in STATE_FIELDS:
        return 16
    if key == "image_size" and value > IMAGE:
        return IMAGE
    return value


def build(model_class: type, task: str) -> tuple[Any, torch.nn.Module, dict[str, torch.Tensor], list[torch.Tensor]]:
    """The tiny config, model, inputs and plain eval output; widths kept when shrinking them fails."""
    failure: Exception | None = None
    for widths in (True, False):
        try:
            config = tiny_config(model_class.config_class, widths=widths)
            if task == "causal" and hasattr(config, "is_decoder"):
                config.is_decoder = True  # what a causal-LM head of an encoder family expects
            with torch.device("meta"):  # sized before any memory is taken
                size = sum(p.numel() for p in model_class(config).parameters())
            if size > (MAX_TINY_PARAMS if widths else MAX_DEPTH_ONLY_PARAMS):
                raise RuntimeError(f"{model_class.__name__} has {size:,} parameters from its "
                                   f"{'tiny' if widths else 'depth-only'} config: too large to sweep")
            torch.manual_seed(0)
            model = model_class(config).float().eval()
            inputs = example_inputs(config, task, set(inspect.signature(model.forward).parameters))
            with torch.no_grad():
                reference = [t.clone() for t in tensors(model(**inputs))]
        except Exception as exc:
            failure = failure or exc  # the tiny config's error says most
            continue
        config.__dict__["_zoo_widths"] = widths
        return config, model, inputs, reference
    assert failure is not None
    raise failure


# --- the checks -----------------------------------------------------------------------------------
def architectures() -> list[tuple[str, str, str]]:
    """(model type, task, class name), one per model type."""
    found: dict[str, tuple[str, str, str]] = {}
    for task, mapping in TASKS:
        for model_type, class_name in getattr(modeling_auto, mapping).items():
            if isinstance(class_name, (tuple, list)):
                class_name = class_name[0]
            found.setdefault(model_type, (model_type, task, class_name))
    return sorted(found.values())


def example_inputs(config: Any, task: str, accepted: set[str] = frozenset({"pixel_values"})) -> dict[str, torch.Tensor]:
    """Inputs for ``task``; ``accepted``: the forward's parameters (ImageGPT classifies token ids)."""
    generator = torch.Generator().manual_seed(0)
    if task == "image" and "pixel_values" in accepted:
        channels = getattr(config, "num_channels", 3)
        size = getattr(config, "image_size", IMAGE)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator)}
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", VOCAB)
    ids = torch.randint(4, min(vocab, VOCAB) - 1, (2, SEQ), generator=generator)
    if task == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids.flip(1)}
    return {"input_ids": ids}


def check(model_type: str, task: str, class_name: str, build_only: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"type": model_type, "task": task, "class": class_name}
    try:
        config, model, inputs, reference = build(getattr(transformers, class_name), task)
    except Exception as exc:
        return {**result, "status": "unbuildable", "detail": one_line(exc)}
    result["layers"] = layers = layer_count(config, task)
    result["config"] = "tiny" if config.__dict__.get("_zoo_widths", True) else "depth only"
    if not reference:
        return {**result, "status": "unbuildable", "detail": "the plain forward returns no tensor"}
    if build_only:
        return {**result, "status": "built"}
    result.update(check_model(model, inputs, lambda m: m(**inputs), reference))
    if result["status"] == "checked":
        result["status"] = "ok" if result["units"] >= layers else "fewer units"
    return result


def case(arch: tuple[str, str, str], build_only: bool = False) -> tuple[dict[str, Any], Any]:
    def run() -> dict[str, Any]:
        transformers.logging.set_verbosity_error()
        return check(*arch, build_only=build_only)

    return {"type": arch[0], "task": arch[1], "class": arch[2]}, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(parser, "bloom,t5", len(SAMPLE), 240.0)
    parser.add_argument("--from-json", help="print the table from saved --json results; a later line for a "
                        "model type replaces an earlier one (rerun the failures with --only and append)")
    parser.add_argument("--build-only", action="store_true",
                        help="only build each tiny model and run its plain forward (checks the config shrinking)")
    args = parser.parse_args()
    if args.from_json:
        by_type = {}
        for line in Path(args.from_json).read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                by_type[result["type"]] = result
        results = [by_type[k] for k in sorted(by_type)]
        report(results, COLUMNS, "model types", None)
        return
    torch.set_num_threads(1)
    archs = architectures()
    wanted = chosen([a[0] for a in archs], args, SAMPLE)
    results = sweep([case(arch, args.build_only) for arch in archs if arch[0] in wanted], args.timeout, args.json)
    report(results, COLUMNS, "model types", args.out)

if __name__ == "__main__":
    main()

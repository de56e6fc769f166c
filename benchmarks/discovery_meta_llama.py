"""find_blocks on an 80-layer, hidden-8192 Llama (Llama-2/3-70B shape) built on the meta device.

No weights exist: the model is built on ``meta`` and discovery traces it with torch.export and
probes it with fake tensors. Targets: under 30 s and under 2 GB peak resident memory, measured
in this (fresh) process with resource.getrusage.

    python benchmarks/discovery_meta_llama.py
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import raptr_fx  # noqa: E402

TARGET_S = 30.0
TARGET_GB = 2.0


def peak_rss_gb() -> float:
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args()

    import transformers
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=args.hidden, intermediate_size=28672 * args.hidden // 8192,
        num_hidden_layers=args.layers, num_attention_heads=64, num_key_value_heads=8,
        max_position_embeddings=8192, bos_token_id=0, eos_token_id=0)
    rss_before = peak_rss_gb()
    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    inputs = {"input_ids": torch.zeros(1, args.seq, dtype=torch.long, device="meta")}
    start = time.perf_counter()
    discovery = raptr_fx.discover(model, inputs)
    seconds = time.perf_counter() - start
    rss = peak_rss_gb()
    droppable = len(discovery.droppable)
    assert droppable == args.layers, f"expected {args.layers} droppable layers, found {droppable}"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"Llama {args.layers} layers, hidden {args.hidden}, {params / 1e9:.1f}B parameters on meta "
          f"(built in {built:.1f} s; peak RSS before discovery {rss_before:.2f} GB)")
    print(f"tracer {discovery.tracer}, probe {discovery.probe} tensors, {droppable} droppable units")
    print(f"find_blocks                {seconds:6.1f} s       ratio to target {seconds / TARGET_S:.2f}")
    print(f"peak resident memory       {rss:6.2f} GB      ratio to target {rss / TARGET_GB:.2f}")


if __name__ == "__main__":
    main()

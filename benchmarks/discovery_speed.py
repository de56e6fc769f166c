"""Discovery speed: find_blocks on a 48-layer nanoGPT-style model; target under 2 s.

    python benchmarks/discovery_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.nanogpt import GPT, GPTConfig  # noqa: E402

import raptr_fx  # noqa: E402

TARGET_S = 2.0


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    config = GPTConfig(n_layer=48)
    model = GPT(config)
    inputs = (torch.randint(0, config.vocab_size, (2, config.block_size)),)
    assert len(raptr_fx.find_blocks(model)) == 48
    symbolic = best_of(3, lambda: raptr_fx.find_blocks(model))
    with_inputs = best_of(3, lambda: raptr_fx.find_blocks(model, inputs))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 48-layer GPT (width {config.n_embd})")
    print(f"find_blocks(model)                 {symbolic:6.2f} s  ratio to target {symbolic / TARGET_S:.2f}")
    print(f"find_blocks(model, example_inputs) {with_inputs:6.2f} s  ratio to target {with_inputs / TARGET_S:.2f}")
    try:
        import transformers
    except ImportError:
        print("transformers not installed: torch.export path not measured")
        return
    transformers.logging.set_verbosity_error()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=48, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    ids = {"input_ids": torch.randint(0, 256, (2, 64))}
    assert len(raptr_fx.find_blocks(llama, ids)) == 48
    exported = best_of(2, lambda: raptr_fx.find_blocks(llama, ids))
    print(f"48-layer HF Llama via torch.export {exported:6.2f} s  ratio to target {exported / TARGET_S:.2f}")


if __name__ == "__main__":
    main()

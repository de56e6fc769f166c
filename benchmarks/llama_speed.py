"""A Hugging Face Llama (transformers 5), transformed through torch.export and compiled: step time
of the untransformed model, of every unit on, and of half the units on; ratios printed last.

    python benchmarks/llama_speed.py --no-compile                     # CPU smoke test, tiny
    python benchmarks/llama_speed.py --device cuda --dtype bfloat16 --layers 16 --hidden 2048 --seq 1024 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Interleaved, add_device_args, header, pin_stage, print_rows, timed_steps  # noqa: E402

import raptr_fx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=12, help="rounds, interleaving the variants against drift")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    add_device_args(parser)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    print(header(args), flush=True)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(2.6875 * args.hidden),
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq,
                         use_cache=False)  # training builds no KV cache (its updates break the graph per layer)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(args.device)
    gated = copy.deepcopy(base)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    half = args.layers // 2
    # Exact sampling: stage 0 runs exactly half the layers every step, stage 1 all of them.
    ctl = raptr_fx.transform(gated, raptr_fx.RaPTr(f"{half}-{args.layers}", total_steps=2, sampling="exact"),
                             example_inputs={"input_ids": batch[:1, :16]})
    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())

    def runner(model: torch.nn.Module):
        forward = torch.compile(model) if args.compile else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step() -> None:
            with autocast:
                loss = forward(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    # "base again": a second untransformed copy, compiled on its own: identical work, the noise line.
    steps = {"base": runner(base), "base again": runner(copy.deepcopy(base)), "gated": runner(gated)}

    for stage in (0, 1):  # warm up (and compile) both gate patterns
        pin_stage(ctl, stage)
        timed_steps(steps["gated"], 2, args.device)
    for name in ("base", "base again"):
        timed_steps(steps[name], 2, args.device)
    timing = Interleaved({"base": steps["base"], "base again": steps["base again"], "half": steps["gated"],
                          "all": steps["gated"]}, args.device,
                         before={"half": lambda: pin_stage(ctl, 0), "all": lambda: pin_stage(ctl, 1)})
    timing.run(args.rounds, args.steps)
    print(f"median step ms: {timing.step_times()}")
    print(f"\nratios (Llama {args.layers} layers, hidden {args.hidden}, compiled={args.compile}): trimmed mean over "
          f"{args.rounds} rounds of the ratio within each round, [95% interval], target, verdict")
    print_rows([
        ("A/A: untransformed copy / untransformed (noise)", timing.ratio(lambda r: r["base again"] / r["base"]), None),
        ("overhead (all units on / untransformed)", timing.ratio(lambda r: r["all"] / r["base"]),
         1.01 if args.compile else 1.02),
        # The layers' share of the step bounds the saving.
        (f"{half} of {args.layers} units on / untransformed", timing.ratio(lambda r: r["half"] / r["base"]), None),
    ])


if __name__ == "__main__":
    main()

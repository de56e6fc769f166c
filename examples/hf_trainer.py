"""RaPTr under the Hugging Face Trainer: one callback, checkpoints and resume included.

    python examples/hf_trainer.py                       # tiny Llama on this repo's bytes, CPU, ~1 min
    python examples/hf_trainer.py --steps 6             # smoke test
    python examples/hf_trainer.py --resume              # continue from the last checkpoint, same gates
    python examples/hf_trainer.py --device cuda --compile --dtype bfloat16 \\
        --layers 12 --width 768 --seq 512 --batch 16 --steps 5000

The model is built from a config (no download). ``RaPTrCallback`` transforms it at its first
forward (transformers models are traced with ``torch.export``, the first batch serves as example
inputs; with ``--compile`` an example batch is passed instead), steps once per optimizer step
whatever the gradient accumulation, stores its state in each checkpoint and logs ``raptr/*``.
Under ``torchrun`` keep ``ddp_find_unused_parameters=False``: the Trainer would otherwise turn
DDP's unused-parameter search on, which RaPTr does not need (skipped units get zero gradients).
"""

from __future__ import annotations

import argparse
import pathlib

import torch
import transformers

from raptr_fx.integrations.transformers import RaPTrCallback

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Bytes(torch.utils.data.Dataset):
    """Windows of this repository's README and sources, as byte tokens (no download)."""

    def __init__(self, seq: int, size: int = 100_000):
        files = [ROOT / "README.md", *sorted((ROOT / "raptr_fx").rglob("*.py"))]
        data = b"\n".join(f.read_bytes() for f in files if f.is_file())
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq, self.size = seq, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = (i * 7919) % (len(self.data) - self.seq)
        x = self.data[start:start + self.seq]
        return {"input_ids": x, "labels": x}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--schedule", default="4-6-8")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.width, intermediate_size=4 * args.width,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.seq, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    model.config.use_cache = False
    data = Bytes(args.seq)

    example = None
    if args.compile:  # a compiled model cannot be traced at its first call: give one batch up front
        example = {k: v.unsqueeze(0).to(args.device) for k, v in data[0].items()}
    raptr = RaPTrCallback(args.schedule, example_inputs=example)                # the one line
    training = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulate, learning_rate=args.lr, warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 8), save_steps=max(1, args.steps // 2), save_total_limit=2,
        report_to=[], disable_tqdm=True, use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
        torch_compile=args.compile, dataloader_num_workers=0, seed=0,
        ddp_find_unused_parameters=False)  # under torchrun: RaPTr needs no unused-parameter search
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data, callbacks=[raptr])
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)

    ctl = raptr.controller
    print(f"done: {trainer.state.global_step} optimizer steps, controller at step {ctl.step_count} "
          f"(stage {ctl.stage}, {sum(ctl.active)}/{len(ctl.blocks)} units), train loss {result.training_loss:.3f}, "
          f"{100 * ctl.expected_compute:.0f}% of the unit compute over the schedule")


if __name__ == "__main__":
    main()

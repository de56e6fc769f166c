"""RaPTr under Lightning: one callback, its state in every checkpoint.

    python examples/lightning_train.py                   # tiny byte-level GPT on this repo's text, CPU, ~1 min
    python examples/lightning_train.py --steps 6         # smoke test
    python examples/lightning_train.py --resume runs/lightning/checkpoints/last.ckpt   # same gate sequence
    python examples/lightning_train.py --device cuda --compile --dtype bfloat16 \\
        --layers 12 --width 768 --seq 256 --batch 32 --steps 5000

``RaPTrLightningCallback(schedule, module="model")`` transforms ``LitGPT.model`` at setup (before
Lightning wraps it), steps once per optimizer step (``accumulate_grad_batches`` included), logs
``raptr/*`` and keeps its state in the checkpoints. ``--compile`` compiles in ``configure_model``,
which Lightning calls after the callback's setup: transform first, then compile.
"""

from __future__ import annotations

import argparse
import pathlib

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from nanogpt import GPT, GPTConfig
from raptr_fx.integrations.lightning import RaPTrLightningCallback

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Windows(torch.utils.data.Dataset):
    """Windows of this repository's README and sources, as byte tokens (no download)."""

    def __init__(self, seq: int, size: int = 100_000):
        files = [ROOT / "README.md", *sorted((ROOT / "raptr_fx").rglob("*.py"))]
        data = b"\n".join(f.read_bytes() for f in files if f.is_file())
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq, self.size = seq, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> torch.Tensor:
        start = (i * 7919) % (len(self.data) - self.seq - 1)
        return self.data[start:start + self.seq + 1]


class LitGPT(L.LightningModule):
    def __init__(self, config: GPTConfig, lr: float, compile: bool):
        super().__init__()
        self.model = GPT(config)
        self.lr, self.compile_model = lr, compile

    def configure_model(self) -> None:
        if self.compile_model:
            self.model.compile()  # in place: state_dict keys unchanged; after the callback's transform

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--schedule", default="6-8-10-12")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="accumulate_grad_batches")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--output-dir", default="runs/lightning")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    lit = LitGPT(GPTConfig(n_layer=args.layers, n_embd=args.width, block_size=args.seq), args.lr, args.compile)
    raptr = RaPTrLightningCallback(args.schedule, module="model")              # the one line
    checkpoints = ModelCheckpoint(dirpath=pathlib.Path(args.output_dir) / "checkpoints",
                                  every_n_train_steps=max(1, args.steps // 2), save_last=True)
    trainer = L.Trainer(
        max_steps=args.steps, accumulate_grad_batches=args.accumulate, callbacks=[raptr, checkpoints],
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.dtype == "bfloat16" else "32-true",
        logger=L.pytorch.loggers.CSVLogger(args.output_dir), log_every_n_steps=max(1, args.steps // 10),
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=args.output_dir)
    loader = torch.utils.data.DataLoader(Windows(args.seq), batch_size=args.batch)
    trainer.fit(lit, loader, ckpt_path=args.resume)

    ctl = raptr.controller
    print(f"done: {trainer.global_step} optimizer steps, controller at step {ctl.step_count} "
          f"(stage {ctl.stage}, {sum(ctl.active)}/{len(ctl.blocks)} units), "
          f"loss {float(trainer.callback_metrics['loss']):.3f}, metrics in {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()

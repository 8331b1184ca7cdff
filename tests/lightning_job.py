"""A tiny Lightning run with GradStatsCallback, for tests/test_lightning.py (in process, or
launched as a script so that Lightning's DDP strategy can start its second process):

    python tests/lightning_job.py OUT [--devices N] [--steps S] [--every K] [--compile]

Writes OUT/csv/.../metrics.csv (CSVLogger) and, per rank and record, the accumulated statistics
just before the callback merged them (OUT/slots_rank{R}_step{S}.pt), so the test can merge them
itself."""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from gradstats.lightning import GradStatsCallback
from gradstats.models import cifar_resnet
from gradstats.records import recorder_slots


class Classifier(pl.LightningModule):
    def __init__(self, compile: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = cifar_resnet(8)
        self.compile = compile

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def dataset(samples: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(
        torch.randn(samples, 3, 8, 8, generator=g), torch.randint(0, 10, (samples,), generator=g)
    )


class SaveSlots(pl.Callback):
    """Before GradStatsCallback records: each rank's accumulated statistics, to a file."""

    def __init__(self, out: str, every: int) -> None:
        self.out, self.every = out, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.every == 0:
            slots = recorder_slots(pl_module)
            torch.save(
                {kind: [(n, s.clone()) for n, s in group] for kind, group in zip(("bn", "block"), slots)},
                os.path.join(self.out, f"slots_rank{trainer.global_rank}_step{step}.pt"),
            )


def main(argv=None) -> GradStatsCallback:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--per-sample", action="store_true")
    parser.add_argument(
        "--loss-scale",
        type=float,
        default=0.0,
        help="16-bit mixed precision; > 0: with a GradScaler of this scale",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = Classifier()
    if args.compile:
        model.net = torch.compile(model.net, backend="aot_eager", fullgraph=True)
    callback = GradStatsCallback(per_sample=args.per_sample)
    precision = {}
    if args.loss_scale > 0:
        scaler = torch.amp.GradScaler("cpu", init_scale=args.loss_scale, growth_interval=1000)
        precision["plugins"] = [pl.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    elif args.loss_scale < 0:
        precision["precision"] = "16-mixed"  # on CPU: autocast to float16, no GradScaler
    trainer = pl.Trainer(
        **precision,
        max_steps=args.steps,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        log_every_n_steps=args.every,
        logger=pl.loggers.CSVLogger(args.out, name="csv", version=0),
        callbacks=[SaveSlots(args.out, args.every), callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(dataset(), batch_size=8, shuffle=False)
    trainer.fit(model, loader)
    return callback


if __name__ == "__main__":
    main()

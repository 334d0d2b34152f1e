"""Exact resume of the shipped experiment configs, shuffling on as shipped: N training steps straight
equal N/2 steps, a checkpoint (mid-epoch) and N/2 resumed steps, bit for bit — for equal weighting,
a stateful loss method (FAMO), a gradient method (Nash-MTL) and a one-task-per-step mixing policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_lightning.cli import MTLCLI

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]

ROOT = Path(__file__).parent.parent / "experiments"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
DIGITS = ["--data.init_args.num_train", "320", "--data.init_args.num_val", "32", "--data.init_args.num_test", "32",
          "--data.init_args.batch_size", "32", "--model.encoder.init_args.out_features", "16"]
CASES = {
    "multidigits-ew": (["multidigits/ew.yaml"], DIGITS),
    "multidigits-famo": (["multidigits/ew.yaml", "multidigits/famo.yaml"], DIGITS),
    "multidigits-nash_mtl": (["multidigits/ew.yaml", "multidigits/nash_mtl.yaml"], DIGITS),
    "domain_digits-temperature": (["domain_digits/temperature.yaml"],
                                  ["--data.init_args.train_sizes", "{original: 96, transposed: 64, inverted: 32}",
                                   "--data.init_args.batch_size", "16", "--model.encoder.init_args.out_features", "16"]),
}
STEPS = 14  # 10 batches per MultiDigits epoch: the checkpoint at step 7 falls inside the first epoch


def run(configs: list[str], extra: list[str], steps: int, ckpt_path: str | None = None, save: str | None = None):
    args = [a for c in configs for a in ("--config", str(ROOT / c))] + extra + QUIET
    args += ["--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.enable_checkpointing", "false"]
    cli = MTLCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    if save is not None:
        cli.trainer.save_checkpoint(save)
    return torch.cat([p.detach().reshape(-1) for p in cli.model.parameters()])


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_run_equals_straight_run_bit_for_bit(case, tmp_path):
    configs, extra = CASES[case]
    straight = run(configs, extra, STEPS)
    ckpt = str(tmp_path / "half.ckpt")
    run(configs, extra, STEPS // 2, save=ckpt)
    resumed = run(configs, extra, STEPS, ckpt_path=ckpt)
    assert torch.equal(straight, resumed), f"max |Δθ| = {float((straight - resumed).abs().max()):.3g}"

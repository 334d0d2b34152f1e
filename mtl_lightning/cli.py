"""``mtl-lightning fit|validate|test|predict --config experiments/….yaml`` (LightningCLI)."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.tracking import RunConfigCallback

#: Trainer flags that the MultiTaskModule implements itself (it drives optimization).
MODULE_OPTIMIZATION_FLAGS = ("gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "mtl_lightning.tracking.WandbLogger",
        "init_args": {"save_dir": "runs", "project": "mtl-lightning"},
    },
}


class MTLCLI(LightningCLI):
    """LightningCLI for a :class:`MultiTaskModule` and any ``LightningDataModule`` (by class_path).

    Several ``--config`` files merge in order, every option can be overridden on the command line,
    and the Trainer's ``gradient_clip_val`` / ``gradient_clip_algorithm`` / ``accumulate_grad_batches``
    are handed to the module, which applies them (the module drives optimization itself).
    """

    def __init__(self, args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(
            MultiTaskModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer, model = config.get("trainer"), config.get("model")
        if trainer is None or model is None:
            return
        for flag in MODULE_OPTIMIZATION_FLAGS:
            value = trainer.get(flag)
            default = 1 if flag == "accumulate_grad_batches" else None
            if value is not None and value != default:
                model[flag] = value
                trainer[flag] = default


def main(args: Optional[list[str]] = None) -> None:
    MTLCLI(args=args)


if __name__ == "__main__":
    main()

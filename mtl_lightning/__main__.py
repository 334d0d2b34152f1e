from mtl_lightning.cli import main

main()

"""Every MultiDigits experiment config parses and configures exactly its balancing callback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl_lightning.balancing import BalancingMethod
from mtl_lightning.cli import MTLCLI

CONFIGS = sorted((Path(__file__).parents[1] / "experiments" / "multidigits").glob("*.yaml"))
EXPECTED = {"uw": "UW", "dwa": "DWA", "rlw": "RLW", "gls": "GLS", "si": "SI", "imtl_l": "IMTLL",
            "stch": "STCH", "famo": "FAMO", "gradnorm": "GradNorm"}


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.stem in EXPECTED], ids=lambda c: c.stem)
def test_config_configures_its_balancing_callback(config):
    cli = MTLCLI(args=["--config", str(config), "--trainer.logger", "false"], run=False)
    methods = [type(cb).__name__ for cb in cli.trainer.callbacks if isinstance(cb, BalancingMethod)]
    assert methods == [EXPECTED[config.stem]]


def test_configs_exist_for_every_method():
    assert set(EXPECTED) <= {c.stem for c in CONFIGS}

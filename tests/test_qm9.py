"""QM9 on the real molecules of qm9pack (the `qm9` extra): units, features, split, MPNN, CLI.

Only the first molecules of the database are read (``max_molecules``: pandas stops after them), so
nothing here parses the whole 225 MB of CSV.
"""

import glob
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")
pytest.importorskip("pandas")
qm9 = pytest.importorskip("mtl_lightning.data.qm9")
if __import__("importlib.util").util.find_spec("qm9pack") is None:
    pytest.skip("qm9pack is not installed (pip install 'mtl-lightning[qm9]')", allow_module_level=True)

from mtl_lightning.cli import MTLCLI  # noqa: E402
from mtl_lightning.data.qm9 import HAR2EV, NASH_MTL_TARGETS, QM9DataModule, QM9Task, TARGETS  # noqa: E402
from mtl_lightning.models.mpnn import MPNN  # noqa: E402
from mtl_lightning.tasks.task import TaskConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EW = str(ROOT / "experiments" / "qm9" / "ew.yaml")
TINY = dict(max_molecules=64, num_val=8, num_test=8, batch_size=16)


def test_unit_constants_and_target_indices_match_pyg():
    from torch_geometric.datasets import qm9 as pyg

    assert qm9.HAR2EV == pyg.HAR2EV and qm9.KCALMOL2EV == pyg.KCALMOL2EV
    for name, target in TARGETS.items():
        if target.atomization is None:
            assert target.factor == pytest.approx(float(pyg.conversion[target.pyg_index])), name
        else:  # PyG's come from DeepChem's kcal/mol column; ours from the Hartree totals minus the atoms
            assert float(pyg.conversion[target.pyg_index]) == pytest.approx(qm9.KCALMOL2EV) and target.factor == HAR2EV
    # Nash-MTL's target_idx = [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]
    assert [TARGETS[t].pyg_index for t in NASH_MTL_TARGETS] == [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]
    for kind, pyg_target in zip(("U0", "U", "H", "G"), (7, 8, 9, 10)):
        ours = [qm9.ATOM_REFERENCE_HARTREE[kind][z] * HAR2EV for z in (1, 6, 7, 8, 9)]
        assert ours == pytest.approx(pyg.atomrefs[pyg_target], abs=1e-4)


def test_methane_values_in_pyg_units_and_graph_features():
    mols = qm9.load_molecules(list(TARGETS), max_molecules=3)
    assert list(mols.index) == [1, 2, 3]  # CH4, NH3, H2O
    t = {k: v[0] for k, v in mols.targets.items()}
    assert t["mu"] == 0.0 and t["alpha"] == 13.21 and t["cv"] == 6.469 and t["r2"] == 35.3641
    assert t["homo"] == pytest.approx(-0.3877 * HAR2EV) and t["zpve"] == pytest.approx(0.044749 * HAR2EV)
    assert t["U0_total"] == pytest.approx(-40.47893 * HAR2EV)
    assert t["U0"] == pytest.approx((-40.47893 - (-37.846772 - 4 * 0.500273)) * HAR2EV)  # atomization, ≈ -17.17 eV
    z, pos = mols.z[:5], mols.pos[:5]
    types = qm9.perceive_bonds(z, pos)
    x = qm9.node_features(z, types)
    assert x[0].tolist() == [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4]  # C: one-hot, Z, not aromatic, sp3, 4 H
    assert x[1].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert (types[0, 1:] == 0).all() and (types[1:, 1:] == -1).all()  # 4 single C–H bonds, no H–H


def test_bond_orders_aromaticity_and_hybridisation():
    # acetylene (#4): triple bond, sp; formaldehyde (#6): C=O, sp2; benzene-like pattern checked on a ring
    mols = qm9.load_molecules(["mu"], max_molecules=6)
    for i, (expected, hybrid) in {3: (2, 7), 5: (1, 8)}.items():
        a, b = mols.offsets[i], mols.offsets[i + 1]
        types = qm9.perceive_bonds(mols.z[a:b], mols.pos[a:b])
        assert types[0, 1] == expected
        assert qm9.node_features(mols.z[a:b], types)[0, hybrid] == 1
    ring = np.array([[np.cos(a), np.sin(a), 0.0] for a in np.arange(6) * np.pi / 3]) * 1.39
    hs = ring * (1 + 1.08 / 1.39)
    types = qm9.perceive_bonds(np.array([6] * 6 + [1] * 6), np.concatenate([ring, hs]))
    x = qm9.node_features(np.array([6] * 6 + [1] * 6), types)
    assert (types[0, 1] == 3) and x[:6, 6].all() and x[:6, 8].all() and x[:6, 10].tolist() == [1] * 6


def test_batches_standardisation_and_split_determinism():
    dm = QM9DataModule(**TINY, seed=42)
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 48, "val": 8, "test": 8}
    batch = next(iter(dm.train_dataloader()))
    graph = batch["input"]
    assert len(graph) == 16 and graph.x.shape[1] == 11 and graph.edge_attr.shape[1] == 5
    sizes = torch.bincount(graph.batch)
    assert graph.edge_index.shape[1] == int((sizes * (sizes - 1)).sum())  # complete graphs, no self-loops
    assert sorted(batch) == sorted(["input", *NASH_MTL_TARGETS])
    train = dm.datasets["train"].labels
    for name in NASH_MTL_TARGETS:
        assert float(train[name].mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(train[name].std()) == pytest.approx(1.0, abs=1e-4)
    first = qm9.load_molecules(["U0"], max_molecules=64)
    raw = first.targets["U0"]
    mean, std = dm.target_stats["U0"]
    train_rows = np.searchsorted(first.index, dm.split_indices["train"])
    assert mean == pytest.approx(raw[train_rows].mean()) and std == pytest.approx(raw[train_rows].std(ddof=1))
    # the same seed gives the same split; another seed another; the global RNG is left alone
    state = torch.random.get_rng_state()
    py_state = random.getstate()
    again = QM9DataModule(**TINY, seed=42)
    again.setup()
    assert torch.equal(torch.random.get_rng_state(), state) and random.getstate() == py_state
    for split in ("train", "val", "test"):
        assert (again.split_indices[split] == dm.split_indices[split]).all()
    other = QM9DataModule(**TINY, seed=0, split="random")
    other.setup()
    assert not (other.split_indices["test"] == dm.split_indices["test"]).all()
    small = QM9DataModule(**TINY, num_train=10)
    small.setup()
    assert (small.split_indices["train"] == dm.split_indices["train"][:10]).all()


def test_mpnn_reused_edge_weights_equal_nnconv():
    dm = QM9DataModule(**TINY)
    dm.setup()
    graph = next(iter(dm.val_dataloader()))["input"]
    torch.manual_seed(0)
    model = MPNN()
    fast = model(graph)
    model.reuse_edge_weights = False
    reference = model(graph)
    assert fast.shape == (8, 64) and model.out_features == 64
    assert torch.allclose(fast, reference, atol=1e-5)


def test_cli_trains_shipped_config_on_real_molecules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = MTLCLI(args=[
        "fit", "--config", EW, "--config", str(ROOT / "experiments" / "qm9" / "famo.yaml"),
        "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        "--data.init_args.max_molecules", "96", "--data.init_args.num_val", "16", "--data.init_args.num_test", "16",
        "--data.init_args.batch_size", "32",
    ])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["val/delta_m"]) and float(metrics["val/U0/mae"]) > 0
    task = cli.model.tasks["homo"]
    assert task.std == pytest.approx(cli.datamodule.target_stats["homo"][1]) and task.report_scale == 1000.0
    assert glob.glob(str(tmp_path / "**" / "best-*.ckpt"), recursive=True)
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    assert set(f"test/{t}/mae" for t in NASH_MTL_TARGETS) <= set(result)


def test_errors():
    with pytest.raises(ValueError, match="unknown target"):
        QM9DataModule(targets=["mu", "dipole"])
    with pytest.raises(ValueError, match="split must be"):
        QM9DataModule(split="scaffold")
    with pytest.raises(ValueError, match="leaves no training molecule"):
        QM9DataModule(max_molecules=20, num_val=10, num_test=10).setup()
    task = QM9Task("mu")
    with pytest.raises(TaskConfigError, match="standardisation"):
        task.metric_inputs(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(TypeError, match="torch_geometric Batch"):
        MPNN()(torch.zeros(2, 11))


def test_missing_qm9pack_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install "mtl-lightning\[qm9\]"'):
        QM9DataModule()

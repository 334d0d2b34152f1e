"""``mtl-lightning results`` on hand-made results files: means and stds, directions, Δm / Δ_MTL, mean
rank, the best of each column (by its direction), the three formats, the plots and the errors."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
import sys

import pytest

from mtl_lightning.cli import main as cli_main
from mtl_lightning.results import ResultsError, format_table, load_results, pareto_front, summarize

# method -> seed -> (a/accuracy ↑, b/rmse ↓, delta_m ↓, delta_mtl ↑)
RUNS = {
    "ew": {0: (0.90, 2.0, 1.0, -1.0), 1: (0.92, 2.2, 2.0, -2.0)},
    "famo": {0: (0.95, 2.5, 0.5, 0.5), 1: (0.93, 2.3, 0.1, 0.3), 2: (0.94, 2.4, 0.3, 0.4)},
    "uw": {0: (0.80, 1.5, 3.0, -3.0), 1: (0.82, 1.7, 4.0, -4.0)},
}
TASKS = {"a": {"accuracy": {"higher_is_better": True, "baseline": 0.9}},
         "b": {"rmse": {"higher_is_better": False, "baseline": 2.0}}}


def _write(root, runs=RUNS):
    for method, seeds in runs.items():
        for seed, (acc, rmse, dm, dmtl) in seeds.items():
            folder = root / f"{method}-s{seed}"
            folder.mkdir(parents=True)
            split = {"metrics": {"a": {"accuracy": acc}, "b": {"rmse": rmse}}, "loss": {}, "delta": {},
                     "delta_m": dm, "delta_mtl": dmtl}
            record = {"format": 1, "run": f"{method}-s{seed}", "group": method, "method": method, "seed": seed,
                      "tasks": TASKS, "splits": {"val": split, "test": split}}
            (folder / "results.json").write_text(json.dumps(record))
            with open(folder / "metrics.csv", "w") as f:
                f.write("epoch,step,train/a/weight,train/b/weight,val/a/accuracy\n")
                for step in range(3):
                    f.write(f"0,{step},{0.5 + 0.1 * step * seed},{1.5 - 0.1 * step},\n")
                f.write("0,2,,,0.5\n")


def _expected(method, index):
    values = [v[index] for v in RUNS[method].values()]
    return statistics.mean(values), statistics.stdev(values)


def test_means_stds_best_and_mean_rank_in_markdown(tmp_path, capsys):
    _write(tmp_path / "sweep")
    cli_main(["results", str(tmp_path / "sweep")])  # through the console script's dispatch
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0] == "| method | runs | a/accuracy ↑ | b/rmse ↓ | Δm % ↓ | Δ_MTL % ↑ | MR ↓ |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == ["ew", "famo", "uw"]
    for method in RUNS:
        cells = rows[method]
        assert cells[0] == str(len(RUNS[method]))
        mean, std = _expected(method, 0)
        assert cells[1].strip("*") == f"{mean:.4f} ± {std:.4f}"
        mean, std = _expected(method, 1)
        assert cells[2].strip("*") == f"{mean:.4f} ± {std:.4f}"
        mean, std = _expected(method, 2)
        assert cells[3].strip("*") == f"{mean:+.2f} ± {std:.2f}"
    # accuracy: famo highest; rmse (lower is better): uw; Δm (lower): famo; Δ_MTL (higher): famo.
    assert rows["famo"][1].startswith("**") and not rows["ew"][1].startswith("**")
    assert rows["uw"][2].startswith("**") and not rows["famo"][2].startswith("**")
    assert rows["famo"][3].startswith("**") and rows["famo"][4].startswith("**")
    # mean rank over the two metric columns: ew (2, 2) -> 2, famo (1, 3) -> 2, uw (3, 1) -> 2: a three-way tie
    assert [rows[m][5] for m in RUNS] == ["**2.00**"] * 3


def test_mean_rank_ties_share_ranks_and_best_marks_all_tied():
    records = []
    for method, (acc, rmse) in {"x": (0.9, 1.0), "y": (0.9, 2.0), "z": (0.8, 3.0)}.items():
        split = {"metrics": {"a": {"accuracy": acc}, "b": {"rmse": rmse}}}
        records.append({"group": method, "tasks": TASKS, "splits": {"test": split}, "index": {"x": 2, "y": 1, "z": 0}[method]})
    table = summarize(records, "test")
    assert [r.method for r in table.rows] == ["z", "y", "x"]  # the sweep's order
    means = {r.method: r.mean["mean_rank"] for r in table.rows}
    assert means == {"x": (1.5 + 1) / 2, "y": (1.5 + 2) / 2, "z": (3 + 3) / 2}
    assert table.best["a/accuracy"] == {"x", "y"} and table.best["b/rmse"] == {"x"} and table.best["mean_rank"] == {"x"}
    assert "delta_m" not in table.best and [c.key for c in table.columns] == ["a/accuracy", "b/rmse", "mean_rank"]
    md = format_table(table, "md")
    assert md.count("**0.9000 ± 0.0000**") == 2


def test_csv_and_latex(tmp_path):
    _write(tmp_path)
    table = summarize(load_results(str(tmp_path)), "test")
    rows = list(csv.DictReader(io.StringIO(format_table(table, "csv"))))
    by_method = {r["method"]: r for r in rows}
    for method in RUNS:
        mean, std = _expected(method, 1)
        assert float(by_method[method]["b/rmse ↓ mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(by_method[method]["b/rmse ↓ std"]) == pytest.approx(std, abs=1e-12)
    assert by_method["famo"]["best"] == "a/accuracy;delta_m;delta_mtl;mean_rank"
    assert by_method["uw"]["best"] == "b/rmse;mean_rank"
    latex = format_table(table, "latex")
    assert latex.startswith("\\begin{tabular}{lccccc}\n\\toprule\n")
    assert r"b/rmse $\downarrow$" in latex and r"$\Delta_m$ \% $\downarrow$" in latex
    famo = next(line for line in latex.splitlines() if line.startswith("famo &"))
    mean, std = _expected("famo", 0)
    assert rf"$\mathbf{{{mean:.4f} \pm {std:.4f}}}$" in famo
    uw = next(line for line in latex.splitlines() if line.startswith("uw &"))
    mean, std = _expected("uw", 1)
    assert rf"$\mathbf{{{mean:.4f} \pm {std:.4f}}}$" in uw and rf"${_expected('uw', 0)[0]:.4f} \pm" in uw


def test_val_split_out_file_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _write(tmp_path / "sweep")
    out = tmp_path / "table.md"
    cli_main(["results", str(tmp_path / "sweep"), "--metric-split", "val", "--out", str(out), "--plots", str(tmp_path / "plots")])
    text = capsys.readouterr().out
    assert "Wrote" in text and out.read_text().startswith("| method |")
    for name in ("pareto.png", "weights.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    from mtl_lightning.results import weight_trajectories

    curves = weight_trajectories(load_results(str(tmp_path / "sweep")))
    # ew has seeds 0 and 1: the mean over the seeds at step 2 is (0.5 + 0.7) / 2
    assert curves["ew"]["a"][2] == (2, pytest.approx(0.6)) and curves["famo"]["b"][0] == (0, pytest.approx(1.5))


def test_pareto_front_respects_directions():
    points = {"p": (0.9, 2.0), "q": (0.8, 1.0), "r": (0.7, 3.0), "s": (0.9, 2.5)}
    assert sorted(pareto_front(points, (True, False))) == ["p", "q"]
    assert sorted(pareto_front(points, (True, True))) == ["r", "s"]


def test_errors_name_what_is_wrong(tmp_path, capsys, monkeypatch):
    with pytest.raises(ResultsError, match=re.escape(f"{tmp_path}: no results.json under it")):
        load_results(str(tmp_path))
    _write(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["results", str(tmp_path), "--metric-split", "train"])
    assert exit_info.value.code == 2
    assert re.search(r"results\.json: no 'train' metrics \(it has \['test', 'val'\]\)", capsys.readouterr().err)
    (tmp_path / "ew-s0" / "results.json").write_text("{}")
    with pytest.raises(ResultsError, match=r"ew-s0/results\.json: not a results file"):
        load_results(str(tmp_path))
    (tmp_path / "ew-s0" / "results.json").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        cli_main(["results", str(tmp_path), "--plots", str(tmp_path / "plots")])
    assert "--plots needs matplotlib: pip install 'mtl-lightning[plots]'" in capsys.readouterr().err


def test_many_methods_add_a_panel_zoomed_on_the_front(tmp_path, monkeypatch):
    """Above ZOOM_ABOVE methods the Pareto plot has a second panel whose limits frame the front's
    points ± std (with a margin); a far-off method is outside it."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from mtl_lightning import results

    runs = {f"m{i:02d}": {0: (0.90 + 0.001 * i, 2.0 - 0.001 * i, 1.0, -1.0), 1: (0.90 + 0.001 * i, 2.0 - 0.001 * i, 1.0, -1.0)}
            for i in range(results.ZOOM_ABOVE)}
    runs["far"] = {0: (0.10, 9.0, 9.0, -9.0), 1: (0.10, 9.0, 9.0, -9.0)}
    _write(tmp_path / "sweep", runs)
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    table = summarize(load_results(str(tmp_path / "sweep")), "test")
    results.plot_pareto(table, "a/accuracy", "b/rmse", str(tmp_path / "pareto.png"))
    full, zoom = saved[0].axes
    front_x = 0.90 + 0.001 * (results.ZOOM_ABOVE - 1)  # the last method dominates all others
    assert zoom.get_xlim()[0] < front_x < zoom.get_xlim()[1] and not zoom.get_xlim()[0] < 0.10
    assert full.get_xlim()[0] < 0.10
    assert {t.get_text() for t in zoom.texts} >= {f"m{results.ZOOM_ABOVE - 1:02d}"}
    assert "far" in {t.get_text() for t in full.texts} and "far" not in {t.get_text() for t in zoom.texts}

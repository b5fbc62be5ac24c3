"""`zoo fit` end to end on a zoo directory and on CSVs, and its errors on bad input."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fit.data import load_table, parse_where
from fit.sumlaw import FitError, fit_sum_law
from zoo.cli import app

runner = CliRunner()


def flat(text: str) -> str:
    """Terminal output with rich's line wrapping undone."""
    return " ".join(text.split())


def _write_zoo(root, rng):
    """A fake finished zoo: two architectures, widths × checkpoints, metadata.json each."""
    for arch, gamma in (("mpnn", 0.15), ("esen", 0.35)):
        for width in (8, 16, 32, 64):
            n = 2.0e4 * width**2
            for step in range(1, 7):
                d = 1e6 * 2**step
                c = 3 * 28.0 * n * d
                loss = 0.002 + 3.0 * n**-gamma + 40.0 * d**-0.3
                ck = root / arch / f"w{width}" / f"step{step}"
                ck.mkdir(parents=True)
                meta = {"architecture": arch, "width": width, "N": n, "atoms_seen": d, "flops": c,
                        "validation": {"loss": loss * np.exp(0.005 * rng.standard_normal()), "force_mae": 0.1}}
                (ck / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.slow  # every law with bootstraps, and the plots; test_csv_where_and_derived_d is the fast CLI path
def test_zoo_directory_end_to_end(tmp_path):
    _write_zoo(tmp_path / "zoo", np.random.default_rng(0))
    out = tmp_path / "out"
    r = runner.invoke(app, ["fit", str(tmp_path / "zoo"), "--out", str(out), "--bootstrap", "20", "--budget", "1e15"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "fit.json").read_text())
    assert set(doc["groups"]) == {"mpnn", "esen"}
    g = doc["groups"]["mpnn"]
    for key in ("gamma_c", "F_c", "L_inf", "intervals", "n_points", "objective"):
        assert key in g["frontier"]
    for key in ("E", "A", "B", "alpha", "beta", "a", "b", "intervals", "n_points", "objective"):
        assert key in g["nd"]
    assert g["nd"]["allocation"][0]["C"] == 1e15
    assert g["k"] == pytest.approx(84.0)
    for name in ("report.md", "frontier.png", "residuals.png", "nd_mpnn.png"):
        assert (out / name).stat().st_size > 0


def test_csv_where_and_derived_d(tmp_path):
    rows = ["N,C,loss,ok"] + [f"{n},{6 * n * d},{1.7 + 400 * n**-0.34 + 410 * d**-0.28},{n > 2e7}"
                              for n in (1e7, 3e7, 1e8, 3e8) for d in (1e9, 3e9, 1e10, 3e10)]
    p = tmp_path / "runs.csv"
    p.write_text("\n".join(rows))
    t = load_table(p, where=["ok == True"], flops_per_param_token=6)
    assert t.N.size == 12 and np.allclose(t.D * 6 * t.N, t.C) and list(t.groups()) == ["all"]
    out = tmp_path / "o"
    r = runner.invoke(app, ["fit", str(p), "--out", str(out), "--flops-per-param-token", "6", "--law", "frontier",
                            "--bootstrap", "10"])
    assert r.exit_code == 0, r.output
    assert "all" in json.loads((out / "fit.json").read_text())["groups"]


def test_bad_inputs_give_clear_errors(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("N,D,C,loss\n1e7,1e9,6e16,2.0\n2e7,1e9,1.2e17,-1\n")
    r = runner.invoke(app, ["fit", str(p), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "non-positive" in flat(r.output) and "row 2" in flat(r.output)
    r = runner.invoke(app, ["fit", str(p), "--out", str(tmp_path / "o"), "--loss-col", "f_loss"])
    assert r.exit_code == 1 and "f_loss" in flat(r.output) and "not found" in flat(r.output)
    with pytest.raises(FitError, match="at least 8 points"):
        fit_sum_law([1e7, 2e7, 3e7], [1e9, 2e9, 3e9], [2.0, 1.9, 1.8])
    with pytest.raises(FitError, match="COLUMN OP VALUE"):
        parse_where("N ~ 3")
    r = runner.invoke(app, ["fit", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no such file" in flat(r.output)

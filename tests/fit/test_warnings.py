"""`zoo fit` says what the data cannot support: one model, rows of different data, failed fits (issue 15)."""

import json

from typer.testing import CliRunner

from zoo.cli import app

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


def _checkpoint(root, name, arch, n, d, loss, data_hash="a" * 64, val_hash="b" * 64):
    ck = root / name
    ck.mkdir(parents=True)
    meta = {"architecture": arch, "width": 8, "N": n, "atoms_seen": d, "flops": 84.0 * n * d,
            "data_hash": data_hash, "val_data_hash": val_hash, "validation": {"loss": loss, "structures": 200}}
    (ck / "metadata.json").write_text(json.dumps(meta))


def _one_run(root, **hashes):
    """One model (one N), ten checkpoints along its learning curve."""
    for step in range(1, 11):
        d = 1e5 * step
        _checkpoint(root, f"run/step-{step}", "esen", 1e5, d, 0.05 + 30.0 * d**-0.4, **hashes)


def test_one_run_frontier_is_flagged(tmp_path):
    _one_run(tmp_path / "zoo")
    r = runner.invoke(app, ["fit", str(tmp_path / "zoo"), "--out", str(tmp_path / "out"), "--bootstrap", "10"])
    assert r.exit_code == 0, r.output
    text = flat(r.output)
    assert "warning:" in text and "one model size" in text and "not a frontier across models" in text
    doc = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert doc["groups"]["esen"]["n_models"] == 1
    assert any("one model size" in w for w in doc["warnings"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**Warnings**" in report and "one model size" in report
    # the L(N, D) fit cannot be made from one N: said in the report and drawn on the residual plot
    assert any("L(N, D)" in w or "nd fit" in w for w in doc["warnings"]), doc["warnings"]
    assert (tmp_path / "out" / "residuals.png").stat().st_size > 0


def test_runs_on_different_data_are_refused_split_or_mixed(tmp_path):
    zoo = tmp_path / "zoo"
    _one_run(zoo / "first")
    for step in range(1, 11):  # a second model on other training data
        d = 1e5 * step
        _checkpoint(zoo / "second", f"step-{step}", "esen", 4e5, d, 0.04 + 30.0 * d**-0.4, data_hash="c" * 64)
    refused = runner.invoke(app, ["fit", str(zoo), "--out", str(tmp_path / "o1"), "--bootstrap", "10"])
    assert refused.exit_code == 1
    text = flat(refused.output)
    assert "2 different data sets" in text and "--split-by-data" in text and "--mix-data" in text
    assert not (tmp_path / "o1" / "fit.json").exists()

    split = runner.invoke(app, ["fit", str(zoo), "--out", str(tmp_path / "o2"), "--bootstrap", "10",
                                "--split-by-data"])
    assert split.exit_code == 0, split.output
    groups = json.loads((tmp_path / "o2" / "fit.json").read_text())["groups"]
    assert sorted(groups) == ["esen [train aaaaaaaa, val bbbbbbbb (200 structures)]",
                              "esen [train cccccccc, val bbbbbbbb (200 structures)]"]

    mixed = runner.invoke(app, ["fit", str(zoo), "--out", str(tmp_path / "o3"), "--bootstrap", "10", "--mix-data"])
    assert mixed.exit_code == 0, mixed.output
    doc = json.loads((tmp_path / "o3" / "fit.json").read_text())
    assert list(doc["groups"]) == ["esen"] and doc["groups"]["esen"]["n_models"] == 2
    assert any("fitted TOGETHER" in w for w in doc["warnings"])


def test_other_validation_set_counts_as_other_data(tmp_path):
    zoo = tmp_path / "zoo"
    _one_run(zoo / "first")
    _checkpoint(zoo / "second", "step-1", "esen", 4e5, 1e5, 0.3, val_hash="d" * 64)
    r = runner.invoke(app, ["fit", str(zoo), "--out", str(tmp_path / "o"), "--bootstrap", "10"])
    assert r.exit_code == 1 and "val dddddddd" in flat(r.output)


def test_failed_fit_is_written_on_the_plot(tmp_path, monkeypatch):
    from fit import plots

    notes = []
    real = plots._note
    monkeypatch.setattr(plots, "_note", lambda ax, lines: (notes.extend(lines), real(ax, lines)))
    _one_run(tmp_path / "zoo")
    r = runner.invoke(app, ["fit", str(tmp_path / "zoo"), "--out", str(tmp_path / "out"), "--bootstrap", "10"])
    assert r.exit_code == 0, r.output
    assert any("L(N, D) fit failed" in line for line in notes), notes
    assert any("one model size" in line for line in notes), notes

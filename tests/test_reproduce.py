"""A tiny run of one reproduction experiment end to end (issue 6)."""
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "reproduce.py")


def test_pooling_comparison_runs_small_and_writes_the_papers_table(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, SCRIPT, "pooling", "--small", "--out", str(out), "--train-samples", "16",
               "--test-samples", "8", "--epochs", "1", "--steps-per-epoch", "3", "--summary", str(tmp_path / "results.md")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "pooling.json").read_text())
    assert set(report["results"]) == {"binary_hpm", "binary_hpm_avgpool"}
    for run in report["results"].values():
        table = run["tables"]["PCKh@0.5 %"]
        assert set(table) == {"Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean"}
        assert 0 <= table["Mean"] <= 100 and run["steps"] == 3 and run["test_samples"] == 8
    assert report["ordering"]["paper_best_first"] == ["binary_hpm", "binary_hpm_avgpool"]
    page = (tmp_path / "results.md").read_text()
    assert "Supplementary Table 1" in page and "Mean 71.9" in page and "--small" in page
    assert "Papers' ordering" in page


def test_experiments_refuse_to_run_without_data():
    result = subprocess.run([sys.executable, SCRIPT, "mpii"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--data-root" in result.stderr

"""A tiny run of one reproduction experiment end to end (issue 6)."""
import json
import os
import runpy
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "reproduce.py")


@pytest.mark.slow
def test_pooling_comparison_runs_small_and_writes_the_papers_table(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, SCRIPT, "pooling", "relu", "--small", "--out", str(out), "--train-samples", "16",
               "--test-samples", "8", "--epochs", "1", "--steps-per-epoch", "3", "--summary", str(tmp_path / "results.md"),
               "--width", "32", "--depth", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "pooling.json").read_text())
    assert set(report["results"]) == {"binary_hpm", "binary_hpm_avgpool"}
    for run in report["results"].values():
        table = run["tables"]["PCKh@0.5 %"]
        assert set(table) == {"Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean"}
        assert 0 <= table["Mean"] <= 100 and run["steps"] == 3 and run["test_samples"] == 8
    assert report["ordering"]["paper_best_first"] == ["binary_hpm", "binary_hpm_avgpool"]
    assert report["recipe"] == "default"
    relu = json.loads((out / "relu.json").read_text())
    # binary_hpm is in both experiments with the same data: trained once, the same result in both
    assert relu["results"]["binary_hpm"] == report["results"]["binary_hpm"]
    assert "binary_hpm_relu" in relu["results"]
    page = (tmp_path / "results.md").read_text()
    assert "Supplementary Table 1" in page and "Mean 71.9" in page and "--small --width 32 --depth 1 --out" in page
    assert "{'width': 32, 'depth': 1} model" in page
    assert ("the default recipe: Adam, step decay, peak rate 0.005, binary networks in two stages, real weights "
            "for the first 30% of the epochs, ApproxSign gradient") in page
    assert "Papers' ordering" in page
    assert "- `pooling`: max pooling beats average pooling: **" in page


@pytest.mark.parametrize("script,argv,message", [
    ("reproduce.py", ["pooling", "--small", "--epochs", "0"], "argument --epochs: 0 is not at least 1"),
    ("reproduce.py", ["recipe", "--small", "--seeds", "0"], "argument --seeds: 0 is not at least 1"),
    ("reproduce.py", ["pooling", "--small", "--test-samples", "-3"], "argument --test-samples: -3 is not at least 1"),
    ("../data/make_synthetic.py", ["--train", "0"], "argument --train: 0 is not at least 1"),
])
def test_scripts_refuse_counts_below_one_before_any_work(script, argv, message, tmp_path, monkeypatch, capsys):
    """--epochs 0 was taken as "not given" (100 epochs); a count below 1 wrote an empty data set
    or divided by zero. (The script runs as ``__main__`` in this process: a new Python would spend
    its 5 s importing TensorFlow.)"""
    path = os.path.join(os.path.dirname(SCRIPT), script)
    monkeypatch.setattr(sys, "argv", [path, *argv, "--out", str(tmp_path / "out")])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script may put its folder first
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(path, run_name="__main__")
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _report(values, table="PCKh@0.5 %", column="Mean"):
    return {"results": {name: {"tables": {table: {column: v}}} for name, v in values.items()}}


def test_summary_judges_the_papers_orderings_from_the_numbers():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import reproduce

    lines = reproduce.judge_orderings({
        "pooling": _report({"binary_hpm": 20.0, "binary_hpm_avgpool": 12.5}),
        "relu": _report({"binary_hpm": 20.0, "binary_hpm_relu": 19.0}),
        "segmentation": _report({"real_bottleneck": 60.0, "binary_bottleneck": 50.0, "binary_hpm": 55.5},
                                "Part segmentation %", "mean_iu"),
    })
    assert lines[0] == ("- `pooling`: max pooling beats average pooling: **holds** (`binary_hpm` 20.00 vs "
                        "`binary_hpm_avgpool` 12.50 Mean; paper 76.0 vs 71.9).")
    assert "helps the binary HPM net: **does not hold** (`binary_hpm_relu` 19.00 vs `binary_hpm` 20.00" in lines[1]
    assert "binary HPM beats the binary bottleneck: **holds**" in lines[2]
    assert lines[3] == ("- `segmentation`: binary HPM against `real_bottleneck`: 55.50 vs 60.00 mean_iu, "
                        "a gap of 4.50 points (paper's gap 1.24).")


def test_experiments_refuse_to_run_without_data():
    result = subprocess.run([sys.executable, SCRIPT, "mpii"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--data-root" in result.stderr


def test_recipe_table_takes_means_over_seeds_and_compares_with_the_real_twin():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import reproduce

    runs = lambda *values: [{"seed": s, "value": v} for s, v in enumerate(values)]  # noqa: E731
    results = {
        "MPII format, PCKh@0.5 Mean %": {"binary, papers' recipe (RMSprop, step decay)": runs(18.0, 20.0),
                                         "binary, Adam, step decay": runs(44.0, 46.0),
                                         "real twin, papers' recipe": runs(54.0, 56.0)},
        "300W format, NME inter-ocular %": {"binary, Adam, step decay": runs(12.0, 14.0),
                                            "real twin, Adam, step decay": runs(10.0, 10.0)},
    }

    class Args:
        small = True
        dtype_policy = "float32"
        width = depth = None

    page = reproduce.recipe_markdown(results, [0, 1], Args())
    assert "`python scripts/reproduce.py recipe --small --seeds 2`" in page
    Args.dtype_policy, Args.depth = "mixed_bfloat16", 1
    assert "`python scripts/reproduce.py recipe --small --dtype-policy mixed_bfloat16 --depth 1 --seeds 2`" in \
        reproduce.recipe_markdown(results, [0, 1], Args())
    assert "| binary, Adam, step decay | 44.00 | 46.00 | 45.00 |" in page
    assert "the binary net is 10.00 points behind" in page  # 55.00 - 45.00
    assert "the binary net is 1.30x its error" in page  # 13.00 / 10.00


@pytest.mark.slow
def test_recipe_ablation_runs_small_with_a_distilled_row(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, SCRIPT, "recipe", "--small", "--out", str(out), "--train-samples", "16",
               "--test-samples", "8", "--epochs", "2", "--steps-per-epoch", "2", "--seeds", "1",
               "--recipes", "step decay, distilled", "--width", "32", "--depth", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "recipe.json").read_text())
    for rows in report["results"].values():  # the teacher is trained first and recorded
        assert set(rows) == {"real twin, Adam, step decay", "binary, Adam, step decay, distilled"}
        assert all(len(r) == 1 and r[0]["steps"] == 4 for r in rows.values())
    assert "Best binary" in (out / "recipe.md").read_text()


@pytest.mark.slow
def test_a_configuration_trains_under_the_dtype_policy_asked_for(tmp_path):
    """--dtype-policy mixed_bfloat16: the network is built under it (its layers compute in bfloat16,
    its heatmaps stay float32), trains, and is scored; the process's policy is float32 after."""
    import tensorflow as tf

    sys.path.insert(0, os.path.dirname(SCRIPT))
    import reproduce
    from larq_landmarks.datasets import writers

    writers.write_layout(str(tmp_path), 16, 8, 0)
    settings = dict(reproduce.SMALL, overrides={"width": 16, "depth": 1}, batch_size=4, dtype_policy="mixed_bfloat16")
    run = reproduce.run_config("binary_hpm", reproduce.EXPERIMENTS["pooling"], str(tmp_path), settings, 2, 1, 0,
                               keep_model=True)
    model = run["model"]
    assert {layer.compute_dtype for layer in model.layers if layer.name.endswith("_bconv")} == {"bfloat16"}
    assert model.output.dtype == tf.float32 and tf.keras.mixed_precision.global_policy().name == "float32"
    assert 0 <= run["tables"]["PCKh@0.5 %"]["Mean"] <= 100 and run["steps"] == 2

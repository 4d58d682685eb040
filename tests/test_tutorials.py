"""Every tutorial in docs/ runs as written, on synthetic data, with the slow parts scaled down.

The ``bash`` and ``python`` fenced blocks of each page run in order in one folder that holds
synthetic data sets in the layout the page describes (``text`` and ``sh`` blocks are not run).
Scaling down rewrites only training lengths and model sizes (see ``SCALE_DOWN``), so a tutorial
whose commands or code drift from the library fails here.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from larq_landmarks.datasets import writers

pytestmark = pytest.mark.slow

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
BIN = os.path.dirname(sys.executable)
SCALE_DOWN = [
    (r"--epochs \d+", "--epochs 1 --steps-per-epoch 2"),
    (r"(larq-landmarks train .*)", r"\1 --input-size 64 --width 32 --depth 1"),
    (r"(larq-landmarks demo .*)--steps \d+", r"\1--steps 20 --train-images 48 --test-images 16 --width 32 --depth 1"),
    (r"EPOCHS, STEPS = \d+, \d+", "EPOCHS, STEPS = 1, 2"),
    (r"PER_REPLICA, INPUT_SIZE, EPOCHS, STEPS = \d+, \d+, \d+, \d+", "PER_REPLICA, INPUT_SIZE, EPOCHS, STEPS = 2, 64, 1, 2"),
    (r"BinaryHourglass\(68, input_size=INPUT_SIZE\)", "BinaryHourglass(68, input_size=INPUT_SIZE, width=32, depth=1)"),
    (r"BinaryHourglass\(68, width=64, depth=2, input_size=64\)", "BinaryHourglass(68, width=32, depth=1, input_size=64)"),
    (r"int8_fine_tune\((.*)steps=\d+\)", r"int8_fine_tune(\1steps=3)"),
    (r"--int8-fine-tune \d+", "--int8-fine-tune 3"),
]


def blocks(page):
    text = open(os.path.join(DOCS, page), encoding="utf-8").read()
    return re.findall(r"^```(bash|python)\n(.*?)^```", text, flags=re.S | re.M)


def scaled(code):
    for pattern, replacement in SCALE_DOWN:
        code = re.sub(pattern, replacement, code)
    return code


@pytest.mark.parametrize("page", ["quickstart.md", "tutorial_aflw2000.md", "tutorial_300w.md", "tutorial_mpii.md",
                                  "tutorial_segmentation.md", "deploy.md", "tutorial_distributed.md"])
def test_tutorial_runs_as_written(page, tmp_path):
    code_blocks = blocks(page)
    assert code_blocks, f"{page} has no runnable blocks"
    writers.write_layout(str(tmp_path), train=12, test=6, seed=1)
    if page == "tutorial_300w.md":  # 300W in iBUG's folders
        writers.write_300w_folders(str(tmp_path / "300W_download"), 4, seed=1, image_size=(128, 128))
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONUNBUFFERED": "1"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    for number, (language, code) in enumerate(code_blocks, start=1):
        code = scaled(code)
        command = ["bash", "-e", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (
            f"{page} block {number} ({language}) failed:\n{code}\n--- stdout ---\n{result.stdout[-3000:]}"
            f"\n--- stderr ---\n{result.stderr[-5000:]}"
        )
    demo_report = tmp_path / "runs" / "demo" / "report.json"
    if demo_report.exists():  # the demo's scale-down reached its network
        settings = json.loads(demo_report.read_text())["settings"]
        assert (settings["width"], settings["depth"]) == (32, 1), settings
    if page == "tutorial_mpii.md":  # a pose model's best epoch is the one with the highest crop PCK
        best = json.loads((tmp_path / "runs" / "mpii" / "best.keras.json").read_text())
        assert best["metric"] == "val_pck" and 0 <= best["value"] <= 1

"""Every tutorial in docs/ runs as written, on synthetic data, with the slow parts scaled down.

The ``bash`` and ``python`` fenced blocks of each page run in order in one folder that holds
synthetic data sets in the layout the page describes (``text`` and ``sh`` blocks are not run).
Scaling down rewrites only training lengths and model sizes (see ``SCALE_DOWN``), so a tutorial
whose commands or code drift from the library fails here. A page's ``larq-landmarks demo``
command (the quickstart's and deploy.md's first block, the same once scaled) runs once per test
session, in a folder the xdist workers share; each page gets a copy of what it wrote.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
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


def _run_block(command, cwd, env):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _shared_demo(code, shared, cwd, env):
    """Run the one-line demo bash block ``code`` once for the session (under a lock, in ``shared``,
    the folder the xdist workers share) and copy the folder it wrote into ``cwd``; returns the
    command's result, the same for every page that runs it."""
    folder = os.path.join(shared, "demo_" + hashlib.sha1(code.encode()).hexdigest()[:12])
    work, result_file = os.path.join(folder, "work"), os.path.join(folder, "result.json")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker's page waits for the first one's run
        if not os.path.exists(result_file):
            run = _run_block(["bash", "-e", "-c", code], work, env)
            with open(result_file, "w") as f:
                json.dump([run.returncode, run.stdout, run.stderr], f)
        with open(result_file) as f:
            returncode, stdout, stderr = json.load(f)
    if returncode == 0:
        out = re.search(r"--out (\S+)", code).group(1)
        shutil.copytree(os.path.join(work, out), os.path.join(cwd, out))
    return subprocess.CompletedProcess(code, returncode, stdout, stderr)


@pytest.mark.parametrize("page", ["quickstart.md", "tutorial_aflw2000.md", "tutorial_300w.md", "tutorial_mpii.md",
                                  "tutorial_segmentation.md", "deploy.md", "tutorial_distributed.md"])
def test_tutorial_runs_as_written(page, tmp_path, tmp_path_factory):
    code_blocks = blocks(page)
    assert code_blocks, f"{page} has no runnable blocks"
    writers.write_layout(str(tmp_path), train=12, test=6, seed=1)
    if page == "tutorial_300w.md":  # 300W in iBUG's folders
        writers.write_300w_folders(str(tmp_path / "300W_download"), 4, seed=1, image_size=(128, 128))
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONUNBUFFERED": "1"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    for number, (language, code) in enumerate(code_blocks, start=1):
        code = scaled(code)
        if language == "bash" and re.fullmatch(r"larq-landmarks demo --out \S+ [^\n]*\n?", code):
            session = tmp_path_factory.getbasetemp()  # an xdist worker's is in the session's folder
            shared = session.parent if os.environ.get("PYTEST_XDIST_WORKER") else session
            result = _shared_demo(code, str(shared), str(tmp_path), env)
        else:
            command = ["bash", "-e", "-c", code] if language == "bash" else [sys.executable, "-c", code]
            result = _run_block(command, tmp_path, env)
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

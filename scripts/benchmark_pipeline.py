"""Pipeline throughput against the default model's training step rate, in one run.

    python scripts/benchmark_pipeline.py --out docs/benchmarks.md

Writes synthetic 300W-format faces (480x480 JPEG, like 300W's image sizes), reads them with the
``.pts`` reader, and times (1) the augmented ``landmark_dataset`` alone, images/s, and (2)
``model.train_on_batch`` of the default ``BinaryHourglass(68)`` at 256x256 on batches already in
memory, images/s, built under the Keras dtype policies float32 and mixed_bfloat16 (``train
--dtype-policy``), each timed twice in turns. The pipeline is not the bottleneck when (1) is well
above (2).
"""
import argparse
import json
import os
import platform
import tempfile
import time

import larq_landmarks  # noqa: F401  (first: Keras 2 set-up)
import numpy as np
import tensorflow as tf

from larq_landmarks import layouts, models, training
from larq_landmarks.atomic import atomic_path, replace_markdown_section
from larq_landmarks.cli import positive_int
from larq_landmarks.datasets import pipeline, readers, writers
from larq_landmarks.models import BinaryHourglass


def time_pipeline(columns, batch, batches):
    data = pipeline.landmark_dataset(columns, 256, flip_permutation=layouts.flip_permutation(68), batch_size=batch)
    iterator = iter(data)
    for _ in range(3):  # warm-up: graph tracing, thread pools
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


POLICIES = ("float32", "mixed_bfloat16")


def training_step(batch, policy):
    """A compiled default model built under the Keras dtype ``policy``, and one training step of it."""
    with models.dtype_policy(policy):
        model = BinaryHourglass(68)
    training.compile_model(model)
    images = np.random.default_rng(0).uniform(size=(batch, 256, 256, 3)).astype(np.float32)
    targets = np.zeros((batch, 64, 64, 68), np.float32)
    for _ in range(2):  # warm-up: tracing
        model.train_on_batch(images, targets)
    return lambda: model.train_on_batch(images, targets)


def time_training(batch, steps, rounds=2):
    """Images/s of each policy's training step: the best of ``rounds`` rounds of ``steps`` steps,
    the policies in turns (this machine's speed drifts over minutes)."""
    steps_of = {policy: training_step(batch, policy) for policy in POLICIES}
    best = {policy: 0.0 for policy in POLICIES}
    for _ in range(rounds):
        for policy, step in steps_of.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[policy] = max(best[policy], steps * batch / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=positive_int, default=200)
    parser.add_argument("--batch", type=positive_int, default=10, help="the papers' batch size")
    parser.add_argument("--batches", type=positive_int, default=30)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--json", default="docs/benchmark_pipeline.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        writers.write_300w(folder, args.images, image_size=(480, 480))
        columns = readers.to_columns(readers.read_pts_folder(folder))
        pipeline_rate = time_pipeline(columns, args.batch, args.batches)
    rates = time_training(args.batch, args.steps)
    training_rate = max(rates.values())
    result = {
        "pipeline_images_per_s": round(pipeline_rate, 1),
        "training_images_per_s": round(rates["float32"], 2),
        "training_images_per_s_mixed_bfloat16": round(rates["mixed_bfloat16"], 2),
        "ratio": round(pipeline_rate / training_rate, 1),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "tensorflow": tf.__version__,
        "settings": vars(args),
    }
    print(json.dumps(result, indent=2))
    with atomic_path(args.json) as temporary, open(temporary, "w") as f:
        json.dump(result, f, indent=2)
    section = (
        "## Data pipeline vs. training step rate\n\n"
        f"Command: `python scripts/benchmark_pipeline.py --out {args.out}` "
        f"({result['cpus']} CPU cores, TensorFlow {result['tensorflow']}, no GPU).\n\n"
        "| what | images/s |\n|---|---:|\n"
        f"| `landmark_dataset` (480x480 JPEG -> augmented 256x256 crop + 64x64x68 heatmaps), batch {args.batch} | {result['pipeline_images_per_s']} |\n"
        f"| `BinaryHourglass(68)` training step (256x256, batch {args.batch}, data in memory) | {result['training_images_per_s']} |\n"
        f"| the same built under the Keras dtype policy `mixed_bfloat16` (`train --dtype-policy mixed_bfloat16`) "
        f"| {result['training_images_per_s_mixed_bfloat16']} |\n\n"
        f"mixed_bfloat16 trains {rates['mixed_bfloat16'] / rates['float32']:.2f}x the images a second of float32 "
        f"here. The pipeline delivers {result['ratio']}x the images the default model can train on here (in the "
        "faster policy): it is not the bottleneck. Each training rate is the best of two rounds of "
        f"{args.steps} steps, the policies in turns.\n"
    )
    replace_markdown_section(args.out, section, "## Data pipeline vs. training step rate")


if __name__ == "__main__":
    main()

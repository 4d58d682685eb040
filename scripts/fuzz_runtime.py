"""A randomised differential run of the bit-packed runtime against LCE's interpreter.

    python scripts/fuzz_runtime.py --seeds 0 40 [--int8 0.5] [--cuda] [--json runs/fuzz.json]

Each seed builds a random ``BinaryHourglass`` (width, depth, stacks, block, pooling, ReLUs, binary
skips, task, input size, quantizers, pad value; binary or real) with trained-like batch norms,
converts it with LCE and runs random images (random batch, random threads) through every kernel
path this CPU has, against LCE's interpreter: issue 10's parity bound (mean difference at most 1e-5
of the mean magnitude, 99% of the landmarks within 0.5 px). For a share of the seeds (``--int8``)
the int8-activation file too, against LCE's interpreter with XNNPACK's int8 kernels: the share of
equal outputs and of landmarks within 0.5 px, whether every path gives the same codes, and whether
the engine's plan with ops done inside others gives the codes of the plan where each op is its own
step (``fuse_blocks=False``). With ``--cuda`` the float file runs on the GPU paths too (``cuda``,
``cuda-popcount``): on this machine's GPU where CuPy finds one, else ``kernels.cu`` built for the
CPU standing in for it (``tests/fake_cupy.py``: reads and writes past an array's end and missing
barriers are errors there; about a second a call of a small network), against the same bound, and
the second and third calls (the run captured as CUDA graphs and replayed, then replayed again)
must give the first one's output.

A seed fails (exit status 1) when something raises, when a GPU path's replayed run differs from
its first, or when the paths' int8 codes differ from each other or from the unfused plan's (int8
is exact arithmetic: every path and plan must give the same; not with the authors' padding, -1,
where LCE keeps float 3x3 convolutions inside the int8 file). Reported for a look, not failed:
float files off the bound (a sign on a float rounding flips one bit, which cascades through the
binary layers: the authors' padding's float 3x3 convolutions on +-1 inputs make that likely; each
path's and LCE's distance from the Keras model's output says which one strayed) and
int8 files whose codes, the same on every path, differ from XNNPACK's (each op rounds as TFLite
defines it; XNNPACK's fixed-point ADD rounds ties upwards, and ``ste_sign`` weights make the int8
scales simple fractions, so that exact ties are common). Found with it (2026-12-02): the AVX2 and
AVX-512 int8 binary convolutions' FMA, a real block with ``relu=True`` that did not build, and a
calibration range that made XNNPACK abort (docs/runtime_changes.md).
"""
import argparse
import contextlib
import json
import os
import random
import sys
import time
import traceback
import warnings

import larq_landmarks  # noqa: F401  (first: Keras 2 set-up)
import numpy as np
import tensorflow as tf

from larq_landmarks import export, heatmaps as hm, models
from larq_landmarks.atomic import atomic_path
from larq_landmarks.runtime import Engine, available_kernels, cuda
from larq_landmarks.synthetic import trained_like_batch_norm

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def random_configuration(seed: int) -> dict:
    """The seed's network (``BinaryHourglass`` keyword arguments plus ``num_landmarks``), batch and
    threads: the same for a seed on every machine."""
    r = random.Random(seed)
    depth = r.choice([1, 2, 3])
    kwargs = dict(width=r.choice([8, 12, 16, 24, 28, 32, 40, 48, 56, 64, 72, 96, 100, 128]), depth=depth,
                  num_stacks=r.choice([1, 1, 2]), block=r.choice(["hpm", "hpm", "bottleneck"]),
                  pooling=r.choice(["max", "max", "avg"]), relu=r.random() < 0.25, binary_skip=r.random() < 0.3,
                  task=r.choice(["heatmaps", "heatmaps", "segmentation"]),
                  input_size=max(16, r.choice([2 ** (depth + 2) * m for m in (1, 2, 3, 4)])),
                  kernel_quantizer=r.choice(["magnitude_aware_sign", "ste_sign"]),
                  pad_value=r.choice([1.0, 1.0, -1.0]), binary=r.random() > 0.15,
                  input_quantizer=r.choice(["approx_sign", "ste_sign", "swish_sign"]))
    if kwargs["block"] == "bottleneck":
        kwargs["bottleneck_ratio"] = r.choice([0.5, 0.25])
    return {"num_landmarks": r.choice([5, 7, 16, 68]), "kwargs": kwargs, "batch": r.choice([1, 2, 3]),
            "threads": r.choice([1, 2, 3]), "int8_draw": r.random()}


def seed_network(seed: int):
    """The seed's Keras model (batch norms with trained-like statistics) and its random images."""
    config = random_configuration(seed)
    tf.keras.utils.set_random_seed(seed)
    model = trained_like_batch_norm(models.BinaryHourglass(config["num_landmarks"], **config["kwargs"]))
    size = config["kwargs"]["input_size"]
    images = np.random.default_rng(seed).uniform(size=(config["batch"], size, size, 3)).astype(np.float32)
    return model, images


def _landmarks(heatmaps: np.ndarray) -> np.ndarray:
    return hm.heatmap_to_input(hm.decode_heatmaps(heatmaps)[0]).numpy()


def _moved_within_half_a_pixel(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.mean(np.abs(_landmarks(got) - _landmarks(expected)).max(-1) <= 0.5))


def _float_parity(got: np.ndarray, lce: np.ndarray, keras: np.ndarray) -> dict:
    """A float file's output against LCE's (issue 10's parity bound), and its distance from the
    Keras model's (where a path is off the bound, whether it or LCE strayed)."""
    difference = float(np.abs(got - lce).mean() / np.abs(lce).mean())
    moved = _moved_within_half_a_pixel(got, lce)
    return {"mean_difference": difference, "landmarks_within_half_a_pixel": moved,
            "within_bound": difference <= 1e-5 and moved >= 0.99,
            "from_keras": float(np.abs(got - keras).mean() / np.abs(lce).mean())}


def check_seed(seed: int, int8_share: float, paths=None, cuda_paths=()) -> dict:
    """One seed's record: its configuration, each path's float parity (``cuda_paths``: the GPU's,
    with whether its replayed run gives its first run's output) and, where drawn, its int8 file's
    agreement with XNNPACK; ``"error"`` where something raised."""
    paths = list(paths or available_kernels())
    config = random_configuration(seed)
    record = {"seed": seed, **{k: config[k] for k in ("num_landmarks", "kwargs", "batch", "threads")}}
    try:
        model, images = seed_network(seed)
        size = config["kwargs"]["input_size"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flatbuffer = export.convert(model)
        lce = export.TfliteModel(flatbuffer, engine="lce").predict(images)
        keras = export.last_stack(model)(images, training=False).numpy()  # (predict: a retracing warning a seed)
        record["lce_from_keras"] = float(np.abs(lce - keras).mean() / np.abs(lce).mean())
        record["float"] = {}
        for path in paths:
            got = Engine(flatbuffer, kernels=path, num_threads=config["threads"]).predict(images)
            record["float"][path] = _float_parity(got, lce, keras)
        for path in cuda_paths:
            engine = Engine(flatbuffer, kernels=path)
            got = engine.predict(images)
            # captured as CUDA graphs on the second call and replayed, then replayed again: a
            # buffer read before the graphs write it holds the first replay's values at the second
            replayed = [engine.predict(images) for _ in range(2)]
            record["float"][path] = {**_float_parity(got, lce, keras),  # within the GPU tests' replay tolerance:
                                     "replay_matches": all(np.allclose(r, got, rtol=1e-5, atol=1e-5) for r in replayed)}
        if config["int8_draw"] < int8_share and config["kwargs"]["binary"]:
            calibration = np.random.default_rng(seed + 1).uniform(size=(4, size, size, 3)).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                int8_file = export.convert(model, int8_calibration=calibration)
            xnnpack = export.interpreter(int8_file, use_xnnpack=True)
            expected = np.concatenate([xnnpack.predict(images[i:i + 1]) for i in range(len(images))])
            outputs = {path: Engine(int8_file, kernels=path, num_threads=config["threads"]).predict(images)
                       for path in paths}
            first = outputs[paths[0]]
            unfused = Engine(int8_file, kernels=paths[0], num_threads=config["threads"], fuse_blocks=False)
            record["int8"] = {"same_as_xnnpack": float(np.mean(first == expected)),
                              "landmarks_within_half_a_pixel": _moved_within_half_a_pixel(first, expected),
                              "paths_agree": all(np.array_equal(first, o) for o in outputs.values()),
                              "unfused_agrees": bool(np.array_equal(first, unfused.predict(images))),
                              # with the authors' padding LCE keeps float 3x3 convolutions, whose
                              # sums' order differs between paths: their codes may too
                              "all_int8": config["kwargs"]["pad_value"] == 1.0}
    except Exception as error:  # a fuzz run reports what raised and goes on
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
    int8 = record.get("int8", {})
    record["failed"] = "error" in record or \
        not all(r.get("replay_matches", True) for r in record.get("float", {}).values()) or \
        (int8.get("all_int8", False) and not (int8["paths_agree"] and int8["unfused_agrees"]))
    return record


def describe(record: dict) -> str:
    """One line for a seed's record."""
    head = f"seed {record['seed']}: {record['num_landmarks']} points, {record['kwargs']}, batch {record['batch']}, " \
           f"{record['threads']} threads"
    if "error" in record:
        return f"ERROR {head}: {record['error']}"
    off = [p for p, r in record["float"].items() if not r["within_bound"]]
    parts = ["float: every path within the bound" if not off else
             "float OFF the bound on " + ", ".join(f"{p} ({record['float'][p]['mean_difference']:.1e}, "
                                                   f"{record['float'][p]['landmarks_within_half_a_pixel']:.0%}, "
                                                   f"{record['float'][p]['from_keras']:.1e} from Keras)"
                                                   for p in off) + f"; LCE {record['lce_from_keras']:.1e} from Keras"]
    unreplayed = [p for p, r in record["float"].items() if not r.get("replay_matches", True)]
    if unreplayed:
        parts.append("the replayed CUDA graphs DIFFER on " + ", ".join(unreplayed))
    if "int8" in record:
        i = record["int8"]
        parts.append(f"int8: {i['same_as_xnnpack']:.2%} of outputs XNNPACK's, landmarks "
                     f"{i['landmarks_within_half_a_pixel']:.0%} within 0.5 px, paths "
                     + ("agree" if i["paths_agree"] else "DISAGREE" if i["all_int8"] else
                        "differ (float convolutions inside)")
                     + (", the unfused plan agrees" if i["unfused_agrees"] else ", the unfused plan DISAGREES"
                        if i["all_int8"] else ", the unfused plan differs"))
    return ("FAIL " if record["failed"] else "ok ") + head + "; " + "; ".join(parts)


def _gpu_or_its_stand_in(stack: contextlib.ExitStack, parser: argparse.ArgumentParser) -> str:
    """This machine's GPU's name where CuPy finds one; else ``kernels.cu`` built for the CPU stands
    in for it (tests/fake_cupy.py, installed until ``stack`` closes)."""
    name = cuda.gpu_name()
    if name is not None:
        return name
    sys.path.insert(0, TESTS)
    import cuda_on_cpu
    import fake_cupy
    import pytest

    if not cuda_on_cpu.available():
        parser.error("--cuda: no GPU here (CuPy found none), and no g++ to build kernels.cu for the CPU instead")
    fake_cupy.install(stack.enter_context(pytest.MonkeyPatch.context()))
    return "kernels.cu built for the CPU (no GPU here)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs=2, type=int, metavar=("FIRST", "COUNT"), default=[0, 20])
    parser.add_argument("--int8", type=float, default=0.5, help="share of the seeds whose int8 file is checked too")
    parser.add_argument("--cuda", action="store_true",
                        help="the GPU paths too: on this machine's GPU, or kernels.cu built for the CPU")
    parser.add_argument("--json", help="write every seed's record here")
    args = parser.parse_args(argv)
    if args.seeds[1] < 1:
        parser.error(f"--seeds: COUNT must be at least 1, got {args.seeds[1]}")
    if not 0 <= args.int8 <= 1:
        parser.error(f"--int8: a share from 0 to 1, got {args.int8}")
    start = time.perf_counter()
    records = []
    with contextlib.ExitStack() as stack:
        if args.cuda:
            print("GPU paths on", _gpu_or_its_stand_in(stack, parser), flush=True)
        for seed in range(args.seeds[0], args.seeds[0] + args.seeds[1]):
            records.append(check_seed(seed, args.int8, cuda_paths=cuda.PATHS if args.cuda else ()))
            print(describe(records[-1]), flush=True)
    failed = [r["seed"] for r in records if r["failed"]]
    print(f"{len(records)} seeds in {time.perf_counter() - start:.0f} s; failed: {failed or 'none'}")
    if args.json:
        with atomic_path(args.json) as path, open(path, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

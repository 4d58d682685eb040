"""Is the binary model worth it on this machine? Its converted file against the float32 file of
the same network, every engine that runs them here timed side by side.

    result = speed.compare(model, num_threads=1)    # a Keras model from models.BinaryHourglass
    print(speed.markdown(result))

``larq-landmarks benchmark`` is the same from the command line. The engines take turns (each runs
``runs`` calls, then the next engine, for ``rounds`` rounds), so that every ratio compares the same
minutes of a machine whose speed drifts.
"""
import os
import platform
import time
from typing import Callable, Dict, Optional

import numpy as np

FLOAT32 = "float32 .tflite, TFLite interpreter (XNNPACK)"
LCE = "binary .tflite, LCE interpreter"
LCE_INT8 = "binary .tflite with int8 activations, LCE interpreter (XNNPACK)"


def batch_one_ms(engines: Dict[str, Callable[[np.ndarray], np.ndarray]], image: np.ndarray, rounds: int = 5,
                 runs: int = 20) -> Dict[str, float]:
    """Median milliseconds of one call on ``image`` for each of ``engines`` (name -> predict),
    over ``rounds`` rounds in which each engine makes ``runs`` calls in turn (after one call each
    that sets up buffers and delegates, not timed)."""
    if rounds < 1 or runs < 1:
        raise ValueError(f"rounds={rounds} and runs={runs} must be at least 1")
    times: Dict[str, list] = {name: [] for name in engines}
    for predict in engines.values():
        predict(image)
    for _ in range(rounds):
        for name, predict in engines.items():
            for _ in range(runs):
                start = time.perf_counter()
                predict(image)
                times[name].append(time.perf_counter() - start)
    return {name: round(1000 * float(np.median(t)), 3) for name, t in times.items()}


def engines_here(binary: bytes, float32: bytes, num_threads: int = 1, int8: Optional[bytes] = None
                 ) -> Dict[str, Callable]:
    """What runs the files on this machine: XNNPACK the float32 one; LCE's interpreter and
    this package's runtime (its best kernels here; also with bfloat16 float convolutions where the
    CPU has AVX512_BF16, int8 ones where it has AVX512_VNNI or runs the avx2 kernels) the binary
    one; LCE's interpreter with XNNPACK (for the int8 ops) and the runtime ``int8``, the binary file
    with int8 activations, where given. Engines that cannot run here are left out."""
    from larq_landmarks.runtime import UnsupportedModelError
    from larq_landmarks.tflite_model import TfliteModel, interpreter

    engines = {FLOAT32: interpreter(float32, num_threads, use_xnnpack=True).predict,
               LCE: TfliteModel(binary, engine="lce", num_threads=num_threads).predict}
    if int8 is not None:
        engines[LCE_INT8] = interpreter(int8, num_threads, use_xnnpack=True).predict  # its int8 ops
    try:
        ours = TfliteModel(binary, engine="runtime", num_threads=num_threads)
    except UnsupportedModelError:  # an op the runtime does not have: LCE's interpreter alone
        return engines
    engines[f"binary .tflite, larq_landmarks.runtime ({ours.kernels})"] = ours.predict
    for precision in ("bfloat16", "int8"):
        try:
            reduced = TfliteModel(binary, engine="runtime", num_threads=num_threads, float_precision=precision)
        except ValueError:  # no AVX512_BF16 / VNNI here (or kernels built without it)
            continue
        engines[f"binary .tflite, larq_landmarks.runtime ({reduced.kernels}, {precision} float convolutions)"] = \
            reduced.predict
    if int8 is not None:
        try:
            engines[f"binary .tflite with int8 activations, larq_landmarks.runtime ({ours.kernels})"] = \
                TfliteModel(int8, engine="runtime", num_threads=num_threads).predict
        except UnsupportedModelError:  # an int8 op the runtime does not have
            pass
    return engines


def compare(model, num_threads: int = 1, rounds: int = 5, runs: int = 20, seed: int = 0) -> dict:
    """Convert ``model`` (a binary Keras model; its last stack) to LCE's bit-packed file, to that
    file with int8 activations (calibrated on 4 random images: its speed, not its accuracy; on ARM
    LCE's int8 kernels decide whether it pays) and to the float32 TFLite file of the same network,
    and time every engine here at batch 1 on one random image. Returns the files' sizes, each
    engine's median ms and its speed against float32."""
    from larq_landmarks import export

    if not export.binary_layers(model):
        raise ValueError(f"{model.name} has no binary layers: its converted file would be the float32 one")
    size = export.last_stack(model).input_shape[1:]
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=(1, *size)).astype(np.float32)
    calibration = rng.uniform(size=(4, *size)).astype(np.float32)
    binary, float32 = export.convert(model), export.convert(model, binary=False)
    int8 = export.convert(model, int8_calibration=calibration)
    ms = batch_one_ms(engines_here(binary, float32, num_threads, int8), image, rounds, runs)
    return {"model": model.name, "input_shape": list(size), "threads": num_threads, "cpu": cpu_name(),
            "rounds": rounds, "runs": runs,
            "bytes": {"binary": len(binary), "binary_int8": len(int8), "float32": len(float32)},
            "ms": ms, "vs_float32": {name: round(ms[FLOAT32] / value, 3) for name, value in ms.items()}}


def markdown(result: dict) -> str:
    """``compare``'s result as a short report: the two files' sizes and a table of the engines."""
    sizes = result["bytes"]
    rows = "".join(f"| {name} | {ms:.3f} | {result['vs_float32'][name]:.2f}x |\n" for name, ms in result["ms"].items())
    height, width, _ = result["input_shape"]
    return (f"{result['model']}, {height}x{width} input, batch 1, {result['threads']} thread(s), {result['cpu']}; "
            f"medians of {result['rounds']} rounds of {result['runs']} calls, the engines taking turns.\n\n"
            f"Files: binary {sizes['binary'] / 1e6:.2f} MB, float32 {sizes['float32'] / 1e6:.2f} MB "
            f"({sizes['float32'] / sizes['binary']:.1f}x smaller)"
            + (f"; binary with int8 activations {sizes['binary_int8'] / 1e6:.2f} MB" if "binary_int8" in sizes else "")
            + ".\n\n"
            "| engine | ms | vs float32 |\n|---|---:|---:|\n" + rows)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the machine type where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def load_or_build(model: str, num_landmarks: int = 68, input_size: Optional[int] = None):
    """A saved Keras model at path ``model``, or the named configuration ``model`` (e.g.
    ``"binary_hpm"``) for ``num_landmarks`` outputs, with trained-like batch norms (a file the size
    of a trained one; speed does not depend on the weights)."""
    import tensorflow as tf

    from larq_landmarks import models
    from larq_landmarks.synthetic import trained_like_batch_norm

    if os.path.exists(model):
        try:
            return tf.keras.models.load_model(model)
        except Exception as error:
            raise ValueError(f"{model}: cannot load a Keras model ({error})") from error
    if model not in models.named_configurations():
        raise ValueError(f"{model!r} is neither a saved Keras model nor a named configuration "
                         f"({', '.join(models.named_configurations())})")
    overrides = {"input_size": input_size} if input_size else {}
    return trained_like_batch_norm(models.build_named(model, num_landmarks, **overrides))

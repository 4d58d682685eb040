"""``larq-landmarks benchmark`` / ``larq_landmarks.speed``: the binary file against the float32
file of the same network, every engine that runs them here, side by side. What is checked is how
the times are taken and reported, never how fast anything is (that is docs/benchmarks.md's)."""
import json
import types

import numpy as np
import pytest

from larq_landmarks import cli, export, speed
from larq_landmarks.models import BinaryHourglass
from larq_landmarks.runtime import Engine, available_kernels


def test_each_engine_is_timed_on_its_own_calls_taking_turns(monkeypatch):
    clock, calls = [0.0], []

    def engine(name, seconds):
        def predict(image):
            calls.append(name)
            clock[0] += seconds
        return predict

    monkeypatch.setattr(speed, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    ms = speed.batch_one_ms({"a": engine("a", 0.002), "b": engine("b", 0.010)}, None, rounds=2, runs=3)
    assert ms == {"a": 2.0, "b": 10.0}
    assert calls == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2  # one untimed call each, then rounds in turn
    with pytest.raises(ValueError, match="rounds=0 and runs=3 must be at least 1"):
        speed.batch_one_ms({"a": engine("a", 0.002)}, None, rounds=0, runs=3)


# over 10 s on 2 cores; the fast tier covers the timing loop in
# test_each_engine_is_timed_on_its_own_calls_taking_turns
@pytest.mark.slow
def test_benchmark_command_times_the_binary_file_against_the_float32_one(tmp_path, capsys):
    model = BinaryHourglass(68, width=32, input_size=64, depth=2, name="small")
    model.save(tmp_path / "small.keras")
    out = tmp_path / "speed.json"
    assert cli.main(["benchmark", "--model", str(tmp_path / "small.keras"), "--rounds", "1", "--runs", "2",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    binary_file = export.convert(model)  # converted once here (each conversion takes seconds)
    ours = f"binary .tflite, larq_landmarks.runtime ({available_kernels()[0]})"
    reduced = []
    for precision in ("bfloat16", "int8"):
        try:
            Engine(binary_file, float_precision=precision)
            reduced.append(f"binary .tflite, larq_landmarks.runtime ({available_kernels()[0]}, {precision} float "
                           "convolutions)")
        except ValueError:  # no AVX512_BF16 / AVX512_VNNI on this CPU
            pass
    ours_int8 = f"binary .tflite with int8 activations, larq_landmarks.runtime ({available_kernels()[0]})"
    assert list(result["ms"]) == [speed.FLOAT32, speed.LCE, speed.LCE_INT8, ours, *reduced, ours_int8]
    assert result["input_shape"] == [64, 64, 3] and result["threads"] == 1 and result["model"] == "small"
    # the sizes are the two converted files', the ratios float32's median over each engine's
    binary_int8 = result["bytes"].pop("binary_int8")
    assert result["bytes"] == {"binary": len(binary_file), "float32": len(export.convert(model, binary=False))}
    assert 0 < binary_int8 < result["bytes"]["binary"]
    for name, ms in result["ms"].items():
        assert ms > 0 and result["vs_float32"][name] == pytest.approx(result["ms"][speed.FLOAT32] / ms, abs=1e-3)
    printed = capsys.readouterr().out
    assert f"| {ours} | {result['ms'][ours]:.3f} | {result['vs_float32'][ours]:.2f}x |" in printed
    assert f"({result['bytes']['float32'] / result['bytes']['binary']:.1f}x smaller); binary with int8 " \
           f"activations {binary_int8 / 1e6:.2f} MB." in printed


def test_benchmark_names_what_it_cannot_compare(tmp_path):
    with pytest.raises(SystemExit, match="'nothing' is neither a saved Keras model nor a named configuration"):
        cli.main(["benchmark", "--model", "nothing"])
    BinaryHourglass(68, width=32, input_size=64, depth=2, binary=False, name="real").save(tmp_path / "real.keras")
    with pytest.raises(SystemExit, match="real has no binary layers"):
        cli.main(["benchmark", "--model", str(tmp_path / "real.keras")])
    (tmp_path / "broken.keras").write_bytes(b"not a model")
    with pytest.raises(SystemExit, match="broken.keras: cannot load a Keras model"):
        cli.main(["benchmark", "--model", str(tmp_path / "broken.keras")])
    for not_a_model in (None, str(tmp_path / "real.keras")):  # an AttributeError before
        with pytest.raises(TypeError, match="model must be a Keras model, got (NoneType|str)"):
            speed.compare(not_a_model)


def test_a_named_configuration_is_built_with_trained_like_batch_norms():
    model = speed.load_or_build("binary_hpm", 16, input_size=64)
    assert model.name == "binary_hpm" and model.input_shape == (None, 64, 64, 3) and model.output_shape[-1] == 16
    means = np.concatenate([l.moving_mean.numpy() for l in model.layers if "bn" in l.name and hasattr(l, "moving_mean")])
    assert np.abs(means).max() > 0  # at initialisation they are all 0, and fold into a bare multiplication

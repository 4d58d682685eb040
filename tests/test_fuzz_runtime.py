"""scripts/fuzz_runtime.py: its random networks, one seed's checks, what fails a run."""
import json

import pytest

from script_modules import load_script


def _small_seed(script, **wanted):
    """The first seed whose network is small and has the ``wanted`` options."""
    for seed in range(2000):
        config = script.random_configuration(seed)
        kwargs = config["kwargs"]
        if kwargs["width"] <= 24 and kwargs["input_size"] <= 32 and all(kwargs[k] == v for k, v in wanted.items()):
            return seed
    raise AssertionError("no such seed")


def test_each_seed_has_its_own_network_the_same_every_time():
    script = load_script("fuzz_runtime")
    first, again, other = (script.random_configuration(s) for s in (7, 7, 8))
    assert first == again and first != other
    configs = [script.random_configuration(s)["kwargs"] for s in range(200)]
    for key in ("block", "pooling", "relu", "binary_skip", "task", "kernel_quantizer", "pad_value", "binary",
                "input_quantizer", "num_stacks", "depth"):
        assert len({c[key] for c in configs}) > 1, key  # every option is drawn both (or all) ways
    assert all(c["input_size"] % 2 ** (c["depth"] + 2) == 0 for c in configs)  # what BinaryHourglass needs


def test_a_path_off_the_bound_is_reported_with_its_and_lces_distance_from_keras():
    script = load_script("fuzz_runtime")
    near = {"mean_difference": 2e-7, "landmarks_within_half_a_pixel": 1.0, "within_bound": True, "from_keras": 3e-7}
    off = {"mean_difference": 9.7e-3, "landmarks_within_half_a_pixel": 0.96, "within_bound": False,
           "from_keras": 4e-7, "replay_matches": True}
    record = {"seed": 3, "num_landmarks": 7, "kwargs": {}, "batch": 1, "threads": 1, "failed": False,
              "lce_from_keras": 9.7e-3, "float": {"avx2": near, "cuda": off}}
    line = script.describe(record)
    assert line.startswith("ok seed 3") and "float OFF the bound on cuda (9.7e-03, 96%, 4.0e-07 from Keras); " \
        "LCE 9.7e-03 from Keras" in line and "DIFFER" not in line


@pytest.mark.slow  # two small networks converted, with LCE and XNNPACK: 10-20 s
def test_a_seed_checks_every_path_and_its_int8_file(monkeypatch, tmp_path):
    script = load_script("fuzz_runtime")
    seed = _small_seed(script, binary=True, pad_value=1.0, kernel_quantizer="magnitude_aware_sign")
    record = script.check_seed(seed, int8_share=1.0)
    assert "error" not in record and not record["failed"]
    assert set(record["float"]) == set(script.available_kernels())
    assert all(r["within_bound"] for r in record["float"].values()), record["float"]
    # the Keras model's output as far from LCE's as the paths' are: float rounding, not a wrong layer
    assert record["lce_from_keras"] < 1e-3 and all(r["from_keras"] < 1e-3 for r in record["float"].values())
    assert record["int8"]["paths_agree"] and record["int8"]["same_as_xnnpack"] >= 0.95
    assert record["int8"]["unfused_agrees"]
    assert script.describe(record).startswith(f"ok seed {seed}: ")

    def broken(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(script.models, "BinaryHourglass", broken)
    record = script.check_seed(seed, int8_share=1.0)
    assert record["failed"] and record["error"] == "RuntimeError: no network"
    assert script.describe(record).startswith(f"ERROR seed {seed}: ")
    # a failed seed makes the run's exit status 1, and the records are written
    assert script.main(["--seeds", str(seed), "1", "--json", str(tmp_path / "records.json")]) == 1
    assert json.loads((tmp_path / "records.json").read_text())[0]["error"] == "RuntimeError: no network"
    with pytest.raises(SystemExit):
        script.main(["--seeds", "0", "0"])


@pytest.mark.slow  # a small network converted, and run on kernels.cu built for the CPU: about 10 s
def test_cuda_runs_the_gpu_paths_and_a_replay_that_differs_fails_the_seed(monkeypatch, tmp_path):
    """``--cuda`` with no GPU here: kernels.cu built for the CPU stands in for it, each GPU path is
    held to the CPU paths' bound and its second and third (replayed) runs to its first."""
    from larq_landmarks.runtime import available_kernels, cuda

    import fake_cupy

    script = load_script("fuzz_runtime")
    seed = _small_seed(script, binary=True, pad_value=1.0, block="hpm")
    assert script.main(["--seeds", str(seed), "1", "--int8", "0", "--cuda", "--json", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert {"cuda", "cuda-popcount"} <= set(record["float"]) and not record["failed"]
    assert all(record["float"][p]["within_bound"] and record["float"][p]["replay_matches"] for p in cuda.PATHS)

    class Drifting(script.Engine):  # a GPU engine whose third call (a second replay) gives another output
        def predict(self, images, *args, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            return super().predict(images, *args, **kwargs) + (self.calls == 3) * 0.01

    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(script, "Engine", Drifting)
    record = script.check_seed(seed, int8_share=0.0, paths=available_kernels()[:1], cuda_paths=cuda.PATHS)
    assert record["failed"] and "error" not in record
    assert [p for p, r in record["float"].items() if not r.get("replay_matches", True)] == list(cuda.PATHS)
    assert "the replayed CUDA graphs DIFFER on cuda, cuda-popcount" in script.describe(record)

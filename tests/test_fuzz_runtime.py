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


@pytest.mark.slow  # two small networks converted, with LCE and XNNPACK: 10-20 s
def test_a_seed_checks_every_path_and_its_int8_file(monkeypatch, tmp_path):
    script = load_script("fuzz_runtime")
    seed = _small_seed(script, binary=True, pad_value=1.0, kernel_quantizer="magnitude_aware_sign")
    record = script.check_seed(seed, int8_share=1.0)
    assert "error" not in record and not record["failed"]
    assert set(record["float"]) == set(script.available_kernels())
    assert all(r["within_bound"] for r in record["float"].values()), record["float"]
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

"""The C++ log lines of TensorFlow and TFLite held to TF_CPP_MIN_LOG_LEVEL (larq_landmarks.native_logs)."""
import os
import threading

import pytest

from larq_landmarks import native_logs
from larq_landmarks.native_logs import below_log_level
from tests.conftest import run_python


def test_below_log_level_drops_absl_lines_under_the_level_and_keeps_everything_else():
    notice = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    info = "I0000 00:00:1796136626.543728   10331 port.cc:153] oneDNN custom operations are on.\n"
    warning = "W0000 00:00:1796136626.544068   10331 cpu_feature_guard.cc:12] slow path\n"
    error = "E1201 14:03:07.000001 7 cuda_platform.cc:52] failed call to cuInit\n"
    other = "/x/site.py:1: UserWarning: I0000 is not a log line here\n"
    text = notice + info + other + warning + error + "continued\n"
    assert below_log_level(text, 0) == text
    assert below_log_level(text, 1) == other + warning + error + "continued\n"
    assert below_log_level(text, 2) == other + error + "continued\n"
    assert below_log_level(text, 3) == other + "continued\n"
    assert below_log_level("no newline at the end", 2) == "no newline at the end"



def test_below_log_level_drops_tflites_info_lines_and_without_a_driver_the_cuinit_error():
    tflite_info = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
    tflite_warning = "WARNING: Attempting to use a delegate that only supports static-sized tensors\n"
    cuinit = ("E0000 00:00:1796215810.195909    4507 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
              "error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    other_error = "E0000 00:00:1796215810.195909    4507 cuda_platform.cc:60] out of memory\n"
    python_line = "a Python line that mentions ] failed call to cuInit\n"
    text = tflite_info + cuinit + tflite_warning + other_error + python_line
    assert below_log_level(text, 0, no_cuda_driver=True) == text
    assert below_log_level(text, 1) == cuinit + tflite_warning + other_error + python_line
    assert below_log_level(text, 2, no_cuda_driver=True) == tflite_warning + other_error + python_line
    assert below_log_level(text, 3, no_cuda_driver=True) == tflite_warning + python_line


def test_holds_from_many_threads_give_descriptor_2_back_with_every_line(capfd, monkeypatch):
    """Descriptor 2 is one per process: holds from several threads at once (interpreters made in
    a web server's workers) take turns, so it ends where it began and no line is lost."""
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    start = threading.Barrier(8)

    def hold(i):
        start.wait()
        for j in range(20):
            with native_logs.held_to_log_level() as held:
                assert held
                os.write(2, f"line {i} {j}\n".encode())
                os.write(2, b"I0000 00:00:12.5 1 port.cc:1] dropped\n")

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.write(2, b"after the holds\n")
    lines = capfd.readouterr().err.splitlines()
    assert sorted(lines) == sorted([f"line {i} {j}" for i in range(8) for j in range(20)] + ["after the holds"])
    assert lines[-1] == "after the holds"


def test_level_0_holds_nothing(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with native_logs.held_to_log_level() as held:
        os.write(2, b"I0000 00:00:12.5 1 port.cc:1] kept\n")
    assert not held
    assert capfd.readouterr().err == "I0000 00:00:12.5 1 port.cc:1] kept\n"


@pytest.mark.slow  # fresh interpreters importing TensorFlow: 13.6 s on 2 cores (Zen 4)
@pytest.mark.skipif(not native_logs.cuda_driver_missing(), reason="NVIDIA's driver is here: cuInit can succeed")
def test_no_cuinit_error_without_a_driver_and_tf_config_stays_open():
    """Where NVIDIA's driver is missing, TensorFlow's first op wrote ``E... failed call to cuInit``
    (tensorflow/tensorflow#37689); the package makes that look while importing TensorFlow, held,
    and every tf.config setting can still be made after it."""
    code = ("import larq_landmarks, tensorflow as tf\n"
            "tf.config.threading.set_intra_op_parallelism_threads(1)\n"
            "tf.config.set_visible_devices([], 'GPU')\n"
            "print(float(tf.constant(1.0) + 1))\n")
    # the same with the driver seemingly there: TensorFlow's line comes (if this TensorFlow writes it)
    driver_seen = run_python("import ctypes\nload = ctypes.CDLL\n"
                             "ctypes.CDLL = lambda name, *a, **k: load(None) if name == 'libcuda.so.1' else "
                             "load(name, *a, **k)\n" + code)
    assert driver_seen.returncode == 0 and driver_seen.stdout.split() == ["2.0"], driver_seen.stderr
    if "failed call to cuInit" not in driver_seen.stderr:
        pytest.skip("this TensorFlow does not look for CUDA")
    quiet = run_python(code)
    assert quiet.returncode == 0 and quiet.stdout.split() == ["2.0"], quiet.stderr
    assert "cuInit" not in quiet.stderr, quiet.stderr
    all_lines = run_python(code, env_extra={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert all_lines.returncode == 0 and "failed call to cuInit" in all_lines.stderr


@pytest.mark.slow  # over 10 s on 2 cores
def test_lces_interpreter_keeps_its_xnnpack_info_line_to_the_level(small_file):
    """TFLite writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." (once a process)
    when an interpreter takes XNNPACK: kept at level 0 only."""
    code = ("import larq_landmarks\nfrom larq_landmarks import tflite_model\n"
            f"tflite_model.interpreter(open({small_file!r}, 'rb').read(), use_xnnpack=True)\nprint('made')\n")
    quiet = run_python(code)
    assert quiet.returncode == 0 and quiet.stdout.split() == ["made"], quiet.stderr
    assert "XNNPACK" not in quiet.stderr, quiet.stderr
    loud = run_python(code, env_extra={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 0 and "INFO: Created TensorFlow Lite XNNPACK delegate" in loud.stderr, loud.stderr

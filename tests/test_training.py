import json
import os

import numpy as np
import pytest
import tensorflow as tf

from larq_landmarks import heatmaps, training
from larq_landmarks.distillation import Distiller, attention_map
from larq_landmarks.models import BinaryHourglass
from tests.conftest import run_python


def _dataset(images, points, batch=16, sigma=1.0):
    size = images.shape[1] // 4

    def target(image, pts):
        hm = heatmaps.render_heatmaps(heatmaps.input_to_heatmap(pts), tf.ones(tf.shape(pts)[:1]), size, sigma)
        return image, hm

    return tf.data.Dataset.from_tensor_slices((images, points)).map(target)


def _mean_error(model, images, points):
    decoded, _ = heatmaps.decode_heatmaps(model.predict(images, verbose=0))
    return float(np.linalg.norm(heatmaps.heatmap_to_input(decoded).numpy() - points, axis=-1).mean())


def test_step_schedule_matches_hand_computation():
    schedule = training.step_schedule(steps_per_epoch=10, epochs=100)
    # boundaries at 400, 700, 900 steps
    for step, rate in [(0, 2.5e-4), (400, 2.5e-4), (401, 1e-4), (700, 1e-4), (701, 5e-5), (901, 1e-5)]:
        assert float(schedule(step)) == pytest.approx(rate)
    with pytest.raises(ValueError, match="epochs"):
        training.step_schedule(10, 0)


def test_cosine_schedule_with_warm_up_matches_hand_computation():
    schedule = training.cosine_schedule(steps_per_epoch=10, epochs=10, learning_rate=1e-3, warmup_fraction=0.1)
    # 100 steps: linear warm-up over 10, then 0.5 (1 + cos(pi t / 90)) over the remaining 90
    for step, rate in [(0, 0.0), (5, 5e-4), (10, 1e-3), (55, 5e-4), (100, 0.0)]:
        assert float(schedule(step)) == pytest.approx(rate, abs=1e-9)
    model = BinaryHourglass(5, width=16, depth=1, input_size=32)
    training.compile_model(model, steps_per_epoch=10, epochs=10, optimizer="adam", schedule="cosine", warmup_fraction=0.1)
    assert isinstance(model.optimizer, tf.keras.optimizers.Adam)
    rate = model.optimizer.get_config()["learning_rate"]  # the schedule, as saved with the model
    assert rate["class_name"] == "CosineDecay"
    assert (rate["config"]["warmup_target"], rate["config"]["warmup_steps"]) == (pytest.approx(2.5e-4), 10)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        training.compile_model(model, optimizer="sgd")
    with pytest.raises(ValueError, match="warmup_fraction=0.1 needs schedule='cosine'"):
        training.compile_model(model, 10, 10, warmup_fraction=0.1)


def test_schedule_arguments_are_named():
    model = BinaryHourglass(3, width=32, depth=2, input_size=64)
    for kwargs, message in [(dict(steps_per_epoch=0, epochs=1), "steps_per_epoch=0 must be a positive integer"),
                            (dict(steps_per_epoch=10, epochs=0), "epochs=0 must be a positive integer"),
                            (dict(learning_rate=-1e-3), "learning_rate=-0.001 must be a positive number"),
                            (dict(learning_rate=float("nan")), "learning_rate=nan must be a positive number")]:
        with pytest.raises(ValueError, match=message):
            training.compile_model(model, **kwargs)


def test_two_stage_weights_carry_over_to_the_binary_model():
    tf.keras.utils.set_random_seed(0)
    first = BinaryHourglass(5, width=16, depth=1, input_size=32, binary_activations=False)
    binary = BinaryHourglass(5, width=16, depth=1, input_size=32)
    convs = [layer for layer in first.layers if layer.name.endswith("_bconv")]
    assert convs and all(layer.input_quantizer is None for layer in convs)
    assert all(binary.get_layer(layer.name).input_quantizer is not None for layer in convs)
    training.transfer_weights(first, binary)
    for a, b in zip(first.weights, binary.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="layer 'stem_conv' has weights"):
        training.transfer_weights(BinaryHourglass(5, width=32, depth=1, input_size=32), binary)
    # two_stage, weights first: half the epochs with real activations, the rest fully binary from
    # those weights
    stages = []

    def train(model, epochs):
        stages.append((model.get_layer("stem_block1_s1_bconv").input_quantizer is None, epochs))
        model.get_layer("stem_conv").set_weights([w + 1 for w in model.get_layer("stem_conv").get_weights()])

    build = lambda **stage: BinaryHourglass(5, width=16, depth=1, input_size=32, **stage)  # noqa: E731
    result = training.two_stage(build, train, 5, first="binary_weights", first_fraction=0.5)
    assert stages == [(True, 2), (False, 3)]
    assert result.get_layer("stem_block1_s1_bconv").input_quantizer is not None
    np.testing.assert_array_equal(result.get_layer("stem_conv").get_weights()[1], 2.0)  # bias 0 + 1 + 1
    with pytest.raises(ValueError, match="epochs >= 2"):
        training.two_stage(lambda **stage: binary, train, 1)
    with pytest.raises(ValueError, match="first='weights' is not known"):
        training.two_stage(build, train, 4, first="weights")


def test_first_stage_epochs_rounds_the_fraction_and_leaves_each_stage_one_epoch():
    assert training.first_stage_epochs(10, 0.3) == 3
    assert training.first_stage_epochs(10, 0.5) == 5
    assert training.first_stage_epochs(2, 0.05) == 1 and training.first_stage_epochs(2, 0.95) == 1
    assert training.first_stage_epochs(100, 0.25) == 25
    for fraction in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match=f"first_fraction={fraction}"):
            training.first_stage_epochs(10, fraction)


def test_two_stage_activations_first_trains_real_weights_on_binary_inputs():
    """Activations first (the default order): stage one binarizes the activations and keeps the
    weights real, its convolution is a float conv of the signs; the fully binary network starts
    from its weights."""
    tf.keras.utils.set_random_seed(0)
    stages = []

    def train(model, epochs):
        conv = model.get_layer("stem_block1_s1_bconv")
        stages.append((conv.input_quantizer is not None, conv.kernel_quantizer is None, epochs))
        if not stages[-1][1]:
            return
        inputs = tf.random.normal((2, 8, 8, conv.input.shape[-1]))
        expected = tf.nn.conv2d(tf.where(inputs < 0, -1.0, 1.0), conv.kernel, 1, "SAME")  # pads 0 = +1 bits
        expected_border = tf.nn.conv2d(tf.pad(tf.where(inputs < 0, -1.0, 1.0), [[0, 0], [1, 1], [1, 1], [0, 0]],
                                              constant_values=1.0), conv.kernel, 1, "VALID")
        np.testing.assert_allclose(conv(inputs).numpy(), expected_border.numpy(), rtol=1e-5, atol=1e-5)
        assert not np.allclose(expected.numpy(), expected_border.numpy())  # the padding value is checked
        conv.kernel.assign(tf.fill(conv.kernel.shape, 0.25))

    assert training.DEFAULT_FIRST_STAGE == "binary_activations"  # the measured better order
    assert training.DEFAULT_FIRST_FRACTION == 0.3  # the measured better split
    result = training.two_stage(lambda **stage: BinaryHourglass(5, width=16, depth=1, input_size=32, **stage),
                                train, 10)
    assert stages == [(True, True, 3), (True, False, 7)]
    np.testing.assert_array_equal(result.get_layer("stem_block1_s1_bconv").kernel.numpy(), 0.25)


@pytest.mark.slow  # two models trained and saved: 14 s on 2 cores (Zen 4)
def test_distiller_trains_the_student_only_and_round_trips(tmp_path):
    tf.keras.utils.set_random_seed(0)
    teacher = BinaryHourglass(5, width=16, depth=1, input_size=32, binary=False)
    student = BinaryHourglass(5, width=16, depth=1, input_size=32)
    distiller = Distiller(student, teacher)
    assert "hg1_l1_up_add" in distiller.attention_layers
    # the loss, by hand: output MSE to the teacher plus the mean squared attention-map distance
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    s_all, t_all = distiller._student_features(x), distiller._teacher_features(x)
    expected = np.mean((s_all[0].numpy() - t_all[0].numpy()) ** 2)
    maps = []
    for s, t in zip(s_all[1:], t_all[1:]):
        a, b = (np.mean(v.numpy() ** 2, -1).reshape(4, -1) for v in (s, t))
        a, b = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
        maps.append(np.mean(np.sum((a - b) ** 2, -1)))
    expected += np.mean(maps)
    assert float(distiller._distillation_loss(s_all, t_all)) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(np.linalg.norm(attention_map(s_all[1]).numpy(), axis=-1), 1.0, rtol=1e-5)

    y = np.random.default_rng(1).uniform(size=(4, 8, 8, 5)).astype(np.float32)
    training.compile_model(distiller, steps_per_epoch=2, epochs=1, optimizer="adam", learning_rate=1e-3)
    teacher_before = [w.numpy().copy() for w in teacher.weights]
    student_before = [w.numpy().copy() for w in student.trainable_weights]
    history = distiller.fit(x, y, batch_size=2, epochs=1, verbose=0,
                            callbacks=training.training_callbacks(str(tmp_path / "run")))
    assert set(history.history) == {"loss", "distillation_loss"}
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(teacher_before, teacher.weights))
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(student_before, student.trainable_weights))
    training.save_model(distiller, str(tmp_path / "distiller.keras"))
    loaded = tf.keras.models.load_model(str(tmp_path / "distiller.keras"))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), student.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="attention layer 'nowhere'"):
        Distiller(student, teacher, attention_layers=["nowhere"])


# over 10 s on 2 cores; the fast tier covers the distiller in
# test_distiller_trains_the_student_only_and_round_trips
@pytest.mark.slow
def test_distiller_with_the_attention_loss_off_matches_heatmaps_only():
    """attention_weight=0: the loss is the output MSE to the teacher alone (a one-output feature
    model returns a tensor, not a list: this once failed inside fit)."""
    tf.keras.utils.set_random_seed(0)
    teacher = BinaryHourglass(5, width=16, depth=1, input_size=32, binary=False)
    student = BinaryHourglass(5, width=16, depth=1, input_size=32)
    distiller = Distiller(student, teacher, heatmap_weight=2.0, attention_weight=0.0)
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    y = np.random.default_rng(1).uniform(size=(4, 8, 8, 5)).astype(np.float32)
    training.compile_model(distiller, learning_rate=1e-3)
    result = distiller.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    expected = 2.0 * np.mean((student(x).numpy() - teacher(x).numpy()) ** 2)
    assert result["distillation_loss"] == pytest.approx(expected, rel=1e-4)
    history = distiller.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["distillation_loss"][0])


@pytest.mark.slow
def test_small_binary_model_learns_synthetic_faces(small_faces):
    """400 RMSprop steps on CPU: the held-out landmark error falls well below the untrained one."""
    tf.keras.utils.set_random_seed(0)
    images, points = small_faces
    train = _dataset(images[:-128], points[:-128], sigma=1.5).shuffle(384, seed=0).batch(16).repeat()
    model = BinaryHourglass(68, width=32, input_size=64, depth=2)
    training.compile_model(model, learning_rate=1e-3)
    before = _mean_error(model, images[-128:], points[-128:])
    model.fit(train, steps_per_epoch=100, epochs=4, verbose=0)
    after = _mean_error(model, images[-128:], points[-128:])
    assert after < 0.5 * before, (before, after)
    assert after < 12.0, after  # pixels at 64x64 input; untrained is ~28


@pytest.mark.slow
def test_stacked_model_trains_on_repeated_targets(small_faces):
    images, points = small_faces
    model = BinaryHourglass(68, num_stacks=2, width=32, input_size=64, depth=1)
    training.compile_model(model, steps_per_epoch=2, epochs=1)
    data = training.for_stacks(_dataset(images[:32], points[:32]).batch(16), model)
    history = model.fit(data, epochs=1, verbose=0)
    assert set(history.history) >= {"loss", "stack_1_loss", "stack_2_loss"}
    h = history.history
    assert h["loss"][0] == pytest.approx(h["stack_1_loss"][0] + h["stack_2_loss"][0], rel=1e-5)


@pytest.mark.slow
def test_interrupted_fit_resumes_after_last_finished_epoch(small_faces, tmp_path):
    images, points = small_faces
    data = _dataset(images[:32], points[:32]).batch(16)
    model = BinaryHourglass(68, width=32, input_size=64, depth=1)
    training.compile_model(model)

    class Crash(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt("simulated interruption")

    callbacks = training.training_callbacks(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        model.fit(data, epochs=4, callbacks=callbacks + [Crash()], verbose=0)
    saved = tmp_path / "model.keras"
    assert saved.exists()  # written after epochs 0 and 1

    started = []
    resumed = BinaryHourglass(68, width=32, input_size=64, depth=1)
    training.compile_model(resumed)
    record = tf.keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: started.append(e))
    resumed.fit(data, epochs=4, callbacks=training.training_callbacks(str(tmp_path)) + [record], verbose=0)
    assert started == [2, 3]
    assert not os.path.exists(tmp_path / "backup" / "chief")  # deleted after a finished fit


# over 10 s on 2 cores; the fast tier covers the best-epoch rule in
# test_save_best_model_reads_the_last_outputs_score_and_never_keeps_nan
@pytest.mark.slow
def test_best_validation_epoch_is_kept_and_a_resumed_run_compares_with_it(small_faces, tmp_path):
    images, points = small_faces
    data, validation = _dataset(images[:16], points[:16]).batch(16), _dataset(images[32:40], points[32:40]).batch(8)

    class Crash(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt("simulated interruption")

    scores = {}
    record = tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: scores.setdefault(e, logs["val_nme"]))
    model = BinaryHourglass(68, width=32, input_size=64, depth=1)
    training.compile_model(model, learning_rate=5e-3, metrics=training.validation_metrics("heatmaps", 68))
    with pytest.raises(KeyboardInterrupt):
        model.fit(data, validation_data=validation, epochs=4, verbose=0,
                  callbacks=training.training_callbacks(str(tmp_path), best_metric="nme") + [record, Crash()])
    # the same model object (its traced steps kept): the backup restores weights and epoch, and a new
    # SaveBestModel reads the best score so far from best.keras.json
    model.fit(data, validation_data=validation, epochs=4, verbose=0,
              callbacks=training.training_callbacks(str(tmp_path), best_metric="nme") + [record])
    assert sorted(scores) == [0, 1, 2, 3]
    best = json.loads((tmp_path / "best.keras.json").read_text())
    epoch = min(scores, key=scores.get)
    assert best == {"epoch": epoch + 1, "metric": "val_nme", "value": pytest.approx(scores[epoch])}
    kept = tf.keras.models.load_model(tmp_path / "best.keras")  # that epoch's weights: the same score again
    assert kept.evaluate(validation, verbose=0, return_dict=True)["nme"] == pytest.approx(scores[epoch], rel=1e-5)


def test_save_best_model_reads_the_last_outputs_score_and_never_keeps_nan(tmp_path):
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    callback = training.SaveBestModel(str(tmp_path / "best.keras"), "mean_iu")  # higher is better
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate([float("nan"), 0.3, 0.2, 0.5, 0.4]):
        callback.on_epoch_end(epoch, {"val_stack_1_mean_iu": 1.0, "val_stack_2_mean_iu": value, "mean_iu": 0.9})
    assert callback.best == {"epoch": 4, "metric": "val_stack_2_mean_iu", "value": 0.5}
    saved = os.path.getmtime(tmp_path / "best.keras")
    resumed = training.SaveBestModel(str(tmp_path / "best.keras"), "mean_iu")  # a resumed run's new callback
    resumed.set_model(model)
    resumed.on_train_begin()
    resumed.on_epoch_end(5, {"val_stack_2_mean_iu": 0.45})  # worse than epoch 4's: nothing written
    assert resumed.best == callback.best and os.path.getmtime(tmp_path / "best.keras") == saved
    resumed.on_epoch_end(6, {"val_stack_2_mean_iu": 0.55})
    assert json.loads((tmp_path / "best.keras.json").read_text())["epoch"] == 7
    with pytest.raises(ValueError, match="no validation 'mean_iu'.*fit needs validation_data"):
        callback.on_epoch_end(5, {"loss": 1.0, "mean_iu": 0.9})
    with pytest.raises(ValueError, match="metric='pckh' must be one of"):
        training.SaveBestModel(str(tmp_path / "x.keras"), "pckh")


def test_pose_models_are_validated_by_pck_and_keep_their_highest_epoch(tmp_path):
    assert [m.name for m in training.validation_metrics("heatmaps", 16)] == ["nme", "pck"]
    assert [m.name for m in training.validation_metrics("heatmaps", 68)] == ["nme"]
    assert [m.name for m in training.validation_metrics("segmentation", 7)] == ["mean_iu"]
    assert [training.best_epoch_metric(*args) for args in (("heatmaps", 16), ("heatmaps", 68),
                                                            ("heatmaps", 34), ("segmentation", 68))] == \
        ["pck", "nme", "nme", "mean_iu"]
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    callback = training.SaveBestModel(str(tmp_path / "best.keras"), "pck")
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate([0.4, 0.7, 0.6]):
        callback.on_epoch_end(epoch, {"val_nme": 0.1 * epoch, "val_pck": value})
    assert callback.best == {"epoch": 2, "metric": "val_pck", "value": 0.7}


def test_terminate_on_nan_stops_training(small_faces, tmp_path):
    images, points = small_faces
    bad = points[:32].copy()
    bad[5:] = np.nan  # NaN targets from the second batch on
    model = BinaryHourglass(68, width=32, input_size=64, depth=1)
    training.compile_model(model)
    history = model.fit(
        _dataset(images[:32], bad).batch(8), epochs=3,
        callbacks=training.training_callbacks(str(tmp_path)), verbose=0,
    )
    assert model.stop_training
    assert len(history.epoch) == 1


def test_callbacks_refuse_a_file_as_their_folder(tmp_path):
    """A file as the run's folder was taken, and failed only once fit wrote to it."""
    taken = tmp_path / "taken"
    taken.write_text("kept")
    with pytest.raises(ValueError, match="work_dir=.*taken' is a file, not a folder"):
        training.training_callbacks(str(taken))
    with pytest.raises(ValueError, match="log_dir=.*taken' is a file, not a folder"):
        training.training_callbacks(str(tmp_path / "run"), log_dir=str(taken))
    assert taken.read_text() == "kept"
    assert len(training.training_callbacks(str(tmp_path / "new"), log_dir=str(tmp_path / "logs"))) == 4


def test_save_model_is_atomic(tmp_path, monkeypatch):
    model = BinaryHourglass(16, width=32, input_size=64, depth=2)
    path = tmp_path / "model.keras"
    training.save_model(model, str(path))
    good = path.read_bytes()

    def broken_save(target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError):
        training.save_model(model, str(path))
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]



def test_replace_markdown_section_keeps_the_other_sections(tmp_path):
    from larq_landmarks.atomic import replace_markdown_section

    path = tmp_path / "bench.md"
    path.write_text("# B\n\n## One\n\nold 1\n\n## Two\n\nold 2\n\n## Three\n\nold 3\n")
    replace_markdown_section(str(path), "## One\n\nnew 1\n\n## Two\n\nnew 2\n", "## One", "## Two")
    replace_markdown_section(str(path), "## Four\n\nnew 4\n", "## Four")
    assert path.read_text() == "# B\n\n## One\n\nnew 1\n\n## Two\n\nnew 2\n\n## Three\n\nold 3\n\n## Four\n\nnew 4\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]

MIRRORED = """
import larq_landmarks, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from larq_landmarks import training, heatmaps
from larq_landmarks.distillation import Distiller
from larq_landmarks.models import BinaryHourglass
strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
x = np.random.default_rng(0).uniform(size=(32, 64, 64, 3)).astype('float32')
p = np.random.default_rng(1).uniform(0, 63, size=(32, 68, 2)).astype('float32')
ds = tf.data.Dataset.from_tensor_slices((x, p)).map(
    lambda i, q: (i, heatmaps.render_heatmaps(heatmaps.input_to_heatmap(q), tf.ones(68), 16)))
with strategy.scope():
    student = BinaryHourglass(68, num_stacks=2, width=32, input_size=64, depth=1)
    teacher = BinaryHourglass(68, num_stacks=2, width=32, input_size=64, depth=1, binary=False)
    distiller = Distiller(student, teacher)
    training.compile_model(distiller, steps_per_epoch=4, epochs=2, optimizer='adam', schedule='cosine', warmup_fraction=0.25)
history = distiller.fit(training.for_stacks(ds.batch(8), student), epochs=2, verbose=0)
print('REPLICAS', strategy.num_replicas_in_sync, 'LOSS', *history.history['loss'], 'DISTILLATION', *history.history['distillation_loss'])
"""


@pytest.mark.slow
def test_same_training_code_runs_under_mirrored_strategy_on_two_cpus():
    """compile_model and fit, on a Distiller (its own train step: the student's and the teacher's
    outputs per replica), under MirroredStrategy on two logical CPUs: two replicas, finite losses.
    A plain model's fit under two replicas runs in tutorial_distributed.md (MultiWorkerMirroredStrategy,
    two worker processes). Tracing the graphs for two replicas is most of this test's time: 43 s on
    a 2-core Zen 4 (with a plain model's fit before it, 70-80 s in the suite)."""
    result = run_python(MIRRORED, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("REPLICAS")][0].split()
    assert line[1] == "2" and line[2] == "LOSS" and line[5] == "DISTILLATION", line
    losses = [float(v) for v in line[3:5] + line[6:]]
    assert len(losses) == 4 and all(np.isfinite(losses)), line


# over 10 s on 2 cores; the fast tier covers mixed_bfloat16 in test_models and test_export (mixed_float16's
# loss scaling only here)
@pytest.mark.slow
def test_mixed_float16_trains_with_loss_scaling_the_model_and_a_distiller(dtype_policy, caplog):
    """Under mixed_float16 compile_model's optimizer is Keras's LossScaleOptimizer, for the model
    and for a Distiller (whose own train step scales its loss through minimize; Keras warns
    where a loss reaches it unscaled): both train, with finite losses, the student's weights
    moving and the teacher's not."""
    tf.keras.utils.set_random_seed(0)
    teacher = BinaryHourglass(5, width=16, depth=1, input_size=32, binary=False)  # float32, as loaded
    dtype_policy("mixed_float16")
    x = np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype(np.float32)
    y = np.random.default_rng(1).uniform(size=(8, 8, 8, 5)).astype(np.float32)
    model = BinaryHourglass(5, width=16, depth=1, input_size=32)
    student = BinaryHourglass(5, width=16, depth=1, input_size=32)
    distiller = Distiller(student, teacher)
    teacher_before = [w.numpy().copy() for w in teacher.weights]
    for fitted, trained in ((model, model), (distiller, student)):
        training.compile_model(fitted, learning_rate=1e-3)
        assert isinstance(fitted.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        assert trained.get_layer("stem_conv").compute_dtype == "float16"
        before = [w.numpy().copy() for w in trained.trainable_weights]
        history = fitted.fit(x, y, batch_size=2, epochs=2, verbose=0)
        assert all(np.isfinite(v).all() for v in history.history.values())
        moved = [not np.array_equal(a, w.numpy()) for a, w in zip(before, trained.trainable_weights)]
        assert sum(moved) > 0.9 * len(moved), f"{sum(moved)} of {len(moved)} weights moved"
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(teacher_before, teacher.weights))
    assert "You forgot to call LossScaleOptimizer" not in caplog.text

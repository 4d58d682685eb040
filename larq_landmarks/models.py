"""The stacked hourglass network of the papers, with binary or real blocks (METHOD.md section 2)."""
import contextlib
import json
from importlib import resources
from typing import Any, Dict, List, Optional

import tensorflow as tf

from larq_landmarks.blocks import BLOCKS, check_binary_options

POOLINGS = ("max", "avg")
TASKS = ("heatmaps", "segmentation")


def _check_arguments(num_landmarks, num_stacks, width, depth, block, pooling, input_size, task):
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} is not known; use one of {tuple(BLOCKS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not known; use one of {POOLINGS}")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not known; use one of {TASKS}")
    if not isinstance(num_stacks, int) or num_stacks < 1:
        raise ValueError(f"num_stacks={num_stacks!r} must be an integer >= 1")
    if not isinstance(num_landmarks, int) or num_landmarks < 1:
        raise ValueError(f"num_landmarks={num_landmarks!r} must be an integer >= 1")
    if not isinstance(width, int) or width < 4 or width % 4:
        raise ValueError(f"width={width!r} must be a positive integer divisible by 4")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r} must be an integer >= 1")
    multiple = 2 ** (depth + 2)
    if not isinstance(input_size, int) or input_size < multiple or input_size % multiple:
        raise ValueError(
            f"input_size={input_size!r} must be a positive multiple of 2**(depth+2) = {multiple} "
            f"(depth={depth}: stride-2 stem, one pooling, then {depth} hourglass poolings)"
        )


def BinaryHourglass(
    num_landmarks: int,
    num_stacks: int = 1,
    width: int = 256,
    depth: int = 4,
    block: str = "hpm",
    binary: bool = True,
    pooling: str = "max",
    relu: bool = False,
    input_size: int = 256,
    kernel_quantizer: str = "magnitude_aware_sign",
    pad_value: float = 1.0,
    binary_skip: bool = False,
    task: str = "heatmaps",
    bottleneck_ratio: float = 0.5,
    binary_activations: bool = True,
    input_quantizer: str = "approx_sign",
    binary_weights: bool = True,
    name: Optional[str] = None,
) -> tf.keras.Model:
    """Build the (binarized) stacked hourglass of Bulat & Tzimiropoulos.

    The defaults reproduce the papers' released binary network: one stack, width 256, depth 4,
    binary HPM blocks, max-pooling, real-valued stem and heads (about 6.25M parameters).

    Its layers follow the Keras dtype policy in force when it is built: under
    ``tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")`` (or ``"mixed_float16"``) they
    compute in bfloat16 (float16) with float32 weights, except the output convolutions, which stay
    float32 for the losses. :func:`float32_model` gives the float32 network to convert.

    Args:
        num_landmarks: K, the number of heatmaps (16 MPII, 68 faces, 34 AFLW-PIFA), or the
            number of classes when ``task="segmentation"`` (7 facial parts).
        num_stacks: hourglasses stacked with intermediate supervision; the model has one output
            per stack, named ``stack_1`` ... ``stack_{num_stacks}``.
        width: channels C of the hourglass; the stem uses C/4 and C/2.
        depth: number of poolings inside each hourglass.
        block: ``"hpm"`` (the papers' block) or ``"bottleneck"`` (Newell et al.'s).
        binary: binarize the blocks' weights and activations (stem and heads stay real).
        pooling: ``"max"`` or ``"avg"`` for every 2x2 pooling (supplementary Table 1).
        relu: ReLU after each convolution of the blocks (supplementary Table 2).
        input_size: side of the square RGB input; outputs are ``input_size/4`` square. Must be a
            multiple of ``2**(depth+2)``.
        kernel_quantizer: ``"magnitude_aware_sign"`` or ``"ste_sign"`` for binary weights.
        pad_value: border value of binary 3x3 convolutions (1: LCE's fast path, -1: authors').
        binary_skip: make the 1x1 skip convolutions binary (default real).
        task: ``"heatmaps"`` (outputs are heatmaps) or ``"segmentation"`` (per-pixel logits).
        bottleneck_ratio: inner width of the bottleneck block as a fraction of ``width``
            (0.5 original; ignored by the HPM block).
        binary_activations: False keeps the binary convolutions' inputs real (binary weights
            only): stage one of ``training.two_stage(..., first="binary_weights")``, whose
            weights :func:`larq_landmarks.training.transfer_weights` copies into the fully binary
            model. Only True converts with LCE.
        input_quantizer: the activations' binarizer: ``"approx_sign"`` (the default: Larq's
            ApproxSign, a triangle-shaped gradient, measured better than the papers' in
            docs/results.md), ``"ste_sign"`` (the papers' straight-through box) or
            ``"swish_sign"``; the same sign forward, all convert to LCE's bit-packed ops.
        binary_weights: False keeps the binary convolutions' weights real (binary activations
            only): stage one of two-stage training with the activations binarized first
            (``training.two_stage(..., first="binary_activations")``). Only True converts with LCE.
        name: model name.

    Returns:
        A ``tf.keras.Model`` mapping ``(batch, input_size, input_size, 3)`` images to a list of
        ``num_stacks`` tensors ``(batch, input_size/4, input_size/4, num_landmarks)`` (a single
        tensor when ``num_stacks == 1``).
    """
    _check_arguments(num_landmarks, num_stacks, width, depth, block, pooling, input_size, task)
    check_binary_options(kernel_quantizer, pad_value, input_quantizer)
    layers = tf.keras.layers
    if not 0 < bottleneck_ratio <= 1:
        raise ValueError(f"bottleneck_ratio={bottleneck_ratio!r} must be in (0, 1]")
    block_fn = BLOCKS[block]
    options = dict(
        binary=binary,
        relu=relu,
        kernel_quantizer=kernel_quantizer,
        pad_value=pad_value,
        binary_skip=binary_skip,
        binary_activations=binary_activations,
        input_quantizer=input_quantizer,
        binary_weights=binary_weights,
    )
    if block == "bottleneck":
        options["inner_ratio"] = bottleneck_ratio
    Pool = layers.MaxPooling2D if pooling == "max" else layers.AveragePooling2D

    def hourglass(x, level, prefix):
        up = block_fn(x, width, name=f"{prefix}_l{level}_up", **options)
        low = Pool(2, name=f"{prefix}_l{level}_pool")(x)
        low = block_fn(low, width, name=f"{prefix}_l{level}_low1", **options)
        if level > 1:
            low = hourglass(low, level - 1, prefix)
        else:
            low = block_fn(low, width, name=f"{prefix}_l{level}_low2", **options)
        low = block_fn(low, width, name=f"{prefix}_l{level}_low3", **options)
        low = layers.UpSampling2D(2, interpolation="nearest", name=f"{prefix}_l{level}_upsample")(
            low
        )
        return layers.Add(name=f"{prefix}_l{level}_add")([up, low])

    inputs = tf.keras.Input((input_size, input_size, 3), name="image")
    x = layers.Conv2D(width // 4, 7, strides=2, padding="same", name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = block_fn(x, width // 2, name="stem_block1", **options)
    x = Pool(2, name="stem_pool")(x)
    x = block_fn(x, width // 2, name="stem_block2", **options)
    x = block_fn(x, width, name="stem_block3", **options)

    outputs: List[tf.Tensor] = []
    for stack in range(1, num_stacks + 1):
        prefix = f"hg{stack}"
        y = hourglass(x, depth, prefix)
        y = block_fn(y, width, name=f"{prefix}_head_block", **options)
        y = layers.Conv2D(width, 1, use_bias=False, name=f"{prefix}_head_conv")(y)
        y = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{prefix}_head_bn")(y)
        y = layers.Activation("relu", name=f"{prefix}_head_relu")(y)
        # float32 whatever the Keras dtype policy (mixed precision computes the rest in bfloat16 or
        # float16): the heatmaps and logits the losses read
        out = layers.Conv2D(num_landmarks, 1, name=f"stack_{stack}", dtype="float32")(y)
        outputs.append(out)
        if stack < num_stacks:
            features = layers.Conv2D(width, 1, name=f"{prefix}_remap_features")(y)
            predictions = layers.Conv2D(width, 1, name=f"{prefix}_remap_predictions")(out)
            x = layers.Add(name=f"{prefix}_merge")([x, features, predictions])

    model_name = name or f"{'binary' if binary else 'real'}_{block}_hourglass"
    return tf.keras.Model(inputs, outputs if num_stacks > 1 else outputs[0], name=model_name)


def named_configurations() -> Dict[str, Dict[str, Any]]:
    """The papers' named networks from ``models/*.json``: name -> {description, kwargs, ...}."""
    configs = {}
    for entry in resources.files("larq_landmarks.named_models").iterdir():
        if entry.name.endswith(".json"):
            configs[entry.name[: -len(".json")]] = json.loads(entry.read_text())
    return dict(sorted(configs.items()))


def build_named(name: str, num_landmarks: int, **overrides: Any) -> tf.keras.Model:
    """Build a named configuration (e.g. ``"binary_hpm"``) for ``num_landmarks`` outputs.

    ``overrides`` replace the configuration's arguments of :func:`BinaryHourglass` (e.g. a
    smaller ``width`` or ``input_size`` for tests).
    """
    configs = named_configurations()
    if name not in configs:
        raise ValueError(f"model name {name!r} is not known; use one of {tuple(configs)}")
    kwargs = {**configs[name]["kwargs"], **overrides}
    return BinaryHourglass(num_landmarks, name=name, **kwargs)


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras's global dtype policy set to ``name`` (``"float32"``, ``"mixed_bfloat16"``,
    ``"mixed_float16"``) for the models built inside the block; the previous one back after it."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def _float32_config(config):
    """``config`` with every ``dtype`` in it (each layer's dtype policy, a Larq layer's quantizers'
    included) ``"float32"``."""
    if isinstance(config, dict):
        return {key: "float32" if key == "dtype" else _float32_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_config(value) for value in config]
    return config


def float32_model(model: tf.keras.Model) -> tf.keras.Model:
    """The same functional network with the same weights computing in float32, for a model built
    under a mixed-precision dtype policy (``"mixed_bfloat16"``, ``"mixed_float16"``); ``model``
    itself when every layer already computes in float32. ``export.convert`` converts through it
    (LCE's converter and the int8 calibration take float32 graphs)."""
    layers = [model] + [m for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]
    if all(layer.dtype_policy.name == "float32" for layer in layers):
        return model
    if not hasattr(model, "_is_graph_network") or not model._is_graph_network:
        raise ValueError(f"{model.name}: a float32 copy needs a functional model (its config); got a "
                         f"{type(model).__name__}")
    copy = type(model).from_config(_float32_config(model.get_config()))  # Functional or Sequential
    copy.set_weights(model.get_weights())
    return copy

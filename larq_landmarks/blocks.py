"""Residual blocks of the papers, built from Keras and Larq layers.

Each block is a function ``block(x, filters, ...) -> tensor`` that adds standard Keras / Larq
layers to a functional model. A model made of them therefore serialises with ``get_config`` and
loads with ``tf.keras.models.load_model`` without custom objects (Larq registers its layers).

Binary convolutions are ``larq.layers.QuantConv2D`` with a sign input quantizer (``approx_sign``
by default, the papers' ``ste_sign`` one argument away), no bias, and a sign-based kernel
quantizer: the configuration that Larq Compute Engine (LCE) converts to its ``LceBconv2d`` op.
They are pre-activated: ``BatchNormalization -> binarize -> conv``.
"""
from typing import Optional

import larq as lq
import tensorflow as tf

KERNEL_QUANTIZERS = ("magnitude_aware_sign", "ste_sign")
# The activations' binarizers: the same sign forward (LCE converts each to LceQuantize), different
# gradients: straight-through clipped at |x| <= 1, ApproxSign's triangle, SwishSign's smooth bump.
INPUT_QUANTIZERS = ("ste_sign", "approx_sign", "swish_sign")
PAD_VALUES = (1.0, -1.0)


def check_binary_options(kernel_quantizer: str, pad_value: float, input_quantizer: str = "approx_sign") -> None:
    """Raise a ValueError naming ``kernel_quantizer``, ``input_quantizer`` or ``pad_value`` if it
    is not supported."""
    if kernel_quantizer not in KERNEL_QUANTIZERS:
        raise ValueError(
            f"kernel_quantizer={kernel_quantizer!r} is not supported; use one of {KERNEL_QUANTIZERS}"
        )
    if input_quantizer not in INPUT_QUANTIZERS:
        raise ValueError(
            f"input_quantizer={input_quantizer!r} is not supported; use one of {INPUT_QUANTIZERS}"
        )
    if float(pad_value) not in PAD_VALUES:
        raise ValueError(f"pad_value={pad_value!r} is not supported; use one of {PAD_VALUES}")


def conv(
    x: tf.Tensor,
    filters: int,
    kernel_size: int,
    *,
    binary: bool,
    kernel_quantizer: str = "magnitude_aware_sign",
    pad_value: float = 1.0,
    binary_activations: bool = True,
    input_quantizer: str = "approx_sign",
    binary_weights: bool = True,
    name: Optional[str] = None,
) -> tf.Tensor:
    """Pre-activated convolution without bias: ``BN -> (sign | ReLU) -> conv``.

    Args:
        x: input tensor (NHWC).
        filters: number of output channels.
        kernel_size: 1 or 3 (square kernels, stride 1, "same" output size).
        binary: binarize inputs with ``input_quantizer`` and weights with ``kernel_quantizer``
            (Larq ``QuantConv2D``); if False, a real ``BN -> ReLU -> Conv2D``.
        kernel_quantizer: ``"magnitude_aware_sign"`` (sign times the per-output-channel mean of
            |W|, as XNOR-Net) or ``"ste_sign"`` (plain sign).
        pad_value: value the binary input is padded with at the border (1 is LCE's fastest path,
            -1 matches the authors' code). Ignored for real convolutions and 1x1 kernels.
        binary_activations: False keeps the binary convolution's input real-valued (binary
            weights only): stage one of two-stage training with the weights binarized first;
            LCE converts only True.
        input_quantizer: the activations' binarizer, one of ``INPUT_QUANTIZERS`` (the sign
            forward, different gradients; all convert to LCE's ops).
        binary_weights: False keeps the binary convolution's weights real (binary activations
            only): stage one of two-stage training in the other order, activations first (see
            :func:`larq_landmarks.training.two_stage`); LCE converts only True.
        name: prefix of the layer names.
    """
    check_binary_options(kernel_quantizer, pad_value, input_quantizer)
    x = tf.keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    if not binary:  # "_input_relu": a block's ReLU after the convolution (relu=True) is "<name>_relu"
        x = tf.keras.layers.Activation("relu", name=f"{name}_input_relu")(x)
        return tf.keras.layers.Conv2D(
            filters, kernel_size, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
    padding = {"padding": "same", "pad_values": float(pad_value)} if kernel_size > 1 else {}
    return lq.layers.QuantConv2D(
        filters,
        kernel_size,
        input_quantizer=input_quantizer if binary_activations else None,
        kernel_quantizer=kernel_quantizer if binary_weights else None,
        kernel_constraint="weight_clip",
        use_bias=False,
        name=f"{name}_bconv",
        **padding,
    )(x)


def _skip(x: tf.Tensor, filters: int, *, binary_skip: bool, kernel_quantizer: str, binary_activations: bool,
          input_quantizer: str, binary_weights: bool, name: str):
    """Identity when the channel count matches, else ``BN -> act -> 1x1 conv``."""
    if x.shape[-1] == filters:
        return x
    return conv(x, filters, 1, binary=binary_skip, kernel_quantizer=kernel_quantizer,
                binary_activations=binary_activations, input_quantizer=input_quantizer,
                binary_weights=binary_weights, name=name)


def _maybe_relu(x: tf.Tensor, relu: bool, name: str) -> tf.Tensor:
    return tf.keras.layers.Activation("relu", name=name)(x) if relu else x


def hpm_block(
    x: tf.Tensor,
    filters: int,
    *,
    binary: bool = True,
    relu: bool = False,
    kernel_quantizer: str = "magnitude_aware_sign",
    pad_value: float = 1.0,
    binary_skip: bool = False,
    binary_activations: bool = True,
    input_quantizer: str = "approx_sign",
    binary_weights: bool = True,
    name: str = "hpm",
) -> tf.Tensor:
    """Hierarchical, parallel and multi-scale block (METHOD.md section 1).

    Three chained 3x3 stages map the input to ``filters/2``, ``filters/4`` and ``filters/4``
    channels; their outputs (receptive fields 3, 5, 7) are concatenated to ``filters`` channels
    and added to the skip path.

    Args:
        x: input tensor (NHWC).
        filters: output channels C (C/2 + C/4 + C/4; when C is not divisible by 4 the first
            stage takes the remainder).
        binary: binary stages (``BN -> sign -> binary 3x3 conv``) or real (``BN -> ReLU -> 3x3``).
        relu: add a ReLU after each convolution (supplementary Table 2).
        kernel_quantizer: weight binarizer of the binary convolutions, see :func:`conv`.
        pad_value: border pad value of the binary 3x3 convolutions, see :func:`conv`.
        binary_skip: make the 1x1 skip convolution (used when channels change) binary.
        binary_activations: binarize the binary convolutions' inputs (False: weights only), see
            :func:`conv`.
        input_quantizer: the activations' binarizer, see :func:`conv`.
        binary_weights: binarize the binary convolutions' weights (False: activations only), see
            :func:`conv`.
        name: prefix of the layer names.
    """
    quarter = filters // 4
    widths = (filters - 2 * quarter, quarter, quarter)
    options = dict(binary=binary, kernel_quantizer=kernel_quantizer, pad_value=pad_value,
                   binary_activations=binary_activations, input_quantizer=input_quantizer,
                   binary_weights=binary_weights)
    stages = []
    y = x
    for i, width in enumerate(widths, start=1):
        y = conv(y, width, 3, name=f"{name}_s{i}", **options)
        y = _maybe_relu(y, relu, f"{name}_s{i}_relu")
        stages.append(y)
    y = tf.keras.layers.Concatenate(name=f"{name}_concat")(stages)
    skip = _skip(
        x, filters, binary_skip=binary_skip, kernel_quantizer=kernel_quantizer,
        binary_activations=binary_activations, input_quantizer=input_quantizer, binary_weights=binary_weights,
        name=f"{name}_skip"
    )
    return tf.keras.layers.Add(name=f"{name}_add")([skip, y])


def bottleneck_block(
    x: tf.Tensor,
    filters: int,
    *,
    binary: bool = True,
    relu: bool = False,
    kernel_quantizer: str = "magnitude_aware_sign",
    pad_value: float = 1.0,
    binary_skip: bool = False,
    binary_activations: bool = True,
    input_quantizer: str = "approx_sign",
    binary_weights: bool = True,
    inner_ratio: float = 0.5,
    name: str = "bottleneck",
) -> tf.Tensor:
    """The original hourglass bottleneck (Newell et al.): 1x1 (C/2) -> 3x3 (C/2) -> 1x1 (C).

    Arguments as :func:`hpm_block`; the binary variant binarizes all three convolutions.
    ``inner_ratio`` sets the inner width (0.5 is the original; about 0.72 gives the HPM block's
    parameter count).
    """
    inner = max(1, int(round(filters * inner_ratio)))
    options = dict(binary=binary, kernel_quantizer=kernel_quantizer, pad_value=pad_value,
                   binary_activations=binary_activations, input_quantizer=input_quantizer,
                   binary_weights=binary_weights)
    y = x
    for i, (width, size) in enumerate(((inner, 1), (inner, 3), (filters, 1)), start=1):
        y = conv(y, width, size, name=f"{name}_c{i}", **options)
        y = _maybe_relu(y, relu, f"{name}_c{i}_relu")
    skip = _skip(
        x, filters, binary_skip=binary_skip, kernel_quantizer=kernel_quantizer,
        binary_activations=binary_activations, input_quantizer=input_quantizer, binary_weights=binary_weights,
        name=f"{name}_skip"
    )
    return tf.keras.layers.Add(name=f"{name}_add")([skip, y])


BLOCKS = {"hpm": hpm_block, "bottleneck": bottleneck_block}

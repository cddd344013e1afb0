"""Export the small Keras models under tests/data/tf2onnx/ with tf2onnx, as a Keras user would.

TensorFlow cannot share this project's environment (and CI has no need of it), so this runs
in a virtual environment of its own:

    python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 tf-keras==2.21.0
    /tmp/tfenv/bin/python tools/export_keras.py [--out tests/data/tf2onnx]   (4 models, one through TFLite)
    /tmp/tfenv/bin/python tools/export_keras.py --applications /tmp/keras_apps [--opset 13]

The second form exports six keras.applications models (MobileNetV3Small, EfficientNetV2B0,
ResNet50V2, DenseNet121, Xception, NASNetMobile; small inputs, 10 classes) for a parity sweep
by hand (`fcpts-onnx inspect FILE --parity`); they are too large for the repository.

The weights are random (nothing is downloaded), drawn so that no tensor is the exporter's
special case: biases and BatchNorm statistics are not zero (tf2onnx folds an Add of zeros
away), LayerNorm's gamma and beta are not ones and zeros, and no two tensors are equal
(tf2onnx stores equal constants once).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]


def transformer(keras, seq=16, width=32, heads=4, classes=10, activation=None, name="keras_transformer"):
    """Two pre-norm encoder blocks: LayerNormalization, MultiHeadAttention, an MLP (tanh GELU
    unless ``activation`` says otherwise). ``keras``: Keras 3, or tf.keras (the tf-keras package)."""
    if activation is None:  # Keras 3's exact GELU uses Erfc, which tf2onnx 1.17 cannot convert
        activation = lambda t: keras.activations.gelu(t, approximate=True)  # noqa: E731
    inp = keras.Input((seq, width))
    x = inp
    for _ in range(2):
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        x = x + keras.layers.MultiHeadAttention(heads, width // heads)(h, h)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.Dense(4 * width, activation=activation)(h)
        x = x + keras.layers.Dense(width)(h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, keras.layers.Dense(classes)(x), name=name)


def convnext(keras, size=32, width=32, classes=10):
    """A ConvNeXt-style CNN on NHWC images: a BatchNorm stem, two blocks (7x7 depthwise,
    LayerNormalization over channels, Dense 4C with GELU, Dense C, residual), a LayerNorm head."""
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(width, 4, strides=4)(inp)
    x = keras.layers.BatchNormalization()(x)
    for _ in range(2):
        h = keras.layers.DepthwiseConv2D(7, padding="same")(x)
        h = keras.layers.LayerNormalization(epsilon=1e-6)(h)
        h = keras.layers.Dense(4 * width, activation=lambda t: keras.activations.gelu(t, approximate=True))(h)
        x = x + keras.layers.Dense(width)(h)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    return keras.Model(inp, keras.layers.Dense(classes)(x), name="keras_convnext")


MODELS = {"keras_transformer": (transformer, 17), "keras_convnext": (convnext, 13)}


def tf_keras_transformer():
    """The transformer in tf.keras (Keras 2): its LayerNorm is written ``Sub(beta, Mul(mean, inv))``
    and, at tf2onnx's default opset 15, each attention block's output projection reaches its Gemm
    through a Reshape whose shape Shape nodes compute. ReLU: its GELU needs Erfc too."""
    import tf_keras

    return transformer(tf_keras, activation="relu", name="tf_keras_transformer")


def applications(keras):
    """keras.applications models, random weights, at the smallest inputs they accept."""
    a = keras.applications
    return {
        "mobilenetv3small": lambda: a.MobileNetV3Small(input_shape=(96, 96, 3), weights=None, classes=10),
        "efficientnetv2b0": lambda: a.EfficientNetV2B0(input_shape=(64, 64, 3), weights=None, classes=10),
        "resnet50v2": lambda: a.ResNet50V2(input_shape=(64, 64, 3), weights=None, classes=10),
        "densenet121": lambda: a.DenseNet121(input_shape=(64, 64, 3), weights=None, classes=10),
        "xception": lambda: a.Xception(input_shape=(71, 71, 3), weights=None, classes=10),
        "nasnetmobile": lambda: a.NASNetMobile(input_shape=(64, 64, 3), weights=None, classes=10),
    }


def randomise(keras, model, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
        elif isinstance(layer, keras.layers.LayerNormalization):
            gamma, beta = layer.get_weights()
            layer.set_weights([gamma + rng.normal(0, 0.1, gamma.shape), beta + rng.normal(0, 0.1, beta.shape)])
    for variable in model.weights:
        if not np.any(variable.numpy()):  # biases start at zero
            variable.assign(rng.normal(0, 0.05, variable.shape).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "tf2onnx")
    parser.add_argument("--applications", type=Path, metavar="DIR", help="export keras.applications models there")
    parser.add_argument("--opset", type=int, default=13, help="with --applications")
    args = parser.parse_args()
    import keras
    import tensorflow as tf
    import tf2onnx

    if args.applications:
        args.out = args.applications
        todo = {name: (make, args.opset) for name, make in applications(keras).items()}
    else:
        todo = {name: (lambda build=build: build(keras), opset) for name, (build, opset) in MODELS.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (name, (build, opset)) in enumerate(todo.items()):
        keras.utils.set_random_seed(i)
        model = build()
        randomise(keras, model, seed=i)
        spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input")]
        function = tf.function(lambda x, model=model: model(x, training=False), input_signature=spec)
        path = args.out / f"{name}_opset{opset}.onnx"
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset, output_path=str(path))
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {len(proto.graph.node)} nodes, "
              f"{path.stat().st_size} bytes, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
              f"tf2onnx {tf2onnx.__version__}")
    if not args.applications:  # tf.keras, exported as its users do, at tf2onnx's default opset
        import tf_keras

        tf.random.set_seed(len(todo))
        model = tf_keras_transformer()
        randomise(tf_keras, model, seed=len(todo))
        path = args.out / "tf_keras_transformer_opset15.onnx"
        proto, _ = tf2onnx.convert.from_keras(model, opset=15, output_path=str(path))
        print(f"{path}: {len(proto.graph.node)} nodes, {path.stat().st_size} bytes, TensorFlow {tf.__version__}, "
              f"tf-keras {tf_keras.__version__}, tf2onnx {tf2onnx.__version__}")
        # through TFLite, as a mobile deployment has it (ReLU: TFLite's GELU op has no converter)
        keras.utils.set_random_seed(len(todo) + 1)
        model = transformer(keras, activation="relu", name="tflite_transformer")
        randomise(keras, model, seed=len(todo) + 1)
        tflite = args.out / "tflite_transformer.tflite"
        tflite.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        path = args.out / "tflite_transformer_opset15.onnx"
        proto, _ = tf2onnx.convert.from_tflite(str(tflite), opset=15, output_path=str(path))
        tflite.unlink()
        print(f"{path}: {len(proto.graph.node)} nodes, {path.stat().st_size} bytes, TensorFlow {tf.__version__} "
              f"(TFLite), Keras {keras.__version__}, tf2onnx {tf2onnx.__version__}")


if __name__ == "__main__":
    main()

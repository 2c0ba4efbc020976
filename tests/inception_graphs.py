"""Inception-like TensorFlow graphs for the tests, built from random weights with the op types, attributes, shapes
and tensor names of the real Inception graph: a plain graph description, its two writers (TensorFlow's protobuf
classes, or tensorboard's copies of them, which need no TensorFlow) and the Inception-v3-shaped builder.

A helper module of the tests (not a test module): tests/test_inception_torch.py checks the reader and the ops on
these graphs, and tests/test_train.py and tests/test_distributed.py write one with `write_inception_like` for the
FID inside training.
"""
import math
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import graph_pb2
from tensorboard.util import tensor_util

import inception_torch as it
from helpers import import_tf_or_skip

FLOAT, INT32, INT64, UINT8, STRING, BOOL, HALF = (it.DT_FLOAT, it.DT_INT32, it.DT_INT64, it.DT_UINT8,
                                                  it.DT_STRING, it.DT_BOOL, it.DT_HALF)


# ==================================================================================================
# Graph description, and two writers: TensorFlow's protobuf classes, or tensorboard's copies of them
# ==================================================================================================

class Type(int):
    """A DataType attribute value."""


class Shape(list):
    """A TensorShapeProto attribute value (-1 for an unknown dimension)."""


class Graph:
    """Nodes as plain data: (name, op, inputs, attrs). Python values map to attribute kinds: bool -> b,
    int -> i, float -> f, str/bytes -> s, Type -> type, Shape -> shape, list of ints -> list(i),
    np.ndarray -> tensor."""

    def __init__(self, producer=8):
        self.nodes = []
        self.producer = producer
        self.count = 0

    def node(self, name, op, inputs=(), **attrs):
        self.nodes.append((name, op, list(inputs), attrs))
        return name

    def const(self, name, value, dtype=None):
        array = np.asarray(value, dtype=dtype)
        if array.dtype.kind in "US":
            array = array.astype(object)
        return self.node(name, "Const", value=array, dtype=Type(dtype_enum(array.dtype)))

    def unique(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def to_bytes(self, writer="tf"):
        return (tf_graph_def(self) if writer == "tf" else plain_graph_def(self)).SerializeToString()


def dtype_enum(dtype):
    if dtype == object:
        return STRING
    return {np.dtype(np.float32): FLOAT, np.dtype(np.int32): INT32, np.dtype(np.int64): INT64,
            np.dtype(np.uint8): UINT8, np.dtype(np.bool_): BOOL, np.dtype(np.float16): HALF,
            np.dtype(np.float64): it.DT_DOUBLE}[np.dtype(dtype)]


def tf_graph_def(graph):
    """The GraphDef built with TensorFlow's protobuf classes and make_tensor_proto."""
    tf = import_tf_or_skip()
    return fill_graph_def(graph, tf.compat.v1.GraphDef(), tf.make_tensor_proto)


def plain_graph_def(graph):
    """The GraphDef built with tensorboard's copies of those classes and of make_tensor_proto (no TensorFlow)."""
    return fill_graph_def(graph, graph_pb2.GraphDef(), tensor_util.make_tensor_proto)


def fill_graph_def(graph, graph_def, make_tensor_proto):
    """`graph`'s nodes written into the empty GraphDef message `graph_def`."""
    graph_def.versions.producer = graph.producer
    for name, op, inputs, attrs in graph.nodes:
        node = graph_def.node.add(name=name, op=op, input=inputs)
        for key, value in attrs.items():
            attr = node.attr[key]
            if isinstance(value, Type):
                attr.type = int(value)
            elif isinstance(value, Shape):
                for size in value:
                    attr.shape.dim.add(size=size)
            elif isinstance(value, bool):
                attr.b = value
            elif isinstance(value, int):
                attr.i = value
            elif isinstance(value, float):
                attr.f = value
            elif isinstance(value, (str, bytes)):
                attr.s = value.encode() if isinstance(value, str) else value
            elif isinstance(value, np.ndarray):
                attr.tensor.CopyFrom(make_tensor_proto(value))
            elif isinstance(value, list):
                attr.list.SetInParent()
                attr.list.i.extend(value)
            else:
                raise TypeError(f"attribute {key}: {value!r}")
    return graph_def


# ==================================================================================================
# An Inception-v3-shaped graph (the 2015 classify_image_graph_def.pb layout) with random weights
# ==================================================================================================

class InceptionLikeBuilder:
    """Node names, op types and attributes as in the real graph: a JPEG decoding head that is never run
    (DecodeJpeg -> Cast -> ExpandDims), ResizeBilinear to 299 x 299 (legacy, no half-pixel centres),
    Sub/Mul normalisation, conv units Conv2D -> BatchNormWithGlobalNormalization -> CheckNumerics /
    Identity with a control input -> Relu, max pools, mixed blocks of the five kinds (35x35, the 35->17
    reduction, 17x17 with 1x7 / 7x1 convolutions, the 17->8 reduction, 8x8 with nested 1x3 / 3x1 joins,
    the last with a max pool tower), joined by the old Concat op with its axis first, pool_3 (8x8 average
    pool), pool_3/_reshape, softmax/logits/MatMul, BiasAdd and Softmax. Channel counts are the real ones
    times `width` (at least 2). Half of the conv units carry TensorFlow 2's explicit default attributes
    (data_format, dilations, explicit_paddings), the others omit them as the 2015 graph does."""

    def __init__(self, rng, width=1 / 16, image_size=299, classes=1008, producer=8):
        self.g = Graph(producer)
        self.rng = rng
        self.width = width
        self.units = 0
        self.image_size = image_size
        self.classes = classes

    def ch(self, n):
        return max(2, int(round(n * self.width)))

    def f32(self, name, array):
        return self.g.const(name, np.asarray(array, np.float32))

    def conv(self, name, x, cin, cout, kh, kw, stride=1, padding="VALID"):
        g, rng = self.g, self.rng
        self.units += 1
        w = rng.normal(size=(kh, kw, cin, cout)) * math.sqrt(2.0 / (kh * kw * cin))
        params = self.f32(f"{name}/conv2d_params", w)
        extra = {}
        if self.units % 2:
            extra = dict(data_format="NHWC", dilations=[1, 1, 1, 1], explicit_paddings=[])
        conv = g.node(f"{name}/Conv2D", "Conv2D", [x, params], T=Type(FLOAT), strides=[1, stride, stride, 1],
                      padding=padding, use_cudnn_on_gpu=True, **extra)
        beta = self.f32(f"{name}/batchnorm/beta", rng.uniform(0.0, 0.4, cout))
        gamma = self.f32(f"{name}/batchnorm/gamma", rng.uniform(0.6, 1.4, cout))
        mean = self.f32(f"{name}/batchnorm/moving_mean", rng.normal(0, 0.2, cout))
        var = self.f32(f"{name}/batchnorm/moving_variance", rng.uniform(0.5, 2.0, cout))
        bn = g.node(f"{name}/batchnorm", "BatchNormWithGlobalNormalization", [conv, mean, var, beta, gamma],
                    T=Type(FLOAT), variance_epsilon=0.001, scale_after_normalization=bool(self.units % 3))
        check = g.node(f"{name}/CheckNumerics", "CheckNumerics", [bn], T=Type(FLOAT),
                       message="batchnorm produced a non-finite value")
        dep = g.node(f"{name}/control_dependency", "Identity", [bn, "^" + check], T=Type(FLOAT))
        return g.node(name, "Relu", [dep], T=Type(FLOAT)), cout

    def pool(self, name, op, x, k, stride, padding):
        g = self.g
        check = g.node(f"{name}/CheckNumerics", "CheckNumerics", [x], T=Type(FLOAT), message="pool input")
        dep = g.node(f"{name}/control_dependency", "Identity", [x, "^" + check], T=Type(FLOAT))
        attrs = dict(ksize=[1, k, k, 1], strides=[1, stride, stride, 1], padding=padding, T=Type(FLOAT))
        if op == "AvgPool":
            attrs["data_format"] = "NHWC"
        return g.node(name, op, [dep], **attrs)

    def join(self, name, parts):
        dim = self.g.const(f"{name}/concat_dim", np.array(3, np.int32))
        return self.g.node(name, "Concat", [dim] + [p for p, _ in parts], N=len(parts), T=Type(FLOAT)), \
            sum(c for _, c in parts)

    def block_a(self, name, x, cin, pool_features):
        c = self.ch
        b0 = self.conv(f"{name}/conv", x, cin, c(64), 1, 1)
        t, ct = self.conv(f"{name}/tower/conv", x, cin, c(48), 1, 1)
        b1 = self.conv(f"{name}/tower/conv_1", t, ct, c(64), 5, 5, padding="SAME")
        t, ct = self.conv(f"{name}/tower_1/conv", x, cin, c(64), 1, 1)
        t, ct = self.conv(f"{name}/tower_1/conv_1", t, ct, c(96), 3, 3, padding="SAME")
        b2 = self.conv(f"{name}/tower_1/conv_2", t, ct, c(96), 3, 3, padding="SAME")
        p = self.pool(f"{name}/tower_2/pool", "AvgPool", x, 3, 1, "SAME")
        b3 = self.conv(f"{name}/tower_2/conv", p, cin, c(pool_features), 1, 1)
        return self.join(f"{name}/join", [b0, b1, b2, b3])

    def block_b(self, name, x, cin):
        c = self.ch
        b0 = self.conv(f"{name}/conv", x, cin, c(384), 3, 3, stride=2)
        t, ct = self.conv(f"{name}/tower/conv", x, cin, c(64), 1, 1)
        t, ct = self.conv(f"{name}/tower/conv_1", t, ct, c(96), 3, 3, padding="SAME")
        b1 = self.conv(f"{name}/tower/conv_2", t, ct, c(96), 3, 3, stride=2)
        p = self.pool(f"{name}/pool", "MaxPool", x, 3, 2, "VALID")
        return self.join(f"{name}/join", [b0, b1, (p, cin)])

    def block_c(self, name, x, cin, c7):
        c = self.ch
        b0 = self.conv(f"{name}/conv", x, cin, c(192), 1, 1)
        t, ct = self.conv(f"{name}/tower/conv", x, cin, c(c7), 1, 1)
        t, ct = self.conv(f"{name}/tower/conv_1", t, ct, c(c7), 1, 7, padding="SAME")
        b1 = self.conv(f"{name}/tower/conv_2", t, ct, c(192), 7, 1, padding="SAME")
        t, ct = self.conv(f"{name}/tower_1/conv", x, cin, c(c7), 1, 1)
        t, ct = self.conv(f"{name}/tower_1/conv_1", t, ct, c(c7), 7, 1, padding="SAME")
        t, ct = self.conv(f"{name}/tower_1/conv_2", t, ct, c(c7), 1, 7, padding="SAME")
        t, ct = self.conv(f"{name}/tower_1/conv_3", t, ct, c(c7), 7, 1, padding="SAME")
        b2 = self.conv(f"{name}/tower_1/conv_4", t, ct, c(192), 1, 7, padding="SAME")
        p = self.pool(f"{name}/tower_2/pool", "AvgPool", x, 3, 1, "SAME")
        b3 = self.conv(f"{name}/tower_2/conv", p, cin, c(192), 1, 1)
        return self.join(f"{name}/join", [b0, b1, b2, b3])

    def block_d(self, name, x, cin):
        c = self.ch
        t, ct = self.conv(f"{name}/tower/conv", x, cin, c(192), 1, 1)
        b0 = self.conv(f"{name}/tower/conv_1", t, ct, c(320), 3, 3, stride=2)
        t, ct = self.conv(f"{name}/tower_1/conv", x, cin, c(192), 1, 1)
        t, ct = self.conv(f"{name}/tower_1/conv_1", t, ct, c(192), 1, 7, padding="SAME")
        t, ct = self.conv(f"{name}/tower_1/conv_2", t, ct, c(192), 7, 1, padding="SAME")
        b1 = self.conv(f"{name}/tower_1/conv_3", t, ct, c(192), 3, 3, stride=2)
        p = self.pool(f"{name}/pool", "MaxPool", x, 3, 2, "VALID")
        return self.join(f"{name}/join", [b0, b1, (p, cin)])

    def block_e(self, name, x, cin, pool_op):
        c = self.ch
        b0 = self.conv(f"{name}/conv", x, cin, c(320), 1, 1)
        t, ct = self.conv(f"{name}/tower/conv", x, cin, c(384), 1, 1)
        b1 = self.join(f"{name}/tower/mixed", [self.conv(f"{name}/tower/mixed/conv", t, ct, c(384), 1, 3, padding="SAME"),
                                              self.conv(f"{name}/tower/mixed/conv_1", t, ct, c(384), 3, 1, padding="SAME")])
        t, ct = self.conv(f"{name}/tower_1/conv", x, cin, c(448), 1, 1)
        t, ct = self.conv(f"{name}/tower_1/conv_1", t, ct, c(384), 3, 3, padding="SAME")
        b2 = self.join(f"{name}/tower_1/mixed", [
            self.conv(f"{name}/tower_1/mixed/conv", t, ct, c(384), 1, 3, padding="SAME"),
            self.conv(f"{name}/tower_1/mixed/conv_1", t, ct, c(384), 3, 1, padding="SAME")])
        p = self.pool(f"{name}/tower_2/pool", pool_op, x, 3, 1, "SAME")
        b3 = self.conv(f"{name}/tower_2/conv", p, cin, c(192), 1, 1)
        return self.join(f"{name}/join", [b0, b1, b2, b3])

    def build(self, blocks="full"):
        g, c, size = self.g, self.ch, self.image_size
        g.const("DecodeJpeg/contents", np.array(TINY_JPEG, dtype=object))
        g.node("DecodeJpeg", "DecodeJpeg", ["DecodeJpeg/contents"], channels=3, ratio=1, fancy_upscaling=True,
               try_recover_truncated=False, acceptable_fraction=1.0, dct_method="")
        g.node("Cast", "Cast", ["DecodeJpeg"], SrcT=Type(UINT8), DstT=Type(FLOAT))
        g.const("ExpandDims/dim", np.array(0, np.int32))
        g.node("ExpandDims", "ExpandDims", ["Cast", "ExpandDims/dim"], T=Type(FLOAT), Tdim=Type(INT32))
        g.const("ResizeBilinear/size", np.array([size, size], np.int32))
        g.node("ResizeBilinear", "ResizeBilinear", ["ExpandDims", "ResizeBilinear/size"], T=Type(FLOAT),
               align_corners=False)
        self.f32("Sub/y", np.array(128.0))
        g.node("Sub", "Sub", ["ResizeBilinear", "Sub/y"], T=Type(FLOAT))
        self.f32("Mul/y", np.array(1 / 128))
        g.node("Mul", "Mul", ["Sub", "Mul/y"], T=Type(FLOAT))
        x, cx = self.conv("conv", "Mul", 3, c(32), 3, 3, stride=2)                  # 149
        x, cx = self.conv("conv_1", x, cx, c(32), 3, 3)                             # 147
        x, cx = self.conv("conv_2", x, cx, c(64), 3, 3, padding="SAME")             # 147
        x = self.pool("pool", "MaxPool", x, 3, 2, "VALID")                          # 73
        x, cx = self.conv("conv_3", x, cx, c(80), 1, 1)
        x, cx = self.conv("conv_4", x, cx, c(192), 3, 3)                            # 71
        x = self.pool("pool_1", "MaxPool", x, 3, 2, "VALID")                        # 35
        names = {"full": ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7",
                          "mixed_8", "mixed_9", "mixed_10"),
                 "small": ("mixed", "mixed_3", "mixed_6", "mixed_8", "mixed_9", "mixed_10")}[blocks]
        kinds = {"mixed": ("a", 32), "mixed_1": ("a", 64), "mixed_2": ("a", 64), "mixed_3": ("b",),
                 "mixed_4": ("c", 128), "mixed_5": ("c", 160), "mixed_6": ("c", 160), "mixed_7": ("c", 192),
                 "mixed_8": ("d",), "mixed_9": ("e", "AvgPool"), "mixed_10": ("e", "MaxPool")}
        for name in names:
            kind, *args = kinds[name]
            x, cx = getattr(self, f"block_{kind}")(name, x, cx, *args)
        final = spatial_size(size)
        g.node("pool_3", "AvgPool", [x], ksize=[1, final, final, 1], strides=[1, 1, 1, 1], padding="VALID",
               data_format="NHWC", T=Type(FLOAT))
        g.const("pool_3/_reshape/shape", np.array([1, cx], np.int32))
        g.node("pool_3/_reshape", "Reshape", ["pool_3", "pool_3/_reshape/shape"], T=Type(FLOAT), Tshape=Type(INT32))
        self.f32("softmax/weights", self.rng.normal(size=(cx, self.classes)) * 2 / math.sqrt(cx))
        g.node("softmax/logits/MatMul", "MatMul", ["pool_3/_reshape", "softmax/weights"], T=Type(FLOAT),
               transpose_a=False, transpose_b=False)
        self.f32("softmax/biases", self.rng.normal(size=self.classes) * 0.1)
        g.node("softmax/logits", "BiasAdd", ["softmax/logits/MatMul", "softmax/biases"], T=Type(FLOAT))
        g.node("softmax", "Softmax", ["softmax/logits"], T=Type(FLOAT))
        return g


def spatial_size(size):
    """Side of mixed_10's output for an input resized to `size` (the stem and the two reductions)."""
    valid = lambda n, k, s: (n - k) // s + 1  # noqa: E731
    n = valid(valid(valid(size, 3, 2), 3, 1), 3, 2)   # conv, conv_1, (conv_2 SAME), pool
    n = valid(valid(n, 3, 1), 3, 2)                   # conv_4, pool_1 -> 35
    return valid(valid(n, 3, 2), 3, 2)                # mixed_3, mixed_8 -> 8


# The content of DecodeJpeg/contents: never decoded (the evaluator feeds ExpandDims:0), so any bytes do.
TINY_JPEG = b"\xff\xd8\xff\xe0 placeholder for a JPEG \xff\xd9"


def write_inception_like(path, seed=0, writer="tf", **kwargs):
    """An Inception-like graph (InceptionLikeBuilder's `kwargs`, its "small" blocks unless `blocks` says otherwise)
    written to `path` by `writer` ("tf", or "plain": no TensorFlow needed); returns the path."""
    blocks = kwargs.pop("blocks", "small")
    graph = InceptionLikeBuilder(np.random.default_rng(seed), **kwargs).build(blocks)
    Path(path).write_bytes(graph.to_bytes(writer))
    return Path(path)

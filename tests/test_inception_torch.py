"""Tests of the PyTorch backend (inception_torch.py): the GraphDef reader, the op semantics, and equality
with TensorFlow on graphs built by tests/inception_graphs.py from random weights with the op types, attributes,
shapes and tensor names of the Inception graph (no download: the real graph is only fetched by the evaluator's
own option).

Tests that need TensorFlow skip without it; the others use that module's small protobuf writer and
NumPy oracles written from TensorFlow's definitions, and `test_torch_tests_pass_without_tensorflow` runs
them in a subprocess where importing TensorFlow fails.
"""
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tensorboard.compat.proto import tensor_pb2

import evaluator as ev
import inception_torch as it
from helpers import import_tf_or_skip
from inception_graphs import BOOL, FLOAT, HALF, INT32, INT64, Graph, InceptionLikeBuilder, Shape, Type, write_inception_like

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # the "1e-4 relative": max |torch - tf| / max |tf|
pytestmark = pytest.mark.usefixtures("isolated")  # conftest.py: no network, own cache, fresh memo


def random_images(seed, n, height, width=None, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, size=(n, height, width or height, 3), dtype=np.uint8)


def run_tf(graph_bytes, feeds, fetches):
    """Plain TensorFlow session run of a serialized GraphDef."""
    tf = import_tf_or_skip()
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_bytes)
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run(fetches, feeds)


def run_torch(graph_bytes, feeds, fetches, device="cpu"):
    function = it.GraphFunction(it.parse_graph_def(graph_bytes), list(feeds), fetches, device)
    return [t.cpu().numpy() for t in function(*feeds.values())]


def rel(got, want):
    return ev.relative_difference(got, want)


# ==================================================================================================
# GraphDef reader
# ==================================================================================================

def test_reader_matches_tensorflow_parse(tf):
    """Every attribute kind and tensor encoding, written by TensorFlow, read back equal."""
    g = Graph(producer=27)
    arrays = {
        "f_content": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "f_scalar": np.array(-2.5, np.float32),
        "i32": np.array([[-3, 0], [7, 2**31 - 1]], np.int32),
        "i64": np.array([-(2**40), 5], np.int64),
        "u8": np.array([0, 255, 17], np.uint8),
        "half": np.array([1.5, -0.25, 65504], np.float16),
        "bools": np.array([True, False, True]),
        "strings": np.array([b"abc", b"", b"\xff\x00"], dtype=object),
        "empty": np.zeros((0, 3), np.float32),
    }
    for name, array in arrays.items():
        g.const(name, array)
    g.node("attrs", "NoOp", [], a_i=-7, a_f=0.1, a_b=True, a_s="SAME", a_type=Type(INT64), a_shape=Shape([-1, 299, 3]),
           a_list=[1, -2, 3], a_empty=[])
    data = g.to_bytes("tf")
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(data)
    parsed = it.parse_graph_def(data)
    assert parsed.producer == 27 and [n.name for n in parsed.nodes] == [n.name for n in graph_def.node]
    for node in graph_def.node:
        mine = parsed[node.name]
        assert (mine.op, mine.inputs) == (node.op, list(node.input))
        if node.op == "Const":
            want = tf.make_ndarray(node.attr["value"].tensor)
            got = mine.attr["value"].value.numpy()
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    attrs = {k: v.value for k, v in parsed["attrs"].attr.items()}
    assert attrs["a_i"] == -7 and attrs["a_b"] is True and attrs["a_s"] == b"SAME" and attrs["a_type"] == INT64
    assert attrs["a_f"] == pytest.approx(0.1, rel=1e-7) and attrs["a_list"] == [1, -2, 3] and attrs["a_empty"] == []
    assert attrs["a_shape"].dims == [-1, 299, 3]


def test_plain_writer_is_read_as_tensorflow_reads_it(tf):
    """The test's own wire-format writer (used by the tests that run without TensorFlow) produces graphs
    TensorFlow parses to the same nodes."""
    graph = InceptionLikeBuilder(np.random.default_rng(0), width=1 / 32).build("small")
    plain, official = tf.compat.v1.GraphDef(), tf.compat.v1.GraphDef()
    plain.ParseFromString(graph.to_bytes("plain"))
    official.ParseFromString(graph.to_bytes("tf"))
    assert len(plain.node) == len(official.node)
    for a, b in zip(plain.node, official.node):
        assert (a.name, a.op, list(a.input)) == (b.name, b.op, list(b.input))
        assert set(a.attr) == set(b.attr)
        for key in a.attr:
            if a.attr[key].HasField("tensor"):
                np.testing.assert_array_equal(tf.make_ndarray(a.attr[key].tensor), tf.make_ndarray(b.attr[key].tensor))
            else:
                assert a.attr[key] == b.attr[key], (a.name, key)


def test_tensor_values_follow_tensorflows_rules():
    """TensorFlow's rule that fewer values than elements repeat the last one (none at all: zeros or False), which
    tensorboard's make_ndarray alone does not follow; too many values, a tensor_content of the wrong size, a dtype
    the reader does not convert and bytes that are not a GraphDef are refused."""
    def tensor(dtype, dims, field, values=(), content=b""):
        proto = tensor_pb2.TensorProto(dtype=dtype, tensor_content=content)
        for size in dims:
            proto.tensor_shape.dim.add(size=size)
        getattr(proto, field).extend(values)
        return it.TensorValue(proto).numpy()

    got = tensor(FLOAT, [2, 3], "float_val", [1.5, -2.0])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[1.5, -2.0, -2.0], [-2.0, -2.0, -2.0]])
    np.testing.assert_array_equal(tensor(INT32, [3], "int_val", [-5, 2**31 - 1]), [-5, 2**31 - 1, 2**31 - 1])
    np.testing.assert_array_equal(tensor(INT64, [2], "int64_val", [-(2**62)]), [-(2**62)] * 2)
    np.testing.assert_array_equal(tensor(FLOAT, [2, 2], "float_val"), np.zeros((2, 2)))
    np.testing.assert_array_equal(tensor(BOOL, [3], "bool_val"), [False] * 3)
    half_bits = int(np.array(0.333, np.float16).view(np.uint16))
    assert tensor(HALF, [], "half_val", [half_bits]) == np.float16(0.333)
    with pytest.raises(it.GraphError, match="3 values for shape"):
        tensor(FLOAT, [2], "float_val", [1.5, -2.0, 1.5])
    with pytest.raises(it.GraphError, match="tensor_content of 7 bytes for shape"):
        tensor(FLOAT, [2], "float_val", content=b"\0" * 7)
    with pytest.raises(it.GraphError, match="unsupported dtype uint32"):
        tensor(it.DT_UINT32, [1], "uint32_val", [3])
    for junk in (b"not a graph", b"\x0a\xff\xff"):
        with pytest.raises(it.GraphError):
            it.parse_graph_def(junk)


# ==================================================================================================
# Op semantics against NumPy oracles written from TensorFlow's definitions (no TensorFlow needed)
# ==================================================================================================

def numpy_resize_bilinear(images, out_h, out_w):
    """TensorFlow's legacy ResizeBilinear (align_corners and half_pixel_centers false), element by element:
    source = float32(dst) * float32(in / out); lower = floor, upper = min(ceil, in - 1);
    top = tl + (tr - tl) * dx; bottom = bl + (br - bl) * dx; out = top + (bottom - top) * dy."""
    n, in_h, in_w, c = images.shape
    out = np.empty((n, out_h, out_w, c), np.float32)
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    for y in range(out_h):
        fy = np.float32(y) * sy
        y0, y1, dy = int(math.floor(fy)), min(int(math.ceil(fy)), in_h - 1), np.float32(fy - np.floor(fy))
        for x in range(out_w):
            fx = np.float32(x) * sx
            x0, x1, dx = int(math.floor(fx)), min(int(math.ceil(fx)), in_w - 1), np.float32(fx - np.floor(fx))
            tl, tr, bl, br = (images[:, a, b].astype(np.float32) for a, b in ((y0, x0), (y0, x1), (y1, x0), (y1, x1)))
            top = tl + (tr - tl) * dx
            bottom = bl + (br - bl) * dx
            out[:, y, x] = top + (bottom - top) * dy
    return out


def same_pads(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def numpy_window_op(x, k, s, padding, reduce):
    """Sliding-window reduction of NHWC x over SAME or VALID windows; `reduce` gets the in-bounds cells
    of each window only (so an average excludes the padding, a max never sees it)."""
    n, h, w, c = x.shape
    (pt, pb), (pl, pr) = ((same_pads(h, k[0], s[0]), same_pads(w, k[1], s[1])) if padding == "SAME"
                          else ((0, 0), (0, 0)))
    oh, ow = (h + pt + pb - k[0]) // s[0] + 1, (w + pl + pr - k[1]) // s[1] + 1
    out = np.empty((n, oh, ow, c), np.float64)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s[0] - pt, j * s[1] - pl
            window = x[:, max(r0, 0):min(r0 + k[0], h), max(c0, 0):min(c0 + k[1], w)]
            out[:, i, j] = reduce(window.reshape(n, -1, c))
    return out


def numpy_conv(x, w, s, padding):
    kh, kw = w.shape[:2]
    n, h, width, c = x.shape
    (pt, pb), (pl, pr) = ((same_pads(h, kh, s[0]), same_pads(width, kw, s[1])) if padding == "SAME"
                          else ((0, 0), (0, 0)))
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh, ow = (h + pt + pb - kh) // s[0] + 1, (width + pl + pr - kw) // s[1] + 1
    out = np.zeros((n, oh, ow, w.shape[3]))
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a:a + (oh - 1) * s[0] + 1:s[0], b:b + (ow - 1) * s[1] + 1:s[1]]
            out += patch @ w[a, b].astype(np.float64)
    return out


def test_same_padding_split():
    assert it.same_padding(147, 3, 1) == (1, 1)
    assert it.same_padding(148, 3, 2) == (0, 1)     # the odd cell goes after
    assert it.same_padding(17, 7, 1) == (3, 3)
    assert it.same_padding(8, 4, 2) == (1, 1)
    assert it.same_padding(9, 2, 3) == (0, 0)
    assert it.same_padding(10, 5, 3) == (2, 2)
    assert it.same_padding(10, 4, 3) == (1, 2)
    assert it.same_padding(5, 3, 1, dilation=2) == (2, 2)


def small_graph():
    g = Graph()
    g.node("x", "Placeholder", dtype=Type(FLOAT))
    return g


@pytest.mark.parametrize("in_size, out_size", [((7, 5), (13, 11)), ((13, 11), (7, 5)), ((6, 6), (6, 6)),
                                               ((3, 8), (299, 299))])
def test_resize_bilinear_legacy_matches_numpy(in_size, out_size, device):
    g = small_graph()
    g.const("size", np.array(out_size, np.int32))
    g.node("r", "ResizeBilinear", ["x", "size"], T=Type(FLOAT), align_corners=False, half_pixel_centers=False)
    images = random_images(0, 2, *in_size).astype(np.float32)
    (got,) = run_torch(g.to_bytes("plain"), {"x:0": images}, ["r:0"], device)
    want = numpy_resize_bilinear(images, *out_size)
    if device.type == "cpu":
        np.testing.assert_array_equal(got, want)  # same float32 operations in the same order
    else:  # CUDA's compiler contracts a * b + c into one fused multiply-add (one rounding fewer): float32 rounding
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)  # of pixel values up to 255


@pytest.mark.parametrize("k, s, size", [((3, 3), (1, 1), (9, 9)), ((3, 3), (2, 2), (10, 9)), ((2, 2), (2, 2), (7, 8)),
                                        ((1, 7), (1, 1), (6, 9)), ((4, 3), (3, 2), (11, 10))])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_and_pools_match_numpy(k, s, size, padding, device):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, *size, 3)).astype(np.float32)
    w = rng.normal(size=(*k, 3, 4)).astype(np.float32)
    g = small_graph()
    g.const("w", w)
    g.node("conv", "Conv2D", ["x", "w"], T=Type(FLOAT), strides=[1, *s, 1], padding=padding)
    for op in ("MaxPool", "AvgPool"):
        g.node(op, op, ["x"], T=Type(FLOAT), ksize=[1, *k, 1], strides=[1, *s, 1], padding=padding)
    conv, max_pool, avg_pool = run_torch(g.to_bytes("plain"), {"x:0": x}, ["conv:0", "MaxPool:0", "AvgPool:0"],
                                         device)
    np.testing.assert_allclose(conv, numpy_conv(x, w, s, padding), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(max_pool, numpy_window_op(x, k, s, padding, lambda v: v.max(axis=1)))
    np.testing.assert_allclose(avg_pool, numpy_window_op(x, k, s, padding, lambda v: v.mean(axis=1)), rtol=1e-6, atol=1e-6)


def test_batch_norm_concat_and_head_match_numpy(device):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    mean, beta = rng.normal(size=(2, 6)).astype(np.float32)
    var, gamma = rng.uniform(0.5, 2, size=(2, 6)).astype(np.float32)
    w = rng.normal(size=(6, 9)).astype(np.float32)
    g = small_graph()
    for name, value in dict(mean=mean, var=var, beta=beta, gamma=gamma, w=w).items():
        g.const(name, value)
    g.const("axis", np.array(3, np.int32))
    g.const("neg_axis", np.array(-1, np.int32))
    g.const("shape", np.array([-1, 6], np.int32))
    for flag in (True, False):
        g.node(f"bn_{flag}", "BatchNormWithGlobalNormalization", ["x", "mean", "var", "beta", "gamma"], T=Type(FLOAT),
               variance_epsilon=0.001, scale_after_normalization=flag)
    g.node("join", "Concat", ["axis", "bn_True", "x", "bn_False"], N=3, T=Type(FLOAT))
    g.node("join_v2", "ConcatV2", ["x", "bn_True", "neg_axis"], N=2, T=Type(FLOAT), Tidx=Type(INT32))
    g.node("flat", "Reshape", ["x", "shape"], T=Type(FLOAT), Tshape=Type(INT32))
    g.node("logits", "MatMul", ["flat", "w"], T=Type(FLOAT), transpose_a=False, transpose_b=False)
    g.node("probs", "Softmax", ["logits"], T=Type(FLOAT))
    join, join_v2, probs = run_torch(g.to_bytes("plain"), {"x:0": x}, ["join:0", "join_v2:0", "probs:0"], device)
    bn_scaled = (x - mean) / np.sqrt(var + 0.001) * gamma + beta
    bn_plain = (x - mean) / np.sqrt(var + 0.001) + beta
    np.testing.assert_allclose(join, np.concatenate([bn_scaled, x, bn_plain], axis=3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(join_v2, np.concatenate([x, bn_scaled], axis=3), rtol=1e-5, atol=1e-5)
    logits = x.reshape(-1, 6).astype(np.float64) @ w
    want = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


# ==================================================================================================
# Refusals
# ==================================================================================================

@pytest.mark.parametrize("op, attrs, inputs, problem", [
    ("Erf", dict(T=Type(FLOAT)), ["x"], r"node 'y': op 'Erf' is not implemented"),
    ("Conv2D", dict(T=Type(FLOAT), strides=[1, 1, 1, 1], padding="SAME", data_format="NCHW"), ["x", "w"],
     r"node 'y' \(op Conv2D\): attribute 'data_format' = 'NCHW' is not implemented"),
    ("Conv2D", dict(T=Type(FLOAT), strides=[1, 1, 1, 1], padding="SAME", data_format="NHWC", dilations=[2, 1, 1, 1]),
     ["x", "w"], r"node 'y' \(op Conv2D\): attribute 'dilations' = \[2, 1, 1, 1\]"),
    ("Conv2D", dict(T=Type(FLOAT), strides=[1, 1, 1, 1], padding="SAME", fancy=True), ["x", "w"],
     r"node 'y' \(op Conv2D\): attribute 'fancy' = True is not implemented"),
    ("Conv2D", dict(T=Type(FLOAT), padding="SAME"), ["x", "w"], r"node 'y' \(op Conv2D\): attribute 'strides' is missing"),
    ("Conv2D", dict(T=Type(HALF), strides=[1, 1, 1, 1], padding="SAME"), ["x", "w"],
     r"node 'y' \(op Conv2D\): attribute 'T' = float16 is not implemented"),
    ("AvgPool", dict(T=Type(FLOAT), ksize=[1, 3, 3, 1], strides=[1, 1, 1, 1], padding="EXPLICIT"), ["x"],
     r"node 'y' \(op AvgPool\): attribute 'padding' = 'EXPLICIT' is not implemented"),
    ("MaxPool", dict(T=Type(FLOAT), ksize=[2, 3, 3, 1], strides=[1, 1, 1, 1], padding="VALID"), ["x"],
     r"node 'y' \(op MaxPool\): attribute 'ksize' = \[2, 3, 3, 1\]"),
    ("FusedBatchNormV3", dict(T=Type(FLOAT), U=Type(FLOAT), is_training=True), ["x", "w", "w", "w", "w"],
     r"node 'y' \(op FusedBatchNormV3\): attribute 'is_training' = True is not implemented"),
])
def test_unsupported_ops_and_attributes_are_refused(op, attrs, inputs, problem):
    g = small_graph()
    g.const("w", np.ones((1, 1, 3, 3), np.float32))
    g.node("y", op, inputs, **attrs)
    g.node("out", "Identity", ["y"], T=Type(FLOAT))
    with pytest.raises(it.GraphError, match=problem):
        it.GraphFunction(it.parse_graph_def(g.to_bytes("plain")), ["x:0"], ["out:0"])


def test_resize_with_both_alignment_flags_is_refused():
    g = small_graph()
    g.const("size", np.array([4, 4], np.int32))
    g.node("r", "ResizeBilinear", ["x", "size"], T=Type(FLOAT), align_corners=True, half_pixel_centers=True)
    function = it.GraphFunction(it.parse_graph_def(g.to_bytes("plain")), ["x:0"], ["r:0"])
    with pytest.raises(it.GraphError, match=r"node 'r' \(ResizeBilinear\).*cannot both be True"):
        function(np.zeros((1, 3, 3, 3), np.float32))


def test_only_the_fed_to_fetched_subgraph_is_checked(tmp_path):
    """The JPEG head (DecodeJpeg, not implemented) is upstream of the fed ExpandDims:0 and never looked at;
    fetching through it is refused."""
    data = write_inception_like(tmp_path / "g.pb", width=1 / 32, writer="plain").read_bytes()
    graph = it.parse_graph_def(data)
    it.GraphFunction(graph, ["ExpandDims:0"], ["pool_3:0"])
    with pytest.raises(it.GraphError, match="op 'DecodeJpeg' is not implemented"):
        it.GraphFunction(graph, [], ["pool_3:0"])
    with pytest.raises(it.GraphError, match="no node 'nope'"):
        it.GraphFunction(graph, ["ExpandDims:0"], ["nope:0"])


def test_check_numerics_stops_on_non_finite_values(tmp_path, device):
    path = write_inception_like(tmp_path / "g.pb", width=1 / 32, writer="plain")
    images = random_images(0, 2, 20).astype(np.float32)
    images[1, 3, 4, 0] = np.nan
    with pytest.raises(it.GraphError, match="CheckNumerics: batchnorm produced a non-finite value : Tensor had NaN"):
        it.TorchInception(path, device=device).features_of(images)


# ==================================================================================================
# Folded conv units (the default) against the node-by-node run
# ==================================================================================================

def plan_ops(function):
    return [spec is it.CONV_UNIT and "ConvUnit" or node.op for node, _, _, _, spec in function._plan]


def test_folded_conv_units_agree_with_the_unfolded_run(tmp_path, device):
    """Every conv unit of the Inception-shaped graph (all eleven blocks) becomes one step; the features agree
    with the node-by-node run to 1e-5 relative."""
    path = write_inception_like(tmp_path / "g.pb", seed=3, writer="plain", blocks="full", image_size=139)
    images = random_images(1, 3, 150, 120)
    folded, unfolded = it.TorchInception(path, device=device), it.TorchInception(path, device=device, fold=False)
    got, want = folded.features_of(images), unfolded.features_of(images)
    for name, a, b in zip(ev.FEATURE_NAMES, got, want):
        assert rel(a, b) < 1e-5, (name, rel(a, b))
        assert not np.array_equal(a, b) or name == "probs"  # the rounding does differ
    ops = plan_ops(folded._function)
    assert ops.count("ConvUnit") == plan_ops(unfolded._function).count("Conv2D") == 94
    assert not {"Conv2D", "BatchNormWithGlobalNormalization", "Relu"} & set(ops)


def test_folding_follows_what_the_op_sequence_allows(device):
    """A batch norm output that is also fetched keeps its Relu separate; a convolution output read twice is
    not folded; a Relu straight after the batch norm joins the step. Results equal the unfolded run."""
    rng = np.random.default_rng(4)
    g = small_graph()
    for i in range(3):
        g.const(f"w{i}", rng.normal(size=(3, 3, 3, 3)).astype(np.float32))
        for name, value in dict(mean=rng.normal(size=3), var=rng.uniform(0.5, 2, 3), beta=rng.normal(size=3),
                                gamma=rng.uniform(0.5, 2, 3)).items():
            g.const(f"{name}{i}", value.astype(np.float32))
        g.node(f"conv{i}", "Conv2D", ["x", f"w{i}"], T=Type(FLOAT), strides=[1, 1, 1, 1], padding="SAME")
        g.node(f"bn{i}", "BatchNormWithGlobalNormalization",
               [f"conv{i}", f"mean{i}", f"var{i}", f"beta{i}", f"gamma{i}"], T=Type(FLOAT), variance_epsilon=0.001,
               scale_after_normalization=True)
        g.node(f"relu{i}", "Relu", [f"bn{i}"], T=Type(FLOAT))
    g.node("twice", "Add", ["conv1", "conv1"], T=Type(FLOAT))
    fetches = ["relu0:0", "bn0:0", "relu1:0", "twice:0", "relu2:0"]
    graph = it.parse_graph_def(g.to_bytes("plain"))
    x = rng.normal(size=(2, 9, 8, 3)).astype(np.float32)
    folded = it.GraphFunction(graph, ["x:0"], fetches, device, fold=True)
    assert plan_ops(folded) == ["ConvUnit", "Relu", "Conv2D", "BatchNormWithGlobalNormalization", "Relu", "Add",
                                "ConvUnit"]
    unfolded = it.GraphFunction(graph, ["x:0"], fetches, device)
    for name, a, b in zip(fetches, folded(x), unfolded(x)):
        assert rel(a.cpu().numpy(), b.cpu().numpy()) < 1e-6, name


# ==================================================================================================
# Equality with TensorFlow
# ==================================================================================================

def _spatial_ops(g, rng, out):
    """Convolutions, pools and resizes of the 3-channel input x: odd and even sizes, strides 1-3, asymmetric SAME
    padding, dilation, explicit padding, up- and down-sampling with each alignment mode."""
    for i, (k, s, padding) in enumerate([((3, 3), 2, "SAME"), ((2, 2), 2, "SAME"), ((4, 4), 3, "SAME"),
                                         ((1, 7), 1, "SAME"), ((7, 1), 1, "SAME"), ((5, 5), 1, "SAME"),
                                         ((3, 3), 2, "VALID"), ((1, 1), 1, "VALID")]):
        g.const(f"w{i}", rng.normal(size=(*k, 3, 4)).astype(np.float32))
        out(g.node(f"conv{i}", "Conv2D", ["x", f"w{i}"], T=Type(FLOAT), strides=[1, s, s, 1], padding=padding))
        for op in ("MaxPool", "AvgPool"):
            out(g.node(f"{op}{i}", op, ["x"], T=Type(FLOAT), ksize=[1, *k, 1], strides=[1, s, s, 1], padding=padding))
    g.const("w_dil", rng.normal(size=(3, 3, 3, 2)).astype(np.float32))
    out(g.node("conv_dilated", "Conv2D", ["x", "w_dil"], T=Type(FLOAT), strides=[1, 1, 1, 1], padding="SAME",
               dilations=[1, 2, 2, 1], data_format="NHWC"))
    out(g.node("conv_explicit", "Conv2D", ["x", "w_dil"], T=Type(FLOAT), strides=[1, 2, 1, 1], padding="EXPLICIT",
               explicit_paddings=[0, 0, 1, 2, 0, 3, 0, 0]))
    for size in ((299, 299), (7, 4), (10, 9), (23, 5)):
        g.const(f"size_{size[0]}_{size[1]}", np.array(size, np.int32))
        for align, half in ((False, False), (True, False), (False, True)):
            out(g.node(f"resize_{size[0]}_{size[1]}_{align}_{half}", "ResizeBilinear",
                       ["x", f"size_{size[0]}_{size[1]}"], T=Type(FLOAT), align_corners=align, half_pixel_centers=half))


def _pointwise_and_shape_ops(g, rng, out):
    """Batch norms, concatenations, unary and binary element-wise ops, reductions, matmul and shape ops of x."""
    for name, value in dict(mean=rng.normal(size=3), var=rng.uniform(0.1, 2, 3), beta=rng.normal(size=3),
                            gamma=rng.normal(size=3), bias_values=rng.normal(size=3)).items():
        g.const(name, value.astype(np.float32))
    for flag in (True, False):
        out(g.node(f"bn_{flag}", "BatchNormWithGlobalNormalization", ["x", "mean", "var", "beta", "gamma"],
                   T=Type(FLOAT), variance_epsilon=0.001, scale_after_normalization=flag))
    out(g.node("fused", "FusedBatchNormV3", ["x", "gamma", "beta", "mean", "var"], T=Type(FLOAT), U=Type(FLOAT),
               epsilon=0.001, is_training=False, data_format="NHWC"))
    g.const("two", np.array(2, np.int32))
    g.const("minus_one", np.array(-1, np.int32))
    out(g.node("concat", "Concat", ["two", "x", "x"], N=2, T=Type(FLOAT)))
    out(g.node("concat_v2", "ConcatV2", ["x", "bn_True", "x", "minus_one"], N=3, T=Type(FLOAT), Tidx=Type(INT32)))
    out(g.node("bias_add", "BiasAdd", ["x", "bias_values"], T=Type(FLOAT), data_format="NHWC"))
    for op in ("Relu", "Relu6", "Softplus", "Rsqrt", "Sigmoid", "Tanh", "Square", "Neg", "Softmax"):
        out(g.node(f"u_{op}", op, ["x"], T=Type(FLOAT)))
    g.const("c", rng.uniform(1, 2, size=(9, 3)).astype(np.float32))
    for op in ("Add", "AddV2", "Sub", "Mul", "RealDiv", "Maximum", "Minimum", "SquaredDifference"):
        out(g.node(f"b_{op}", op, ["x", "c"], T=Type(FLOAT)))
    g.const("axes", np.array([1, 2], np.int32))
    for op in ("Mean", "Sum", "Max"):
        out(g.node(op, op, ["x", "axes"], T=Type(FLOAT), Tidx=Type(INT32), keep_dims=op == "Mean"))
    g.const("flat_shape", np.array([-1, 27], np.int32))
    g.node("flat", "Reshape", ["x", "flat_shape"], T=Type(FLOAT), Tshape=Type(INT32))
    g.const("wm", rng.normal(size=(5, 27)).astype(np.float32))
    out(g.node("matmul_t", "MatMul", ["flat", "wm"], T=Type(FLOAT), transpose_a=False, transpose_b=True))
    out(g.node("squeeze", "Squeeze", ["Mean"], T=Type(FLOAT), squeeze_dims=[1, 2]))
    g.const("zero", np.array(0, np.int32))
    out(g.node("expand", "ExpandDims", ["x", "zero"], T=Type(FLOAT), Tdim=Type(INT32)))
    g.const("paddings", np.array([[0, 0], [1, 2], [0, 1], [0, 0]], np.int32))
    out(g.node("pad", "Pad", ["x", "paddings"], T=Type(FLOAT), Tpaddings=Type(INT32)))
    g.node("shape", "Shape", ["x"], T=Type(FLOAT), out_type=Type(INT32))
    for name, value in dict(b0=[0], b1=[1], s1=[1]).items():
        g.const(name, np.array(value, np.int32))
    g.node("batch", "StridedSlice", ["shape", "b0", "b1", "s1"], T=Type(INT32), Index=Type(INT32), shrink_axis_mask=1)
    g.node("packed", "Pack", ["batch", "minus_one"], T=Type(INT32), N=2, axis=0)
    out(g.node("reshape_dynamic", "Reshape", ["x", "packed"], T=Type(FLOAT), Tshape=Type(INT32)))


def test_ops_match_tensorflow(tf):
    """One graph with many branches from one input: every implemented op (_spatial_ops,
    _pointwise_and_shape_ops) against TensorFlow."""
    rng = np.random.default_rng(3)
    g = small_graph()
    x = rng.uniform(-2, 3, size=(2, 10, 9, 3)).astype(np.float32)
    fetches = []

    def out(name):
        fetches.append(name + ":0")
        return name

    _spatial_ops(g, rng, out)
    _pointwise_and_shape_ops(g, rng, out)
    data = g.to_bytes("tf")
    want = run_tf(data, {"x:0": x}, fetches)
    got = run_torch(data, {"x:0": x}, fetches)
    worst = {}
    for name, a, b in zip(fetches, got, want):
        assert a.shape == b.shape, name
        worst[name] = rel(a, b)
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    # The legacy resize and the pools are the same float32 operations: bit for bit.
    for name, a, b in zip(fetches, got, want):
        if name.startswith(("resize", "MaxPool")):
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.fixture(scope="module")
def inception_like(tf, tmp_path_factory):
    """The Inception-shaped graph (all eleven mixed blocks, channels / 16), written by TensorFlow."""
    return write_inception_like(tmp_path_factory.mktemp("graph") / "inception_like.pb", seed=5, blocks="full")


@pytest.fixture(scope="module")
def tf_features(inception_like):
    features = ev.InceptionFeatures(inception_like)
    yield features
    features.close()


@pytest.fixture(scope="module")
def torch_features(inception_like):
    features = it.TorchInception(inception_like, device="cpu")
    yield features
    features.close()


@pytest.mark.parametrize("height, width", [(64, 64), (299, 299), (333, 310), (37, 80)])
def test_inception_like_features_match_tensorflow(tf_features, torch_features, height, width):
    images = random_images(height + width, 6, height, width)
    want = tf_features.compute(images, batch_size=4)
    got = torch_features.compute(images, batch_size=4)
    for name, a, b in zip(ev.FEATURE_NAMES, got, want):
        assert a.shape == b.shape, name
        assert rel(a, b) < TOLERANCE, (name, rel(a, b))
        assert np.std(b) > 0, name  # not a degenerate (all-dead) network
    assert got[0].shape[1] == want[0].shape[1] and got[1].shape[1] == 17 * 17 * 7 and got[2].shape[1] == 1008


@pytest.fixture(scope="module")
def inception_like_139(tf, tmp_path_factory):
    """The same architecture resized to 139 x 139: mixed_6 is 7 x 7, so sFID's covariances are 343 x 343
    (17 x 17 x 7 = 2023 at 299, where each scipy sqrtm takes ~10 s on two cores)."""
    return write_inception_like(tmp_path_factory.mktemp("graph") / "inception_like_139.pb", seed=6, blocks="full",
                                image_size=139)


def test_metrics_equal_to_printed_digits(inception_like_139, tmp_path):
    """The whole evaluation, once per backend: the same eval_results.txt lines (IS, FID, sFID, precision and
    recall to the printed digits), with the ADM float16 and the float32 precision/recall."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(20, 150, 48))
    lines = {}
    backends = {"tf": ev.InceptionFeatures(inception_like_139), "torch": it.TorchInception(inception_like_139, "cpu")}
    for pr_float32 in (False, True):
        for name, features in backends.items():
            samples = tmp_path / f"samples_{name}_{pr_float32}"
            samples.mkdir()
            np.savez(samples / "a.npz", arr_0=random_images(21, 80, 40))
            np.savez(samples / "b.npz", arr_0=random_images(22, 90, 56, low=30))
            ev._REFERENCE_MEMO.clear()
            ev.evaluate_folder(ref, samples, batch_size=50, cache_dir=tmp_path / "cache", features=features,
                               pr_float32=pr_float32)
            lines[name, pr_float32] = (samples / "eval_results.txt").read_text()
        assert lines["tf", pr_float32] == lines["torch", pr_float32]
    backends["tf"].close()
    assert lines["tf", False].count("\n") == 2
    # The reference activations were cached once per backend.
    assert len(list((tmp_path / "cache" / "ref_activations").glob("*.npz"))) == 2


def test_self_check_against_tensorflow(inception_like, monkeypatch, caplog):
    images = random_images(7, 5, 30)
    features = ev.make_feature_extractor("torch", inception_like, device="cpu")
    assert isinstance(features, it.TorchInception) and isinstance(features.first_batch_check, ev.TensorFlowCheck)
    check = features.first_batch_check
    with caplog.at_level("INFO", logger="evaluator"):
        features.compute(images, batch_size=3)
    assert max(check.differences.values()) < TOLERANCE and "matches TensorFlow" in caplog.text
    assert features.first_batch_check is None  # once per run

    # A backend whose convolutions (folded or not) drift by 1e-3 is stopped with a message naming the
    # difference and the way out.
    original = it.conv2d_nhwc
    monkeypatch.setattr(it, "conv2d_nhwc", lambda *args, **kwargs: original(*args, **kwargs) * 1.001)
    features = ev.make_feature_extractor("torch", inception_like, device="cpu")
    with pytest.raises(ev.BackendMismatchError, match=r"disagrees with TensorFlow.*pool [0-9.e-]+.*--no-tf-check"):
        features.compute(images, batch_size=3)
    unchecked = ev.make_feature_extractor("torch", inception_like, device="cpu", tf_check=False)
    assert unchecked.first_batch_check is None
    unchecked.compute(images, batch_size=3)


def test_backend_resolution(monkeypatch, tmp_path):
    path = tmp_path / "g.pb"
    path.write_bytes(b"")
    monkeypatch.setattr(ev, "_TF_AVAILABLE", False)
    assert ev.resolve_backend("auto") == "torch"
    assert isinstance(ev.make_feature_extractor("auto", path), it.TorchInception)
    monkeypatch.setattr(ev, "_TF_AVAILABLE", True)
    assert ev.resolve_backend("auto") == "tf"
    assert isinstance(ev.make_feature_extractor("auto", path), ev.InceptionFeatures)
    assert ev.resolve_backend("torch") == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        ev.resolve_backend("jax")


def test_bad_graph_files_on_the_torch_backend(tmp_path):
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"not a graph")
    features = ev.make_feature_extractor("torch", junk, tf_check=False)
    with pytest.raises(ValueError, match="junk.pb.*not a TensorFlow GraphDef"):
        features.compute(np.zeros((4, 8, 8, 3), np.uint8))
    g = Graph()
    g.const("something_else", np.float32(1))
    other = tmp_path / "other.pb"
    other.write_bytes(g.to_bytes("plain"))
    with pytest.raises(ValueError, match="other.pb.*lacks the tensors"):
        ev.make_feature_extractor("torch", other, tf_check=False).compute(np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="nope.pb.*not found"):
        ev.make_feature_extractor("torch", tmp_path / "nope.pb")


# ==================================================================================================
# Without TensorFlow
# ==================================================================================================

BLOCK_TENSORFLOW = textwrap.dedent("""
    import sys
    sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError
""")


def run_without_tensorflow(tmp_path, args):
    """Run python `args` with a sitecustomize that makes importing TensorFlow fail."""
    site = tmp_path / "no_tf_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), SOFLOW_CACHE_DIR=str(tmp_path / "c"))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_evaluator_without_tensorflow(tmp_path, tf):
    """`--backend auto` in a process where TensorFlow cannot be imported: the torch backend runs and prints
    the same eval_results.txt lines as TensorFlow computes here."""
    graph = write_inception_like(tmp_path / "g.pb", seed=9, width=1 / 32, image_size=139)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(30, 60, 32))
    folders = {}
    for name in ("tf", "subprocess"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        np.savez(folders[name] / "s.npz", arr_0=random_images(31, 50, 40))
    ev.evaluate_folder(ref, folders["tf"], graph_path=graph, cache_dir=tmp_path / "cache", backend="tf")
    script = textwrap.dedent(f"""
        import sys, evaluator
        assert not evaluator.tensorflow_available()
        code = evaluator.main(["--ref_batch", {str(ref)!r}, "--sample_batch_dir", {str(folders['subprocess'])!r},
                               "--inception-graph", {str(graph)!r}, "--batch-size", "25"])
        assert code == 0
        assert "torch" in sys.modules and sys.modules.get("tensorflow") is None
    """)
    result = run_without_tensorflow(tmp_path, ["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    want = (folders["tf"] / "eval_results.txt").read_text()
    assert (folders["subprocess"] / "eval_results.txt").read_text() == want
    assert result.stdout == want


@pytest.mark.skipif(os.environ.get("SOFLOW_NO_TF_SUBTEST") == "1", reason="already inside the no-TensorFlow run")
def test_torch_tests_pass_without_tensorflow(tmp_path):
    """This file's tests in a process where importing TensorFlow fails: the torch-backend tests pass and
    those that need TensorFlow are skipped."""
    os.environ["SOFLOW_NO_TF_SUBTEST"] = "1"
    try:
        result = run_without_tensorflow(tmp_path, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                                   str(Path(__file__)), "-k", "not without_tensorflow"])
    finally:
        del os.environ["SOFLOW_NO_TF_SUBTEST"]
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert passed >= 20 and skipped >= 5, summary

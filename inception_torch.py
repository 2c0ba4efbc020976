"""Run a TensorFlow GraphDef -- the ADM evaluator's Inception graph `classify_image_graph_def.pb` -- with
PyTorch, without TensorFlow.

Two parts:

* the reader: the .pb file is parsed by the protobuf classes of TensorFlow's messages that the `tensorboard`
  package ships (`tensorboard.compat.proto`, no TensorFlow needed), and constants are converted to NumPy by its
  `make_ndarray`, after the checks TensorFlow makes and with TensorFlow's fill rule for short value lists;
* an interpreter (`GraphFunction`) that executes the sub-graph between fed tensors and fetched tensors
  with PyTorch ops that reproduce TensorFlow's semantics (SAME padding split as TensorFlow splits it,
  legacy `ResizeBilinear`, average pooling that leaves padded cells out of the divisor, the old `Concat`
  op with its axis first, `BatchNormWithGlobalNormalization`, ...). Every node that has to run is checked
  when the function is built: an op type that is not implemented, an attribute that is not known, or an
  attribute value that is not implemented is refused with an error naming the node, the op and the
  attribute. Nodes outside the fed -> fetched sub-graph (the graph's JPEG decoder, say) are never looked
  at.

`TorchInception` wraps this for the evaluator: the same interface as `evaluator.InceptionFeatures` (the
TensorFlow backend), computing pool_3 features, the spatial features of mixed_6/conv and the softmax of
the pool features times the weights of softmax/logits/MatMul. Float32 throughout; on CUDA TF32 is switched
off while it runs, so the convolutions and products are plain fp32 as TensorFlow computes them.
"""
import math
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import graph_pb2, tensor_pb2, types_pb2
from tensorboard.util.tensor_util import make_ndarray

# Tensor and op names of the Inception graph, declared here for both backends (evaluator.py imports them;
# this module imports nothing of the evaluator's).
INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
LOGITS_MATMUL_OP = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7  # sFID uses the first 7 channels of mixed_6/conv (17 x 17 x 7 = 2023 features)


class GraphError(ValueError):
    """The graph cannot be read or executed: not a GraphDef, a missing tensor, or an op / attribute this
    interpreter does not implement (the message names the node, the op and the attribute)."""


# ==================================================================================================
# GraphDef reading: the protobuf classes and TensorProto -> NumPy converter that tensorboard ships
# ==================================================================================================

# DataType enum (tensorflow/core/framework/types.proto) -> (name, numpy dtype or None).
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = (
    types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32, types_pb2.DT_UINT8, types_pb2.DT_INT16,
    types_pb2.DT_INT8, types_pb2.DT_STRING)
DT_INT64, DT_BOOL, DT_BFLOAT16, DT_UINT16, DT_HALF, DT_UINT32, DT_UINT64 = (
    types_pb2.DT_INT64, types_pb2.DT_BOOL, types_pb2.DT_BFLOAT16, types_pb2.DT_UINT16, types_pb2.DT_HALF,
    types_pb2.DT_UINT32, types_pb2.DT_UINT64)
DTYPES = {
    DT_FLOAT: ("float32", np.float32), DT_DOUBLE: ("float64", np.float64), DT_INT32: ("int32", np.int32),
    DT_UINT8: ("uint8", np.uint8), DT_INT16: ("int16", np.int16), DT_INT8: ("int8", np.int8),
    DT_STRING: ("string", object), DT_INT64: ("int64", np.int64), DT_BOOL: ("bool", np.bool_),
    DT_BFLOAT16: ("bfloat16", None), DT_UINT16: ("uint16", np.uint16), DT_HALF: ("float16", np.float16),
    DT_UINT32: ("uint32", np.uint32), DT_UINT64: ("uint64", np.uint64),
}
# The repeated field of TensorProto that holds the values of each dtype when tensor_content is empty.
_VALUE_FIELD = {DT_FLOAT: "float_val", DT_DOUBLE: "double_val", DT_INT32: "int_val", DT_UINT8: "int_val",
                DT_INT16: "int_val", DT_INT8: "int_val", DT_UINT16: "int_val", DT_INT64: "int64_val",
                DT_BOOL: "bool_val", DT_HALF: "half_val", DT_STRING: "string_val"}


def dtype_name(dtype):
    if dtype in DTYPES:
        return DTYPES[dtype][0]
    if dtype > 100 and dtype - 100 in DTYPES:
        return DTYPES[dtype - 100][0] + "_ref"
    return f"DataType {dtype}"


class TensorShape:
    """TensorShapeProto: dims (-1 for an unknown size) or unknown_rank."""

    def __init__(self, dims=(), unknown_rank=False):
        self.dims = list(dims)
        self.unknown_rank = unknown_rank

    @classmethod
    def from_proto(cls, proto):
        return cls([d.size for d in proto.dim], proto.unknown_rank)

    def __repr__(self):
        return "TensorShape(<unknown rank>)" if self.unknown_rank else f"TensorShape({self.dims})"


def _every_value_written(proto, numel):
    """`proto` with each of its numel values in its *_val field. TensorFlow (Tensor::FromProto) reads fewer
    values than elements by repeating the last one, and none at all as zeros; tensorboard's make_ndarray knows
    only one value or all of them."""
    values = getattr(proto, _VALUE_FIELD[proto.dtype])
    if len(values) > numel:
        raise GraphError(f"tensor has {len(values)} values for shape {[d.size for d in proto.tensor_shape.dim]}")
    if len(values) in (1, numel):
        return proto
    full = tensor_pb2.TensorProto()
    full.CopyFrom(proto)
    fill = values[-1] if len(values) else {DT_STRING: b"", DT_BOOL: False}.get(proto.dtype, 0)
    getattr(full, _VALUE_FIELD[proto.dtype]).extend([fill] * (numel - len(values)))
    return full


def tensor_to_numpy(proto):
    """A TensorProto as a NumPy array, by tensorboard's make_ndarray after the checks TensorFlow makes (dtype,
    complete shape, tensor_content size) and its fill rule for short *_val fields (`_every_value_written`)."""
    if proto.dtype not in _VALUE_FIELD:
        raise GraphError(f"tensor of unsupported dtype {dtype_name(proto.dtype)}")
    shape = TensorShape.from_proto(proto.tensor_shape)
    if shape.unknown_rank or any(d < 0 for d in shape.dims):
        raise GraphError(f"tensor with an incomplete shape {shape}")
    numel = int(np.prod(shape.dims, dtype=np.int64))
    if proto.tensor_content:
        if len(proto.tensor_content) != numel * np.dtype(DTYPES[proto.dtype][1]).itemsize:
            raise GraphError(f"tensor_content of {len(proto.tensor_content)} bytes for shape {shape.dims} "
                             f"{dtype_name(proto.dtype)}")
        return make_ndarray(proto)
    return make_ndarray(_every_value_written(proto, numel))


class TensorValue:
    """A TensorProto, converted to a NumPy array on first use (constants of the real graph total ~90 MB)."""

    def __init__(self, proto):
        self.proto = proto
        self.dtype = proto.dtype
        self.shape = TensorShape.from_proto(proto.tensor_shape)
        self._array = None

    def numpy(self):
        if self._array is None:
            self._array = tensor_to_numpy(self.proto)
        return self._array

    def __repr__(self):
        return f"TensorValue({dtype_name(self.dtype)}, {self.shape})"


class FuncValue:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"func {self.name!r}"


def _python_value(kind, value):
    """One attribute value (or list element) of kind `kind` as the interpreter reads it."""
    if kind == "shape":
        return TensorShape.from_proto(value)
    if kind == "tensor":
        return TensorValue(value)
    if kind == "func":
        return FuncValue(value.name)
    return bool(value) if kind == "b" else value


class AttrValue:
    """One attribute: `kind` is 's', 'i', 'f', 'b', 'type', 'shape', 'tensor', 'func', 'placeholder',
    'list(<kind>)' or 'list' (an empty list), and `value` the Python value."""

    def __init__(self, kind, value):
        self.kind = kind
        self.value = value

    @classmethod
    def from_proto(cls, proto):
        kind = proto.WhichOneof("value")
        if kind is None:
            return cls(None, None)
        if kind != "list":
            return cls(kind, _python_value(kind, getattr(proto, kind)))
        kinds = [k for k in ("s", "i", "f", "b", "type", "shape", "tensor", "func") if len(getattr(proto.list, k))]
        if len(kinds) > 1:
            raise GraphError(f"attribute list mixes {kinds}")
        if not kinds:
            return cls("list", [])
        return cls(f"list({kinds[0]})", [_python_value(kinds[0], v) for v in getattr(proto.list, kinds[0])])

    def __repr__(self):
        if self.kind == "type":
            return dtype_name(self.value)
        if self.kind == "s":
            return repr(self.value.decode("utf-8", "replace"))
        return repr(self.value)


class NodeDef:
    def __init__(self, name, op, inputs, device, attr):
        self.name = name
        self.op = op
        self.inputs = inputs
        self.device = device
        self.attr = attr

    @classmethod
    def from_proto(cls, proto):
        return cls(proto.name, proto.op, list(proto.input), proto.device,
                   {key: AttrValue.from_proto(value) for key, value in proto.attr.items()})

    def __repr__(self):
        return f"NodeDef({self.name!r}, op={self.op!r}, inputs={self.inputs})"


class GraphDef:
    """The nodes of a GraphDef (functions in its library are ignored) and its producer version."""

    def __init__(self, nodes, producer=0):
        self.nodes = nodes
        self.producer = producer
        self.by_name = {}
        for node in nodes:
            if node.name in self.by_name:
                raise GraphError(f"duplicate node name {node.name!r}")
            self.by_name[node.name] = node

    def __getitem__(self, name):
        return self.by_name[name]

    def __contains__(self, name):
        return name in self.by_name


def parse_graph_def(data):
    """Parse the bytes of a serialized tensorflow.GraphDef (tensorboard's copy of its protobuf class). Raises
    GraphError when they are not one."""
    try:
        proto = graph_pb2.GraphDef.FromString(bytes(data))
    except DecodeError as err:
        raise GraphError(f"not a GraphDef ({err})") from err
    nodes = [NodeDef.from_proto(node) for node in proto.node]
    for node in nodes:
        if not node.name or not node.op:
            raise GraphError("a node without name or op")
    return GraphDef(nodes, proto.versions.producer)


def load_graph_def(path):
    path = Path(path)
    try:
        return parse_graph_def(path.read_bytes())
    except GraphError as err:
        raise GraphError(f"Inception graph {path}: not a TensorFlow GraphDef ({err})") from err


# ==================================================================================================
# Op semantics
# ==================================================================================================

_REQUIRED = object()
FLOAT_ONLY = (DT_FLOAT,)
NUMERIC = (DT_FLOAT, DT_INT32, DT_INT64)


class Attr:
    """Specification of one attribute: its kind, its default (TensorFlow's; _REQUIRED when it has none)
    and the values implemented (`allowed`, or a `check` returning an error text or None)."""

    def __init__(self, kind, default=_REQUIRED, allowed=None, check=None):
        self.kind = kind
        self.default = default
        self.allowed = allowed
        self.check = check


def _types(*allowed, default=_REQUIRED):
    return Attr("type", default, allowed=allowed)


def _ones_except_hw(name):
    def check(values):
        if len(values) != 4 or values[0] != 1 or values[3] != 1 or min(values) < 1:
            return f"{name} {values}: only [1, h, w, 1] with positive h, w (NHWC) is implemented"
        return None
    return check


class OpSpec:
    def __init__(self, fn, attrs, n_inputs=None, n_outputs=1, variadic=None):
        self.fn = fn
        self.attrs = attrs
        self.n_inputs = n_inputs          # exact number of data inputs, or None when variadic
        self.n_outputs = n_outputs
        self.variadic = variadic          # name of the attr giving the count of a variadic input list


OPS = {}


def op(name, attrs=None, n_inputs=1, n_outputs=1, variadic=None):
    def register(fn):
        OPS[name] = OpSpec(fn, attrs or {}, n_inputs, n_outputs, variadic)
        return fn
    return register


def _torch():
    import torch
    return torch


_TORCH_DTYPES = {}


def torch_dtype(dtype):
    torch = _torch()
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({DT_FLOAT: torch.float32, DT_DOUBLE: torch.float64, DT_INT32: torch.int32,
                              DT_UINT8: torch.uint8, DT_INT16: torch.int16, DT_INT8: torch.int8,
                              DT_INT64: torch.int64, DT_BOOL: torch.bool, DT_HALF: torch.float16})
    return _TORCH_DTYPES.get(dtype)


class Context:
    """What an op function sees besides its inputs and attributes: the device, whether each input is
    static (known before any feed), and a per-node cache for values derived from static inputs."""

    def __init__(self, node, device, static_inputs):
        self.node = node
        self.device = device
        self.static_inputs = static_inputs
        self.cache = {}
        self.deferred = None  # a run's list of pending CheckNumerics results, None to check at once

    def derived(self, key, input_indices, make):
        """make() computed once when the inputs `input_indices` are static, every call otherwise."""
        if not all(self.static_inputs[i] for i in input_indices):
            return make()
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def fail(self, message):
        raise GraphError(f"node {self.node.name!r} ({self.node.op}): {message}")


def _as_tensor(value):
    """torch tensor of a NumPy array (or anything array-like), keeping 0-d arrays 0-d."""
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if not array.flags.c_contiguous or not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _place(ctx, array_or_tensor):
    """Floating-point values live on the compute device; integer and boolean values (shapes, axes) on
    the CPU, where the ops that read them as Python numbers can do so without a device sync."""
    t = _as_tensor(array_or_tensor)
    return t.to(ctx.device) if t.is_floating_point() else t.cpu()


def _ints(ctx, tensor, what):
    if tensor.is_floating_point():
        ctx.fail(f"{what} must be an integer tensor")
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _scalar_int(ctx, tensor, what):
    values = _ints(ctx, tensor, what)
    # Graphs older than GraphDef version 6 may hold a 1-element vector where a scalar is expected.
    if len(values) != 1:
        ctx.fail(f"{what} must be a scalar, got shape {list(tensor.shape)}")
    return values[0]


def _same_device(a, b):
    if a.device != b.device:
        if a.is_floating_point():
            b = b.to(a.device)
        else:
            a = a.to(b.device)
    return a, b


# ---- sources and plumbing ---------------------------------------------------------------------------

@op("Const", {"value": Attr("tensor"), "dtype": Attr("type")}, n_inputs=0)
def _const(ctx, inputs, attrs):
    tensor = attrs["value"]
    if tensor.dtype != attrs["dtype"]:
        ctx.fail(f"attribute 'value' has dtype {dtype_name(tensor.dtype)} but 'dtype' is "
                 f"{dtype_name(attrs['dtype'])}")
    array = tensor.numpy()
    if array.dtype == object:
        return [array]  # strings: only ops that are never run here (DecodeJpeg) consume them
    if torch_dtype(tensor.dtype) is None:
        ctx.fail(f"attribute 'dtype' {dtype_name(tensor.dtype)} is not implemented")
    return [_place(ctx, array)]


@op("Placeholder", {"dtype": Attr("type"), "shape": Attr("shape", None)}, n_inputs=0)
def _placeholder(ctx, inputs, attrs):
    ctx.fail("a placeholder must be fed")


@op("PlaceholderWithDefault", {"dtype": Attr("type"), "shape": Attr("shape")}, n_inputs=1)
def _placeholder_with_default(ctx, inputs, attrs):
    return [inputs[0]]


@op("Identity", {"T": Attr("type")})
def _identity(ctx, inputs, attrs):
    return [inputs[0]]


@op("StopGradient", {"T": Attr("type")})
def _stop_gradient(ctx, inputs, attrs):
    return [inputs[0]]


@op("NoOp", n_inputs=0, n_outputs=0)
def _noop(ctx, inputs, attrs):
    return []


def _numerics_error(ctx, message, lo, hi):
    kind = "NaN" if math.isnan(lo) or math.isnan(hi) else "Inf"
    ctx.fail(f"CheckNumerics: {message} : Tensor had {kind} values")


@op("CheckNumerics", {"T": _types(DT_FLOAT, DT_DOUBLE, DT_HALF), "message": Attr("s")})
def _check_numerics(ctx, inputs, attrs):
    torch = _torch()
    x = inputs[0]
    message = attrs["message"].decode("utf-8", "replace")
    if x.numel() == 0:
        return [x]
    # min and max are finite exactly when every value is (NaN propagates through both). Inside a run the
    # check is deferred to the end of the run (one device sync for all checks instead of one each); the
    # run then fails as TensorFlow's does, naming the first failing check.
    lo, hi = torch.aminmax(x)
    if ctx.deferred is not None:
        ctx.deferred.append((ctx, message, torch.stack([lo, hi])))
    elif not math.isfinite(float(lo)) or not math.isfinite(float(hi)):
        _numerics_error(ctx, message, float(lo), float(hi))
    return [x]


_CASTABLE = (DT_FLOAT, DT_DOUBLE, DT_HALF, DT_INT32, DT_INT64, DT_UINT8, DT_INT16, DT_INT8, DT_BOOL)


@op("Cast", {"SrcT": _types(*_CASTABLE), "DstT": _types(*_CASTABLE), "Truncate": Attr("b", False)})
def _cast(ctx, inputs, attrs):
    torch = _torch()
    x, dst = inputs[0], torch_dtype(attrs["DstT"])
    if attrs["Truncate"] and x.is_floating_point() and dst.is_floating_point and \
            torch.finfo(dst).bits < torch.finfo(x.dtype).bits:
        ctx.fail("attribute 'Truncate' True for a narrowing floating-point cast is not implemented")
    if x.is_floating_point() and not dst.is_floating_point and dst != torch.bool:
        x = torch.trunc(x)  # TensorFlow truncates towards zero, as C++ does
    return [_place(ctx, x.to(dst))]


@op("ExpandDims", {"T": Attr("type"), "Tdim": _types(DT_INT32, DT_INT64, default=DT_INT32)}, n_inputs=2)
def _expand_dims(ctx, inputs, attrs):
    x, dim = inputs[0], _scalar_int(ctx, inputs[1], "dim")
    if not -x.dim() - 1 <= dim <= x.dim():
        ctx.fail(f"dim {dim} out of range for a tensor of rank {x.dim()}")
    return [x.unsqueeze(dim if dim >= 0 else dim + x.dim() + 1)]


@op("Squeeze", {"T": Attr("type"), "squeeze_dims": Attr("list(i)", [])})
def _squeeze(ctx, inputs, attrs):
    x = inputs[0]
    dims = [d + x.dim() if d < 0 else d for d in attrs["squeeze_dims"]]
    if not dims:
        return [x.reshape([s for s in x.shape if s != 1])]
    for d in dims:
        if not 0 <= d < x.dim() or x.shape[d] != 1:
            ctx.fail(f"cannot squeeze dimension {d} of shape {list(x.shape)}")
    return [x.reshape([s for i, s in enumerate(x.shape) if i not in dims])]


@op("Reshape", {"T": Attr("type"), "Tshape": _types(DT_INT32, DT_INT64, default=DT_INT32)}, n_inputs=2)
def _reshape(ctx, inputs, attrs):
    x, shape = inputs[0], _ints(ctx, inputs[1], "shape")
    if shape.count(-1) > 1 or any(s < -1 for s in shape):
        ctx.fail(f"invalid shape {shape}")
    known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
    if -1 in shape:
        if known == 0 or x.numel() % known:
            ctx.fail(f"cannot reshape a tensor of shape {list(x.shape)} into {shape}")
        shape = [x.numel() // known if s == -1 else s for s in shape]
    elif known != x.numel():
        ctx.fail(f"cannot reshape a tensor of {x.numel()} values into shape {shape}")
    return [x.reshape(shape)]


@op("Shape", {"T": Attr("type"), "out_type": _types(DT_INT32, DT_INT64, default=DT_INT32)})
def _shape(ctx, inputs, attrs):
    torch = _torch()
    return [torch.tensor(list(inputs[0].shape), dtype=torch_dtype(attrs["out_type"]))]


@op("Pack", {"T": Attr("type"), "N": Attr("i"), "axis": Attr("i", 0)}, n_inputs=None, variadic="N")
def _pack(ctx, inputs, attrs):
    torch = _torch()
    rank = inputs[0].dim()
    axis = attrs["axis"] + rank + 1 if attrs["axis"] < 0 else attrs["axis"]
    if not 0 <= axis <= rank:
        ctx.fail(f"attribute 'axis' {attrs['axis']} out of range")
    return [torch.stack(list(inputs), dim=axis)]


def _no_masks(*names):
    return {name: Attr("i", 0, check=lambda v, n=name: None if v == 0 else f"{n} {v} is not implemented")
            for name in names}


@op("StridedSlice", {"T": Attr("type"), "Index": _types(DT_INT32, DT_INT64), "begin_mask": Attr("i", 0),
                     "end_mask": Attr("i", 0), "shrink_axis_mask": Attr("i", 0),
                     **_no_masks("ellipsis_mask", "new_axis_mask")}, n_inputs=4)
def _strided_slice(ctx, inputs, attrs):
    x = inputs[0]
    begin, end, strides = (_ints(ctx, t, name) for t, name in zip(inputs[1:], ("begin", "end", "strides")))
    if not len(begin) == len(end) == len(strides) <= x.dim():
        ctx.fail("begin, end and strides must have one value per sliced dimension")
    index, squeeze = [], []
    for axis, (b, e, s) in enumerate(zip(begin, end, strides)):
        size = x.shape[axis]
        if s == 0:
            ctx.fail("a stride of 0")
        if attrs["shrink_axis_mask"] >> axis & 1:
            b = b + size if b < 0 else b
            if not 0 <= b < size:
                ctx.fail(f"index {b} out of bounds for dimension {axis} of size {size}")
            index.append(slice(b, b + 1))
            squeeze.append(axis)
            continue
        if s < 0:
            ctx.fail("negative strides are not implemented")
        b = 0 if attrs["begin_mask"] >> axis & 1 else min(max(b + size if b < 0 else b, 0), size)
        e = size if attrs["end_mask"] >> axis & 1 else min(max(e + size if e < 0 else e, 0), size)
        index.append(slice(b, max(e, b), s))
    out = x[tuple(index)]
    return [out.reshape([n for i, n in enumerate(out.shape) if i not in squeeze])]


# ---- element-wise -----------------------------------------------------------------------------------

def _binary(name, fn, types=NUMERIC):
    @op(name, {"T": _types(*types)}, n_inputs=2)
    def run(ctx, inputs, attrs):
        a, b = _same_device(*inputs)
        try:
            return [fn(a, b)]
        except RuntimeError as err:
            ctx.fail(f"incompatible shapes {list(a.shape)} and {list(b.shape)} ({err})")
    return run


_binary("Add", lambda a, b: a + b)
_binary("AddV2", lambda a, b: a + b)
_binary("Sub", lambda a, b: a - b)
_binary("Mul", lambda a, b: a * b)
_binary("RealDiv", lambda a, b: a / b, FLOAT_ONLY)
_binary("Maximum", lambda a, b: _torch().maximum(a, b))
_binary("Minimum", lambda a, b: _torch().minimum(a, b))
_binary("SquaredDifference", lambda a, b: (a - b) * (a - b), FLOAT_ONLY)


def _unary(name, fn, types=FLOAT_ONLY):
    @op(name, {"T": _types(*types)})
    def run(ctx, inputs, attrs):
        return [fn(inputs[0])]
    return run


_unary("Relu", lambda x: _torch().relu(x), NUMERIC)
_unary("Relu6", lambda x: x.clamp(0, 6), NUMERIC)
_unary("Neg", lambda x: -x, NUMERIC)
_unary("Square", lambda x: x * x, NUMERIC)
_unary("Sqrt", lambda x: _torch().sqrt(x))
_unary("Rsqrt", lambda x: _torch().rsqrt(x))
_unary("Exp", lambda x: _torch().exp(x))
_unary("Tanh", lambda x: _torch().tanh(x))
_unary("Sigmoid", lambda x: _torch().sigmoid(x))


@op("Softplus", {"T": _types(DT_FLOAT)})
def _softplus(ctx, inputs, attrs):
    # TensorFlow: x above -threshold is returned as is, below threshold exp(x), log1p(exp(x)) between,
    # with threshold = log(float32 epsilon) + 2.
    torch = _torch()
    x = inputs[0]
    threshold = math.log(float(np.finfo(np.float32).eps)) + 2
    return [torch.where(x > -threshold, x, torch.where(x < threshold, torch.exp(x), torch.log1p(torch.exp(x))))]


@op("Softmax", {"T": _types(DT_FLOAT)})
def _softmax(ctx, inputs, attrs):
    x = inputs[0]
    if x.dim() < 1:
        ctx.fail("logits must have at least one dimension")
    return [_torch().softmax(x, dim=-1)]


@op("BiasAdd", {"T": _types(DT_FLOAT), "data_format": Attr("s", b"NHWC", allowed=(b"NHWC",))}, n_inputs=2)
def _bias_add(ctx, inputs, attrs):
    x, bias = inputs
    if bias.dim() != 1 or x.dim() < 2 or x.shape[-1] != bias.shape[0]:
        ctx.fail(f"bias of shape {list(bias.shape)} does not match the last dimension of {list(x.shape)}")
    return [x + bias]


@op("BiasAddV1", {"T": _types(DT_FLOAT)}, n_inputs=2)
def _bias_add_v1(ctx, inputs, attrs):
    return _bias_add(ctx, inputs, {"data_format": b"NHWC"})


# ---- reductions and matrix product ------------------------------------------------------------------

def _reduction(name, fn, types=FLOAT_ONLY):
    @op(name, {"T": _types(*types), "Tidx": _types(DT_INT32, DT_INT64, default=DT_INT32), "keep_dims": Attr("b", False)},
        n_inputs=2)
    def run(ctx, inputs, attrs):
        x = inputs[0]
        axes = sorted({a + x.dim() if a < 0 else a for a in _ints(ctx, inputs[1], "reduction_indices")})
        if any(not 0 <= a < x.dim() for a in axes):
            ctx.fail(f"reduction axes out of range for rank {x.dim()}")
        if not axes:
            return [x]
        return [fn(x, axes, attrs["keep_dims"])]
    return run


_reduction("Mean", lambda x, axes, keep: x.mean(dim=axes, keepdim=keep))
_reduction("Sum", lambda x, axes, keep: x.sum(dim=axes, keepdim=keep), NUMERIC)
_reduction("Max", lambda x, axes, keep: x.amax(dim=axes, keepdim=keep), NUMERIC)


@op("MatMul", {"T": _types(DT_FLOAT), "transpose_a": Attr("b", False), "transpose_b": Attr("b", False),
               "grad_a": Attr("b", False), "grad_b": Attr("b", False)}, n_inputs=2)
def _matmul(ctx, inputs, attrs):
    a, b = inputs
    if a.dim() != 2 or b.dim() != 2:
        ctx.fail(f"MatMul needs matrices, got shapes {list(a.shape)} and {list(b.shape)}")
    a = a.t() if attrs["transpose_a"] else a
    b = b.t() if attrs["transpose_b"] else b
    if a.shape[1] != b.shape[0]:
        ctx.fail(f"matrix shapes {list(a.shape)} and {list(b.shape)} do not match")
    return [a @ b]


# ---- concatenation ----------------------------------------------------------------------------------

def _concat(ctx, values, axis):
    torch = _torch()
    rank = values[0].dim()
    if not -rank <= axis < rank:
        ctx.fail(f"concat axis {axis} out of range for rank {rank}")
    axis = axis + rank if axis < 0 else axis
    for v in values[1:]:
        if v.dim() != rank or any(v.shape[i] != values[0].shape[i] for i in range(rank) if i != axis):
            ctx.fail(f"cannot concatenate shapes {[list(t.shape) for t in values]} on axis {axis}")
    return [torch.cat(values, dim=axis)]


@op("Concat", {"N": Attr("i"), "T": Attr("type")}, n_inputs=None, variadic="N")
def _concat_v1(ctx, inputs, attrs):
    # The old op: the axis (concat_dim) comes first, then the N values.
    return _concat(ctx, list(inputs[1:]), _scalar_int(ctx, inputs[0], "concat_dim"))


@op("ConcatV2", {"N": Attr("i"), "T": Attr("type"), "Tidx": _types(DT_INT32, DT_INT64, default=DT_INT32)}, n_inputs=None,
    variadic="N")
def _concat_v2(ctx, inputs, attrs):
    return _concat(ctx, list(inputs[:-1]), _scalar_int(ctx, inputs[-1], "axis"))


# ---- image ops --------------------------------------------------------------------------------------

def same_padding(size, kernel, stride, dilation=1):
    """TensorFlow's SAME padding of one spatial dimension: (before, after), the odd cell after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _spatial_padding(ctx, attrs, x, kernel_hw, strides_hw, dilations_hw=(1, 1)):
    """((top, bottom), (left, right)) for the node's padding attribute."""
    padding = attrs["padding"]
    if padding == b"VALID":
        pads = ((0, 0), (0, 0))
    elif padding == b"SAME":
        pads = tuple(same_padding(x.shape[1 + i], kernel_hw[i], strides_hw[i], dilations_hw[i]) for i in range(2))
    else:  # EXPLICIT
        explicit = attrs["explicit_paddings"]
        if len(explicit) != 8 or any(explicit[i] for i in (0, 1, 6, 7)) or min(explicit) < 0:
            ctx.fail(f"attribute 'explicit_paddings' {explicit}: only non-negative spatial padding of an "
                     f"NHWC tensor is implemented")
        pads = ((explicit[2], explicit[3]), (explicit[4], explicit[5]))
    for i in range(2):
        effective = (kernel_hw[i] - 1) * dilations_hw[i] + 1
        if x.shape[1 + i] + sum(pads[i]) < effective:
            ctx.fail(f"input of spatial size {list(x.shape[1:3])} is smaller than the window {list(kernel_hw)}")
    return pads


def _padding_attr(*allowed):
    return Attr("s", allowed=allowed)


_DATA_FORMAT = Attr("s", b"NHWC", allowed=(b"NHWC",))


def _check_4d(ctx, x, what="input"):
    if x.dim() != 4:
        ctx.fail(f"{what} must be 4-D NHWC, got shape {list(x.shape)}")


@op("Conv2D", {"T": _types(DT_FLOAT), "strides": Attr("list(i)", check=_ones_except_hw("strides")),
               "use_cudnn_on_gpu": Attr("b", True), "padding": _padding_attr(b"SAME", b"VALID", b"EXPLICIT"),
               "explicit_paddings": Attr("list(i)", []), "data_format": _DATA_FORMAT,
               "dilations": Attr("list(i)", [1, 1, 1, 1], check=_ones_except_hw("dilations"))}, n_inputs=2)
def _conv2d(ctx, inputs, attrs):
    x, w = inputs
    if w.dim() != 4:
        ctx.fail(f"filter must be 4-D [h, w, in, out], got shape {list(w.shape)}")
    weight = ctx.derived("weight", [1], lambda: torch_conv_weight(w))
    return [conv2d_nhwc(ctx, attrs, x, weight)]


def torch_conv_weight(w):
    """A TensorFlow filter [h, w, in, out] as PyTorch's [out, in, h, w], in channels-last memory to match the
    NHWC activations."""
    return w.permute(3, 2, 0, 1).contiguous(memory_format=_torch().channels_last)


def conv2d_nhwc(ctx, attrs, x, weight, bias=None):
    """Conv2D of the NHWC tensor `x` with the PyTorch filter `weight` (torch_conv_weight) and an optional bias
    added inside the convolution, with the padding, strides and dilations of the node's attributes."""
    F = _torch().nn.functional
    _check_4d(ctx, x)
    if weight.shape[1] != x.shape[3]:
        ctx.fail(f"filter has {weight.shape[1]} input channels but the input has {x.shape[3]} (grouped "
                 f"convolutions are not implemented)")
    strides, dilations = attrs["strides"][1:3], attrs["dilations"][1:3]
    (top, bottom), (left, right) = _spatial_padding(ctx, attrs, x, weight.shape[2:], strides, dilations)
    xc = x.permute(0, 3, 1, 2)  # NCHW view of the NHWC tensor (channels-last strides, no copy)
    if top == bottom and left == right:
        y = F.conv2d(xc, weight, bias, stride=strides, padding=(top, left), dilation=dilations)
    else:
        y = F.conv2d(F.pad(xc, (left, right, top, bottom)), weight, bias, stride=strides, dilation=dilations)
    return y.permute(0, 2, 3, 1)


def _pool_attrs(explicit=False):
    attrs = {"T": _types(DT_FLOAT), "ksize": Attr("list(i)", check=_ones_except_hw("ksize")),
             "strides": Attr("list(i)", check=_ones_except_hw("strides")), "data_format": _DATA_FORMAT,
             "padding": _padding_attr(b"SAME", b"VALID", *((b"EXPLICIT",) if explicit else ()))}
    if explicit:
        attrs["explicit_paddings"] = Attr("list(i)", [])
    return attrs


def _pool_window(ctx, inputs, attrs):
    """The common start of MaxPool and AvgPool: (NHWC input, its NCHW view, window (h, w), strides (h, w),
    (top, bottom), (left, right) padding)."""
    x = inputs[0]
    _check_4d(ctx, x)
    kernel, strides = attrs["ksize"][1:3], attrs["strides"][1:3]
    vertical, horizontal = _spatial_padding(ctx, attrs, x, kernel, strides)
    return x, x.permute(0, 3, 1, 2), kernel, strides, vertical, horizontal


@op("MaxPool", {**_pool_attrs(explicit=True), "T": Attr("type", DT_FLOAT, allowed=(DT_FLOAT,))})
def _max_pool(ctx, inputs, attrs):
    F = _torch().nn.functional
    _, xc, kernel, strides, (top, bottom), (left, right) = _pool_window(ctx, inputs, attrs)
    if top or bottom or left or right:
        # Padded cells never win: they hold -inf.
        xc = F.pad(xc, (left, right, top, bottom), value=float("-inf"))
    return [F.max_pool2d(xc, kernel, strides).permute(0, 2, 3, 1)]


@op("AvgPool", _pool_attrs())
def _avg_pool(ctx, inputs, attrs):
    torch = _torch()
    F = torch.nn.functional
    x, xc, kernel, strides, (top, bottom), (left, right) = _pool_window(ctx, inputs, attrs)
    if not (top or bottom or left or right):
        y = F.avg_pool2d(xc, kernel, strides)
    elif top == bottom and left == right and top <= kernel[0] // 2 and left <= kernel[1] // 2:
        # TensorFlow divides by the number of cells inside the input (padding excluded).
        y = F.avg_pool2d(xc, kernel, strides, padding=(top, left), count_include_pad=False)
    else:
        sums = F.avg_pool2d(F.pad(xc, (left, right, top, bottom)), kernel, strides, divisor_override=1)
        ones = torch.ones((1, 1) + tuple(x.shape[1:3]), dtype=x.dtype, device=x.device)
        counts = F.avg_pool2d(F.pad(ones, (left, right, top, bottom)), kernel, strides, divisor_override=1)
        y = sums / counts
    return [y.permute(0, 2, 3, 1)]


@op("BatchNormWithGlobalNormalization", {"T": _types(DT_FLOAT), "variance_epsilon": Attr("f"),
                                         "scale_after_normalization": Attr("b")}, n_inputs=5)
def _batch_norm_global(ctx, inputs, attrs):
    x, mean, var, beta, gamma = inputs
    depth = x.shape[-1]
    if any(t.dim() != 1 or t.shape[0] != depth for t in (mean, var, beta, gamma)):
        ctx.fail(f"mean, variance, beta and gamma must be vectors of the last dimension {depth}")

    # As TensorFlow: the per-channel scale first, then (x - mean) * scale + beta.
    factor = ctx.derived("scale", [2, 4], lambda: batch_norm_scale(attrs, var, gamma))
    return [(x - mean).mul_(factor).add_(beta)]


def batch_norm_scale(attrs, var, gamma):
    """BatchNormWithGlobalNormalization's per-channel factor as TensorFlow computes it (float32):
    rsqrt(var + eps), times gamma when scale_after_normalization."""
    s = _torch().rsqrt(var + attrs["variance_epsilon"])
    return s * gamma if attrs["scale_after_normalization"] else s


_FUSED_BN = {"T": _types(DT_FLOAT), "epsilon": Attr("f", 0.0001), "data_format": _DATA_FORMAT,
             "is_training": Attr("b", True, allowed=(False,)), "exponential_avg_factor": Attr("f", 1.0)}


def _fused_batch_norm(ctx, inputs, attrs):
    torch = _torch()
    x, scale, offset, mean, var = inputs[:5]
    _check_4d(ctx, x)
    factor = torch.rsqrt(var + attrs["epsilon"]) * scale
    y = (x - mean) * factor + offset
    return [y, mean, var, mean, var] + ([torch.zeros(0)] if ctx.node.op == "FusedBatchNormV3" else [])


for _name, _extra in (("FusedBatchNorm", {}), ("FusedBatchNormV2", {"U": _types(DT_FLOAT)}),
                      ("FusedBatchNormV3", {"U": _types(DT_FLOAT)})):
    OPS[_name] = OpSpec(_fused_batch_norm, {**_FUSED_BN, **_extra}, n_inputs=5,
                        n_outputs=6 if _name == "FusedBatchNormV3" else 5)


@op("Pad", {"T": _types(DT_FLOAT), "Tpaddings": _types(DT_INT32, DT_INT64, default=DT_INT32)}, n_inputs=2)
def _pad(ctx, inputs, attrs):
    F = _torch().nn.functional
    x, paddings = inputs[0], _ints(ctx, inputs[1], "paddings")
    if len(paddings) != 2 * x.dim() or min(paddings, default=0) < 0:
        ctx.fail(f"paddings {paddings} do not fit a tensor of rank {x.dim()}")
    flat = []
    for axis in reversed(range(x.dim())):
        flat += [paddings[2 * axis], paddings[2 * axis + 1]]
    return [F.pad(x, flat)]


def _scale(in_size, out_size, align_corners):
    # ImageResizerState: computed in float32, as TensorFlow does.
    if align_corners and out_size > 1:
        return np.float32(in_size - 1) / np.float32(out_size - 1)
    return np.float32(in_size) / np.float32(out_size)


def resize_weights(in_size, out_size, align_corners=False, half_pixel_centers=False):
    """Lower and upper source indices and interpolation weights of TensorFlow's ResizeBilinear along one
    axis, in float32 like TensorFlow: legacy source coordinate `dst * scale`, or
    `(dst + 0.5) * scale - 0.5` with half-pixel centres; lower = max(floor, 0), upper = min(ceil, in - 1),
    weight = coordinate - floor."""
    scale = _scale(in_size, out_size, align_corners)
    dst = np.arange(out_size, dtype=np.float32)
    with np.errstate(all="ignore"):
        src = (dst + np.float32(0.5)) * scale - np.float32(0.5) if half_pixel_centers else dst * scale
    src = src.astype(np.float32)
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    return lower, upper, (src - floor).astype(np.float32)


@op("ResizeBilinear", {"T": _types(DT_FLOAT, DT_DOUBLE, DT_HALF, DT_UINT8, DT_INT8, DT_INT16, DT_INT32, DT_INT64),
                       "align_corners": Attr("b", False), "half_pixel_centers": Attr("b", False)}, n_inputs=2)
def _resize_bilinear(ctx, inputs, attrs):
    torch = _torch()
    x, size = inputs[0], _ints(ctx, inputs[1], "size")
    _check_4d(ctx, x, "images")
    if len(size) != 2 or min(size) <= 0:
        ctx.fail(f"size must hold two positive values, got {size}")
    if attrs["align_corners"] and attrs["half_pixel_centers"]:
        ctx.fail("attributes 'align_corners' and 'half_pixel_centers' cannot both be True")
    x = x.to(device=ctx.device, dtype=torch.float32)
    (out_h, out_w), (in_h, in_w) = size, x.shape[1:3]
    if (out_h, out_w) == (in_h, in_w):
        return [x]  # TensorFlow's no-op resize: a cast to float

    def weights():
        ys = resize_weights(in_h, out_h, attrs["align_corners"], attrs["half_pixel_centers"])
        xs = resize_weights(in_w, out_w, attrs["align_corners"], attrs["half_pixel_centers"])
        return tuple(torch.from_numpy(a).to(ctx.device) for a in ys + xs)
    key = ("weights", in_h, in_w, out_h, out_w)
    if key not in ctx.cache:
        ctx.cache[key] = weights()
    y_lo, y_hi, y_w, x_lo, x_hi, x_w = ctx.cache[key]
    x_w = x_w[None, None, :, None]

    def along_x(rows):
        # top = top_left + (top_right - top_left) * x_lerp, as TensorFlow's compute_lerp.
        left = rows.index_select(2, x_lo)
        return left + (rows.index_select(2, x_hi) - left) * x_w

    if in_h < 2 * out_h:
        # Interpolating every input row along x first, then picking rows, does the same float32
        # operations on the same values as picking first, with less work when enlarging.
        rows = along_x(x)
        top, bottom = rows.index_select(1, y_lo), rows.index_select(1, y_hi)
    else:
        top, bottom = along_x(x.index_select(1, y_lo)), along_x(x.index_select(1, y_hi))
    return [top + (bottom - top) * y_w[None, :, None, None]]


# ==================================================================================================
# Graph execution
# ==================================================================================================

def split_tensor_name(name):
    """'node:1' -> ('node', 1); 'node' -> ('node', 0)."""
    node, sep, index = name.rpartition(":")
    if sep and index.isdigit():
        return node, int(index)
    return name, 0


def _parse_input(name):
    """A NodeDef input: ('node', index, is_control)."""
    if name.startswith("^"):
        return name[1:], -1, True
    node, index = split_tensor_name(name)
    return node, index, False


def _attr_value(node, name, spec, raw):
    """The Python value of attribute `name` of `node`, checked against `spec`."""
    def refuse(problem):
        raise GraphError(f"node {node.name!r} (op {node.op}): attribute {name!r} {problem}")

    if raw is None or raw.kind is None:
        if spec.default is _REQUIRED:
            refuse("is missing")
        if spec.allowed is not None and spec.default not in spec.allowed:
            refuse(f"is missing, and its default {spec.default!r} is not implemented")
        return spec.default
    kind = raw.kind
    if spec.kind.startswith("list("):
        if kind == "list":
            value = []
        elif kind == spec.kind:
            value = list(raw.value)
        else:
            refuse(f"has kind {kind}, expected {spec.kind}")
    elif kind != spec.kind:
        refuse(f"has kind {kind}, expected {spec.kind}")
    else:
        value = raw.value
    if spec.allowed is not None and value not in spec.allowed:
        shown = raw if kind in ("type", "s") else value
        allowed = [dtype_name(v) if spec.kind == "type" else v.decode() if isinstance(v, bytes) else v
                   for v in spec.allowed]
        refuse(f"= {shown} is not implemented (implemented: {allowed})")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            refuse(f"= {value}: {problem}")
    return value


def node_attrs(node):
    """Validated attributes of `node` (defaults filled in), or GraphError naming the node, op and
    attribute: unknown op, unknown attribute, missing attribute, or a value that is not implemented.
    Attributes whose names start with '_' (TensorFlow's internal annotations) are ignored."""
    spec = OPS.get(node.op)
    if spec is None:
        raise GraphError(f"node {node.name!r}: op {node.op!r} is not implemented by the PyTorch backend")
    for name in node.attr:
        if not name.startswith("_") and name not in spec.attrs:
            raise GraphError(f"node {node.name!r} (op {node.op}): attribute {name!r} = {node.attr[name]!r} "
                             f"is not implemented")
    return {name: _attr_value(node, name, attr_spec, node.attr.get(name))
            for name, attr_spec in spec.attrs.items()}


def exact_fp32(device):
    """No TF32 while the graph runs (cuDNN enables it for convolutions by default), the previous settings
    restored afterwards, through distributed.tf32_mode (one TF32 API for the whole process). The flags steer
    only CUDA kernels; they are switched on every device so that CPU runs take the same path."""
    from distributed import tf32_mode
    return tf32_mode(False)


# ==================================================================================================
# Folding conv units (the fast path)
# ==================================================================================================
#
# Every conv unit of the Inception graph is Conv2D -> BatchNormWithGlobalNormalization -> CheckNumerics /
# Identity(^check) -> Relu, with static filters and batch-norm statistics. `fold_conv_units` rewrites a plan
# so that each such unit is one step: a convolution whose weights carry the batch norm's scale and whose bias
# is beta - mean * scale (the same affine map, rounded differently: conv(x, w) * s vs conv(x, w * s)), then
# the unit's CheckNumerics on that output (so a non-finite batch-norm output still stops the run, naming
# that check) and its Relu in place. Only what the op sequence allows is folded: a Conv2D whose output is
# read by the batch norm alone, a batch norm whose statistics are static and whose outputs are not fetched;
# the check and the Relu join the step only when nothing else reads the values between them.

class ConvUnit:
    """What one folded step computes (see above)."""

    def __init__(self, conv_ctx, conv_attrs, weight, bias, check=None, relu=False):
        self.conv_ctx, self.conv_attrs = conv_ctx, conv_attrs
        self.weight, self.bias = weight, bias   # PyTorch layout (torch_conv_weight), float32
        self.check = check                      # (ctx, attrs) of the unit's CheckNumerics, or None
        self.relu = relu


def _run_conv_unit(ctx, inputs, attrs):
    unit = attrs["unit"]
    y = conv2d_nhwc(unit.conv_ctx, unit.conv_attrs, inputs[0], unit.weight, unit.bias)
    if unit.check is not None:
        check_ctx, check_attrs = unit.check
        check_ctx.deferred = ctx.deferred  # the run's list of pending checks (None: check at once)
        try:
            _check_numerics(check_ctx, [y], check_attrs)
        finally:
            check_ctx.deferred = None
    return [y.relu_() if unit.relu else y]


CONV_UNIT = OpSpec(_run_conv_unit, {}, n_inputs=1)


def folded_conv_weights(w, bn_attrs, mean, var, beta, gamma):
    """(weight, bias) of Conv2D with filter `w` [h, w, in, out] followed by the batch norm: the scale as
    TensorFlow computes it (float32), the products and the bias in float64, rounded once to float32."""
    scale = batch_norm_scale(bn_attrs, var, gamma).double()
    weight = torch_conv_weight((w.double() * scale).float())
    bias = (beta.double() - mean.double() * scale).float()
    return weight, bias


class _Readers:
    """Who reads what in a plan: the steps reading each (node, index) as data, and the steps naming each node
    as a control input."""

    def __init__(self, plan, fetches):
        self.data, self.control, self.fetched = {}, {}, set(fetches)
        self.step_of = {step[0].name: i for i, step in enumerate(plan)}
        for i, (node, _, _, data, _) in enumerate(plan):
            for ref in data:
                self.data.setdefault(ref, []).append(i)
            for name in node.inputs:
                if name.startswith("^"):
                    self.control.setdefault(name[1:], []).append(i)

    def only_reader(self, name, plan, op):
        """The step of the one node reading `name`:0 (op `op`, nothing else reads it, it is not fetched and
        nothing waits on it), or None."""
        steps = self.data.get((name, 0), [])
        if len(steps) != 1 or self.control.get(name) or (name, 0) in self.fetched:
            return None
        return steps[0] if plan[steps[0]][0].op == op else None


def _unit_tail(plan, bn_step, readers):
    """Steps after the batch norm that join its folded step: (check step or None, identity step or None,
    relu step or None)."""
    bn = plan[bn_step][0].name
    if readers.control.get(bn) or (bn, 0) in readers.fetched:
        return None, None, None
    relu = readers.only_reader(bn, plan, "Relu")
    if relu is not None:
        return None, None, relu
    steps = readers.data.get((bn, 0), [])
    by_op = {plan[i][0].op: i for i in steps}
    check, identity = by_op.get("CheckNumerics"), by_op.get("Identity")
    if len(steps) != 2 or check is None or identity is None:
        return None, None, None
    check_name = plan[check][0].name
    if readers.data.get((check_name, 0)) or (check_name, 0) in readers.fetched or \
            readers.control.get(check_name) != [identity] or plan[identity][3] != [(bn, 0)]:
        return None, None, None
    relu = readers.only_reader(plan[identity][0].name, plan, "Relu")
    return (check, identity, relu) if relu is not None else (None, None, None)


def _foldable_conv(plan, bn_step, readers, static):
    """The step of the Conv2D feeding the batch norm at `bn_step` when the pair can be folded, or None."""
    bn, ctx, _, data, _ = plan[bn_step]
    if bn.op != "BatchNormWithGlobalNormalization" or ctx.static_inputs != [False, True, True, True, True]:
        return None
    conv_name, conv_step = data[0][0], readers.step_of.get(data[0][0])
    if data[0][1] != 0 or conv_step is None or readers.only_reader(conv_name, plan, bn.op) != bn_step:
        return None
    conv, conv_ctx, _, conv_data, _ = plan[conv_step]
    if conv.op != "Conv2D" or not conv_ctx.static_inputs[1]:
        return None
    w = static[conv_data[1][0]][conv_data[1][1]]
    stats = [static[n][i] for n, i in data[1:]]
    if w.dim() != 4 or any(t.dim() != 1 or t.shape[0] != w.shape[3] for t in stats):
        return None  # left to the ops themselves, which report the problem
    return conv_step


def fold_conv_units(plan, static, fetches):
    """`plan` (GraphFunction's steps) with every foldable conv unit replaced by one CONV_UNIT step, placed
    where the unit's last node was (see the comment above)."""
    torch = _torch()
    readers = _Readers(plan, fetches)
    replaced, removed = {}, set()
    for bn_step in range(len(plan)):
        conv_step = _foldable_conv(plan, bn_step, readers, static)
        if conv_step is None:
            continue
        conv, conv_ctx, conv_attrs, conv_data, _ = plan[conv_step]
        bn, _, bn_attrs, bn_data, _ = plan[bn_step]
        with torch.no_grad():
            weight, bias = folded_conv_weights(static[conv_data[1][0]][conv_data[1][1]], bn_attrs,
                                               *(static[n][i] for n, i in bn_data[1:]))
        check, identity, relu = _unit_tail(plan, bn_step, readers)
        unit = ConvUnit(conv_ctx, conv_attrs, weight, bias, relu=relu is not None,
                        check=(plan[check][1], plan[check][2]) if check is not None else None)
        steps = [s for s in (conv_step, bn_step, check, identity, relu) if s is not None]
        last = plan[max(steps)][0]
        removed.update(steps)
        ctx = Context(last, conv_ctx.device, conv_ctx.static_inputs[:1])
        replaced[max(steps)] = (last, ctx, {"unit": unit}, [conv_data[0]], CONV_UNIT)
    return [replaced.get(i, step) for i, step in enumerate(plan) if i in replaced or i not in removed]


class GraphFunction:
    """The sub-graph of `graph` that computes the tensors `fetches` from the tensors `feeds`, as a callable
    f(*feed_values) -> [fetched tensors] (torch tensors).

    Built once: the nodes that have to run are found (data and control inputs, stopping at fed tensors),
    checked (ops and attributes, see `node_attrs`), ordered, and those that do not depend on a feed
    (constants and what is computed from them only) are evaluated once and kept on the device. With `fold`,
    conv units are folded (fold_conv_units): faster, and equal to the unfolded run up to float32 rounding."""

    def __init__(self, graph, feeds, fetches, device="cpu", fold=False):
        torch = _torch()
        self.graph = graph
        self.device = torch.device(device)
        self.feeds = [split_tensor_name(name) for name in feeds]
        self.fetches = [split_tensor_name(name) for name in fetches]
        for node, index in self.feeds + self.fetches:
            if node not in graph:
                raise GraphError(f"tensor {node}:{index}: no node {node!r} in the graph")
        fed = set(self.feeds)
        order = self._order(fed)
        self._plan = []  # (node, ctx, attrs, input refs, op spec)
        static = {}      # node name -> outputs (list), for nodes computed at build time
        dynamic = set()
        for node in order:
            attrs = node_attrs(node)
            spec = OPS[node.op]
            refs = [_parse_input(name) for name in node.inputs]
            data = [(n, i) for n, i, control in refs if not control]
            controls = [n for n, i, control in refs if control]
            self._check_arity(node, spec, attrs, data)
            for n, i in data:
                if (n, i) not in fed and i >= OPS[graph[n].op].n_outputs:
                    raise GraphError(f"node {node.name!r}: input {n}:{i} does not exist")
            is_dynamic = [ref in fed or ref[0] in dynamic for ref in data]
            ctx = Context(node, self.device, [not d for d in is_dynamic])
            if any(is_dynamic) or any(c in dynamic for c in controls):
                dynamic.add(node.name)
                self._plan.append((node, ctx, attrs, data, spec))
            else:
                if node.op == "Placeholder":
                    raise GraphError(f"node {node.name!r} (Placeholder) must be fed to compute "
                                     f"{', '.join(f'{n}:{i}' for n, i in self.fetches)}")
                with torch.no_grad(), exact_fp32(self.device):
                    static[node.name] = self._run_node(spec, ctx, attrs, [static[n][i] for n, i in data])
        if fold:
            self._plan = fold_conv_units(self._plan, static, self.fetches)
        # Keep only the static values the dynamic part or the fetches read.
        needed = {ref for _, _, _, data, _ in self._plan for ref in data} | set(self.fetches)
        self._static = {(n, i): static[n][i] for n, i in needed if n in static and (n, i) not in fed}
        # When each dynamic value is read for the last time, so it can be freed.
        self._last_use = {}
        for step, (_, _, _, data, _) in enumerate(self._plan):
            for ref in data:
                self._last_use[ref] = step
        for ref in self.fetches:
            self._last_use[ref] = len(self._plan)

    def _order(self, fed):
        """Nodes needed for the fetches, inputs before consumers."""
        graph, order, state = self.graph, [], {}
        stack = [(node, False) for node, index in reversed(self.fetches) if (node, index) not in fed]
        while stack:
            name, expanded = stack.pop()
            if expanded:
                if state[name] != "done":
                    state[name] = "done"
                    order.append(graph[name])
                continue
            if state.get(name) == "done":
                continue
            if state.get(name) == "visiting":
                raise GraphError(f"the graph has a cycle through node {name!r} (control flow is not "
                                 f"implemented)")
            if name not in graph:
                raise GraphError(f"no node {name!r} in the graph")
            state[name] = "visiting"
            stack.append((name, True))
            for input_name in reversed(graph[name].inputs):
                node, index, control = _parse_input(input_name)
                if node not in graph:
                    raise GraphError(f"node {name!r}: input {input_name!r} names no node of the graph")
                if not control and (node, index) in fed:
                    continue
                if state.get(node) == "visiting":
                    raise GraphError(f"the graph has a cycle through node {node!r} (control flow is not "
                                     f"implemented)")
                if state.get(node) != "done":
                    stack.append((node, False))
        return order

    @staticmethod
    def _check_arity(node, spec, attrs, data):
        if spec.variadic is not None:
            fixed = {"Concat": 1, "ConcatV2": 1}.get(node.op, 0)
            if len(data) != attrs[spec.variadic] + fixed:
                raise GraphError(f"node {node.name!r} (op {node.op}): attribute {spec.variadic!r} = "
                                 f"{attrs[spec.variadic]} but it has {len(data)} data inputs")
        elif len(data) != spec.n_inputs:
            raise GraphError(f"node {node.name!r} (op {node.op}): expected {spec.n_inputs} data inputs, "
                             f"got {len(data)}")

    @staticmethod
    def _run_node(spec, ctx, attrs, inputs):
        outputs = spec.fn(ctx, inputs, attrs)
        if len(outputs) != spec.n_outputs:
            raise GraphError(f"node {ctx.node.name!r}: {len(outputs)} outputs, expected {spec.n_outputs}")
        return outputs

    def __call__(self, *feed_values):
        torch = _torch()
        if len(feed_values) != len(self.feeds):
            raise ValueError(f"expected {len(self.feeds)} feed values, got {len(feed_values)}")
        values = dict(self._static)
        for ref, value in zip(self.feeds, feed_values):
            value = _as_tensor(value)
            values[ref] = value.to(self.device) if value.is_floating_point() else value
        checks = []
        try:
            with torch.no_grad(), exact_fp32(self.device):
                for step, (node, ctx, attrs, data, spec) in enumerate(self._plan):
                    ctx.deferred = checks
                    outputs = self._run_node(spec, ctx, attrs, [values[ref] for ref in data])
                    for index, value in enumerate(outputs):
                        if (node.name, index) in self._last_use:  # an output nobody reads is freed at once
                            values[(node.name, index)] = value
                    for ref in data:
                        if self._last_use.get(ref) == step and ref not in self._static:
                            values.pop(ref, None)
        finally:
            for _, ctx, _, _, _ in self._plan:
                ctx.deferred = None
        if checks:
            bounds = torch.stack([bound for _, _, bound in checks]).cpu()
            bad = (~torch.isfinite(bounds).all(dim=1)).nonzero()
            if len(bad):
                ctx, message, _ = checks[int(bad[0])]
                lo, hi = bounds[int(bad[0])].tolist()
                _numerics_error(ctx, message, lo, hi)
        return [values[ref] for ref in self.fetches]


def default_device():
    torch = _torch()
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchInception:
    """The Inception graph run by the interpreter above: the PyTorch backend of the evaluator, with the
    interface of evaluator.InceptionFeatures.

    compute(images, batch_size) -> (pool [N, 2048], spatial [N, 17*17*7], probs [N, 1008]), float32 NumPy;
    features_of(images) -> the same for one batch; forward(images) -> the same as torch tensors on the
    device (for in-process use, e.g. gathering across ranks).

    The graph is parsed and the function built on first use, so constructing this object is cheap.
    `first_batch_check`, when given, is called once with the first batch (float32 NHWC images) and the
    three outputs computed for it (NumPy); the evaluator uses it to compare with TensorFlow.

    `fold` (default): conv units run folded (fold_conv_units), within float32 rounding of the unfolded run
    (fold=False), which executes every node as TensorFlow's op sequence has it."""

    backend = "torch"

    def __init__(self, graph_path, device=None, spatial_channels=SPATIAL_CHANNELS, first_batch_check=None,
                 fold=True):
        self.graph_path = Path(graph_path)
        if not self.graph_path.is_file():
            raise GraphError(f"Inception graph {self.graph_path}: file not found")
        self.device = device
        self.fold = fold
        self.spatial_channels = spatial_channels
        self.first_batch_check = first_batch_check
        self._function = None

    def _build(self):
        graph = load_graph_def(self.graph_path)
        missing = [name for name in (INPUT_TENSOR, POOL_TENSOR, SPATIAL_TENSOR)
                   if split_tensor_name(name)[0] not in graph]
        if LOGITS_MATMUL_OP not in graph or missing:
            raise GraphError(f"Inception graph {self.graph_path}: lacks the tensors the metrics need "
                             f"({INPUT_TENSOR}, {POOL_TENSOR}, {SPATIAL_TENSOR}, {LOGITS_MATMUL_OP}): "
                             f"missing {missing + ([LOGITS_MATMUL_OP] if LOGITS_MATMUL_OP not in graph else [])}")
        matmul = graph[LOGITS_MATMUL_OP]
        if len(matmul.inputs) < 2 or matmul.inputs[1].startswith("^"):
            raise GraphError(f"Inception graph {self.graph_path}: {LOGITS_MATMUL_OP} has no weights input")
        device = self.device or default_device()
        self._function = GraphFunction(graph, [INPUT_TENSOR], [POOL_TENSOR, SPATIAL_TENSOR], device, self.fold)
        weights = GraphFunction(graph, [], [matmul.inputs[1]], device)()[0]
        if not weights.is_floating_point() or weights.dim() != 2:
            raise GraphError(f"Inception graph {self.graph_path}: the weights of {LOGITS_MATMUL_OP} are not "
                             f"a float matrix (shape {list(weights.shape)})")
        self._weights = weights.float()

    def forward(self, images):
        """(pool [B, D], spatial [B, S], probs [B, C]) of images [B, H, W, 3] in [0, 255] (uint8 or float,
        NumPy or torch), as float32 torch tensors on the device."""
        torch = _torch()
        if self._function is None:
            self._build()
        images = _as_tensor(images)
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {tuple(images.shape)}")
        images = images.to(self._function.device).float()
        pool, spatial = self._function(images)
        batch = pool.shape[0]
        pool = pool.reshape(batch, -1)
        spatial = spatial[..., :self.spatial_channels].reshape(batch, -1)
        with torch.no_grad(), exact_fp32(self._function.device):
            probs = torch.softmax(pool @ self._weights, dim=1)
        return pool, spatial, probs

    def features_of(self, images):
        """NumPy float32 (pool, spatial, probs) of one batch."""
        outputs = tuple(t.cpu().numpy() for t in self.forward(images))
        if self.first_batch_check is not None:
            check, self.first_batch_check = self.first_batch_check, None
            if not isinstance(images, np.ndarray):
                images = images.cpu().numpy()
            check(images.astype(np.float32), outputs)
        return outputs

    def compute(self, images, batch_size=64, desc="inception features"):
        """Features of uint8 images [N, H, W, 3], fed in batches of `batch_size`."""
        return batched_features(self.features_of, images, batch_size, desc)

    def close(self):
        self._function = None
        self._weights = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def batched_features(features_of, images, batch_size=64, desc="inception features"):
    """(pool, spatial, probs) of uint8 images [N, H, W, 3] through `features_of`, `batch_size` images at a time
    (both backends' `compute`)."""
    from tqdm import tqdm
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    outputs = ([], [], [])
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        for out, value in zip(outputs, features_of(images[start:start + batch_size])):
            out.append(value)
    return tuple(np.concatenate(out, axis=0) for out in outputs)

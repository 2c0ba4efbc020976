"""Sample-quality metrics following the ADM evaluation protocol (Dhariwal & Nichol 2021).

Computes Inception Score, FID, sFID and k-NN precision / recall (Kynkaanniemi et al. 2019, k=3) of
every sample batch (`.npz`, images under `arr_0` as uint8 [N, H, W, 3]) in a folder against a reference
batch, using the TensorFlow Inception-v3 graph `classify_image_graph_def.pb`:

    python evaluator.py --ref_batch REF.npz --sample_batch_dir SAMPLES/ [--inception-graph PATH]
                        [--inception-sha256 HEX] [--batch-size 64] [--cache-dir DIR]
                        [--backend auto|tf|torch] [--device cuda|cpu] [--no-tf-check] [--pr-float32]
                        [--metrics adm,fd_dinov2 [--dinov2 PATH] [--dinov2-ref NPZ|FOLDER]]

Results are appended, one line per sample file, to `SAMPLES/eval_results.txt`; files already listed there
are skipped, so the command can be re-run while new sample files appear.

Features: images (float32 in [0, 255], NHWC, any size; the graph resizes internally) enter at
`ExpandDims:0`. `pool_3:0` (2048-d) gives FID, precision/recall and, multiplied by the weights of
`softmax/logits/MatMul` and soft-maxed, the class probabilities for IS. The first 7 channels of
`mixed_6/conv:0`, flattened, give the spatial features for sFID.

Two backends execute the graph. `tf`: TensorFlow, in TF1 graph mode through `tf.compat.v1` (on the GPU
when there is one, otherwise on the CPU). `torch`: inception_torch.py, which parses the same .pb file
without TensorFlow and runs it with PyTorch ops of TensorFlow's semantics (fp32, CUDA when present).
`auto` (the default) is `tf` when TensorFlow can be imported and `torch` otherwise. When the torch
backend runs and TensorFlow is importable, the first batch of every run is also computed by TensorFlow
and the run stops if the two disagree by more than 1e-4 relative (--no-tf-check skips this).

Precision / recall use ADM's float16 pairwise distances by default (see manifold_radii); --pr-float32
gives the exact float32 version.

--metrics adm,fd_dinov2 adds the Frechet distance in DINOv2 ViT-L/14 features (EDM2's protocol:
dinov2_features.py) to each line (`, FD_DINOv2: ...`), against the statistics of the reference batch's images or
of --dinov2-ref (an .npz of images or a folder of image files), cached in <cache dir>/dinov2_ref_stats/. The
default (--metrics adm) writes the ADM line alone.

TensorFlow and PyTorch are imported lazily (inside functions) so `import evaluator` stays cheap.
For use inside a training process: make_feature_extractor(...) -> an object with features_of(images)
and compute(images, batch_size); load_reference(...) (memoised, and cached on disk per file signature,
graph and backend); compute_metrics(...); format_result(...); for FD-DINOv2 check_dinov2_inputs(...),
make_dinov2_features(...), load_dinov2_reference(...) and fd_dinov2(...).
"""
import argparse
import dataclasses
import hashlib
import logging
import os
import sys
import zipfile
import zlib
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import scipy.linalg
from scipy.special import xlogy
from tqdm import tqdm

# The Inception graph's tensor and op names (inception_torch imports NumPy only: neither torch nor TensorFlow).
import dinov2_features
from inception_torch import INPUT_TENSOR, LOGITS_MATMUL_OP, POOL_TENSOR, SPATIAL_CHANNELS, SPATIAL_TENSOR
from safe_io import Claim, ClaimError, WriteError, atomic_write, check_writable

log = logging.getLogger("evaluator")

INCEPTION_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                 "classify_image_graph_def.pb")
INCEPTION_FILENAME = "classify_image_graph_def.pb"
# SHA-256 of the file above: unset, as no checksum of the published file is verified in this repository, so a
# download is checked only for completeness (Content-Length) and, on load, for the tensors the metrics need.
# Set it, or pass --inception-sha256, to have every download and cached copy verified.
INCEPTION_SHA256 = None

NEAREST_K = 3  # neighbourhood size of the precision / recall manifolds
IS_SPLIT_SIZE = 5000
# The covariance needs 2 images; a k-NN radius needs k other images in the same set.
MIN_IMAGES = max(2, NEAREST_K + 1)

RESULTS_FILENAME = "eval_results.txt"
METRIC_SETS = ("adm", "fd_dinov2")  # --metrics: the ADM set (IS, FID, sFID, precision, recall), FD-DINOv2
FD_DINOV2 = "FD_DINOv2"  # its name in the result dict and the results line
DINOV2_CACHE_FOLDER = "dinov2_ref_stats"  # beside ref_activations/ in the cache folder
CACHE_VERSION = 1  # bump when the layout of the cached reference activations changes


class BadInputError(ValueError):
    """An input file or folder that cannot be evaluated; the message names the file and the problem."""


class DownloadError(RuntimeError):
    """The Inception graph could not be downloaded or failed its checksum."""


def default_cache_dir():
    """Folder for the downloaded graph and the cached reference activations ($SOFLOW_CACHE_DIR or
    ~/.cache/soflow)."""
    return Path(os.environ.get("SOFLOW_CACHE_DIR") or Path.home() / ".cache" / "soflow")


# --------------------------------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------------------------------

def _npz_headers(path):
    """{array name: (shape, dtype)} of an .npz archive, read from the .npy headers only, so checking a
    large batch does not load its images."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: file not found")
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                headers[info.filename[:-len(".npy")]] = (shape, dtype)
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise BadInputError(f"{path}: not a readable .npz archive ({err})") from err
    return headers


def check_batch(path, role="sample batch", min_images=MIN_IMAGES):
    """Check, without loading the images, that `path` holds `arr_0` as uint8 [N, H, W, 3] with at least
    `min_images` images. Returns the {name: (shape, dtype)} headers. Raises BadInputError otherwise."""
    headers = _npz_headers(path)
    if "arr_0" not in headers:
        found = ", ".join(sorted(headers)) or "nothing"
        extra = (" (precision/recall need the reference images even when mu/sigma are precomputed)"
                 if role == "reference batch" else "")
        raise BadInputError(f"{role} {path}: no images: 'arr_0' is missing (found: {found}); expected "
                            f"uint8 images [N, H, W, 3] under 'arr_0'{extra}")
    shape, dtype = headers["arr_0"]
    if dtype != np.uint8:
        raise BadInputError(f"{role} {path}: arr_0 has dtype {dtype}, expected uint8 images in [0, 255]")
    if len(shape) != 4 or shape[-1] != 3 or min(shape[1:3]) < 1:
        hint = ""
        if len(shape) == 4 and shape[-1] == 1:
            hint = "; grayscale images: repeat the channel, np.repeat(x, 3, axis=-1)"
        elif len(shape) == 4 and shape[1] == 3:
            hint = "; channels-first (NCHW) images: use x.transpose(0, 2, 3, 1)"
        raise BadInputError(f"{role} {path}: arr_0 has shape {shape}, expected [N, H, W, 3]{hint}")
    if shape[0] < min_images:
        raise BadInputError(f"{role} {path}: has {shape[0]} images, but at least {min_images} are needed "
                            f"(2 for the covariance, k+1={NEAREST_K + 1} for precision/recall)")
    return headers


def load_images(path, role="sample batch", min_images=MIN_IMAGES):
    """Validated uint8 images [N, H, W, 3] of an .npz batch (opened read-only)."""
    check_batch(path, role, min_images)
    return _read_images(path, role)


def _read_images(path, role):
    """`arr_0` of an .npz whose headers were checked; BadInputError naming the file when its data are corrupt
    behind a valid header (a bad CRC, data shorter than the header says)."""
    try:
        with np.load(path, allow_pickle=False) as batch:
            return batch["arr_0"]
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as err:
        raise BadInputError(f"{role} {path}: corrupt: its images cannot be read ({type(err).__name__}: {err})") from err


def load_reference_stats(path):
    """Precomputed statistics in a reference batch: a dict with any of the pairs (mu, sigma) and
    (mu_s, sigma_s), each checked to be a [D] mean with a [D, D] covariance."""
    headers = _npz_headers(path)
    stats = {}
    for mean_key, cov_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        present = [key for key in (mean_key, cov_key) if key in headers]
        if not present:
            continue
        if len(present) == 1:
            missing = cov_key if present[0] == mean_key else mean_key
            raise BadInputError(f"reference batch {path}: has '{present[0]}' but not '{missing}'")
        mean_shape, cov_shape = headers[mean_key][0], headers[cov_key][0]
        if len(mean_shape) != 1 or cov_shape != (mean_shape[0], mean_shape[0]):
            raise BadInputError(f"reference batch {path}: '{mean_key}' {mean_shape} and '{cov_key}' "
                                f"{cov_shape} are not a [D] mean and a [D, D] covariance")
    with np.load(path, allow_pickle=False) as batch:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            if key in headers:
                stats[key] = batch[key].astype(np.float64)
    return stats


# --------------------------------------------------------------------------------------------------
# Inception graph
# --------------------------------------------------------------------------------------------------

def file_sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url, dest, sha256=None, chunk_size=1 << 20):
    """Download `url` to `dest` atomically (safe_io.atomic_write): the bytes go to a temporary file next to
    `dest`, which is renamed onto `dest` only once it is complete and (when `sha256` is given) matches the
    checksum, so an interrupted or corrupt download never leaves a file that looks valid. A network failure or
    a bad download raises DownloadError, a failed write safe_io.WriteError (with the path and the free space)."""
    dest = Path(dest)

    def fetch(tmp):
        digest, received = hashlib.sha256(), 0
        with open(tmp, "wb") as out, _open_download(url) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                for chunk in iter(lambda: _read_download(response, url, chunk_size), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(f"download of {url} incomplete: got {received} of {total} bytes")
        if sha256 and digest.hexdigest() != sha256.lower():
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, "
                                f"got {digest.hexdigest()}")

    atomic_write(dest, fetch, "download", content_errors=(DownloadError,))
    return dest


def _open_download(url):
    try:
        return urlopen(url, timeout=60)
    except OSError as e:  # no network, refused, not found: the download's failure, not the file's
        raise DownloadError(f"download of {url} failed: {type(e).__name__}: {e}") from e


def _read_download(response, url, chunk_size):
    try:
        return response.read(chunk_size)
    except OSError as e:  # a dropped connection is the download's failure, not the file's
        raise DownloadError(f"download of {url} failed: {type(e).__name__}: {e}") from e


def resolve_inception_graph(graph_path=None, cache_dir=None, sha256=None):
    """Path of the Inception graph: `graph_path` when given (checked against `sha256` if set), otherwise
    the copy in the cache folder, downloaded once from INCEPTION_URL and verified against `sha256` or
    INCEPTION_SHA256."""
    if graph_path is not None:
        graph_path = Path(graph_path)
        if not graph_path.is_file():
            raise BadInputError(f"Inception graph {graph_path}: file not found")
        if sha256 and file_sha256(graph_path) != sha256.lower():
            raise BadInputError(f"Inception graph {graph_path}: sha256 does not match {sha256}")
        return graph_path
    sha256 = sha256 or INCEPTION_SHA256
    dest = Path(cache_dir or default_cache_dir()) / INCEPTION_FILENAME
    if dest.is_file():
        if sha256 and file_sha256(dest) != sha256.lower():
            raise DownloadError(f"cached Inception graph {dest} does not match sha256 {sha256}; delete it "
                                f"to download it again")
        return dest
    log.info("downloading the Inception graph from %s to %s", INCEPTION_URL, dest)
    try:
        return download_file(INCEPTION_URL, dest, sha256)
    except DownloadError as err:
        raise DownloadError(f"could not download {INCEPTION_URL} ({err}); download it by hand and pass "
                            f"--inception-graph PATH") from err


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TF's start-up chatter unless asked for
    import tensorflow as tf
    return tf


_TF_AVAILABLE = None


def tensorflow_available():
    """Whether TensorFlow can be imported here (tried once; importing it is what decides)."""
    global _TF_AVAILABLE
    if _TF_AVAILABLE is None:
        try:
            _import_tensorflow()
            _TF_AVAILABLE = True
        except Exception as err:  # ImportError, or a broken installation failing in its own way
            log.info("TensorFlow is not importable (%s: %s)", type(err).__name__, err)
            _TF_AVAILABLE = False
    return _TF_AVAILABLE


BACKENDS = ("auto", "tf", "torch")


def resolve_backend(backend="auto"):
    """'tf' or 'torch': `auto` is tf when TensorFlow can be imported, torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "tf" if tensorflow_available() else "torch"
    return backend


class InceptionFeatures:
    """The Inception graph and its TF1 session (the `tf` backend). The graph is parsed and the session
    created on first use, so constructing this object is cheap.

    compute(images, batch_size) -> (pool [N, 2048], spatial [N, 17*17*7], probs [N, 1008]), float32;
    features_of(images) -> the same for one batch.
    """

    backend = "tf"

    def __init__(self, graph_path, spatial_channels=SPATIAL_CHANNELS):
        self.graph_path = Path(graph_path)
        if not self.graph_path.is_file():
            raise BadInputError(f"Inception graph {self.graph_path}: file not found")
        self.spatial_channels = spatial_channels
        self._session = None

    def _build(self):
        tf = _import_tensorflow()
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(self.graph_path.read_bytes())
        except Exception as err:  # protobuf's DecodeError
            raise BadInputError(f"Inception graph {self.graph_path}: not a TensorFlow GraphDef ({err})") from err
        graph = tf.Graph()
        with graph.as_default():
            # The graph's own input has batch size 1; mapping it onto a placeholder with a free batch
            # dimension lets whole batches go through (every op up to pool_3 is batch-agnostic).
            images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="images")
            try:
                pool, spatial = tf.import_graph_def(graph_def, input_map={INPUT_TENSOR: images},
                                                    return_elements=[POOL_TENSOR, SPATIAL_TENSOR],
                                                    name="inception")
                weights = graph.get_operation_by_name(f"inception/{LOGITS_MATMUL_OP}").inputs[1]
            except (ValueError, KeyError, IndexError) as err:
                raise BadInputError(f"Inception graph {self.graph_path}: lacks the tensors the metrics need "
                                    f"({INPUT_TENSOR}, {POOL_TENSOR}, {SPATIAL_TENSOR}, "
                                    f"{LOGITS_MATMUL_OP}): {err}") from err
            batch = tf.shape(pool)[0]
            pool_flat = tf.reshape(pool, [batch, -1])
            # The graph's own softmax sits behind a reshape to batch size 1, so the class probabilities
            # are recomputed here from the pool features and the logits weights.
            probs = tf.nn.softmax(tf.matmul(pool_flat, weights))
            spatial_flat = tf.reshape(spatial[..., :self.spatial_channels], [batch, -1])
        config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True  # do not grab all GPU memory (torch may share the GPU)
        self._session = tf.compat.v1.Session(graph=graph, config=config)
        self._images = images
        self._fetches = (pool_flat, spatial_flat, probs)

    def features_of(self, images):
        """(pool, spatial, probs), float32, of one batch of images [B, H, W, 3] in [0, 255]."""
        if self._session is None:
            self._build()
        batch = np.asarray(images).astype(np.float32)
        return tuple(value.astype(np.float32, copy=False)
                     for value in self._session.run(self._fetches, {self._images: batch}))

    def compute(self, images, batch_size=64, desc="inception features"):
        """Features of uint8 images [N, H, W, 3], fed in batches of `batch_size`."""
        from inception_torch import batched_features  # NumPy only: imports neither torch nor TensorFlow
        return batched_features(self.features_of, images, batch_size, desc)

    def close(self):
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BackendMismatchError(RuntimeError):
    """The torch backend's features disagree with TensorFlow's on the same images."""


TF_CHECK_TOLERANCE = 1e-4
FEATURE_NAMES = ("pool", "spatial", "probs")


def relative_difference(got, want):
    """max |got - want| / max |want|: the difference relative to the scale of the features."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) if want.size else 0.0
    diff = np.max(np.abs(got - want)) if want.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


class TensorFlowCheck:
    """Computes one batch with the TensorFlow backend and compares it with the torch backend's outputs;
    raises BackendMismatchError when a feature differs by more than `tolerance` (relative_difference)."""

    def __init__(self, graph_path, spatial_channels=SPATIAL_CHANNELS, tolerance=TF_CHECK_TOLERANCE):
        self.graph_path = Path(graph_path)
        self.spatial_channels = spatial_channels
        self.tolerance = tolerance
        self.differences = None

    def __call__(self, images, outputs):
        with InceptionFeatures(self.graph_path, self.spatial_channels) as reference:
            expected = reference.features_of(images)
        self.differences = {name: relative_difference(got, want)
                            for name, got, want in zip(FEATURE_NAMES, outputs, expected)}
        shapes_differ = [name for name, got, want in zip(FEATURE_NAMES, outputs, expected)
                         if np.shape(got) != np.shape(want)]
        text = ", ".join(f"{name} {value:.2e}" for name, value in self.differences.items())
        if shapes_differ or max(self.differences.values()) > self.tolerance:
            raise BackendMismatchError(
                f"the torch backend disagrees with TensorFlow on the first batch of {len(images)} images "
                f"with {self.graph_path}: relative difference {text} (tolerance {self.tolerance:g})"
                + (f"; shapes differ for {shapes_differ}" if shapes_differ else "")
                + ". Use --backend tf, or --no-tf-check to run the torch backend anyway.")
        log.info("torch backend matches TensorFlow on the first batch (relative difference %s)", text)


def make_feature_extractor(backend="auto", graph_path=None, device=None, tf_check=True,
                           spatial_channels=SPATIAL_CHANNELS, fold=True):
    """The Inception feature extractor of `backend` ('auto', 'tf' or 'torch') for the graph at
    `graph_path` (see resolve_inception_graph). Both have compute(images, batch_size) and
    features_of(images) returning float32 (pool, spatial, probs), and close().

    torch: runs on `device` (default: CUDA when available), with its conv units folded unless fold=False
    (inception_torch.fold_conv_units). With tf_check and TensorFlow importable, its first batch is checked
    against TensorFlow (TensorFlowCheck)."""
    backend = resolve_backend(backend)
    if backend == "tf":
        return InceptionFeatures(graph_path, spatial_channels)
    import inception_torch
    check = TensorFlowCheck(graph_path, spatial_channels) if tf_check and tensorflow_available() else None
    try:
        return inception_torch.TorchInception(graph_path, device=device, spatial_channels=spatial_channels,
                                              first_batch_check=check, fold=fold)
    except inception_torch.GraphError as err:
        raise BadInputError(str(err)) from err


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def feature_statistics(features):
    """Mean and covariance (float64) of features [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A (near-)singular product can make sqrtm fail; a tiny ridge on both covariances fixes that.
        log.warning("sqrtm of the covariance product is not finite; adding %g to the diagonals", eps)
        ridge = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(covmean):
        # Round-off can leave a small imaginary part; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=IS_SPLIT_SIZE):
    """Inception Score of class probabilities [N, C]: the predictions are cut into consecutive splits of
    `split_size` (the last one may be shorter; one split when N <= split_size); per split
    exp(mean_i KL(p_i || mean p)); the mean over splits."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        # xlogy(0, .) = 0, so classes with zero probability (softmax underflow) add nothing, not nan.
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_distances(a, a_sq, b, b_sq):
    """Block of squared Euclidean distances by ||a||^2 - 2 a.b + ||b||^2, clipped at 0 (round-off)."""
    d = a_sq[:, None] - 2 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0, out=d)


def _prepare(features, center, dtype):
    # Centring does not change distances but shrinks the norms, which limits the cancellation in the
    # ||a||^2 - 2ab + ||b||^2 expansion when it runs in float32.
    x = (np.asarray(features, dtype=np.float64) - center).astype(dtype)
    return x, np.einsum("ij,ij->i", x, x)


# ---- ADM's float16 distances ---------------------------------------------------------------------
#
# The ADM evaluator (guided-diffusion, evaluations/evaluator.py: ManifoldEstimator, DistanceBlock,
# _batch_pairwise_distances) computes every block of squared distances in a TensorFlow graph from the
# float32 features cast to float16:
#     norm_u = reduce_sum(square(U), 1), norm_v likewise        (float16)
#     D = maximum(norm_u[:, None] - 2 * matmul(U, V^T) + norm_v[None, :], 0)   (float16, this order)
# and, when that float16 block holds a non-finite value (an overflow past 65504), recomputes the whole
# block with the same formula in float32 from the uncast features. Blocks are 10,000 rows x 10,000 columns
# (row_batch_size = col_batch_size = 10000). The k-NN radius of a feature is the (k+1)-th smallest squared
# distance in its row (itself included), and a point is inside a ball when distance <= radius.
#
# Here each float16 operation rounds once to float16 as in ADM's graph, with torch on the metrics device
# (metrics_device: CUDA when present, else the CPU); the two reductions are accumulated in float64 and
# rounded once to float16: the sums of squares exactly (every float16 square is a multiple of 2^-24 below
# 2^16, so partial sums of up to 8192 of them stay below 2^53 units), the dot products to float64's rounding
# (the correctly rounded float16 value unless the exact one lies within ~1e-13 relative of a float16 rounding
# boundary). ADM's TensorFlow kernels accumulate them in an implementation-specific order (on the CPU Eigen
# sums the squares in float16 packets, the matrix product accumulates in float32; on the GPU cub sums in
# float16), so ADM's own figures differ between its CPU and GPU runs by one float16 unit in part of the norms;
# the correctly rounded value used here is the one both approximate.
#
# Work split over processes (`share`, e.g. distributed.RowShare in training): an object with `rank`,
# `bounds(n)` -> (lo, hi), the rows of n this process computes, `gather(array)` -> the arrays of every
# process concatenated in rank order, and `any(bool array)` -> their element-wise OR. Each process computes
# the rows of its share of ADM's blocks; a block's float32 fallback is still decided by the whole block.

ADM_BATCH_SIZE = 10000  # ADM's ManifoldEstimator row_batch_size = col_batch_size
_ROW_CHUNK = 1024       # rows per float64 product, to bound the memory of one step
_FP16_MAX = 65504.0


def _torch():
    import torch
    return torch


def metrics_device(device=None):
    """The torch device of the precision/recall distance blocks: `device`, else CUDA when available, else
    the CPU."""
    torch = _torch()
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def _float64_to_fp16(x):
    """Float64 tensor -> float16, correctly rounded (as NumPy's astype). torch's own conversion goes through
    float32 and so rounds twice: a value just above a float16 midpoint lands on the midpoint in float32 and
    then rounds to even, one float16 unit off. Rounding to float32 "to odd" first (the float32 neighbour of x
    with an odd last bit when x is not a float32) makes the second rounding the correct one, since float32
    keeps more than two bits beyond float16's 11."""
    torch = _torch()
    f = x.float()
    inexact = f.double() != x  # NaN stays NaN; infinities are exact
    even = (f.view(torch.int32) & 1) == 0
    toward_x = torch.nextafter(f, torch.where(x > f.double(), float("inf"), float("-inf")).float())
    return torch.where(inexact & even, toward_x, f).half()


def _fp16_norms(x16):
    """||x||^2 per row of float16 features (torch) as ADM computes it: the squares rounded to float16 (a
    float16 product, exact in float32 and rounded once), their sum rounded once to float16."""
    return _float64_to_fp16((x16 * x16).double().sum(dim=1))


def _fp16_block(u16, u_norm, v16, v_norm):
    """Float16 squared distances of ADM's _batch_pairwise_distances for float16 rows u16, v16 and their
    float16 norms: max((|u|^2 - 2 u.v) + |v|^2, 0), each operation rounded to float16 (torch computes a
    float16 operation in float32 and rounds: float32's 24 bits make that double rounding exact)."""
    torch = _torch()
    dot = _float64_to_fp16(u16.double() @ v16.double().T)
    d = u_norm[:, None] - 2 * dot
    d += v_norm[None, :]
    return torch.maximum(d, d.new_zeros(()))  # NaN stays NaN (and sends the block to the fallback)


def _fp32_block(u, v):
    """ADM's float32 fallback: the same formula on the uncast float32 features (torch tensors); no TF32."""
    torch = _torch()
    from inception_torch import exact_fp32
    with exact_fp32(u.device):
        d = (u * u).sum(dim=1)[:, None] - 2 * (u @ v.T)
        d += (v * v).sum(dim=1)[None, :]
    return torch.maximum(d, d.new_zeros(()))


class _ADMDistances:
    """Squared distances between the rows of `u` and of `v` (float32 [N, D] features) as ADM's DistanceBlock
    computes them, block by block (see above), as torch tensors on `device`."""

    def __init__(self, u, v, batch_size=ADM_BATCH_SIZE, device=None):
        torch = _torch()
        self.device = metrics_device(device)
        self.u = torch.as_tensor(np.asarray(u, np.float32), device=self.device)
        self.v = self.u if v is u else torch.as_tensor(np.asarray(v, np.float32), device=self.device)
        self.u16 = self.u.half()  # values past 65504 become inf, as in NumPy's and TensorFlow's casts
        self.v16 = self.u16 if v is u else self.v.half()
        self.u_norm = _fp16_norms(self.u16)
        self.v_norm = self.u_norm if v is u else _fp16_norms(self.v16)
        self.batch_size = batch_size
        self.fallback_blocks = []  # (row start, column start) of the blocks redone in float32

    def _fp16_rows(self, r0, r1, c0, c1):
        torch = _torch()
        out = torch.empty((r1 - r0, c1 - c0), dtype=torch.float16, device=self.device)
        for s0 in range(r0, r1, _ROW_CHUNK):
            s1 = min(s0 + _ROW_CHUNK, r1)
            out[s0 - r0:s1 - r0] = _fp16_block(self.u16[s0:s1], self.u_norm[s0:s1], self.v16[c0:c1],
                                               self.v_norm[c0:c1])
        return out

    def _certainly_finite(self, rows, cols):
        """Whether no float16 distance of the block can overflow, from the norms alone: with finite norms
        (hence finite features), |u.v| <= |u| |v| and each float16 rounding (< 2^-9 relative here) keeps
        (|u|^2 + 2 |u| |v|) + |v|^2 below 65504."""
        u_sq, v_sq = self.u_norm[rows].double(), self.v_norm[cols].double()
        if not (bool(u_sq.isfinite().all()) and bool(v_sq.isfinite().all())):
            return False
        u_len = self.u16[rows].double().square().sum(dim=1).sqrt().max()
        v_len = self.v16[cols].double().square().sum(dim=1).sqrt().max()
        grow = 1 + 2.0 ** -9
        bound = ((u_sq.max() + 2 * u_len * v_len * grow) * grow + v_sq.max()) * grow
        return float(bound) < _FP16_MAX

    def _block_finite(self, part, block_rows, share_rows, cols):
        """Whether ADM's whole block (block_rows x cols) holds only finite float16 distances, given `part`, its
        rows `share_rows`; the other rows are computed only when the norms cannot rule out an overflow."""
        torch = _torch()
        if not bool(torch.isfinite(part).all()):
            return False
        if share_rows == block_rows or self._certainly_finite(slice(*block_rows), slice(*cols)):
            return True
        others = [(block_rows[0], share_rows[0]), (share_rows[1], block_rows[1])]
        return all(bool(torch.isfinite(self._fp16_rows(a, b, *cols)).all()) for a, b in others if a < b)

    def blocks(self, lo=0, hi=None):
        """Yields (first row, column start, squared distances) for ADM's blocks, rows outer, columns inner,
        restricted to the rows [lo, hi) (default: all): float16, or float32 when ADM's block holds a
        non-finite float16 value."""
        n, m, b = len(self.u), len(self.v), self.batch_size
        hi = n if hi is None else hi
        for r0 in range(lo - lo % b, hi, b):
            block_rows, share_rows = (r0, min(r0 + b, n)), (max(r0, lo), min(r0 + b, n, hi))
            for c0 in range(0, m, b):
                cols = (c0, min(c0 + b, m))
                part = self._fp16_rows(*share_rows, *cols)
                if self._block_finite(part, block_rows, share_rows, cols):
                    yield share_rows[0], c0, part
                else:
                    self.fallback_blocks.append((r0, c0))
                    log.info("non-finite float16 distances in block (%d, %d): recomputed in float32", r0, c0)
                    yield share_rows[0], c0, _fp32_block(self.u[slice(*share_rows)], self.v[slice(*cols)])


def adm_pairwise_sq_distances(u, v, batch_size=ADM_BATCH_SIZE, device=None):
    """Full matrix [len(u), len(v)] (float32 NumPy) of ADM's squared distances (float16 blocks, float32 where
    a block overflows). For tests and small sets; the metrics below never hold the whole matrix."""
    out = np.empty((len(u), len(v)), dtype=np.float32)
    for r0, c0, block in _ADMDistances(u, v, batch_size, device).blocks():
        out[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block.float().cpu().numpy()
    return out


def _row_chunks(block, first_row):
    """(rows of the whole matrix, rows of the block) of `block` in _ROW_CHUNK pieces."""
    for s0 in range(0, len(block), _ROW_CHUNK):
        s1 = min(s0 + _ROW_CHUNK, len(block))
        yield slice(first_row + s0, first_row + s1), slice(s0, s1)


def _adm_radii(features, k, batch_size, device=None, share=None):
    torch = _torch()
    n = len(features)
    lo, hi = share.bounds(n) if share is not None else (0, n)
    distances = _ADMDistances(features, features, batch_size, device)
    best = torch.full((hi - lo, k + 1), float("inf"), dtype=torch.float32, device=distances.device)
    for r0, _, block in distances.blocks(lo, hi):
        for rows, part in _row_chunks(block, r0 - lo):
            merged = torch.cat([best[rows], block[part].float()], dim=1)
            best[rows] = torch.topk(merged, k + 1, dim=1, largest=False).values
    # NumPy's square root, correctly rounded: torch's float64 sqrt on the CPU is one unit off for ~0.7% of values,
    # which moves a radius below its own squared distance and drops the points that lie exactly on it (float16
    # distances tie often).
    radii = np.sqrt(best[:, k].double().cpu().numpy())
    return share.gather(radii) if share is not None else radii


def _squared_thresholds(radii):
    """For each radius r (float64), the largest float32 t with sqrt(t) <= r in float64. A float16 or float32
    squared distance d is then <= t exactly when sqrt(d) <= r (float64's sqrt is strictly increasing on
    float32 values), so the comparisons stay on the squares, as ADM makes them."""
    r = np.asarray(radii, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        t = (r * r).astype(np.float32)
        for _ in range(3):  # r*r rounded to float32 is within one float32 step of the answer
            t = np.where(np.sqrt(t.astype(np.float64)) > r, np.nextafter(t, np.float32(-np.inf)), t)
            up = np.nextafter(t, np.float32(np.inf))
            t = np.where(np.sqrt(up.astype(np.float64)) <= r, up, t)
    return t


def _adm_precision_recall(ref, sample, ref_radii, sample_radii, batch_size, device=None, share=None):
    """ADM's evaluate_pr on float16 distances: reference rows x sample columns."""
    torch = _torch()
    distances = _ADMDistances(ref, sample, batch_size, device)
    ref_t, sample_t = (torch.as_tensor(_squared_thresholds(r), device=distances.device)
                       for r in (ref_radii, sample_radii))
    lo, hi = share.bounds(len(ref)) if share is not None else (0, len(ref))
    ref_in_sample = torch.zeros(hi - lo, dtype=torch.bool, device=distances.device)
    sample_in_ref = torch.zeros(len(sample), dtype=torch.bool, device=distances.device)
    for r0, c0, block in distances.blocks(lo, hi):
        cols = slice(c0, c0 + block.shape[1])
        for rows, part in _row_chunks(block, r0):
            d = block[part]
            ref_in_sample[rows.start - lo:rows.stop - lo] |= (d <= sample_t[None, cols]).any(dim=1)
            sample_in_ref[cols] |= (d <= ref_t[rows, None]).any(dim=0)
    ref_in_sample, sample_in_ref = ref_in_sample.cpu().numpy(), sample_in_ref.cpu().numpy()
    if share is not None:
        ref_in_sample, sample_in_ref = share.gather(ref_in_sample), share.any(sample_in_ref)
    return float(sample_in_ref.mean()), float(ref_in_sample.mean())


def _float32_radii(features, k, block_size, dtype):
    n = len(features)
    x, x_sq = _prepare(features, np.mean(features, axis=0), dtype)
    radii = np.empty(n, dtype=np.float64)
    for r0 in range(0, n, block_size):
        rows = slice(r0, r0 + block_size)
        best = np.full((len(x[rows]), k + 1), np.inf, dtype=dtype)
        for c0 in range(0, n, block_size):
            cols = slice(c0, c0 + block_size)
            d = _squared_distances(x[rows], x_sq[rows], x[cols], x_sq[cols])
            best = np.partition(np.concatenate([best, d], axis=1), k, axis=1)[:, :k + 1]
        radii[rows] = np.sqrt(best[:, k].astype(np.float64))
    return radii


def manifold_radii(features, k=NEAREST_K, block_size=1000, dtype=np.float32, float32=False,
                   adm_batch_size=ADM_BATCH_SIZE, device=None, share=None):
    """Distance of every feature [N, D] to its k-th nearest neighbour in the same set (itself excluded,
    i.e. the (k+1)-th smallest distance counting 0 to itself), as float64.

    Default: ADM's float16 squared distances (see above), in its 10,000 x 10,000 blocks (`adm_batch_size`),
    with torch on `device` (metrics_device), the rows split over processes with `share` (see above).
    float32=True: the exact version (NumPy, never split): centred features, distances in `dtype` (float32)
    in block_size x block_size blocks. Either way only the k+1 smallest per row are kept, so no N x N matrix
    exists."""
    n = len(features)
    if n <= k:
        raise ValueError(f"need more than k={k} features for k-NN radii, got {n}")
    if float32:
        return _float32_radii(features, k, block_size, dtype)
    return _adm_radii(features, k, adm_batch_size, device, share)


def precision_recall(ref, sample, k=NEAREST_K, block_size=1000, dtype=np.float32, ref_radii=None,
                     sample_radii=None, float32=False, adm_batch_size=ADM_BATCH_SIZE, device=None, share=None):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features [N, D].

    precision: fraction of samples within the k-NN ball of at least one reference feature;
    recall: fraction of reference features within the k-NN ball of at least one sample
    (distance <= radius). Default: ADM's float16 distances, reference rows x sample columns as ADM's
    evaluate_pr orders them, on `device`, split over processes with `share`; float32=True: the exact
    float32 version (see manifold_radii). Radii (from manifold_radii with the same settings) may be passed
    in when already known (the reference radii are reused across sample files)."""
    if ref_radii is None:
        ref_radii = manifold_radii(ref, k, block_size, dtype, float32, adm_batch_size, device, share)
    if sample_radii is None:
        sample_radii = manifold_radii(sample, k, block_size, dtype, float32, adm_batch_size, device, share)
    ref_radii, sample_radii = np.asarray(ref_radii, np.float64), np.asarray(sample_radii, np.float64)
    if not float32:
        return _adm_precision_recall(ref, sample, ref_radii, sample_radii, adm_batch_size, device, share)
    sample_in_ref = np.zeros(len(sample), dtype=bool)
    ref_in_sample = np.zeros(len(ref), dtype=bool)
    center = np.mean(ref, axis=0)
    r, r_sq = _prepare(ref, center, dtype)
    s, s_sq = _prepare(sample, center, dtype)
    # One pass over the sample x reference distance blocks answers both questions.
    for s0 in range(0, len(s), block_size):
        srows = slice(s0, s0 + block_size)
        for r0 in range(0, len(r), block_size):
            rrows = slice(r0, r0 + block_size)
            d = np.sqrt(_squared_distances(s[srows], s_sq[srows], r[rrows], r_sq[rrows]).astype(np.float64))
            sample_in_ref[srows] |= (d <= ref_radii[None, rrows]).any(axis=1)
            ref_in_sample[rrows] |= (d <= sample_radii[srows, None]).any(axis=0)
    return float(sample_in_ref.mean()), float(ref_in_sample.mean())


# --------------------------------------------------------------------------------------------------
# Reference batch and folder evaluation
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Reference:
    """Reference activations with the statistics the metrics compare against."""
    path: Path
    pool: np.ndarray
    spatial: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    _radii: dict = dataclasses.field(default_factory=dict)
    cache: tuple = None  # (path, key) of the disk cache of the activations, which then holds the radii too

    def radii(self, k=NEAREST_K, float32=False, device=None, share=None):
        """k-NN radii of the reference pool features, computed once (rows split with `share`) and reused
        for every sample file; stored with the activations in the disk cache."""
        name = _radii_key(k, float32)
        if name not in self._radii:
            log.info("computing reference manifold radii (k=%d, %s distances)", k,
                     "float32" if float32 else "ADM float16")
            self._radii[name] = manifold_radii(self.pool, k, float32=float32, device=device, share=share)
            if self.cache is not None and (share is None or share.rank == 0):
                _save_cached_activations(*self.cache, self.pool, self.spatial, self._radii)
        return self._radii[name]


def _radii_key(k, float32):
    return f"radii_k{k}_{'float32' if float32 else 'adm'}"


# In-process memo of the last reference (one entry: the activations of 50k images take ~800 MB).
_REFERENCE_MEMO = {}


def _file_signature(path):
    stat = Path(path).stat()
    return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def reference_cache_path(ref_batch, graph_path, cache_dir=None, backend="tf"):
    """Where the activations of `ref_batch` are cached: under <cache dir>/ref_activations/, keyed by the
    path, size and mtime of both the reference batch and the Inception graph (features depend on both)
    and by the backend that computed them. The cache never goes into the sample folder, where an .npz
    would be taken for a sample batch."""
    signature = f"v{CACHE_VERSION}|{_file_signature(ref_batch)}|{_file_signature(graph_path)}"
    if backend != "tf":  # the tf key is kept as it was, so existing caches stay valid
        signature += f"|{backend}"
    key = hashlib.sha256(signature.encode()).hexdigest()
    folder = Path(cache_dir or default_cache_dir()) / "ref_activations"
    return folder / f"{Path(ref_batch).stem}-{key[:20]}.npz", key


def _load_cached_activations(path, key, n_images):
    """(pool, spatial, {radii name: radii}) from the cache file, or None when it does not match."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["key"]) != key:
                return None
            pool, spatial = cached["pool"], cached["spatial"]
            radii = {name: cached[name] for name in cached.files if name.startswith("radii_")}
    except Exception as err:  # a corrupt or foreign cache file is recomputed, not fatal
        log.warning("ignoring unreadable reference cache %s (%s)", path, err)
        return None
    if pool.ndim != 2 or spatial.ndim != 2 or len(pool) != n_images or len(spatial) != n_images:
        log.warning("ignoring reference cache %s with unexpected shapes", path)
        return None
    return pool, spatial, {name: r for name, r in radii.items() if r.shape == (n_images,)}


def _save_cached_activations(path, key, pool, spatial, radii=None):
    """Atomic write (safe_io.atomic_write), so a crash never leaves a truncated cache behind."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, key=np.array(key), pool=pool, spatial=spatial, **(radii or {}))
    atomic_write(path, write, "reference-activation cache")


def load_reference(ref_batch, features, batch_size=64, cache_dir=None):
    """Reference activations and statistics, from the in-process memo, the disk cache, or computed (and
    then cached). Precomputed mu/sigma (mu_s/sigma_s) in the batch replace the statistics of its images
    for FID (sFID); precision/recall always use the activations of the images. `features` is a feature
    extractor (make_feature_extractor); its graph and backend are part of the cache key."""
    ref_batch = Path(ref_batch)
    headers = check_batch(ref_batch, role="reference batch")
    n_images = headers["arr_0"][0][0]
    stats = load_reference_stats(ref_batch)
    cache_path, key = reference_cache_path(ref_batch, features.graph_path, cache_dir,
                                           getattr(features, "backend", "tf"))
    if key in _REFERENCE_MEMO:
        return _REFERENCE_MEMO[key]

    cached = _load_cached_activations(cache_path, key, n_images) if cache_path.is_file() else None
    radii = {}
    if cached is not None:
        log.info("using cached reference activations %s", cache_path)
        pool, spatial, radii = cached
    else:
        log.info("computing reference activations of %s (cached to %s)", ref_batch, cache_path)
        pool, spatial, _ = features.compute(load_images(ref_batch, role="reference batch"), batch_size,
                                            desc=f"reference {ref_batch.name}")
        _save_cached_activations(cache_path, key, pool, spatial)

    for mean_key, cov_key, acts in (("mu", "sigma", pool), ("mu_s", "sigma_s", spatial)):
        if mean_key in stats and stats[mean_key].shape != (acts.shape[1],):
            raise BadInputError(f"reference batch {ref_batch}: precomputed '{mean_key}' has shape "
                                f"{stats[mean_key].shape}, but the features have dimension {acts.shape[1]}")
    if "mu" in stats:
        log.info("using the precomputed mu/sigma of %s for FID", ref_batch)
        mu, sigma = stats["mu"], stats["sigma"]
    else:
        mu, sigma = feature_statistics(pool)
    if "mu_s" in stats:
        log.info("using the precomputed mu_s/sigma_s of %s for sFID", ref_batch)
        mu_s, sigma_s = stats["mu_s"], stats["sigma_s"]
    else:
        mu_s, sigma_s = feature_statistics(spatial)
    reference = Reference(ref_batch, pool, spatial, mu, sigma, mu_s, sigma_s, radii, (cache_path, key))
    _REFERENCE_MEMO.clear()
    _REFERENCE_MEMO[key] = reference
    return reference


# --------------------------------------------------------------------------------------------------
# FD-DINOv2 (the network, preprocessing and statistics: dinov2_features.py)
# --------------------------------------------------------------------------------------------------

def check_dinov2_inputs(source, weights=None, find_weights=True):
    """Before any computation: the reference source (an .npz of images or a folder of image files) and, with
    find_weights, the DINOv2 weights file (found, not downloaded) are there. Returns the weights path (or None)."""
    try:
        found = dinov2_features.find_weights(weights) if find_weights else None
    except dinov2_features.MissingWeightsError as err:
        raise BadInputError(str(err)) from None
    try:
        if Path(source).is_dir():
            dinov2_features.folder_images(source)
        else:
            check_batch(source, role="DINOv2 reference")
    except ValueError as err:
        raise BadInputError(f"DINOv2 reference images (--dinov2-ref, default the reference batch): {err}") from None
    return found


def make_dinov2_features(weights=None, device=None):
    """dinov2_features.DINOv2Features of the ViT-L/14 weights at `weights` (check_dinov2_inputs)."""
    try:
        network = dinov2_features.build_network(weights)
    except dinov2_features.WeightsError as err:
        raise BadInputError(str(err)) from None
    return dinov2_features.DINOv2Features(network, device=device)


def _dinov2_source(source, batch_size):
    """(name, signature, batches, number of batches or None) of an .npz of images or a folder of image files; the
    images are read only when the batches are iterated."""
    source = Path(source)
    if source.is_dir():
        files = dinov2_features.folder_images(source)
        return (source.name, dinov2_features.folder_signature(source, files),
                dinov2_features.folder_batches(files, batch_size), None)
    n_images = check_batch(source, role="DINOv2 reference")["arr_0"][0][0]

    def batches():
        yield from dinov2_features.batches_of(load_images(source, role="DINOv2 reference"), batch_size)
    return source.stem, f"npz {_file_signature(source)}", batches(), -(-n_images // batch_size)


def dinov2_cache_folder(cache_dir=None):
    return Path(cache_dir or default_cache_dir()) / DINOV2_CACHE_FOLDER


def check_dinov2_cache_writable(dinov2, source, cache_dir=None):
    """Before the DINOv2 reference statistics are computed: their cache folder can be written."""
    name, signature, _, _ = _dinov2_source(source, 1)
    path, _ = dinov2_features.stats_cache_path(dinov2, name, signature, dinov2_cache_folder(cache_dir))
    if not path.is_file():
        try:
            check_writable(path.parent, "DINOv2 reference-statistics cache folder")
        except WriteError as err:
            raise BadInputError(f"{err}; nothing was computed. Pass --cache-dir (or set SOFLOW_CACHE_DIR) to a "
                                f"writable folder") from None


def load_dinov2_reference(dinov2, source, batch_size=64, cache_dir=None):
    """(mu, sigma), float64, of the DINOv2 features of `source`'s images, from or into the cache."""
    name, signature, batches, total = _dinov2_source(source, batch_size)
    return dinov2_features.reference_statistics(dinov2, batches, name, signature, dinov2_cache_folder(cache_dir),
                                                total)


def fd_dinov2(reference_stats, moments):
    """FD-DINOv2 of the samples' feature moments (dinov2_features.Moments, float64) against (mu, sigma)."""
    return frechet_distance(*reference_stats, *moments.statistics())


def compute_metrics(reference, pool, spatial, probs, k=NEAREST_K, pr_float32=False, device=None, share=None):
    """IS, FID, sFID, precision and recall of one sample set's features against `reference`.
    Precision/recall use ADM's float16 distances on `device` (metrics_device), or exact float32 ones with
    pr_float32. With `share` (see above) every process calls this with the same arguments: the
    precision/recall rows are split over them, with the same result, and IS, FID and sFID are computed on
    rank 0 only, which gets the dict (the others get None)."""
    log.info("computing precision/recall (k=%d)", k)
    ref_radii = reference.radii(k, pr_float32, device, share)
    precision, recall = precision_recall(reference.pool, pool, k, ref_radii=ref_radii, float32=pr_float32,
                                         device=device, share=share)
    if share is not None and share.rank != 0:
        return None
    mu, sigma = feature_statistics(pool)
    mu_s, sigma_s = feature_statistics(spatial)
    return {
        "IS": inception_score(probs),
        "FID": frechet_distance(reference.mu, reference.sigma, mu, sigma),
        "sFID": frechet_distance(reference.mu_s, reference.sigma_s, mu_s, sigma_s),
        "precision": precision,
        "recall": recall,
    }


def format_result(result):
    """One eval_results.txt line. A distance that rounds to zero prints as 0.0000 whatever its sign (a copy of
    the reference gives +-1e-9 depending on the backend's rounding)."""
    def number(key):
        text = f"{result[key]:.4f}"
        return "0.0000" if text == "-0.0000" else text
    line = (f"{result['file']} # IS: {number('IS')}, FID: {number('FID')}, sFID: {number('sFID')}, "
            f"prec: {number('precision')}, recall: {number('recall')}")
    return line + (f", {FD_DINOV2}: {number(FD_DINOV2)}" if FD_DINOV2 in result else "")


def evaluated_files(results_path, metric=None):
    """Names of the sample files an eval_results.txt already lists (with `metric`, e.g. FD_DINOv2: on a line that
    has it)."""
    results_path = Path(results_path)
    if not results_path.is_file():
        return set()
    with open(results_path) as f:
        return {line.split(" # ", 1)[0] for line in f
                if " # " in line and (metric is None or f" {metric}: " in line.split(" # ", 1)[1])}


def append_result(results_path, line):
    """Appends `line` to an eval_results.txt, flushed and fsynced; any failure raises safe_io.WriteError naming the
    file and the free space. The evaluator's writer, and train.py's for its in-training FID (training_fid.py)."""
    try:
        with open(results_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except Exception as err:
        raise WriteError(results_path, err, "results file") from err


def results_claim(results_path):
    """The lock on an eval_results.txt (safe_io.Claim, file RESULTS.lock) that its writers hold: a second evaluator
    of the folder is refused (it would score the files twice), and train.py holds it while it appends."""
    results_path = Path(results_path)
    return Claim(f"{results_path}.lock", results_path.parent, "sample folder", "another --sample_batch_dir")


class UnreadableSamplesError(BadInputError):
    """Some sample files were corrupt and not scored (the others were); `results` holds those scored."""

    def __init__(self, message, results):
        super().__init__(message)
        self.results = results


def check_results_writable(results_path):
    """Before any computation: the results file can be appended to (or created in its folder)."""
    try:
        if results_path.exists():
            with open(results_path, "a"):
                pass
        else:
            check_writable(results_path.parent, "results folder")
    except (OSError, WriteError) as err:
        detail = str(err) if isinstance(err, WriteError) else f"{type(err).__name__}: {err}"
        raise BadInputError(f"results file {results_path} cannot be written ({detail}); nothing was computed. "
                            f"Make the sample folder writable, or evaluate a writable copy of it") from None


def check_cache_writable(ref_batch, features, cache_dir):
    """Before the reference activations are computed: their cache folder can be written (when they are not
    cached yet)."""
    cache_path, key = reference_cache_path(ref_batch, features.graph_path, cache_dir,
                                           getattr(features, "backend", "tf"))
    if key in _REFERENCE_MEMO or cache_path.is_file():
        return
    try:
        check_writable(cache_path.parent, "reference-activation cache folder")
    except WriteError as err:
        raise BadInputError(f"{err}; nothing was computed. Pass --cache-dir (or set SOFLOW_CACHE_DIR) to a "
                            f"writable folder") from None


def _score_files(pending, reference, features, batch_size, results_path, pr_float32, device, dinov2=None):
    """Scores each file, appending its line as it finishes; a corrupt file is reported by name and skipped (it is
    not listed, so a re-run tries it again). With `dinov2` ((DINOv2Features, reference (mu, sigma))) the line has
    FD-DINOv2 too. Returns (results, [error messages])."""
    results, unreadable = [], []
    for i, path in enumerate(pending, 1):
        log.info("evaluating %s (%d/%d)", path.name, i, len(pending))
        try:
            images = _read_images(path, "sample batch")
        except BadInputError as err:
            log.error("skipping %s", err)
            unreadable.append(str(err))
            continue
        pool, spatial, probs = features.compute(images, batch_size, desc=path.name)
        result = {"file": path.name, "path": str(path),
                  **compute_metrics(reference, pool, spatial, probs, pr_float32=pr_float32, device=device)}
        if dinov2 is not None:
            network, reference_stats = dinov2
            moments = network.moments(dinov2_features.batches_of(images, batch_size), desc=f"{path.name} DINOv2",
                                      total=-(-len(images) // batch_size))
            result[FD_DINOV2] = fd_dinov2(reference_stats, moments)
        line = format_result(result)
        append_result(results_path, line)  # one line per finished file: a later crash loses nothing computed
        log.info("%s", line)
        results.append(result)
    return results, unreadable


def _pending_files(ref_batch, sample_dir, metric=None):
    """(the sample files of `sample_dir` that its eval_results.txt does not list yet (with `metric`: not on a line
    with it), the results path)."""
    if not sample_dir.is_dir():
        raise BadInputError(f"sample folder {sample_dir}: not a directory")
    files = sorted(p for p in sample_dir.glob("*.npz") if p.is_file())
    # The reference batch may live in the sample folder; it is no sample.
    files = [p for p in files if not (ref_batch.exists() and p.samefile(ref_batch))]
    if not files:
        raise BadInputError(f"sample folder {sample_dir}: no .npz sample files")
    results_path = sample_dir / RESULTS_FILENAME
    done = evaluated_files(results_path, metric)
    pending = [p for p in files if p.name not in done]
    if len(pending) < len(files):
        log.info("skipping %d file(s) already listed in %s", len(files) - len(pending), results_path)
    return pending, results_path


def evaluate_folder(ref_batch, sample_dir, graph_path=None, batch_size=64, cache_dir=None,
                    inception_sha256=None, features=None, backend="auto", device=None, tf_check=True,
                    pr_float32=False, metrics=("adm",), dinov2_weights=None, dinov2_ref=None, dinov2=None):
    """Evaluate every .npz in `sample_dir` (sorted) not yet listed in its eval_results.txt, appending one
    line per file. Returns the result dicts (file, path, IS, FID, sFID, precision, recall) of the files
    evaluated now. `features` (from make_feature_extractor) may be passed in to reuse a session;
    otherwise one of `backend` is made (see make_feature_extractor for device and tf_check).
    With "fd_dinov2" in `metrics`: FD_DINOv2 too (a file listed without it is scored again, on a new line),
    through `dinov2` (make_dinov2_features; default: of `dinov2_weights`) against the images of `dinov2_ref`
    (default: `ref_batch`).

    All inputs are checked before anything is computed, and sample files are only ever read."""
    ref_batch, sample_dir = Path(ref_batch), Path(sample_dir)
    check_batch(ref_batch, role="reference batch")
    load_reference_stats(ref_batch)
    with_dinov2 = "fd_dinov2" in metrics
    pending, results_path = _pending_files(ref_batch, sample_dir, FD_DINOV2 if with_dinov2 else None)
    if not pending:
        log.info("nothing new to evaluate in %s", sample_dir)
        return []
    for path in pending:
        check_batch(path, role="sample batch")
    dinov2_ref = Path(dinov2_ref or ref_batch)
    if with_dinov2:
        dinov2_weights = check_dinov2_inputs(dinov2_ref, dinov2_weights, find_weights=dinov2 is None)
    check_results_writable(results_path)
    claim = results_claim(results_path)
    try:
        claim.acquire()  # a second evaluator of the same folder is refused (it would score the files twice)
    except (ClaimError, WriteError, OSError) as err:
        raise BadInputError(str(err)) from None

    own_features = features is None
    try:
        if own_features:
            features = make_feature_extractor(backend, resolve_inception_graph(graph_path, cache_dir,
                                                                               inception_sha256),
                                              device=device, tf_check=tf_check)
        check_cache_writable(ref_batch, features, cache_dir)
        if with_dinov2:
            dinov2 = dinov2 or make_dinov2_features(dinov2_weights, device)
            check_dinov2_cache_writable(dinov2, dinov2_ref, cache_dir)
        reference = load_reference(ref_batch, features, batch_size, cache_dir)
        scoring = (dinov2, load_dinov2_reference(dinov2, dinov2_ref, batch_size, cache_dir)) if with_dinov2 else None
        results, unreadable = _score_files(pending, reference, features, batch_size, results_path, pr_float32,
                                           device, scoring)
    finally:
        if own_features and features is not None:
            features.close()
        claim.release()
    if unreadable:
        raise UnreadableSamplesError(f"{len(unreadable)} of {len(pending)} sample file(s) could not be read and were "
                                     f"not scored: " + "; ".join(unreadable) + f". The other {len(results)} were "
                                     f"scored and appended to {results_path}; replace the unreadable files and "
                                     f"re-run (they are tried again)", results)
    return results


def parse_metrics(text):
    """--metrics: a comma-separated subset of METRIC_SETS that holds 'adm' (the ADM set is always computed)."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in METRIC_SETS]
    if unknown or "adm" not in names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated list of {', '.join(METRIC_SETS)} that includes adm (the ADM "
            f"set is always computed), e.g. adm,fd_dinov2")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref_batch", "--ref-batch", required=True,
                        help="reference .npz (uint8 images [N, H, W, 3] under arr_0; optional mu, sigma, "
                             "mu_s, sigma_s)")
    parser.add_argument("--sample_batch_dir", "--sample-batch-dir", required=True,
                        help="folder of sample .npz files; results go to eval_results.txt in it")
    parser.add_argument("--inception-graph", default=None,
                        help=f"path of {INCEPTION_FILENAME} (default: download once into the cache folder)")
    parser.add_argument("--inception-sha256", default=None,
                        help="expected SHA-256 of the Inception graph (overrides the built-in value)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception batch")
    parser.add_argument("--cache-dir", default=None,
                        help="folder for the downloaded graph and cached reference activations "
                             "(default: $SOFLOW_CACHE_DIR or ~/.cache/soflow)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="tf: TensorFlow; torch: the PyTorch interpreter of the same graph (no "
                             "TensorFlow needed); auto (default): tf when TensorFlow is importable, else torch")
    parser.add_argument("--device", default=None,
                        help="torch backend device (default: cuda when available, else cpu)")
    parser.add_argument("--no-tf-check", dest="tf_check", action="store_false",
                        help="torch backend: skip the comparison of the first batch with TensorFlow "
                             "(done by default when TensorFlow is importable)")
    parser.add_argument("--pr-float32", action="store_true",
                        help="precision/recall from exact float32 distances instead of ADM's float16 ones")
    parser.add_argument("--metrics", type=parse_metrics, default=("adm",),
                        help="adm (default: IS, FID, sFID, precision, recall) or adm,fd_dinov2 (adds "
                             "FD_DINOv2, EDM2's protocol, to each line)")
    parser.add_argument("--dinov2", default=None, metavar="PATH",
                        help="DINOv2 ViT-L/14 weights (timm's model.safetensors or dinov2_vitl14_pretrain.pth; "
                             "default: the Hugging Face Hub cache, never downloaded)")
    parser.add_argument("--dinov2-ref", default=None, metavar="NPZ|FOLDER",
                        help="real images for the FD-DINOv2 reference statistics: an .npz (arr_0) or a folder of "
                             "image files (default: the reference batch's images)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        results = evaluate_folder(args.ref_batch, args.sample_batch_dir, args.inception_graph,
                                  args.batch_size, args.cache_dir, args.inception_sha256,
                                  backend=args.backend, device=args.device, tf_check=args.tf_check,
                                  pr_float32=args.pr_float32, metrics=args.metrics, dinov2_weights=args.dinov2,
                                  dinov2_ref=args.dinov2_ref)
    except (BadInputError, DownloadError, BackendMismatchError, WriteError) as err:
        raise SystemExit(f"evaluator: error: {err}") from None
    except ValueError as err:
        graph_error = getattr(sys.modules.get("inception_torch"), "GraphError", None)
        if graph_error is None or not isinstance(err, graph_error):
            raise
        raise SystemExit(f"evaluator: error: {err}") from None
    for result in results:
        print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

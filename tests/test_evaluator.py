"""Tests of evaluator.py on a small stand-in for the Inception graph (built here, no network).

The toy graph carries the tensor names the evaluator relies on (ExpandDims, mixed_6/conv, pool_3,
softmax/logits/MatMul); its features are recomputed here with a plain session on the whole batch and the
metrics re-derived with straightforward, non-batched NumPy/SciPy code. Precision/recall are checked
against an independent element-by-element float16 computation of ADM's distances (the default) and
against exact distances (--pr-float32).
"""
import hashlib
import io
import math
import re
import sys
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

import evaluator as ev

POOL_DIM = 16
CLASSES = 10
K = 3


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("isolated")  # conftest.py: no network, own cache, fresh memo


@pytest.fixture(scope="module")
def toy_graph(tf, tmp_path_factory):
    """Write a toy Inception graph; returns (path, softmax weights [POOL_DIM, CLASSES])."""
    rng = np.random.default_rng(1234)
    conv_w = (0.3 * rng.normal(size=(3, 3, 3, 8))).astype(np.float32)
    pool_w = (2.0 / np.sqrt(128) * rng.normal(size=(128, POOL_DIM))).astype(np.float32)
    logits_w = (1.5 * rng.normal(size=(POOL_DIM, CLASSES))).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="ExpandDims")
        resized = tf.compat.v1.image.resize_bilinear(images, [8, 8])  # any input size, like the real graph
        conv = tf.nn.conv2d(resized / 127.5 - 1, tf.constant(conv_w), strides=2, padding="SAME")
        conv = tf.identity(conv, name="mixed_6/conv")  # [N, 4, 4, 8]
        hidden = tf.nn.softplus(tf.matmul(tf.reshape(conv, [-1, 128]), tf.constant(pool_w)))
        pool = tf.reshape(hidden, [-1, 1, 1, POOL_DIM], name="pool_3")
        weights = tf.constant(logits_w, name="softmax/weights")
        tf.raw_ops.MatMul(a=tf.reshape(pool, [-1, POOL_DIM]), b=weights, name="softmax/logits/MatMul")
    for name in ("ExpandDims:0", "mixed_6/conv:0", "pool_3:0", "softmax/logits/MatMul:0"):
        graph.get_tensor_by_name(name)  # the names must match exactly
    path = tmp_path_factory.mktemp("graph") / "toy_inception.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path, logits_w.astype(np.float64)


@pytest.fixture(scope="module")
def toy_features(toy_graph):
    features = ev.InceptionFeatures(toy_graph[0])
    yield features
    features.close()


@pytest.fixture(scope="module")
def direct_features(tf, toy_graph):
    """Independent feature extraction: the toy graph run on the whole batch at once, softmax and the
    spatial slice done in NumPy. Returns a function images -> (pool, spatial, probs)."""
    path, logits_w = toy_graph
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    session = tf.compat.v1.Session(graph=graph)

    def run(images):
        pool, conv = session.run(["pool_3:0", "mixed_6/conv:0"], {"ExpandDims:0": images.astype(np.float32)})
        pool = pool.reshape(len(images), -1).astype(np.float64)
        logits = pool @ logits_w
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return pool, conv[..., :7].reshape(len(images), -1).astype(np.float64), probs

    yield run
    session.close()


# --------------------------------------------------------------------------------------------------
# Straightforward NumPy versions of the metrics
# --------------------------------------------------------------------------------------------------

def np_fid(feats1, feats2):
    mu1, mu2 = feats1.mean(0), feats2.mean(0)
    s1, s2 = np.cov(feats1, rowvar=False), np.cov(feats2, rowvar=False)
    return np_frechet(mu1, s1, mu2, s2)


def np_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def np_inception_score(probs, split_size):
    scores = []
    for i in range(0, len(probs), split_size):
        p = probs[i:i + split_size]
        kl = np.sum(p * (np.log(p) - np.log(p.mean(axis=0))), axis=1)
        scores.append(np.exp(kl.mean()))
    return np.mean(scores)


def np_radii(x, k=K):
    return np.sort(cdist(x, x), axis=1)[:, k]


def np_precision_recall(ref, sample, k=K):
    d = cdist(sample, ref)  # full matrix [n_sample, n_ref]
    precision = np.mean((d <= np_radii(ref, k)[None, :]).any(axis=1))
    recall = np.mean((d <= np_radii(sample, k)[:, None]).any(axis=0))
    return precision, recall


def adm_sq_distances_scalar(u, v):
    """ADM's float16 squared distances, element by element with NumPy float16 scalars: features cast to
    float16; |u|^2 = the float16 squares summed exactly (math.fsum) and rounded once to float16, u.v the
    same for the products; then (|u|^2 - 2 u.v) + |v|^2 and max(., 0), each step a float16 operation."""
    uh, vh = np.asarray(u, np.float32).astype(np.float16), np.asarray(v, np.float32).astype(np.float16)
    norm = lambda row: np.float16(math.fsum(float(x * x) for x in row))  # noqa: E731  (x * x is float16)
    nu, nv = [norm(row) for row in uh], [norm(row) for row in vh]
    out = np.empty((len(uh), len(vh)), np.float32)
    for i, a in enumerate(uh):
        for j, b in enumerate(vh):
            dot = np.float16(math.fsum(float(x) * float(y) for x, y in zip(a, b)))
            d = (nu[i] - np.float16(2) * dot) + nv[j]
            out[i, j] = max(d, np.float16(0))
    return out


def adm_sq_distances(u, v):
    """The same computation vectorised (float64 sums of the float16 squares / products)."""
    uh, vh = np.asarray(u, np.float32).astype(np.float16), np.asarray(v, np.float32).astype(np.float16)
    nu = (uh * uh).astype(np.float64).sum(1).astype(np.float16)
    nv = (vh * vh).astype(np.float64).sum(1).astype(np.float16)
    dot = np.einsum("id,jd->ij", uh.astype(np.float64), vh.astype(np.float64)).astype(np.float16)
    return np.maximum((nu[:, None] - np.float16(2) * dot) + nv[None, :], np.float16(0)).astype(np.float32)


def adm_precision_recall(ref, sample, k=K, distances=adm_sq_distances):
    """ADM's rule on its float16 squared distances: radius = (k+1)-th smallest squared distance in the
    row (itself included); inside when squared distance <= squared radius; rows = reference."""
    r2 = np.partition(distances(ref, ref), k, axis=1)[:, k]
    s2 = np.partition(distances(sample, sample), k, axis=1)[:, k]
    d = distances(ref, sample)
    precision = np.mean((d <= r2[:, None]).any(axis=0))
    recall = np.mean((d <= s2[None, :]).any(axis=1))
    return precision, recall


def random_images(seed, n, size, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, size=(n, size, size, 3), dtype=np.uint8)


def sha_and_mtime(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


# --------------------------------------------------------------------------------------------------
# Metric functions
# --------------------------------------------------------------------------------------------------

def test_frechet_distance_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, s1 = ev.feature_statistics(a)
    mu2, s2 = ev.feature_statistics(b)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(np_fid(a, b), rel=1e-9)
    assert abs(ev.frechet_distance(mu1, s1, mu1, s1)) < 1e-3
    # Degenerate covariances still give a finite distance (here just the squared mean difference).
    zero = np.zeros((12, 12))
    with pytest.warns(scipy.linalg.LinAlgWarning):
        assert ev.frechet_distance(mu1, zero, mu2, zero) == pytest.approx(np.sum((mu1 - mu2) ** 2))
    with pytest.raises(ValueError, match="mismatched"):
        ev.frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


def test_frechet_distance_retries_and_checks_imaginary_part(monkeypatch):
    rng = np.random.default_rng(4)
    mu1, s1 = ev.feature_statistics(rng.normal(size=(100, 5)))
    mu2, s2 = ev.feature_statistics(rng.normal(size=(100, 5)) + 1)
    real_sqrtm = scipy.linalg.sqrtm
    seen = []

    def failing_once(matrix):
        seen.append(matrix)
        return np.full_like(matrix, np.nan) if len(seen) == 1 else real_sqrtm(matrix)
    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    ridge = np.eye(5) * 1e-6
    # The ridge only enters the square root; the traces keep the original covariances.
    want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(real_sqrtm((s1 + ridge) @ (s2 + ridge)).real))
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(seen[1], (s1 + ridge) @ (s2 + ridge))

    # A small imaginary part is dropped, a large one is an error.
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 1e-9j)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(np_frechet(mu1, s1, mu2, s2), rel=1e-9)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 0.5j * np.eye(5))
    with pytest.raises(ValueError, match="imaginary"):
        ev.frechet_distance(mu1, s1, mu2, s2)


def test_inception_score_matches_numpy():
    rng = np.random.default_rng(1)
    logits = 3 * rng.normal(size=(1234, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # Several splits, the last one partial.
    assert ev.inception_score(probs, split_size=500) == pytest.approx(np_inception_score(probs, 500), rel=1e-12)
    # Fewer predictions than split_size: one split of everything (the default split is 5000).
    assert ev.inception_score(probs) == pytest.approx(np_inception_score(probs, len(probs)), rel=1e-12)
    # Confident predictions spread evenly over C classes score C; zero probabilities give no nan.
    assert ev.inception_score(np.eye(10)[np.arange(100) % 10]) == pytest.approx(10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_precision_recall_float32_matches_numpy(dtype):
    """The exact version (float32=True, --pr-float32)."""
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(53, 6))
    sample = rng.normal(size=(41, 6)) * 1.3 + 0.4
    # block_size 7 forces several (and uneven) blocks along both axes.
    radii = ev.manifold_radii(ref, K, block_size=7, dtype=dtype, float32=True)
    np.testing.assert_allclose(radii, np_radii(ref), rtol=1e-5)
    precision, recall = ev.precision_recall(ref, sample, K, block_size=7, dtype=dtype, float32=True)
    assert (precision, recall) == np_precision_recall(ref, sample)
    assert 0 < precision < 1 and 0 < recall < 1  # a non-trivial case
    assert ev.precision_recall(ref, ref, K, block_size=7, dtype=dtype, float32=True) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k=3"):
        ev.manifold_radii(ref[:3], K, float32=True)


def pool_like(rng, n, dim, shift=0.0):
    """Non-negative features of pool_3's scale (ReLU then average pool)."""
    return (np.abs(rng.normal(size=(n, dim))) * 0.6 + shift).astype(np.float32)


def test_adm_float16_distances_match_independent_computation(device):
    """The default reproduces the element-by-element float16 computation exactly: distances, radii and
    precision/recall, also with ADM blocks smaller than the sets (batch size 7)."""
    rng = np.random.default_rng(3)
    ref, sample = pool_like(rng, 45, 64), pool_like(rng, 38, 64, shift=0.05)
    want = adm_sq_distances_scalar(ref, sample)
    np.testing.assert_array_equal(ev.adm_pairwise_sq_distances(ref, sample, batch_size=7, device=device), want)
    np.testing.assert_array_equal(adm_sq_distances(ref, sample), want)  # the vectorised test helper agrees
    exact = cdist(ref.astype(np.float64), sample.astype(np.float64)) ** 2
    assert np.mean(want != exact.astype(np.float32)) > 0.9  # float16 rounding is really there

    scalar_ref = adm_sq_distances_scalar(ref, ref)
    want_radii = np.sqrt(np.partition(scalar_ref, K, axis=1)[:, K].astype(np.float64))
    np.testing.assert_array_equal(ev.manifold_radii(ref, K, adm_batch_size=7, device=device), want_radii)
    np.testing.assert_array_equal(ev.manifold_radii(ref, K, device=device), want_radii)
    want_pr = adm_precision_recall(ref, sample, distances=adm_sq_distances_scalar)
    assert ev.precision_recall(ref, sample, K, adm_batch_size=7, device=device) == want_pr
    assert ev.precision_recall(ref, sample, K, device=device) == want_pr
    assert 0 < want_pr[0] < 1 and 0 < want_pr[1] < 1


def test_float16_sums_are_rounded_once(device):
    """A dot product or squared norm just above a float16 midpoint (1 + 2^-11 + 2^-30 or 2^-24, between 1
    and 1 + 2^-10) rounds up, as ADM's formula with one rounding does; a float64 -> float32 -> float16
    conversion (torch's own .half()) lands on the midpoint and rounds to even, down, one unit off."""
    rng = np.random.default_rng(5)
    u = np.zeros((2, 4), np.float32)
    u[0, :3] = 1, 1, 2.0 ** -14               # |u|^2 = 2 + 2^-28 -> 2
    u[1] = 1, 2.0 ** -6, 2.0 ** -6, 2.0 ** -12  # |u|^2 = 1 + 2^-11 + 2^-24 -> 1 + 2^-10
    v = np.zeros((2, 4), np.float32)          # v1 = 0: the distance to it is the norm alone
    v[0, :3] = 1, 2.0 ** -11, 2.0 ** -16      # u0.v0 = 1 + 2^-11 + 2^-30 -> 1 + 2^-10
    ref = np.concatenate([u, pool_like(rng, 30, 4)])
    sample = np.concatenate([v, pool_like(rng, 20, 4)])
    got = ev.adm_pairwise_sq_distances(ref, sample, device=device)
    np.testing.assert_array_equal(got, adm_sq_distances_scalar(ref, sample))
    assert got[0, 0] == np.float32(1 - 2.0 ** -9)  # (2 - 2 (1 + 2^-10)) + 1; with u0.v0 rounded down: 1
    assert got[1, 1] == np.float32(1 + 2.0 ** -10)  # |u1|^2; rounded down: 1

    near = rng.normal(size=100_000) * 100
    midpoints = near.astype(np.float16).astype(np.float64) + np.spacing(near.astype(np.float16)) / 2
    doubles = np.concatenate([midpoints * (1 + rng.uniform(-1, 1, size=near.shape) * 2.0 ** -40), near,
                              [0.0, -0.0, np.inf, -np.inf, 65519.0, 65520.0, 2.0 ** -25, 3e-8]])
    with np.errstate(over="ignore"):
        want = doubles.astype(np.float16)
    got = ev._float64_to_fp16(torch.as_tensor(doubles, device=device)).cpu().numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_radii_and_points_on_the_radius_over_many_points(device):
    """2,000 x 2,000 float16 distances (many of them tied): every radius is the square root of its row's (k+1)-th
    smallest squared distance, correctly rounded, so that a point exactly on a radius counts as inside, as in ADM's
    comparison of the squares; precision and recall equal the independent computation's."""
    rng = np.random.default_rng(7)
    ref, sample = pool_like(rng, 2000, 16), pool_like(rng, 2000, 16, shift=0.02)
    squared = adm_sq_distances(ref, ref)
    want = np.sqrt(np.partition(squared, K, axis=1)[:, K].astype(np.float64))
    radii = ev.manifold_radii(ref, K, device=device)
    np.testing.assert_array_equal(radii, want)
    assert ev.precision_recall(ref, sample, K, device=device) == adm_precision_recall(ref, sample)


def test_float16_and_float32_agree_on_well_separated_data(device):
    """Groups of k+1 points, far apart; samples are near copies of 30 of the 40 reference groups plus 10
    groups elsewhere. Every distance is far from every radius compared with float16's resolution, so both
    versions give the same radii, to the float16 rounding of ADM's formula (a few units of the squared
    norms' float16 spacing), and the same precision and recall."""
    rng = np.random.default_rng(4)
    dim = 24
    centres = rng.normal(size=(50, dim))
    centres *= 2 / np.linalg.norm(centres, axis=1, keepdims=True)
    ref = np.repeat(centres[:40], K + 1, axis=0) + 0.2 * rng.normal(size=(40 * (K + 1), dim))
    copies = ref[:30 * (K + 1)] + 0.01 * rng.normal(size=(30 * (K + 1), dim))
    others = np.repeat(centres[40:], K + 1, axis=0) + 0.2 * rng.normal(size=(10 * (K + 1), dim))
    ref, sample = ref.astype(np.float32), np.concatenate([copies, others]).astype(np.float32)
    for features in (ref, sample):
        r16, r32 = ev.manifold_radii(features, K, device=device), ev.manifold_radii(features, K, float32=True)
        resolution = np.spacing(np.float16(np.max(np.sum(features.astype(np.float64) ** 2, axis=1))))
        assert np.max(np.abs(r16 ** 2 - r32 ** 2)) <= 3 * float(resolution)
        np.testing.assert_allclose(r16, r32, rtol=5e-3)
    pr16, pr32 = ev.precision_recall(ref, sample, K, device=device), ev.precision_recall(ref, sample, K, float32=True)
    assert pr16 == pr32 == np_precision_recall(ref.astype(np.float64), sample.astype(np.float64))
    assert 0.7 < pr16[0] < 1 and 0.7 < pr16[1] < 1


def test_float16_block_falls_back_to_float32_when_not_finite(device):
    """A block whose float16 distances overflow (> 65504) is recomputed in float32, as a whole; the other
    blocks stay float16."""
    rng = np.random.default_rng(5)
    u, v = pool_like(rng, 20, 16), pool_like(rng, 17, 16)
    u[9, 3] = 300.0  # its square overflows float16
    distances = ev._ADMDistances(u, v, batch_size=7, device=device)
    got = np.empty((20, 17), np.float32)
    for r0, c0, block in distances.blocks():
        got[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block.cpu()
    assert distances.fallback_blocks == [(7, 0), (7, 7), (7, 14)]  # the row block of row 9, every column block
    want16 = adm_sq_distances_scalar(u, v)
    rows = slice(7, 14)
    np.testing.assert_array_equal(np.delete(got, range(7, 14), axis=0), np.delete(want16, range(7, 14), axis=0))
    for c0 in (0, 7, 14):  # each block recomputed in float32 from the uncast features
        cols = slice(c0, c0 + 7)
        want32 = ev._fp32_block(torch.from_numpy(u[rows]).to(device), torch.from_numpy(v[cols]).to(device)).cpu().numpy()
        np.testing.assert_array_equal(got[rows, cols], want32)
    np.testing.assert_allclose(got[rows], cdist(u[rows], v) ** 2, rtol=1e-5)
    assert np.isinf(want16[rows]).any() or not np.isfinite(want16[9]).all()
    np.testing.assert_array_equal(ev.adm_pairwise_sq_distances(u, v, batch_size=7, device=device), got)


SHARE_SCRIPT = """
import sys
import numpy as np
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import evaluator as ev
from distributed import RowShare

dist.init_process_group("gloo")
share = RowShare()
data = np.load(sys.argv[2])
ref, sample = data["ref"], data["sample"]
radii = ev.manifold_radii(sample, 3, adm_batch_size=7, share=share)
pr = ev.precision_recall(ref, sample, 3, adm_batch_size=7, share=share)
reference = ev.Reference(None, ref, ref, *ev.feature_statistics(ref), *ev.feature_statistics(ref))
metrics = ev.compute_metrics(reference, sample, sample, data["probs"], share=share)
if share.rank == 0:
    np.savez(sys.argv[3], radii=radii, pr=np.array(pr), metrics=np.array([metrics[key] for key in sorted(metrics)]))
else:
    assert metrics is None
dist.destroy_process_group()
"""


def test_precision_recall_split_over_two_ranks(tmp_path):
    """Two gloo ranks, each computing its rows: the same radii, precision/recall and metrics as one process.
    With ADM blocks of 7 rows the share boundaries (19 of 38 samples, 22 of 45 references) cut a block, and
    an overflow on one rank's side of it sends the whole block to the float32 fallback on both."""
    from helpers import torchrun
    rng = np.random.default_rng(6)
    ref, sample = pool_like(rng, 45, 16), pool_like(rng, 38, 16, shift=0.05)
    sample[20, 3] = ref[26, 5] = 300.0  # squares past float16's range, in rows 14-20 and 21-27
    probs = rng.dirichlet(np.ones(CLASSES), size=38).astype(np.float32)
    np.savez(tmp_path / "features.npz", ref=ref, sample=sample, probs=probs)
    script = tmp_path / "share.py"
    script.write_text(SHARE_SCRIPT)
    torchrun(str(script), [str(ev.Path(ev.__file__).parent), str(tmp_path / "features.npz"), str(tmp_path / "out.npz")])
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(got["radii"], ev.manifold_radii(sample, K, adm_batch_size=7))
    distances = ev._ADMDistances(sample, sample, batch_size=7)
    list(distances.blocks())
    assert (14, 0) in distances.fallback_blocks and (0, 0) not in distances.fallback_blocks
    assert tuple(got["pr"]) == ev.precision_recall(ref, sample, K, adm_batch_size=7)
    reference = ev.Reference(None, ref, ref, *ev.feature_statistics(ref), *ev.feature_statistics(ref))
    want = ev.compute_metrics(reference, sample, sample, probs)
    np.testing.assert_array_equal(got["metrics"], [want[key] for key in sorted(want)])


def test_adm_distances_against_tensorflow_graph(tf):
    """ADM's own float16 DistanceBlock graph, rebuilt here in TensorFlow and run on the CPU: its matrix
    product accumulates in float32 and Eigen sums the squares in float16 packets, so part of its norms
    differ from the correctly rounded ones by one float16 unit. The distances agree to one unit of each
    norm plus one of the result. On these features (2048-d, all pairwise distances within a few percent of
    each other: many near-ties) that moves precision / recall by at most 0.01."""
    tf1 = tf.compat.v1
    rng = np.random.default_rng(6)
    ref, sample = pool_like(rng, 300, 2048), pool_like(rng, 250, 2048, shift=0.01)
    graph = tf.Graph()
    with graph.as_default():
        a, b = tf1.placeholder(tf.float32, [None, None]), tf1.placeholder(tf.float32, [None, None])

        def pairwise(u, v):
            nu = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
            nv = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
            return tf.maximum(nu - 2 * tf.matmul(u, v, False, True) + nv, 0.0)
        d16 = pairwise(tf.cast(a, tf.float16), tf.cast(b, tf.float16))
        block = tf.cond(tf.reduce_all(tf.math.is_finite(d16)), lambda: tf.cast(d16, tf.float32),
                        lambda: pairwise(a, b))
    with tf1.Session(graph=graph) as session:
        tf_d = {key: session.run(block, {a: x, b: y}) for key, (x, y) in
                {"rr": (ref, ref), "ss": (sample, sample), "rs": (ref, sample)}.items()}
    ours = ev.adm_pairwise_sq_distances(ref, sample)
    # One float16 unit of each norm, and one of the result.
    norms = [ev._fp16_norms(torch.from_numpy(x.astype(np.float16))).numpy() for x in (ref, sample)]
    bound = np.spacing(norms[0])[:, None] + np.spacing(norms[1])[None, :] + np.spacing(ours.astype(np.float16))
    assert np.all(np.abs(ours - tf_d["rs"]) <= bound.astype(np.float32))
    assert np.mean(ours == tf_d["rs"]) > 0.3
    r2 = np.partition(tf_d["rr"], K, axis=1)[:, K]
    s2 = np.partition(tf_d["ss"], K, axis=1)[:, K]
    tf_pr = (np.mean((tf_d["rs"] <= r2[:, None]).any(axis=0)), np.mean((tf_d["rs"] <= s2[None, :]).any(axis=1)))
    ours_pr = ev.precision_recall(ref, sample, K)
    assert abs(ours_pr[0] - tf_pr[0]) <= 0.01 and abs(ours_pr[1] - tf_pr[1]) <= 0.01, (ours_pr, tf_pr)


# --------------------------------------------------------------------------------------------------
# Features and folder evaluation on the toy graph
# --------------------------------------------------------------------------------------------------

def test_features_match_direct_run(toy_features, direct_features):
    images = random_images(3, 23, 13)
    pool, spatial, probs = toy_features.compute(images, batch_size=5)  # uneven last batch
    want_pool, want_spatial, want_probs = direct_features(images)
    assert pool.shape == (23, POOL_DIM) and spatial.shape == (23, 4 * 4 * 7) and probs.shape == (23, CLASSES)
    np.testing.assert_allclose(pool, want_pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spatial, want_spatial, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-4, atol=1e-6)


@pytest.fixture
def folder(tmp_path):
    """A reference batch and a sample folder with two files (one a copy of the reference images)."""
    ref_images = random_images(10, 300, 16)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=ref_images)
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "a_copy.npz", arr_0=ref_images)
    np.savez(samples / "b_shifted.npz", arr_0=random_images(11, 200, 12, low=40))
    return ref, samples


def count_compute_calls(monkeypatch, features):
    calls = []
    original = features.compute

    def counting(images, *args, **kwargs):
        calls.append(len(images))
        return original(images, *args, **kwargs)
    monkeypatch.setattr(features, "compute", counting)
    return calls


LINE = re.compile(r"^(?P<file>\S+) # IS: (?P<IS>\d+\.\d{4}), FID: (?P<FID>-?\d+\.\d{4}), "
                  r"sFID: (?P<sFID>-?\d+\.\d{4}), prec: (?P<prec>[01]\.\d{4}), recall: (?P<recall>[01]\.\d{4})$")


def test_evaluate_folder(folder, tmp_path, monkeypatch, toy_features, direct_features):
    ref, samples = folder
    cache = tmp_path / "cache"
    before = {p.name: sha_and_mtime(p) for p in samples.iterdir()}
    calls = count_compute_calls(monkeypatch, toy_features)

    results = ev.evaluate_folder(ref, samples, batch_size=32, cache_dir=cache, features=toy_features)
    assert [r["file"] for r in results] == ["a_copy.npz", "b_shifted.npz"]
    assert calls == [300, 300, 200]  # reference once, then each sample file

    lines = (samples / "eval_results.txt").read_text().splitlines()
    assert lines == [ev.format_result(r) for r in results]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [m["file"] for m in parsed] == ["a_copy.npz", "b_shifted.npz"]

    # The copy of the reference: FID/sFID ~0, every point on the other manifold.
    copy = results[0]
    assert abs(copy["FID"]) < 1e-3 and abs(copy["sFID"]) < 1e-3
    assert copy["precision"] == 1.0 and copy["recall"] == 1.0

    # Every metric agrees with the non-batched NumPy computation on independently computed features.
    ref_pool, ref_spatial, _ = direct_features(np.load(ref)["arr_0"])
    for result, match in zip(results, parsed):
        pool, spatial, probs = direct_features(np.load(samples / result["file"])["arr_0"])
        want = {"IS": np_inception_score(probs, 5000), "FID": np_fid(ref_pool, pool),
                "sFID": np_fid(ref_spatial, spatial)}
        want["precision"], want["recall"] = adm_precision_recall(ref_pool, pool)
        for key, value in want.items():
            assert result[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
        for key, field in (("IS", "IS"), ("FID", "FID"), ("sFID", "sFID"), ("precision", "prec"),
                           ("recall", "recall")):
            assert float(match[field]) == pytest.approx(want[key], abs=2e-4), key
    shifted = results[1]
    assert shifted["FID"] > 0.1 and shifted["precision"] < 1

    # Re-running evaluates nothing and adds no line.
    calls.clear()
    assert ev.evaluate_folder(ref, samples, batch_size=32, cache_dir=cache, features=toy_features) == []
    assert calls == []
    assert (samples / "eval_results.txt").read_text().splitlines() == lines

    # A new file: only it is evaluated; the reference comes from the disk cache (memo cleared).
    np.savez(samples / "c_new.npz", arr_0=random_images(12, 150, 20))
    ev._REFERENCE_MEMO.clear()
    new = ev.evaluate_folder(ref, samples, batch_size=32, cache_dir=cache, features=toy_features)
    assert [r["file"] for r in new] == ["c_new.npz"]
    assert calls == [150]
    final = (samples / "eval_results.txt").read_text().splitlines()
    assert final[:2] == lines and len(final) == 3 and final[2].startswith("c_new.npz # IS: ")

    # Sample files untouched, and nothing but eval_results.txt added to the sample folder.
    after = {p.name: sha_and_mtime(p) for p in samples.iterdir()}
    assert {name: after[name] for name in before} == before
    assert set(after) == set(before) | {"c_new.npz", "eval_results.txt"}
    assert list((cache / "ref_activations").glob("*.npz"))


def test_reference_reused_in_process(folder, tmp_path, monkeypatch, toy_features):
    """Without a disk cache, the in-process memo still computes the reference only once."""
    ref, samples = folder
    calls = count_compute_calls(monkeypatch, toy_features)
    ev.evaluate_folder(ref, samples, cache_dir=tmp_path / "cache", features=toy_features)
    for cached in (tmp_path / "cache" / "ref_activations").iterdir():
        cached.unlink()
    np.savez(samples / "c_new.npz", arr_0=random_images(12, 150, 20))
    ev.evaluate_folder(ref, samples, cache_dir=tmp_path / "cache", features=toy_features)
    assert calls == [300, 300, 200, 150]


def test_precomputed_reference_stats(folder, tmp_path, toy_features, direct_features):
    ref, samples = folder
    ref_images = np.load(ref)["arr_0"]
    rng = np.random.default_rng(5)
    mu = rng.normal(size=POOL_DIM)
    factor = rng.normal(size=(POOL_DIM, POOL_DIM))
    sigma = factor @ factor.T / POOL_DIM
    ref_stats = tmp_path / "ref_stats.npz"
    np.savez(ref_stats, arr_0=ref_images, mu=mu, sigma=sigma)  # no mu_s/sigma_s: sFID from the images

    results = ev.evaluate_folder(ref_stats, samples, cache_dir=tmp_path / "cache", features=toy_features)
    ref_pool, ref_spatial, _ = direct_features(ref_images)
    for result in results:
        pool, spatial, _ = direct_features(np.load(samples / result["file"])["arr_0"])
        want_fid = np_frechet(mu, sigma, pool.mean(0), np.cov(pool, rowvar=False))
        assert result["FID"] == pytest.approx(want_fid, rel=1e-4)
        assert result["sFID"] == pytest.approx(np_fid(ref_spatial, spatial), rel=1e-4, abs=1e-4)
        # precision/recall still come from the reference images
        assert (result["precision"], result["recall"]) == adm_precision_recall(ref_pool, pool)

    # With mu_s/sigma_s too, sFID uses them.
    dim = 4 * 4 * 7
    mu_s, sigma_s = np.zeros(dim), np.eye(dim)
    np.savez(ref_stats, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    (samples / "eval_results.txt").unlink()
    result = ev.evaluate_folder(ref_stats, samples, cache_dir=tmp_path / "cache", features=toy_features)[1]
    pool, spatial, _ = direct_features(np.load(samples / result["file"])["arr_0"])
    want = np_frechet(mu_s, sigma_s, spatial.mean(0), np.cov(spatial, rowvar=False))
    assert result["sFID"] == pytest.approx(want, rel=1e-4)


def test_main_cli(folder, tmp_path, toy_graph, capsys, direct_features, device):
    ref, samples = folder
    argv = ["--ref_batch", str(ref), "--sample_batch_dir", str(samples), "--inception-graph", str(toy_graph[0]),
            "--batch-size", "50", "--cache-dir", str(tmp_path / "cache")]
    assert ev.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == (samples / "eval_results.txt").read_text().splitlines()
    assert len(out) == 2 and all(LINE.match(line) for line in out)

    # The torch backend (checked against TensorFlow on its first batch) prints the same lines.
    torch_samples = tmp_path / "torch_samples"
    torch_samples.mkdir()
    for path in samples.glob("*.npz"):
        (torch_samples / path.name).write_bytes(path.read_bytes())
    torch_argv = argv[:3] + [str(torch_samples)] + argv[4:] + ["--backend", "torch", "--device", str(device)]
    assert ev.main(torch_argv) == 0
    assert capsys.readouterr().out.splitlines() == out

    # --pr-float32: exact precision / recall.
    exact_samples = tmp_path / "exact_samples"
    exact_samples.mkdir()
    (exact_samples / "b_shifted.npz").write_bytes((samples / "b_shifted.npz").read_bytes())
    assert ev.main(argv[:3] + [str(exact_samples)] + argv[4:] + ["--pr-float32"]) == 0
    match = LINE.match(capsys.readouterr().out.strip())
    ref_pool = direct_features(np.load(ref)["arr_0"])[0]
    pool = direct_features(np.load(exact_samples / "b_shifted.npz")["arr_0"])[0]
    precision, recall = np_precision_recall(ref_pool, pool)
    assert (float(match["prec"]), float(match["recall"])) == (round(precision, 4), round(recall, 4))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"empty.*no \.npz"):
        ev.main(["--ref_batch", str(ref), "--sample_batch_dir", str(empty)])


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arrays, problem", [
    ({"images": np.zeros((8, 4, 4, 3), np.uint8)}, r"'arr_0' is missing \(found: images\)"),
    ({"arr_0": np.zeros((8, 4, 4, 3), np.float32)}, "dtype float32, expected uint8"),
    ({"arr_0": np.zeros((8, 4, 4), np.uint8)}, r"shape \(8, 4, 4\), expected \[N, H, W, 3\]"),
    ({"arr_0": np.zeros((8, 4, 4, 1), np.uint8)}, "grayscale"),
    ({"arr_0": np.zeros((8, 3, 4, 4), np.uint8)}, "channels-first"),
    ({"arr_0": np.zeros((3, 4, 4, 3), np.uint8)}, "has 3 images, but at least 4 are needed"),
])
def test_bad_sample_file(tmp_path, arrays, problem):
    path = tmp_path / "bad_batch.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=f"bad_batch.npz.*{problem}"):
        ev.load_images(path)


def test_not_an_npz_and_missing_file(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="junk.npz.*not a readable .npz"):
        ev.load_images(junk)
    with pytest.raises(ValueError, match="absent.npz.*not found"):
        ev.load_images(tmp_path / "absent.npz")


def test_folder_input_errors_come_before_any_computation(folder, tmp_path, monkeypatch, toy_features):
    ref, samples = folder
    calls = count_compute_calls(monkeypatch, toy_features)

    def run(ref_path=ref, sample_dir=samples):
        return ev.evaluate_folder(ref_path, sample_dir, cache_dir=tmp_path / "cache", features=toy_features)

    stats_only = tmp_path / "stats_only.npz"
    np.savez(stats_only, mu=np.zeros(POOL_DIM), sigma=np.eye(POOL_DIM))
    with pytest.raises(ValueError, match=r"reference batch .*stats_only.npz.*no images.*'arr_0' is missing"):
        run(ref_path=stats_only)
    half_stats = tmp_path / "half_stats.npz"
    np.savez(half_stats, arr_0=np.zeros((8, 4, 4, 3), np.uint8), mu=np.zeros(POOL_DIM))
    with pytest.raises(ValueError, match="half_stats.npz.*'mu' but not 'sigma'"):
        run(ref_path=half_stats)
    with pytest.raises(ValueError, match="missing_ref.npz.*not found"):
        run(ref_path=tmp_path / "missing_ref.npz")
    with pytest.raises(ValueError, match="no_such_dir.*not a directory"):
        run(sample_dir=tmp_path / "no_such_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a batch")
    with pytest.raises(ValueError, match="empty.*no .npz sample files"):
        run(sample_dir=empty)

    # One bad file among good ones: nothing is computed and no result is written.
    np.savez(samples / "c_tiny.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="c_tiny.npz.*has 2 images, but at least 4"):
        run()
    assert calls == []
    assert not (samples / "eval_results.txt").exists()


def test_bad_inception_graph(tmp_path, tf):
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="junk.pb.*not a TensorFlow GraphDef"):
        ev.InceptionFeatures(junk).compute(np.zeros((4, 8, 8, 3), np.uint8))
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(1.0, name="something_else")
    other = tmp_path / "other.pb"
    other.write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(ValueError, match="other.pb.*lacks the tensors"):
        ev.InceptionFeatures(other).compute(np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="nope.pb.*not found"):
        ev.InceptionFeatures(tmp_path / "nope.pb")


# --------------------------------------------------------------------------------------------------
# Download of the Inception graph (with a fake urlopen)
# --------------------------------------------------------------------------------------------------

class FakeResponse(io.BytesIO):
    def __init__(self, payload, content_length=None):
        super().__init__(payload)
        length = len(payload) if content_length is None else content_length
        self.headers = {"Content-Length": str(length)}


def fake_urlopen(payload, calls, content_length=None):
    def urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse(payload, content_length)
    return urlopen


def test_download_file_is_atomic_and_checked(tmp_path, monkeypatch):
    payload = b"graph bytes " * 100_000  # > 1 chunk
    digest = hashlib.sha256(payload).hexdigest()
    calls = []
    monkeypatch.setattr(ev, "urlopen", fake_urlopen(payload, calls))
    dest = tmp_path / "dl" / "graph.pb"

    with pytest.raises(ev.DownloadError, match="checksum mismatch"):
        ev.download_file("https://example.invalid/graph.pb", dest, sha256="0" * 64)
    assert list(dest.parent.iterdir()) == []  # no partial or temporary file left behind

    monkeypatch.setattr(ev, "urlopen", fake_urlopen(payload, calls, content_length=len(payload) + 1))
    with pytest.raises(ev.DownloadError, match="incomplete"):
        ev.download_file("https://example.invalid/graph.pb", dest)
    assert list(dest.parent.iterdir()) == []

    monkeypatch.setattr(ev, "urlopen", fake_urlopen(payload, calls))
    assert ev.download_file("https://example.invalid/graph.pb", dest, sha256=digest.upper()) == dest
    assert dest.read_bytes() == payload
    assert list(dest.parent.iterdir()) == [dest]


def test_resolve_inception_graph_downloads_once(tmp_path, monkeypatch):
    payload = b"fake inception graph"
    digest = hashlib.sha256(payload).hexdigest()
    calls = []
    monkeypatch.setattr(ev, "urlopen", fake_urlopen(payload, calls))
    cache = tmp_path / "cache"

    path = ev.resolve_inception_graph(None, cache, sha256=digest)
    assert path == cache / ev.INCEPTION_FILENAME and path.read_bytes() == payload
    assert calls == [ev.INCEPTION_URL]
    assert ev.resolve_inception_graph(None, cache, sha256=digest) == path  # cached: no second download
    assert calls == [ev.INCEPTION_URL]
    with pytest.raises(ev.DownloadError, match="does not match"):
        ev.resolve_inception_graph(None, cache, sha256="f" * 64)

    # A failing download points at --inception-graph and leaves nothing behind.
    def offline(url, timeout=None):
        raise OSError("network unreachable")
    monkeypatch.setattr(ev, "urlopen", offline)
    other = tmp_path / "other_cache"
    with pytest.raises(ev.DownloadError, match="--inception-graph"):
        ev.resolve_inception_graph(None, other)
    assert list(other.iterdir()) == []

    # An explicit path is used as is (and checked when a checksum is given).
    assert ev.resolve_inception_graph(path, None) == path
    with pytest.raises(ValueError, match="does not match"):
        ev.resolve_inception_graph(path, None, sha256="f" * 64)
    with pytest.raises(ValueError, match="missing.pb.*not found"):
        ev.resolve_inception_graph(tmp_path / "missing.pb")


def corrupt_copies(samples):
    """Two sample files whose headers are valid but whose data are not: a flipped byte in the image data (bad
    CRC) and fewer bytes than the header announces (a short write, with a matching CRC)."""
    good = (samples / "a_copy.npz").read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    (samples / "c_bad_crc.npz").write_bytes(bytes(flipped))
    images = np.load(samples / "a_copy.npz")["arr_0"]
    header = {"descr": "|u1", "fortran_order": False, "shape": images.shape}
    with zipfile.ZipFile(samples / "d_short.npz", "w") as archive:
        with archive.open("arr_0.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)
            member.write(images.tobytes()[: images.nbytes // 2])


def test_corrupt_sample_files_are_named_and_the_others_scored(folder, tmp_path, toy_features):
    ref, samples = folder
    corrupt_copies(samples)
    with pytest.raises(ev.UnreadableSamplesError, match=r"2 of 4 sample file\(s\) could not be read.*c_bad_crc.npz: "
                                                        r"corrupt.*Bad CRC.*d_short.npz: corrupt.*The other 2 were "
                                                        r"scored") as raised:
        ev.evaluate_folder(ref, samples, cache_dir=tmp_path / "cache", features=toy_features)
    assert [r["file"] for r in raised.value.results] == ["a_copy.npz", "b_shifted.npz"]
    listed = (samples / "eval_results.txt").read_text().splitlines()
    assert [line.split(" # ")[0] for line in listed] == ["a_copy.npz", "b_shifted.npz"]  # the bad ones retried later
    assert sorted(p.name for p in samples.iterdir() if "lock" in p.name) == []


def test_unwritable_results_or_cache_stop_before_any_computation(folder, tmp_path, monkeypatch, toy_features):
    ref, samples = folder
    calls = count_compute_calls(monkeypatch, toy_features)
    (samples / "eval_results.txt").mkdir()  # cannot be appended to, whoever runs the evaluator
    with pytest.raises(ValueError, match=r"results file .*eval_results.txt cannot be written .*nothing was computed"):
        ev.evaluate_folder(ref, samples, cache_dir=tmp_path / "cache", features=toy_features)
    (samples / "eval_results.txt").rmdir()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"could not write reference-activation cache folder .*a_file.*nothing was "
                                         r"computed. Pass --cache-dir"):
        ev.evaluate_folder(ref, samples, cache_dir=tmp_path / "a_file" / "cache", features=toy_features)
    assert calls == [] and not (samples / "eval_results.txt").exists()


def test_a_second_evaluator_of_the_same_folder_is_refused(folder, tmp_path, toy_features):
    import json
    import socket
    import subprocess
    ref, samples = folder
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (samples / "eval_results.txt.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        with pytest.raises(ValueError, match=rf"sample folder {samples} is in use by another process: pid {other.pid}"):
            ev.evaluate_folder(ref, samples, cache_dir=tmp_path / "cache", features=toy_features)
    finally:
        other.kill()
        other.wait()
    assert not (samples / "eval_results.txt").exists()


# --------------------------------------------------------------------------------------------------
# FD-DINOv2 (--metrics adm,fd_dinov2; the pipeline itself: tests/test_dinov2_features.py)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from helpers import tiny_dinov2_features, write_tiny_dinov2
    path = write_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny.safetensors")
    return path, tiny_dinov2_features(path)


def copy_samples(samples, dest):
    dest.mkdir()
    for path in samples.glob("*.npz"):
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def test_default_output_is_unchanged_and_fd_dinov2_adds_one_field(folder, tmp_path, toy_graph, capsys, monkeypatch,
                                                                  tiny_dinov2):
    ref, samples = folder
    cache = tmp_path / "cache"

    def argv(sample_dir, *extra):
        return ["--ref_batch", str(ref), "--sample_batch_dir", str(sample_dir), "--inception-graph",
                str(toy_graph[0]), "--batch-size", "50", "--cache-dir", str(cache), *extra]

    def refuse(*args, **kwargs):
        raise AssertionError("the default evaluation must not touch DINOv2")
    with monkeypatch.context() as m:
        for name in ("find_weights", "build_network", "reference_statistics"):
            m.setattr(ev.dinov2_features, name, refuse)
        default, explicit = copy_samples(samples, tmp_path / "default"), copy_samples(samples, tmp_path / "explicit")
        assert ev.main(argv(default)) == 0
        printed = capsys.readouterr().out
        assert ev.main(argv(explicit, "--metrics", "adm")) == 0
        assert capsys.readouterr().out == printed
    written = (default / "eval_results.txt").read_bytes()
    assert (explicit / "eval_results.txt").read_bytes() == written and written.decode() == printed
    assert all(LINE.match(line) for line in printed.splitlines()) and "DINOv2" not in printed
    assert not (cache / ev.DINOV2_CACHE_FOLDER).exists()

    # adm,fd_dinov2: the same line plus ", FD_DINOv2: x", x the Frechet distance of the DINOv2 features.
    path, network = tiny_dinov2
    built = []
    monkeypatch.setattr(ev, "make_dinov2_features", lambda weights, device: built.append(weights) or network)
    both = copy_samples(samples, tmp_path / "both")
    assert ev.main(argv(both, "--metrics", "adm,fd_dinov2", "--dinov2", str(path))) == 0
    assert built == [path]
    lines = (both / "eval_results.txt").read_text().splitlines()
    ref_dinov2 = network.features_of(np.load(ref)["arr_0"])
    for line, plain in zip(lines, printed.splitlines(), strict=True):
        head, value = line.rsplit(", FD_DINOv2: ", 1)
        assert head == plain and re.fullmatch(r"-?\d+\.\d{4}", value)
        name = plain.split(" # ")[0]
        want = np_fid(ref_dinov2, network.features_of(np.load(both / name)["arr_0"]))
        assert float(value) == pytest.approx(want, abs=2e-4), name
    assert float(lines[0].rsplit(": ", 1)[1]) == 0.0 and float(lines[1].rsplit(": ", 1)[1]) > 0.01  # copy, shifted
    assert capsys.readouterr().out.splitlines() == lines

    # A folder scored without it: each file gets a second line with it; then nothing is left to score.
    assert ev.main(argv(default, "--metrics", "adm,fd_dinov2", "--dinov2", str(path))) == 0
    assert (default / "eval_results.txt").read_text().splitlines() == printed.splitlines() + lines
    assert ev.main(argv(default, "--metrics", "adm,fd_dinov2", "--dinov2", str(path))) == 0
    assert (default / "eval_results.txt").read_text().splitlines() == printed.splitlines() + lines
    assert len(list((cache / ev.DINOV2_CACHE_FOLDER).glob("*.npz"))) == 1  # the reference's statistics, once

    # --dinov2-ref: another image set gives other reference statistics (a second cache file).
    other_ref = tmp_path / "other_ref.npz"
    np.savez(other_ref, arr_0=random_images(20, 64, 16))
    other = copy_samples(samples, tmp_path / "other")
    assert ev.main(argv(other, "--metrics", "adm,fd_dinov2", "--dinov2", str(path), "--dinov2-ref",
                        str(other_ref))) == 0
    first = (other / "eval_results.txt").read_text().splitlines()[0]
    want = np_fid(network.features_of(np.load(other_ref)["arr_0"]), ref_dinov2)
    assert float(first.rsplit(": ", 1)[1]) == pytest.approx(want, abs=2e-4) and want > 0.01
    assert len(list((cache / ev.DINOV2_CACHE_FOLDER).glob("*.npz"))) == 2


def test_fd_dinov2_input_errors_come_before_any_computation(folder, tmp_path, monkeypatch, toy_features, capsys):
    ref, samples = folder
    calls = count_compute_calls(monkeypatch, toy_features)
    with pytest.raises(ValueError, match=r"absent\.pth: file not found.*hf download timm/vit_large_patch14_dinov2"):
        ev.evaluate_folder(ref, samples, cache_dir=tmp_path / "cache", features=toy_features,
                           metrics=("adm", "fd_dinov2"), dinov2_weights=tmp_path / "absent.pth")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"found, never read")
    with pytest.raises(ValueError, match=r"DINOv2 reference .*missing\.npz.*not found"):
        ev.evaluate_folder(ref, samples, cache_dir=tmp_path / "cache", features=toy_features,
                           metrics=("adm", "fd_dinov2"), dinov2_weights=weights, dinov2_ref=tmp_path / "missing.npz")
    assert calls == [] and not (samples / "eval_results.txt").exists()
    with pytest.raises(SystemExit, match=r"absent\.pth: file not found"):
        ev.main(["--ref_batch", str(ref), "--sample_batch_dir", str(samples), "--metrics", "adm,fd_dinov2",
                 "--dinov2", str(tmp_path / "absent.pth"), "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(SystemExit):
        ev.main(["--ref_batch", str(ref), "--sample_batch_dir", str(samples), "--metrics", "fd_dinov2"])
    assert "includes adm (the ADM set is always computed), e.g. adm,fd_dinov2" in capsys.readouterr().err

"""dinov2_features.py: the FD-DINOv2 pipeline on a tiny random DINOv2 ViT of timm's family (no download), against an
independent computation: the same weights loaded into timm's model by the test, the preprocessing and the DINOv2 hub
model's position-embedding resampling written out here, timm's own forward, NumPy's mean / covariance and scipy's
sqrtm. Also: the cache key, the weights lookup and its error message, the reference statistics' cache."""
import math

import numpy as np
import pytest
import scipy.linalg
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import dinov2_features as df
import evaluator
from helpers import TINY_DINOV2, tiny_dinov2_features, write_tiny_dinov2

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images(seed, n, height, width, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, (n, height, width, 3), dtype=np.uint8)


def independent_features(weights_path, batch):
    """The normed class token of timm's model for 224 x 224 inputs, the weights loaded here: position embeddings
    resampled as the DINOv2 hub model does (bicubic, scale factor (16 + 0.1) / grid, no antialias)."""
    from safetensors.torch import load_file
    state = load_file(str(weights_path))
    kwargs = dict(TINY_DINOV2)
    model = timm.create_model(kwargs.pop("arch"), img_size=224, num_classes=0, **kwargs).eval()
    pos = state["pos_embed"]
    side = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((16 + 0.1) / side,) * 2, mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    model.load_state_dict(state)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    x = (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_features(x)[:, 0].numpy()  # forward_features ends with the final LayerNorm


def scipy_frechet(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny.safetensors")
    return path, tiny_dinov2_features(path)


def test_features_and_distance_equal_an_independent_computation(tiny):
    path, features = tiny
    reference, samples = images(0, 40, 32, 32), images(1, 36, 48, 40, low=30)
    got = np.concatenate([features.features_of(b) for b in df.batches_of(samples, 16)])
    want = independent_features(path, samples)
    assert got.shape == (36, TINY_DINOV2["embed_dim"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    ref_moments = features.moments(df.batches_of(reference, 16))
    distance = evaluator.fd_dinov2(ref_moments.statistics(), features.moments(df.batches_of(samples, 7)))
    assert distance == pytest.approx(scipy_frechet(independent_features(path, reference), want), rel=1e-6)
    assert distance > 0.1  # the two sets differ, so the check above compares a non-trivial number
    same = evaluator.fd_dinov2(ref_moments.statistics(), features.moments(df.batches_of(reference, 9)))
    assert abs(same) < 1e-6


def test_position_embeddings_follow_the_dinov2_hub_rule_not_timms():
    from timm.layers import resample_abs_pos_embed
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    ours = df.dinov2_pos_embed(pos, 16)
    assert ours.shape == (1, 257, 8) and torch.equal(ours[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    hub = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic").permute(0, 2, 3, 1)
    torch.testing.assert_close(ours[:, 1:], hub.reshape(1, 256, 8), rtol=0, atol=0)
    timms = resample_abs_pos_embed(pos, new_size=(16, 16), num_prefix_tokens=1)
    assert (ours - timms).abs().max() > 1e-3  # timm's own resampling would change the features
    assert df.dinov2_pos_embed(pos, 37) is pos


def test_original_and_timm_layouts_load_the_same_network(tmp_path, tiny):
    original = write_tiny_dinov2(tmp_path / "original.pth", original_layout=True)  # same seed as `tiny`
    batch = images(2, 4, 30, 30)
    np.testing.assert_array_equal(tiny_dinov2_features(original).features_of(batch), tiny[1].features_of(batch))
    wrong = write_tiny_dinov2(tmp_path / "wrong.safetensors", embed_dim=48)
    with pytest.raises(df.WeightsError, match=r"wrong\.safetensors do not fit timm's vit_small_patch14_dinov2"):
        tiny_dinov2_features(wrong)


def test_moments_equal_numpy_mean_and_covariance():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(50, 6)) * 3 + 10).astype(np.float32)
    moments = df.Moments()
    for part in np.array_split(x, 4):
        moments.add(part)
    mu, sigma = moments.statistics()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 images"):
        df.Moments().add(x[:1]).statistics()


def test_the_cache_key_names_network_weights_and_preprocessing(tmp_path, tiny):
    path, features = tiny

    def key(feats, signature="npz ref"):
        return df.stats_cache_path(feats, "ref", signature, tmp_path)[1]
    base = key(features)
    assert key(tiny_dinov2_features(path)) == base  # the same network, rebuilt
    assert key(features, "npz other") != base
    assert key(tiny_dinov2_features(write_tiny_dinov2(tmp_path / "seed1.safetensors", seed=1))) != base
    deeper = df.build_network(write_tiny_dinov2(tmp_path / "deeper.safetensors", depth=3), **{**TINY_DINOV2,
                                                                                            "depth": 3})
    assert key(df.DINOv2Features(deeper, device="cpu")) != base
    for change in (dict(resolution=112), dict(antialias=False), dict(interpolation="bilinear"),
                   dict(mean=(0.5, 0.5, 0.5))):
        assert key(tiny_dinov2_features(path, **change)) != base, change


def test_reference_statistics_are_cached(tmp_path, tiny):
    features = tiny[1]
    batch = images(4, 12, 20, 20)
    first = df.reference_statistics(features, df.batches_of(batch, 5), "ref", "sig", tmp_path)

    def unread():
        raise AssertionError("the cached statistics must not read the images")
        yield
    second = df.reference_statistics(features, unread(), "ref", "sig", tmp_path)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert len(list(tmp_path.glob("ref-*.npz"))) == 1


def test_folder_and_npz_references_give_the_same_statistics(tmp_path, tiny):
    features = tiny[1]
    square, wide = images(5, 3, 24, 24), images(6, 2, 20, 36)
    folder = tmp_path / "real"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(list(square) + list(wide)):
        Image.fromarray(image).save(folder / ("sub" if i >= 3 else "") / f"{i}.png")
    files = df.folder_images(folder)
    assert [b.shape for b in df.folder_batches(files, 2)] == [(2, 24, 24, 3), (1, 24, 24, 3), (2, 20, 36, 3)]
    from_folder = evaluator.load_dinov2_reference(features, folder, batch_size=2, cache_dir=tmp_path / "cache")
    moments = df.Moments().add(features.features_of(square)).add(features.features_of(wide))
    for a, b in zip(from_folder, moments.statistics()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    (folder / "sub" / "notes.txt").write_text("not an image")
    assert df.folder_images(folder) == files
    with pytest.raises(ValueError, match=r"empty: 0 image file"):
        df.folder_images(tmp_path / "empty")


def test_missing_weights_name_the_files_and_how_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    with pytest.raises(df.MissingWeightsError) as err:
        df.find_weights()
    message = str(err.value)
    for part in ("model.safetensors", "timm/vit_large_patch14_dinov2.lvd142m", str(tmp_path / "hub"),
                 "dinov2_vitl14_pretrain.pth", "hf download", df.ORIGINAL_URL, "--dinov2 PATH",
                 "fid_dinov2_weights"):
        assert part in message, part
    with pytest.raises(df.MissingWeightsError, match=r"nowhere\.pth: file not found.*hf download"):
        df.find_weights(tmp_path / "nowhere.pth")

    # Found in the Hub cache's layout (as `hf download` leaves it), then in torch hub's checkpoint folder.
    snapshot = tmp_path / "hub" / "models--timm--vit_large_patch14_dinov2.lvd142m" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "hub" / "models--timm--vit_large_patch14_dinov2.lvd142m" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--vit_large_patch14_dinov2.lvd142m" / "refs" / "main").write_text("abc123")
    assert df.find_weights() == snapshot / "model.safetensors"
    (snapshot / "model.safetensors").unlink()
    (tmp_path / "torch_hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch_hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth").write_bytes(b"weights")
    assert df.find_weights() == tmp_path / "torch_hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth"

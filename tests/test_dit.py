"""DiT backbone: reference state-dict layout and parameter counts, conditioning, initialisation."""
import json
import os

import numpy as np
import pytest
import torch

from dit import DIT_SIZES, build_dit, get_2d_sincos_pos_embed, timestep_embedding
from models import Soflow

MANIFEST = json.load(open(os.path.join(os.path.dirname(__file__), "data", "official_state_dict_manifest.json")))


def reference_model(model_type, device="meta"):
    with torch.device(device):
        if model_type == "UNet":
            return Soflow(3, 32, 0, 0.0, "Linear", "Euler", "UNet")
        return Soflow(4, 32, 1000, 0.1, "Linear", "Euler", model_type)


@pytest.mark.parametrize("model_type", ["UNet"] + list(DIT_SIZES))
def test_state_dict_matches_manifest(model_type):
    model = reference_model(model_type)
    ref = MANIFEST[model_type]
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert [k for k, _, _ in ours] == [k for k, _, _ in ref["state_dict"]]
    assert ours == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["num_trainable"]


def test_pos_embed_is_fixed_sincos():
    net = build_dit("DiT-B-4", 32, 4, 10, True)
    assert not net.pos_embed.requires_grad
    table = get_2d_sincos_pos_embed(768, 8)
    assert np.allclose(net.pos_embed[0].numpy(), table, atol=1e-6)
    # first half encodes the column index: rows in one image row share their second half
    assert np.allclose(table[0, 384:], table[1, 384:]) and not np.allclose(table[0, :384], table[1, :384])


def test_adaln_zero_start_outputs_zero_and_conditions_on_t_minus_s(device):
    torch.manual_seed(0)
    net = build_dit("DiT-B-4", 16, 4, 10, True, hidden_size=64, depth=2, num_heads=4).to(device)
    x = torch.randn(3, 4, 16, 16).to(device)
    t = torch.rand(3).to(device)
    labels = torch.tensor([0, 1, 10], device=device)
    assert torch.all(net(x, t, t * 0.5, labels) == 0)
    with torch.no_grad():
        for p in net.parameters():  # leave adaLN-Zero start (drawn on the CPU: the same weights on each device)
            p.copy_(torch.nn.init.normal_(torch.empty(p.shape, dtype=p.dtype), std=0.05))
    out1 = net(x, t, t * 0.5, labels)
    out2 = net(x, t, t * 0.2, labels)
    out3 = net(x, t, t * 0.5, None)  # null class = row 10
    assert out1.shape == x.shape and not torch.allclose(out1, out2)
    assert torch.allclose(out3[2], out1[2], atol=1e-6) and not torch.allclose(out3[0], out1[0])
    # the s-embedder sees only t - s
    emb = net.s_embedder(t - t * 0.5)
    assert torch.allclose(emb, net.s_embedder(torch.tensor(0.5, device=device) * t))


def test_timestep_embedding_raw_time(device):
    t = torch.tensor([0.0, 0.5], device=device)
    emb = timestep_embedding(t, 256).cpu()
    assert emb.shape == (2, 256)
    assert torch.allclose(emb[0, :128], torch.ones(128)) and torch.allclose(emb[0, 128:], torch.zeros(128))
    assert torch.isclose(emb[1, 0], torch.cos(torch.tensor(0.5)))


def test_label_table_without_null_row_rejects_none(device):
    net = build_dit("DiT-B-4", 16, 4, 10, False, hidden_size=32, depth=1, num_heads=2).to(device)
    assert net.y_embedder.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="null"):
        net(torch.randn(1, 4, 16, 16).to(device), torch.rand(1).to(device), torch.rand(1).to(device), None)


def test_bad_sizes():
    with pytest.raises(ValueError, match="DiT-Z-9"):
        build_dit("DiT-Z-9", 32, 4, 10, True)
    with pytest.raises(ValueError, match="patch size"):
        build_dit("DiT-B-4", 30, 4, 10, True)
    with pytest.raises(ValueError, match="mlp_ratio"):
        build_dit("DiT-B-4", 32, 4, 10, True, mlp_ratio=2)


@pytest.mark.parametrize("model_type", ["UNet"] + list(DIT_SIZES))
def test_reference_state_dict_loads_strictly(model_type):
    """A state dict with exactly the manifest's keys and shapes loads with strict=True, no renaming."""
    model = reference_model(model_type)
    released = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                for k, shape, dtype in MANIFEST[model_type]["state_dict"]}
    result = model.load_state_dict(released, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_reference_layout_checkpoint_file_loads(tmp_path):
    """A checkpoint file in the release's layout (model / ema_model / optimizer / finished_steps /
    finished_epochs) of the real-size U-Net loads through the checkpoint reader with strict=True."""
    from checkpoints import load_checkpoint, model_state
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(shape, generator=g) for k, shape, _ in MANIFEST["UNet"]["state_dict"]}
    torch.save({"model": weights, "ema_model": weights, "optimizer": {}, "finished_steps": 800000,
                "finished_epochs": 16384}, tmp_path / "released.pt")
    model = reference_model("UNet", device="cpu")
    model.load_state_dict(model_state(load_checkpoint(str(tmp_path / "released.pt"))), strict=True)
    assert torch.equal(model.network.map_layer0.weight, weights["network.map_layer0.weight"])


# CPU-only: the initial weights are drawn on the CPU whatever the device (a statistics check of that draw).
def test_initialisation_of_the_two_time_embedders():
    """As the release: the t embedder's two MLP weights are re-drawn from normal(0, 0.02); the (t - s)
    embedder keeps DiT's xavier-uniform draw (bound sqrt(6 / (fan_in + fan_out))), biases zero."""
    torch.manual_seed(0)
    net = build_dit("DiT-B-4", 32, 4, 10, True)
    for layer, fan_in in ((net.t_embedder.mlp[0], 256), (net.t_embedder.mlp[2], 768)):
        assert abs(layer.weight.std().item() - 0.02) < 0.001
    for layer, fan_in in ((net.s_embedder.mlp[0], 256), (net.s_embedder.mlp[2], 768)):
        bound = (6 / (fan_in + 768)) ** 0.5
        w = layer.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound  # uniform on [-bound, bound]
        assert abs(w.std().item() - bound / 3 ** 0.5) < 0.02 * bound
        assert torch.all(layer.bias == 0)

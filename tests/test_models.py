import pytest
import torch
import torch.nn.functional as F

from ancra_tune.models import MODEL_REGISTRY, ModelOutput, create_model, reverse_attention

K = 10
# Heavy models are checked on one tiny batch; the registry is covered in full.
INPUTS = {"small_cnn": (3, 1, 28), "resnet18": (2, 3, 32), "preact_resnet18": (2, 3, 32),
          "wrn28_10": (2, 3, 32), "wrn34_10": (2, 3, 32)}
# As released: RA in both blocks of ResNet-18's last stage, in the last two blocks of a WRN.
N_RA_BLOCKS = {"small_cnn": 2, "resnet18": 2, "preact_resnet18": 2, "wrn28_10": 2, "wrn34_10": 2}
FEATURES = {"small_cnn": 128, "resnet18": 512, "preact_resnet18": 2048, "wrn28_10": 640, "wrn34_10": 640}


def test_reverse_attention_is_eq6_by_hand() -> None:
    feats = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weight = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 3.0]])  # (K=2, C=3)
    out = reverse_attention(feats, weight, torch.tensor([1, 0]))
    assert torch.equal(out, torch.tensor([[0.5, 4.0, 9.0], [4.0, 0.0, -6.0]]))
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    out4 = reverse_attention(maps, weight, torch.tensor([0, 1]))
    assert torch.equal(out4[0], maps[0] * weight[0].view(3, 1, 1))
    assert torch.equal(out4[1], maps[1] * weight[1].view(3, 1, 1))
    with pytest.raises(ValueError, match="do not match"):
        reverse_attention(feats, torch.ones(2, 4), torch.tensor([0, 1]))
    # A 2 x 2 pooling grid (the released PreActResNet's 2048-d feature): D = C * 4 and each
    # channel's quadrant is scaled by its own entry of the row.
    w2 = torch.arange(2 * 12, dtype=torch.float32).view(2, 12)  # (K=2, C=3 x 4 cells)
    maps = torch.ones(1, 3, 4, 4)
    out = reverse_attention(maps, w2, torch.tensor([1]))[0]
    for c in range(3):
        cells = w2[1, 4 * c:4 * c + 4]  # top-left, top-right, bottom-left, bottom-right
        assert torch.equal(out[c, :2, :2], torch.full((2, 2), cells[0].item()))
        assert torch.equal(out[c, :2, 2:], torch.full((2, 2), cells[1].item()))
        assert torch.equal(out[c, 2:, :2], torch.full((2, 2), cells[2].item()))
        assert torch.equal(out[c, 2:, 2:], torch.full((2, 2), cells[3].item()))


@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
@pytest.mark.parametrize("ra", [True, False])
def test_registry_shapes_gradients(name: str, ra: bool) -> None:
    n, c, s = INPUTS[name]
    model = create_model(name, num_classes=K, in_channels=c, ra=ra)
    x, y = torch.rand(n, c, s, s), torch.randint(0, K, (n,))
    out = model(x, y)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (n, K)
    assert len(out.aux_logits) == (N_RA_BLOCKS[name] if ra else 0)
    assert all(a.shape == (n, K) for a in out.aux_logits)
    assert out.features.shape == (n, model.fc.in_features) and model.fc.in_features == FEATURES[name]
    loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(a, y) for a in out.aux_logits)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname


def test_unknown_model_lists_known() -> None:
    with pytest.raises(ValueError, match="small_cnn.*resnet18"):
        create_model("vgg", num_classes=10)


def _cells(rows, h, w, g):
    """(N, C * g * g) rows -> (N, C, H, W): each channel's entry c * g * g + i * g + j fills cell (i, j)."""
    n = rows.shape[0]
    out = torch.zeros(n, rows.shape[1] // (g * g), h, w)
    for i in range(g):
        for j in range(g):
            out[:, :, i * h // g:(i + 1) * h // g, j * w // g:(j + 1) * w // g] = rows[:, i * g + j::g * g, None, None]
    return out


def _manual_ra_forward(model, x, gate_fn):
    """RA written out step by step from the model's pieces (eq. 6, Algorithm 1), with the released
    structure of pre-activation nets: their final BN-ReLU inside every RA block, fed forward."""
    z = model.stem(model.normalize(x))
    w = model.fc.weight
    g = model.pool_grid
    aux = []
    for i, block in enumerate(model.last_stage):
        z = block(z)
        if model.post_in_ra_blocks:
            z = model.post(z)
        pooled = torch.flatten(F.adaptive_avg_pool2d(z, g), 1)
        p = model.fc(pooled)
        aux.append(p)
        gate = gate_fn(p)
        if i < len(model.last_stage) - 1:
            z = z * _cells(w[gate], z.shape[2], z.shape[3], g)
        else:
            weighted = z * _cells(w[gate], z.shape[2], z.shape[3], g)
            final = model.fc(torch.flatten(F.adaptive_avg_pool2d(weighted, g), 1))
    return final, aux


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18", "wrn28_10"])
def test_ra_gate_uses_label_in_training_and_prediction_otherwise(name: str) -> None:
    torch.manual_seed(1)
    n, c, s = INPUTS[name]
    model = create_model(name, num_classes=K, in_channels=c, ra=True).eval()
    x, y = torch.rand(n, c, s, s), torch.randint(0, K, (n,))
    with torch.no_grad():
        by_label = model(x, y)
        by_pred = model(x)
        ref_label, aux_label = _manual_ra_forward(model, x, lambda p: y)
        ref_pred, aux_pred = _manual_ra_forward(model, x, lambda p: p.argmax(1))
    torch.testing.assert_close(by_label.logits, ref_label)
    torch.testing.assert_close(by_pred.logits, ref_pred)
    for a, b in zip(by_pred.aux_logits, aux_pred, strict=True):
        torch.testing.assert_close(a, b)
    # The first block's P reads the unweighted feature: it does not depend on the gate.
    torch.testing.assert_close(by_label.aux_logits[0], by_pred.aux_logits[0])
    # Gating by a label other than the prediction changes the final output.
    wrong = (by_pred.aux_logits[-1].argmax(1) + 1) % K
    assert not torch.allclose(model(x, wrong).logits, by_pred.logits)


def test_ra_off_feed_unweighted_option() -> None:
    torch.manual_seed(2)
    a = create_model("small_cnn", num_classes=K, in_channels=1, ra=True, ra_feed_weighted=False).eval()
    x, y = torch.rand(4, 1, 12, 12), torch.randint(0, K, (4,))
    with torch.no_grad():
        out = a(x, y)
        # With unweighted feeding the last block's P equals the plain (RA-off) network's prediction.
        b = create_model("small_cnn", num_classes=K, in_channels=1, ra=False).eval()
        b.load_state_dict(a.state_dict())
        plain = b(x)
    torch.testing.assert_close(out.aux_logits[-1], plain.logits)
    torch.testing.assert_close(out.logits, a.fc(plain.features * a.fc.weight[y]))


def test_normalisation_inside_model() -> None:
    m = create_model("small_cnn", num_classes=K, in_channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(m.normalize(x), (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2)


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18", "wrn28_10"])
@pytest.mark.parametrize("feed_weighted", [True, False])
def test_real_logits_from_a_shared_pass_are_the_real_models_exactly(name: str, feed_weighted: bool) -> None:
    """``real=True`` gives, beside whatever gate is attacked, the real model's P' bit for bit, and
    leaves the surrogate's values and gradients as they are without it."""
    torch.manual_seed(3)
    n, c, s = INPUTS[name]
    n = 4 if name == "small_cnn" else n
    model = create_model(name, num_classes=K, in_channels=c, ra=True, ra_feed_weighted=feed_weighted).eval()
    x = torch.rand(n, c, s, s)
    with torch.no_grad():
        real = model(x).logits
    labels = (real.argmax(1) + 1) % K  # gates that part from the prediction
    for kw in ({}, {"labels": labels}, {"soft_gate": 1.0, "gate": "soft"},
               {"soft_gate": 1.0, "gate": "straight_through"}):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        shared = model(xa, real=True, **kw)
        alone = model(xb, **kw)
        assert alone.real_logits is None
        assert torch.equal(shared.real_logits, real), kw
        assert not shared.real_logits.requires_grad
        assert torch.equal(shared.logits, alone.logits), kw
        F.cross_entropy(shared.logits, labels).backward()
        F.cross_entropy(alone.logits, labels).backward()
        assert torch.equal(xa.grad, xb.grad), kw
    if name == "small_cnn":  # the labels' and the soft gate's P' differ from the real one here
        assert not torch.equal(model(x, labels).logits, real)

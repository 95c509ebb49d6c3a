import pytest
import torch
from conftest import IdentityCNN, wrap
from safetensors.torch import save_file
from torch import nn

from lavise_core.data.samples import sample_photo
from lavise_core.models.networks import ModelLoadError, default_layer, forward_maps, load_model, record_layer


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_record_layer_removes_hook_on_success(identity_model):
    m = identity_model.model
    with record_layer(m, "features") as rec:
        m(torch.rand(2, 3, 16, 16))
    assert rec.output.shape == (2, 3, 16, 16)
    assert _hook_count(m) == 0


def test_record_layer_removes_hook_when_forward_raises():
    m = IdentityCNN(fail_after=0)
    with pytest.raises(RuntimeError, match="simulated"), record_layer(m, "features"):
        m(torch.rand(1, 3, 8, 8))
    assert _hook_count(m) == 0


def test_forward_maps_identity_values(identity_model):
    x = torch.zeros(1, 3, 16, 16)
    x[0, 1] = 0.5
    maps, logits = forward_maps(identity_model, x)
    assert torch.equal(maps[0, 1], torch.full((16, 16), 0.5))
    assert torch.allclose(logits, torch.tensor([[0.0, 0.5, 0.0]]))


def test_default_layer_is_last_spatial_module():
    # the container's output is the same tensor as its last child's; the outermost name wins
    assert default_layer(IdentityCNN(), 16) == "features"


def test_classifier_weights(identity_model):
    w, b = identity_model.classifier_weights()
    assert w.shape == (3, 3) and (w == torch.eye(3).numpy()).all() and (b == 0).all()


def test_missing_layer_message(identity_model):
    with pytest.raises(ModelLoadError, match="no layer 'layer9'"):
        identity_model.check_layer("layer9")


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0")


def _top5(lm, name):
    x = lm.preprocess(sample_photo(name))[None]
    with torch.no_grad():
        p = lm.model(x).softmax(1)[0]
    return [lm.class_names[i] for i in p.topk(5).indices]


def test_efficientnet_lite0_classifies_chelsea_as_a_cat(lite0):
    assert _top5(lite0, "chelsea")[0] in {"tabby", "tiger cat", "Egyptian cat"}


def test_efficientnet_lite0_classifies_coffee(lite0):
    assert _top5(lite0, "coffee")[0] in {"espresso", "cup"}


def test_efficientnet_lite0_layer_feeds_pooling(lite0):
    x = lite0.preprocess(sample_photo("coffee"))[None]
    maps, logits = forward_maps(lite0, x)
    assert maps.shape == (1, 1280, 7, 7)
    w, b = lite0.classifier_weights()
    # the classifier sees exactly the spatial mean of the explained layer
    recomputed = maps.mean((2, 3)) @ torch.from_numpy(w).T + torch.from_numpy(b)
    assert torch.allclose(recomputed, logits, atol=1e-4)
    assert _hook_count(lite0.model) == 0


def test_unknown_spec():
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("alexnet-from-the-moon")


def test_named_architecture_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"not on this machine \(looked for .*resnet18-f37072fd\.pth\)"):
        load_model("torchvision:resnet18")


def test_named_architecture_from_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    m = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(m.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    lm = load_model("torchvision:resnet18")
    assert lm.default_layer == "layer4" and lm.classifier == "fc" and len(lm.class_names) == 1000


def _write_resnet_checkpoint(tmp_path, classes=3):
    import torchvision

    m = torchvision.models.resnet18(weights=None, num_classes=classes)
    path = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(path))
    names = tmp_path / "names.txt"
    names.write_text("".join(f"c{i}\n" for i in range(classes)))
    return path, names


def test_user_checkpoint_safetensors(tmp_path):
    path, names = _write_resnet_checkpoint(tmp_path)
    lm = load_model(f"checkpoint:{path}?arch=torchvision:resnet18&classes={names}")
    assert lm.class_names == ["c0", "c1", "c2"] and lm.default_layer == "layer4"


def test_user_checkpoint_wrong_class_count(tmp_path):
    path, _ = _write_resnet_checkpoint(tmp_path, classes=3)
    names = tmp_path / "five.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    with pytest.raises(ModelLoadError, match="shape mismatches: fc"):
        load_model(f"checkpoint:{path}?arch=torchvision:resnet18&classes={names}")


class _Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickled_checkpoint_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil()}, path)
    with pytest.raises(ModelLoadError, match=r"refused.*`print`") as err:
        load_model(f"checkpoint:{path}?arch=torchvision:resnet18")
    assert "weights_only" not in str(err.value) and "safetensors.torch.save_file" in str(err.value)


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (lambda b: b[: len(b) // 2], r"header describes .* bytes \(truncated\)"),
        (lambda b: b[:5], "shorter than the 8-byte header length"),
        (lambda b: b"not a safetensors file at all", "header claims .* bytes"),
        (lambda b: b[:8] + b"{" * 8 + b[16:], "header is not valid JSON"),
    ],
)
def test_corrupt_safetensors_named_with_reason(tmp_path, cut, why):
    path, _ = _write_resnet_checkpoint(tmp_path)
    path.write_bytes(cut(path.read_bytes()))
    with pytest.raises(ModelLoadError, match=f"w.safetensors is not a readable safetensors file: .*{why}"):
        load_model(f"checkpoint:{path}?arch=torchvision:resnet18")


def test_truncated_torch_checkpoint_is_not_called_a_pickle_refusal(tmp_path):
    import torchvision

    path = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match=r"w\.pt is not a readable PyTorch checkpoint") as err:
        load_model(f"checkpoint:{path}?arch=torchvision:resnet18")
    assert "weights_only" not in str(err.value)


def test_first_mismatching_key_and_both_shapes(tmp_path):
    import torchvision

    sd = torchvision.models.resnet18(weights=None, num_classes=3).state_dict()
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)  # earlier than fc in the architecture's order
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    names = tmp_path / "n.txt"
    names.write_text("a\nb\nc\nd\n")
    with pytest.raises(
        ModelLoadError,
        match=r"first mismatching tensor 'layer2.0.conv1.weight': the checkpoint has shape \(128, 32, 3, 3\), "
        r"the architecture expects \(128, 64, 3, 3\)",
    ):
        load_model(f"checkpoint:{path}?arch=torchvision:resnet18&classes={names}")


def test_checkpoint_needs_architecture(tmp_path):
    path, _ = _write_resnet_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="needs its architecture"):
        load_model(f"checkpoint:{path}")


def test_wrap_helper_hash_changes_with_weights():
    a, b = IdentityCNN(), IdentityCNN()
    with torch.no_grad():
        b.classifier.bias.fill_(1.0)
    assert wrap(a).weights_hash != wrap(b).weights_hash


def test_reinitialize_copies_is_seeded_and_keeps_the_global_rng() -> None:
    from lavise_core.models.networks import LoadedModel, reinitialised, reinitialize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 5, 5))
    with torch.no_grad():
        net[1].weight.fill_(7.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r1, r2 = reinitialize(net, 3), reinitialize(net, 3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    assert not torch.equal(r1[0].weight, net[0].weight)
    assert torch.equal(r1[0].weight, r2[0].weight)
    assert torch.all(r1[1].weight == 1.0)
    assert not any(p.requires_grad for p in r1.parameters()) and not r1.training
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    reinitialize(net, 5)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is not disturbed
    lm = LoadedModel("x", net, ["a", "b"], 5, 5, (0, 0, 0), (1, 1, 1), "0", "3", "h")
    rl = reinitialised(lm, 3)
    assert torch.equal(rl.model[0].weight, r1[0].weight) and rl.lock is not lm.lock and rl.model is not net
    assert rl.class_names == ["a", "b"] and rl.default_layer == "0"

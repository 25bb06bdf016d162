"""GroupNorm ResNets: torchvision's names and sizes, feature maps, pretrained loading, GFLOPs."""

import pickle

import pytest
import torch
from torch import nn

from lowmag.errors import LowmagError
from lowmag.train.flops import forward_gflops
from lowmag.train.models import build_model, load_pretrained

# torchvision's published parameter counts for 1000 classes (its weights' "num_params").
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)), "resnet50": ("bottleneck", (3, 4, 6, 3))}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchvision_layout(architecture, num_classes, batchnorm_buffers=False):
    """{name: shape} of torchvision's ResNet state dict, written out from the paper's tables.

    With ``batchnorm_buffers`` the BatchNorm running statistics are included, as in a
    torchvision checkpoint file.
    """
    kind, layers = DEPTHS[architecture]
    expansion = 1 if kind == "basic" else 4
    shapes = {}

    def conv(name, out_ch, in_ch, k):
        shapes[f"{name}.weight"] = (out_ch, in_ch, k, k)

    def norm(name, ch):
        shapes[f"{name}.weight"] = (ch,)
        shapes[f"{name}.bias"] = (ch,)
        if batchnorm_buffers:
            shapes[f"{name}.running_mean"] = (ch,)
            shapes[f"{name}.running_var"] = (ch,)
            shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 7)
    norm("bn1", 64)
    in_ch = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for b in range(layers[stage]):
            p = f"layer{stage + 1}.{b}"
            stride = 2 if stage > 0 and b == 0 else 1
            if kind == "basic":
                conv(f"{p}.conv1", width, in_ch, 3)
                norm(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                norm(f"{p}.bn2", width)
            else:
                conv(f"{p}.conv1", width, in_ch, 1)
                norm(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                norm(f"{p}.bn2", width)
                conv(f"{p}.conv3", width * 4, width, 1)
                norm(f"{p}.bn3", width * 4)
            if b == 0 and (stride != 1 or in_ch != width * expansion):
                conv(f"{p}.downsample.0", width * expansion, in_ch, 1)
                norm(f"{p}.downsample.1", width * expansion)
            in_ch = width * expansion
    shapes["fc.weight"] = (num_classes, 512 * expansion)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def fake_torchvision_checkpoint(architecture, num_classes=1000, seed=0):
    """Random tensors named and shaped like a torchvision BatchNorm checkpoint."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in torchvision_layout(architecture, num_classes, batchnorm_buffers=True).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000, dtype=torch.long)
        else:
            state[name] = torch.randn(shape, generator=g)
    return state


def _numel(shapes):
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def _final_map_side(n):
    """conv1 (7, /2), maxpool (3, /2), then the stride-2 3x3 convs of layers 2-4."""
    n = _conv_out(n, 7, 2, 3)
    n = _conv_out(n, 3, 2, 1)
    for _ in range(3):
        n = _conv_out(n, 3, 2, 1)
    return n


def _resnet18_macs(h, w, num_classes):
    """Multiply-accumulates of resnet18's convs and fc, counted by hand."""
    total = 0
    h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
    total += h * w * 64 * 3 * 7 * 7
    h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    in_ch = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for b in range(2):
            s = 2 if stage and b == 0 else 1
            h, w = _conv_out(h, 3, s, 1), _conv_out(w, 3, s, 1)
            total += h * w * width * (in_ch * 9 + width * 9)
            if s != 1 or in_ch != width:
                total += h * w * width * in_ch
            in_ch = width
    return total + 512 * num_classes




@pytest.fixture(scope="module")
def resnet18_8():
    torch.manual_seed(0)
    return build_model("resnet18", 8).eval()


# --- architecture --------------------------------------------------------------------------


def test_layout_helper_reproduces_torchvision_counts():
    """Guards the hand-written layout itself before it is used as the reference."""
    for name, count in TORCHVISION_PARAMS.items():
        assert _numel(torchvision_layout(name, 1000)) == count


def test_resnet18_has_torchvision_names():
    state = build_model("resnet18", 8).state_dict()
    for key in (
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.weight",
        "layer4.1.conv2.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in state
    assert "layer1.0.downsample.0.weight" not in state  # no projection where shapes agree
    assert tuple(state["fc.weight"].shape) == (8, 512)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)


@pytest.mark.parametrize("architecture", ["resnet18", "resnet34", "resnet50"])
def test_state_dict_matches_torchvision_and_uses_groupnorm_32(architecture):
    model = build_model(architecture, 1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == torchvision_layout(architecture, 1000)  # GroupNorm has no running stats
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[architecture]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert norms == []
    groupnorms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groupnorms and all(m.num_groups == 32 for m in groupnorms)
    n_norm_weights = sum(1 for k in got if ".bn" in k or k.startswith("bn1") or "downsample.1" in k)
    assert len(groupnorms) * 2 == n_norm_weights


def test_unknown_architecture_and_too_few_classes_are_refused():
    with pytest.raises(LowmagError, match="resnet18"):
        build_model("resnet101", 8)
    with pytest.raises(LowmagError, match="2 classes"):
        build_model("resnet18", 1)


# --- forward -------------------------------------------------------------------------------


@pytest.mark.parametrize("side,expected", [(144, 5), (72, 3), (36, 2), (18, 1)])
def test_final_map_has_stride_32(resnet18_8, side, expected):
    assert _final_map_side(side) == expected  # the hand formula agrees with the paper's sizes
    with torch.no_grad():
        logits, features = resnet18_8.forward_with_features(torch.rand(2, 3, side, side))
    assert logits.shape == (2, 8)
    assert features.shape == (2, 512, expected, expected)


def test_forward_is_head_of_features_on_any_input_size(resnet18_8):
    x = torch.rand(1, 3, 100, 60)
    with torch.no_grad():
        features = resnet18_8.forward_features(x)
        logits = resnet18_8(x)
        pair = resnet18_8.forward_with_features(x)
    assert features.shape == (1, 512, _final_map_side(100), _final_map_side(60)) == (1, 512, 4, 2)
    torch.testing.assert_close(logits, resnet18_8.forward_head(features))
    torch.testing.assert_close(pair[0], logits)
    torch.testing.assert_close(pair[1], features)


def test_output_does_not_depend_on_the_batch(resnet18_8):
    batch = torch.rand(3, 3, 72, 72, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = resnet18_8(batch)
        alone = torch.cat([resnet18_8(batch[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


# --- pretrained weights --------------------------------------------------------------------


class NotATensor:
    """A pickled object a weights-only load must refuse."""

    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_batchnorm_checkpoint_loads_except_fc(tmp_path, suffix):
    state = fake_torchvision_checkpoint("resnet18", 1000)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(0)
    model = build_model("resnet18", 8)
    fc_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    missing = load_pretrained(model, path)
    assert missing == ["fc.bias", "fc.weight"]
    own = model.state_dict()
    loaded = [k for k in own if not k.startswith("fc.")]
    assert "layer2.0.downsample.1.weight" in loaded and "bn1.bias" in loaded
    for key in loaded:
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)
    for key, before in fc_before.items():
        torch.testing.assert_close(own[key], before, rtol=0, atol=0)


def test_checkpoint_wrapped_in_state_dict_key_loads(tmp_path):
    state = fake_torchvision_checkpoint("resnet18", 1000)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = build_model("resnet18", 8)
    assert load_pretrained(model, path) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_weights_of_another_depth_are_refused(tmp_path):
    # resnet50's tensors share names with resnet18's (layer1.0.conv1...) but not shapes.
    state = {k: torch.zeros(v) for k, v in torchvision_layout("resnet50", 1000, True).items()}
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    with pytest.raises(LowmagError, match="wrong shape"):
        load_pretrained(build_model("resnet18", 8), path)


def test_pickled_objects_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": NotATensor()}, path, pickle_protocol=2)
    with pytest.raises(LowmagError, match="evil.pth"):
        load_pretrained(build_model("resnet18", 8), path)
    assert "this would have run" not in capsys.readouterr().out
    other = tmp_path / "plain.pkl"
    other.write_bytes(pickle.dumps(NotATensor(), protocol=2))
    with pytest.raises(LowmagError, match="plain.pkl"):
        load_pretrained(build_model("resnet18", 8), other)


def test_file_without_resnet_weights_or_missing_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(LowmagError, match="torchvision names"):
        load_pretrained(build_model("resnet18", 8), path)
    with pytest.raises(LowmagError, match="not found"):
        load_pretrained(build_model("resnet18", 8), tmp_path / "absent.pth")


# --- GFLOPs --------------------------------------------------------------------------------


def test_resnet18_gflops_at_224_is_torchvisions():
    gflops = forward_gflops(build_model("resnet18", 1000), 224, 224)
    assert gflops == pytest.approx(1.814, abs=0.001)  # torchvision: 1.81 GFLOPS
    assert gflops == pytest.approx(_resnet18_macs(224, 224, 1000) / 1e9, rel=1e-9)


def test_gflops_scale_with_input_area(resnet18_8):
    high = forward_gflops(resnet18_8, 144, 144)
    low = forward_gflops(resnet18_8, 72, 72)
    assert high == pytest.approx(_resnet18_macs(144, 144, 8) / 1e9, rel=1e-9)
    assert low == pytest.approx(_resnet18_macs(72, 72, 8) / 1e9, rel=1e-9)
    # Not exactly 4: odd map sizes round up at every stride-2 layer (9 -> 5 -> 3 px),
    # so the small input keeps relatively more work (ratio 3.43 here).
    assert high / low == pytest.approx(4.0, rel=0.15)
    assert not resnet18_8.training  # the counter restores the mode it found

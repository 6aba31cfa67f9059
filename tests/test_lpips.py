"""LPIPS from user-supplied torchvision + lpips files, and CDC's intra-cluster LPIPS.

The weight files are random stand-ins written with the exact key names and shapes of torchvision's
`vgg16-397923af.pth` / `alexnet-owt-7be5be79.pth` and the lpips package's `weights/v0.1/{vgg,alex}.pth`,
taken from the layouts below, not from our module. (Against the real lpips 0.1.4 code and its real
v0.1 heads, with a torchvision-layout backbone, our distances were checked bit-identical once by hand.)
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from click.testing import CliRunner

from genadapt.errors import UserError
from genadapt.eval.lpips import LPIPS, intra_cluster_lpips, load_lpips, lpips_distance, lpips_pairwise

# torchvision's features.<index> convs: (index, in, out, kernel)
VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
VGG16_CONVS = [(i, a, b, 3) for i, a, b in VGG16_CONVS]
ALEXNET_CONVS = [(0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3)]
LIN_CHANNELS = {"vgg": [64, 128, 256, 512, 512], "alex": [64, 192, 384, 256, 256]}


def backbone_state(net: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, c_in, c_out, k in VGG16_CONVS if net == "vgg" else ALEXNET_CONVS:
        state[f"features.{index}.weight"] = torch.randn(c_out, c_in, k, k, generator=gen) * math.sqrt(2 / (c_in * k * k))
        state[f"features.{index}.bias"] = torch.randn(c_out, generator=gen) * 0.01
    state["classifier.6.bias"] = torch.zeros(1000)  # torchvision files carry the classifier too: ignored
    return state


def linear_state(net: str, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(LIN_CHANNELS[net])}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips-weights")
    paths = {}
    for net in ("vgg", "alex"):
        paths[net] = (folder / f"{net}-backbone.pth", folder / f"{net}.pth")
        torch.save(backbone_state(net), paths[net][0])
        torch.save(linear_state(net), paths[net][1])
    paths["vgg-safetensors"] = (folder / "vgg-backbone.safetensors", folder / "vgg-lin.safetensors")
    save_file(backbone_state("vgg"), paths["vgg-safetensors"][0])
    save_file(linear_state("vgg"), paths["vgg-safetensors"][1])
    return paths


@pytest.fixture(scope="module")
def vgg(files):
    return load_lpips(*files["vgg"], net="vgg")


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_state_dict_has_torchvision_and_lpips_names():
    for net in ("vgg", "alex"):
        expected = {k: tuple(v.shape) for k, v in {**backbone_state(net), **linear_state(net)}.items() if not k.startswith("classifier.")}
        assert {k: tuple(v.shape) for k, v in LPIPS(net).state_dict().items()} == expected


def test_pth_and_safetensors_give_the_same_metric(files, vgg):
    other = load_lpips(*files["vgg-safetensors"], net="vgg")
    assert not vgg.training and vgg.model_id.startswith("lpips-vgg-v0.1@")
    a, b = _images(2, 0), _images(2, 1)
    assert torch.equal(lpips_distance(vgg, a, b, size=32), lpips_distance(other, a, b, size=32))


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_distance_is_zero_on_itself_symmetric_and_positive(files, net):
    model = load_lpips(*files[net], net=net)
    a, b = _images(3, 0), _images(3, 1)
    d = lpips_distance(model, a, b, size=None)  # 32 px: upsampled to 64
    assert d.shape == (3,) and bool((d > 0).all())
    assert torch.equal(lpips_distance(model, a, a, size=None), torch.zeros(3))
    assert torch.allclose(lpips_distance(model, b, a, size=None), d, rtol=1e-6, atol=0)
    pairs = lpips_pairwise(model, a, b, size=None)
    assert pairs.shape == (3, 3) and torch.allclose(pairs.diagonal().float(), d, rtol=1e-5)
    within = lpips_pairwise(model, a, size=None)
    assert torch.equal(within, within.T) and torch.equal(within.diagonal(), torch.zeros(3)) and bool((within + torch.eye(3) > 0).all())


def test_unusable_files_give_one_line_errors(files, tmp_path):
    backbone, linear = files["vgg"]
    cases = [
        ((tmp_path / "absent.pth", linear, "vgg"), ["absent.pth", "no such file", "vgg16-397923af.pth", "https://download.pytorch.org/models/"]),
        ((backbone, tmp_path / "absent.pth", "vgg"), ["no such file", "weights/v0.1/vgg.pth", "lpips"]),
        ((linear, backbone, "vgg"), ["holds LPIPS linear heads", "--lpips-linear"]),
        ((backbone, files["alex"][1], "vgg"), ["wrong shape for 'lin1.model.1.weight'", "weights/v0.1/vgg.pth"]),
        ((files["alex"][0], files["alex"][1], "vgg"), ["missing", "vgg16-397923af.pth"]),
        ((files["vgg"][0], files["alex"][1], "alex"), ["alexnet-owt-7be5be79.pth"]),
    ]
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    cases.append(((text, linear, "vgg"), ["cannot be read", "vgg16-397923af.pth"]))
    for args, needles in cases:
        with pytest.raises(UserError) as caught:
            load_lpips(*args)
        message = str(caught.value)
        assert "\n" not in message and all(n in message for n in needles), message
    with pytest.raises(UserError, match="choose 'vgg'"):
        load_lpips(backbone, linear, net="squeeze")


def test_intra_cluster_lpips_is_zero_for_copies_and_positive_otherwise(vgg):
    shots = _images(3, 0)
    copies = shots[[0, 1, 2, 0, 1, 2, 0, 1]]
    result = intra_cluster_lpips(copies, shots, vgg, size=32)
    assert result["value"] == 0.0 and result["cluster_sizes"] == [3, 3, 2] and result["nearest_shot"] == [0, 1, 2] * 2 + [0, 1]
    assert result["distance_name"] == "LPIPS (vgg)" and result["distance"] == "lpips" and "32x32" in result["space"]
    fresh = intra_cluster_lpips(_images(8, 5), shots, vgg, size=32, max_per_cluster=3)
    assert fresh["value"] > 0 and fresh["n_clusters_used"] >= 1 and sum(fresh["cluster_sizes"]) == 8


def test_evaluate_adds_lpips_and_keeps_the_encoder_diversity_name(files, tmp_path):
    from genadapt.data import load_dataset
    from genadapt.eval.evaluate import evaluate, rows

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    shots = load_dataset("builtin:digits/3?shots=4&seed=0", resolution=32)
    copies = shots.subset([i % 4 for i in range(12)], name="copies")
    reference = load_dataset("builtin:digits/3?shots=12&seed=1", resolution=32)
    backbone, linear = files["vgg"]
    result = evaluate(copies, reference, shots, features=encoder, out=tmp_path, n_boot=2, lpips=(backbone, linear, "vgg", 32))
    perceptual = result["intra_cluster_lpips"]
    assert perceptual["distance_name"] == "LPIPS (vgg)" and perceptual["value"] == 0.0 and perceptual["size"] == 32
    diversity = result["intra_cluster_diversity"]["distance_name"]
    assert diversity.startswith("cosine distance on Sequential@") and "LPIPS" not in diversity
    labels = [metric for metric, _ in rows(result)]
    assert "intra-cluster LPIPS (vgg) (CDC, 32 px)" in labels
    assert "LPIPS (vgg)" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["intra_cluster_lpips"]["value"] == 0.0
    assert "intra_cluster_lpips" not in evaluate(copies, reference, None, features=encoder, n_boot=2, lpips=(backbone, linear, "vgg", 32))


def test_cli_lpips_flags_fail_fast_with_one_line(files, tmp_path):
    from genadapt.cli import app

    base = ["evaluate", "--samples", str(tmp_path), "--reference", "builtin:digits/3", "--out", str(tmp_path / "out")]
    alone = CliRunner().invoke(app, base + ["--train", str(tmp_path), "--lpips-backbone", str(files["vgg"][0])])
    assert alone.exit_code == 2 and "--lpips-linear" in alone.output
    no_train = CliRunner().invoke(app, base + ["--lpips-backbone", str(files["vgg"][0]), "--lpips-linear", str(files["vgg"][1])])
    assert no_train.exit_code == 2 and "--train" in no_train.output
    missing = CliRunner().invoke(app, base + ["--train", str(tmp_path), "--lpips-backbone", str(tmp_path / "vgg16.pth"), "--lpips-linear", str(files["vgg"][1])])
    assert missing.exit_code == 2 and "vgg16-397923af.pth" in missing.output

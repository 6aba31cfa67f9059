"""Feature extractors and the feature cache; the FID Inception-v3 built from a stand-in state dict."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from genadapt.data.imageset import ImageRecord, ImageSet
from genadapt.errors import UserError
from genadapt.eval import features as Fe
from genadapt.eval.inception import FEATURE_DIM, FIDInceptionV3, load_inception


class Counting(nn.Module):
    """A tiny conv net that counts its forward calls; returns [N, 4, 1, 1] (flattened by the wrapper)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.conv(images).mean(dim=(2, 3), keepdim=True)


def images(seed: int, count: int = 10) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_a_plain_module_is_an_extractor():
    module = Counting()
    extractor = Fe.get_extractor(module)
    assert re.fullmatch(r"Counting@[0-9a-f]{12}", extractor.extractor_id)
    feats = Fe.extract(extractor, images(0), batch_size=3, progress=False)
    assert feats.shape == (10, 4) and feats.dtype == torch.float32
    assert module.calls == 4  # ceil(10 / 3) batches
    assert torch.allclose(feats, module.conv(images(0)).mean(dim=(2, 3)), atol=1e-6)
    # Same weights, same id; a module carrying its own id is used as it is.
    assert Fe.get_extractor(Counting()).extractor_id == extractor.extractor_id
    module.extractor_id = "mine@v1"
    assert Fe.get_extractor(module) is module


def test_cache_hit_returns_the_same_feats_without_running_the_model(tmp_path):
    module = Counting()
    extractor = Fe.get_extractor(module)
    first = Fe.cached_features(extractor, images(0), tmp_path, progress=False)
    calls = module.calls
    again = Fe.cached_features(extractor, images(0), tmp_path, progress=False)
    assert module.calls == calls and torch.equal(first, again)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1


def test_cache_key_changes_with_the_pixels_and_with_the_extractor(tmp_path):
    module = Counting()
    extractor = Fe.get_extractor(module)
    base = Fe.cached_features(extractor, images(0), tmp_path, progress=False)
    changed = images(0)
    changed[3, 1, 5, 5] += 0.01  # one value of one pixel
    calls = module.calls
    other = Fe.cached_features(extractor, changed, tmp_path, progress=False)
    assert module.calls > calls and not torch.equal(other[3], base[3]) and torch.equal(other[:3], base[:3])

    retrained = Counting(seed=1)
    other_extractor = Fe.get_extractor(retrained)
    assert other_extractor.extractor_id != extractor.extractor_id
    feats = Fe.cached_features(other_extractor, images(0), tmp_path, progress=False)
    assert retrained.calls > 0 and not torch.allclose(feats, base)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3


class Pool(nn.Module):
    """A weightless extractor whose output depends on a plain attribute (no extra_repr: same repr)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, images):
        return nn.functional.adaptive_avg_pool2d(images, self.size).flatten(1)


class Normalised(nn.Module):
    """Weightless too: mean and std are non-persistent buffers (not in state_dict)."""

    def __init__(self, mean: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), mean), persistent=False)

    def forward(self, images):
        return (images - self.mean).mean(dim=(2, 3))


def test_weightless_modules_with_other_settings_never_share_cache_entries(tmp_path):
    four, eight = Fe.get_extractor(Pool(4)), Fe.get_extractor(Pool(8))
    assert four.extractor_id != eight.extractor_id
    assert Fe.extractor_cache_key(four) != Fe.extractor_cache_key(eight)
    feats4 = Fe.cached_features(four, images(0), tmp_path, progress=False)
    feats8 = Fe.cached_features(eight, images(0), tmp_path, progress=False)
    assert feats4.shape == (10, 3 * 16) and feats8.shape == (10, 3 * 64)
    # A later run: new instances, same cache folder. Pool(4) hits its own entry, Pool(8) its own.
    again = Fe.get_extractor(Pool(4))
    assert Fe.extractor_cache_key(again) == Fe.extractor_cache_key(four)
    assert torch.equal(Fe.cached_features(again, images(0), tmp_path, progress=False), feats4)
    assert torch.equal(Fe.cached_features(Fe.get_extractor(Pool(8)), images(0), tmp_path, progress=False), feats8)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_non_persistent_buffers_and_own_ids_are_in_the_key(tmp_path):
    zero, half = Fe.get_extractor(Normalised(0.0)), Fe.get_extractor(Normalised(0.5))
    assert Fe.state_dict_sha256(zero.module) == Fe.state_dict_sha256(half.module)  # what the old id hashed
    assert zero.extractor_id != half.extractor_id
    assert not torch.allclose(
        Fe.cached_features(zero, images(0), tmp_path, progress=False), Fe.cached_features(half, images(0), tmp_path, progress=False)
    )
    # Modules carrying the same id of their own still get different keys when they differ.
    a, b = Pool(2), Pool(3)
    a.extractor_id = b.extractor_id = "mine@v1"
    assert Fe.get_extractor(a) is a and Fe.extractor_cache_key(a) != Fe.extractor_cache_key(b)
    assert Fe.cached_features(a, images(0), tmp_path, progress=False).shape != Fe.cached_features(b, images(0), tmp_path, progress=False).shape


def test_a_changed_weight_changes_the_key_even_in_the_same_wrapper(tmp_path):
    module = Counting()
    extractor = Fe.get_extractor(module)
    key = Fe.extractor_cache_key(extractor)
    before = Fe.cached_features(extractor, images(0), tmp_path, progress=False)
    assert Fe.extractor_cache_key(extractor) == key  # the call counter changed; the key did not
    with torch.no_grad():
        module.conv.bias[0] += 1.0
    assert Fe.extractor_cache_key(extractor) != key
    calls = module.calls
    after = Fe.cached_features(extractor, images(0), tmp_path, progress=False)
    assert module.calls > calls and not torch.allclose(after[:, 0], before[:, 0]) and torch.allclose(after[:, 1:], before[:, 1:])
    assert Fe.get_extractor(module).extractor_id != extractor.extractor_id  # a new wrapper: a new id too


def test_image_sets_are_keyed_by_their_uint8_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv("GENADAPT_CACHE", str(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    image_set = ImageSet("test", pixels, [ImageRecord(id=str(i)) for i in range(6)])
    module = Counting()
    extractor = Fe.get_extractor(module)
    feats = Fe.cached_features(extractor, image_set, progress=False)  # default cache dir: $GENADAPT_CACHE/features
    assert torch.allclose(feats, Fe.extract(extractor, image_set.tensors(), progress=False))
    assert list((tmp_path / "features").rglob("*.safetensors"))
    assert Fe.pixels_sha256(image_set) == Fe.pixels_sha256(pixels.copy())
    other = pixels.copy()
    other[0, 0, 0, 0] ^= 1
    assert Fe.pixels_sha256(other) != Fe.pixels_sha256(pixels)


def test_eval_encoder_folders_and_the_missing_pocket_encoder(tmp_path, monkeypatch):
    from genadapt import zoo
    from genadapt.zoo.eval_encoder import EvalEncoder, EvalEncoderConfig, save_model

    config = EvalEncoderConfig(widths=(8, 16))
    torch.manual_seed(0)
    model = save_model(EvalEncoder(config.widths), config, tmp_path / "run", step=0)
    for spec in (model, str(tmp_path / "run")):  # the model folder, or the pretrain run folder holding it
        extractor = Fe.get_extractor(spec)
        assert extractor.extractor_id.startswith("pocket-eval-encoder@")
        assert Fe.extract(extractor, images(0), progress=False).shape == (10, 16)

    monkeypatch.setattr(zoo, "WEIGHTS", tmp_path / "no-weights")
    with pytest.raises(UserError, match="genadapt pretrain eval-encoder"):
        Fe.get_extractor("pocket")
    (tmp_path / "no-weights" / "eval-encoder").mkdir(parents=True)  # shipped folder without weights
    with pytest.raises(UserError, match="genadapt pretrain eval-encoder"):
        Fe.get_extractor("pocket")


def test_unknown_specs_get_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="pocket"):
        Fe.get_extractor("clip-vit")
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"x")
    with pytest.raises(UserError, match=f"inception:{re.escape(str(weights))}"):
        Fe.get_extractor(str(weights))


# --------------------------------------------------------------------------- Inception


# A few of pytorch-fid's key names and shapes (torchvision's Inception3 names, FID blocks).
PYTORCH_FID_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_3a.bn.bias": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
}


def stand_in_weights(seed: int = 0) -> dict:
    """Random weights with pytorch-fid's key names and shapes: He-scaled convs, unit batch norms, the
    1008-way `fc` the real file carries, and no `num_batches_tracked` (files saved before PyTorch 0.4.1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) * (2 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            state[key] = torch.ones(value.shape)
        else:
            state[key] = torch.zeros(value.shape)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    return state


def test_inception_has_pytorch_fids_layout():
    state = FIDInceptionV3().state_dict()
    for key, shape in PYTORCH_FID_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # torchvision's Inception-v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and the
    # 1000-way fc (2,049,000) that leaves the pool3 trunk: 21,785,568.
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 21_785_568


def test_inception_loads_pth_and_safetensors_and_gives_pool3(tmp_path):
    state = stand_in_weights()
    pth, safetensors = tmp_path / "pt_inception-stand-in.pth", tmp_path / "inception.safetensors"
    torch.save(state, pth)
    save_file(state, str(safetensors))
    model = load_inception(pth)
    assert not model.training and re.fullmatch(r"inception-v3-fid@[0-9a-f]{12}", model.extractor_id)
    batch = images(0, count=2)
    with torch.no_grad():
        feats = model(batch)
        assert feats.shape == (2, FEATURE_DIM) and torch.isfinite(feats).all() and (feats >= 0).all()
        assert torch.equal(load_inception(safetensors)(batch), feats)
    assert Fe.get_extractor(f"inception:{pth}").extractor_id == model.extractor_id


def test_inception_refuses_wrong_or_missing_weights(tmp_path):
    hint = "expected pytorch-fid's pt_inception-2015-12-05 weights"
    with pytest.raises(UserError, match=re.escape(hint)):
        load_inception(tmp_path / "absent.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Linear(3, 4).state_dict(), wrong)
    with pytest.raises(UserError, match=re.escape(hint)) as error:
        load_inception(wrong)
    assert "\n" not in str(error.value)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(UserError, match=re.escape(hint)):
        load_inception(text)
    state = stand_in_weights()
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 1024, 1, 1)
    torch.save(state, tmp_path / "misshaped.pth")
    with pytest.raises(UserError, match="mis-shaped"):
        load_inception(tmp_path / "misshaped.pth")
    # torchvision's ImageNet Inception-v3 shares the trunk's names but has a 1000-way fc: not FID's.
    state = stand_in_weights()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(state, tmp_path / "torchvision.pth")
    with pytest.raises(UserError, match="fc.weight"):
        load_inception(tmp_path / "torchvision.pth")

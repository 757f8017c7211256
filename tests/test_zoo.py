"""Model loading: local state dicts, torchvision's ImageNet weights through the hub cache, explicit random
weights (loud), and one clear error for each way weights can be missing or wrong."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
import torchvision

from lrp_module import zoo
from lrp_module.files import sha256_file
from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW, IMAGENET_RECIPE
from pipeline.preprocess import Preprocessing


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    yield tmp_path / "torch" / "hub"
    torch.hub.set_dir(previous)


def test_state_dict_file_round_trip(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.vgg11(num_classes=7)
    path = tmp_path / "vgg11.pt"
    torch.save(source.state_dict(), path)
    model, info = zoo.build_vgg("vgg11", path)
    assert info.kind == "file" and info.sha256 == sha256_file(path) and not info.is_random
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert model.classifier[-1].out_features == 7 and not model.training


def test_mismatched_weights_name_the_file(tmp_path):
    path = tmp_path / "vgg13.pt"
    torch.save(torchvision.models.vgg13().state_dict(), path)
    with pytest.raises(zoo.WeightsError, match=r"vgg13.pt do not match vgg11") as error:
        zoo.build_vgg("vgg11", path)
    assert "\n" not in str(error.value)


def test_missing_and_unsafe_files(tmp_path):
    with pytest.raises(zoo.WeightsError, match="does not exist"):
        zoo.build_vgg("vgg11", tmp_path / "nope.pth")
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(print))  # a pickle that is not plain tensors: weights_only refuses it
    with pytest.raises(zoo.WeightsError, match="not a loadable state dict"):
        zoo.build_vgg("vgg11", evil)


def test_imagenet_weights_missing_says_where_to_put_them(offline_hub):
    with pytest.raises(zoo.WeightsError) as error:
        zoo.build_vgg("vgg16", "imagenet")
    message = str(error.value)
    expected = offline_hub / "checkpoints" / "vgg16-397923af.pth"
    assert str(expected) in message and "https://download.pytorch.org/models/vgg16-397923af.pth" in message


def test_imagenet_weights_from_hub_cache(offline_hub, monkeypatch):
    """A checkpoint placed where torchvision caches it is used (hash-checked), with the class names."""
    path = zoo.hub_checkpoint_path("vgg11")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.vgg11().state_dict(), path)
    with pytest.raises(zoo.WeightsError, match="corrupt"):  # our random file fails the hash in the name
        zoo.build_vgg("vgg11", "imagenet")
    # the same file under the name torchvision would give a checkpoint with its hash
    digest = sha256_file(path)
    real = zoo.imagenet_weights("vgg11")
    url = real.url.replace(path.name, f"vgg11-{digest[:8]}.pth")
    path.rename(path.with_name(f"vgg11-{digest[:8]}.pth"))
    monkeypatch.setattr(zoo, "imagenet_weights", lambda name: SimpleNamespace(url=url, meta=real.meta))
    model, info = zoo.build_vgg("vgg11", "imagenet")
    assert info.kind == "imagenet" and info.sha256 == digest and len(info.categories) == 1000
    assert info.categories[0] == "tench"


def test_random_weights_are_explicit_and_loud():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model, info = zoo.build_vgg("vgg11", "random", num_classes=5, seed=3)
    assert info.is_random and model.classifier[-1].out_features == 5
    with pytest.warns(UserWarning):
        again, _ = zoo.build_vgg("vgg11", "random", num_classes=5, seed=3)
    assert torch.equal(model.features[0].weight, again.features[0].weight)


def test_bad_names_and_missing_choice():
    with pytest.raises(ValueError, match="unknown model 'vgg12'"):
        zoo.build_vgg("vgg12", "random")
    with pytest.raises(zoo.WeightsError, match="no weights given"):
        zoo.build_vgg("vgg11", None)


@pytest.mark.parametrize("name", [*zoo.VGG_NAMES, "resnet18", "resnet34"])
def test_the_weights_recipe_is_torchvisions_for_these_weights(name):
    expected = zoo.imagenet_weights(name).transforms()
    assert [IMAGENET_RECIPE.resize] == expected.resize_size and [IMAGENET_RECIPE.crop] == expected.crop_size
    assert list(IMAGENET_RECIPE.mean) == expected.mean and list(IMAGENET_RECIPE.std) == expected.std
    assert expected.interpolation == torchvision.transforms.InterpolationMode.BILINEAR and expected.antialias


def test_the_recipe_at_another_size_keeps_the_256_224_ratio_and_the_box_bounds_are_the_pixel_range():
    assert Preprocessing.for_size(224) == Preprocessing() == Preprocessing(resize=256, crop=224)
    assert Preprocessing.for_size(64) == Preprocessing(resize=73, crop=64)  # round(64 * 256 / 224) = round(73.14)
    assert Preprocessing.for_size(32).resize == 37 and IMAGENET_RECIPE.at_crop(448).resize == 512
    for bound, pixel in ((IMAGENET_LOW, 0.0), (IMAGENET_HIGH, 1.0)):
        assert list(bound) == [(pixel - m) / s for m, s in zip(IMAGENET_RECIPE.mean, IMAGENET_RECIPE.std)]

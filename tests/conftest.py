"""Fixtures shared by the tests."""
import pytest
import torch

from .helpers import make_vgg


@pytest.fixture
def vgg11():
    return make_vgg("vgg11")


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)

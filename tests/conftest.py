"""Fixtures shared by the tests."""
import os
import subprocess

import pytest
import torch

from .helpers import make_vgg

# LRP_MKLDNN=0: run with oneDNN off (PyTorch's own kernels), one of the kernel paths `make test-precision` covers
if os.environ.get("LRP_MKLDNN") == "0":
    torch.backends.mkldnn.enabled = False

# The largest parity matrices run a covering sample by default (helpers.sampled_matrix); the rest is marked `full`
# and runs with --full, or by itself where it is cheap: a machine with at least this many CPUs.
FULL_MATRIX_CPUS = 8


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help=f"run the full parity matrices (tests marked `full`; default on >= {FULL_MATRIX_CPUS} CPUs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: the rest of a parity matrix beyond its covering sample (--full)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full") or (os.cpu_count() or 1) >= FULL_MATRIX_CPUS:
        return
    deselected = [item for item in items if item.get_closest_marker("full")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


@pytest.fixture
def vgg11():
    return make_vgg("vgg11")


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory):
    """One cache of traced LRP modules for the pipeline tests of a session: each configuration is built once."""
    return tmp_path_factory.mktemp("artifact-cache")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module: two CPUs in Ray's accounting (actors take half a CPU), shut down after."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def tmpfs(tmp_path):
    """A real 64 KiB filesystem (root only); resized with remount."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                            check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)

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


@pytest.fixture(scope="session")
def hans_concept_runs(tmp_path_factory, artifact_cache):
    """run_for(model) -> (data, run): shapes-hans' validation split (360 images, hans.csv) explained by `model` with
    concepts at vgg-shapes' last three convolutions (conditional maps at features.8), each model's run made once per
    session and shared by the concept audit's proofs (prototypes and CAVs: ~80-110 s a run on 2 shared cores). Call
    it inside a test that holds Ray (`local_ray`); the proofs write into separate folders of the run."""
    from demo import shapes_hans
    from demo.hans_cav import explain_split, write_data

    root = tmp_path_factory.mktemp("hans-concepts")
    write_data(root / "data", "shapes-hans", shapes_hans.VAL_PER_CLASS)
    runs: dict = {}

    def run_for(model: str):
        if model not in runs:
            explain_split(root / "data", root / model, model, "features.8", str(artifact_cache))
            runs[model] = root / model
        return root / "data", runs[model]

    return run_for


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

"""The run's precision probe (pipeline/precision_probe.py, issue 20.4): the float64 references its own process
guesses beside the run are used only where they are exactly the actor's inputs and classes; anything else is
recomputed in the driver; the seeded random models two threads build at once are the seed's; the float64 oracle
holds its weights once."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.precision_probe as precision_probe
from lrp_module import LRPModel
from lrp_module.oracle import Float64Oracle, compare, numeric_settings
from lrp_module.zoo import build_model
from pipeline.contracts import ProbeImages
from pipeline.datasets.records import ImageRecord
from pipeline.precision_probe import PrecisionProbe, ProbeModel
from pipeline.preprocess import Preprocessing, load

pytestmark = pytest.mark.timeout(300)
SIZE = 32


@pytest.fixture
def records(tmp_path) -> list[ImageRecord]:
    generator = np.random.default_rng(0)
    found = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(generator.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        found.append(ImageRecord(name, str(path)))
    return found


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Counts the float64 oracles the probe builds in the driver (its own process builds one, not counted)."""
    count: list[int] = []
    real = precision_probe._oracle

    def counted(spec):
        count.append(1)
        return real(spec)
    monkeypatch.setattr(precision_probe, "_oracle", counted)
    return count


def _model() -> torch.nn.Module:
    return build_model("vgg11", "random", warn=False)[0]


def _actor(x: torch.Tensor, target: int = -1) -> ProbeImages:
    """What the actor of shard 0 returns: eager float32 LRP of the run's model on `x`."""
    logits, relevance = LRPModel(_model()).explain(x, torch.full((x.shape[0],), target))
    used = logits.argmax(1) if target < 0 else torch.full((x.shape[0],), target)
    return ProbeImages(("a",), x.numpy(), tuple(int(t) for t in used), relevance.sum(1).numpy(),
                       numeric_settings("cpu"))


def _probe(records: list[ImageRecord]) -> PrecisionProbe:
    return PrecisionProbe(ProbeModel("vgg11", "random", "epsilon_gamma_box", 0.0, images=1), records, SIZE,
                          "predicted", 10**8).start()


def _expected(explained: ProbeImages, x: torch.Tensor, target: int) -> float:
    reference = Float64Oracle(_model()).explain(x, torch.tensor([target]))[1].sum(1)
    return compare(torch.from_numpy(explained.relevance), reference).worst


def test_the_guess_is_used_when_it_is_the_actors_image_and_class(records, builds):
    x = load(records[0], Preprocessing.for_size(SIZE))[0].unsqueeze(0)
    explained = _actor(x)
    probe = _probe(records)
    record = probe.record(explained)
    assert not builds and record["images"] == 1 and record["device"].startswith("cpu")
    assert probe.seconds > 0 and probe._folder is None  # its folder is gone
    assert record["max_relative_error"]["max"] == pytest.approx(_expected(explained, x, explained.targets[0]),
                                                                rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("differs", ["input", "class"])
def test_an_image_the_guess_missed_is_recomputed_for_what_the_actor_had(records, builds, differs):
    """A GPU decode gives other pixels; a float32 prediction can differ from float64's: the reference is then the
    actor's input and class, never the guess (which would compare two different maps)."""
    x = load(records[0], Preprocessing.for_size(SIZE))[0].unsqueeze(0)
    if differs == "input":
        x = x + 0.01
    explained = _actor(x, target=-1 if differs == "input" else 7)
    record = _probe(records).record(explained)
    assert len(builds) == 1 and record["images"] == 1  # computed in the driver for the actor's image
    assert record["max_relative_error"]["max"] == pytest.approx(_expected(explained, x, explained.targets[0]),
                                                                rel=1e-9, abs=1e-15)


def test_the_record_says_why_when_missing(records, tmp_path):
    _probe(records).write(None, tmp_path / "precision.json")
    record = json.loads((tmp_path / "precision.json").read_text())
    assert record == {"reference": "float64-cpu", "images": 0, "error": "shard 0 explained no image"}
    broken = PrecisionProbe(ProbeModel("vgg11", str(tmp_path / "missing.pt"), "epsilon_gamma_box", 0.0), records,
                            SIZE, "predicted", 10**8).start()
    record = broken.record(None)  # the process's own last line, not a traceback
    assert record["images"] == 0 and "missing.pt" in record["error"] and "\n" not in record["error"]


def test_a_cancelled_probe_leaves_no_process_and_no_folder(records):
    probe = _probe(records)
    folder, process = probe._folder, probe._process
    probe.cancel()
    assert process.poll() is not None and not folder.exists()


def test_seeded_random_models_built_in_threads_at_once_are_the_seeds():
    """The driver builds the artifact's model while the probe builds its own: the global RNG is held by one."""
    expected = _model().state_dict()
    built: list[dict] = []
    threads = [threading.Thread(target=lambda: built.append(_model().state_dict())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 3
    for state in built:
        assert all(torch.equal(state[key], expected[key]) for key in expected)


def test_share_weights_holds_the_models_tensors_and_explains_the_same(images):
    model = _model()
    shared, copied = LRPModel(model, share_weights=True), LRPModel(model)
    first = model.features[0].weight
    assert shared.steps[0].weight.data_ptr() == first.data_ptr() != copied.steps[0].weight.data_ptr()
    assert torch.equal(shared.explain(images)[1], copied.explain(images)[1])

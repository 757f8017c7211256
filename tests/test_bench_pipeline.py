"""The pipeline benchmark's parts that need no Ray (the whole `--quick` run takes ~80 s here, too long for a
test): FLOP counting against VGG16's published figure, the physical limit, the stage breakdown, the options."""
from __future__ import annotations

import pytest

from bench import pipeline_speed as bench

pytestmark = pytest.mark.timeout(120)


def test_vgg16_forward_flops_are_the_published_15_5_gmac():
    assert bench.forward_flops("vgg16", 224) == pytest.approx(2 * 15.47e9, rel=2e-3)  # torchvision: 15.47 GFLOPS (MAC)


def test_physical_limit_from_the_known_peaks_or_the_given_ones():
    limit = bench.physical_limit("NVIDIA H200", 31e9, None)
    assert limit["lrp_limit_images_per_s_float32"] == pytest.approx(67e12 / (3 * 31e9))
    assert limit["lrp_limit_images_per_s_tf32"] == pytest.approx(495e12 / (3 * 31e9))
    assert bench.physical_limit("Some GPU", 31e9, None)["peak_tflops"] is None
    given = bench.physical_limit("Some GPU", 31e9, {"float32": 10.0})
    assert given["lrp_limit_images_per_s_float32"] == pytest.approx(10e12 / (3 * 31e9))


def test_stage_breakdown_times_every_stage_of_the_readable_images(tmp_path):
    data = bench.make_images(tmp_path / "images", 6, (64, 48))
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    result = bench.stage_breakdown(data, "vgg11", 32, 4, "cpu", limit=10)
    assert result["images"] == 6
    assert set(result["seconds_per_image"]) == {"decode", "copy", "lrp", "stats", "write"}
    assert all(seconds >= 0 for seconds in result["seconds_per_image"].values())
    assert result["seconds_per_image"]["lrp"] > 0
    assert result["images_per_second_if_serial"] == pytest.approx(1 / sum(result["seconds_per_image"].values()))


def test_options_per_device():
    cpu, cuda, quick = bench._parse([]), bench._parse(["--device", "cuda"]), bench._parse(["--quick"])
    assert (cpu.images, cpu.image_size, cpu.batch, cpu.no_memory) == (256, (320, 240), 8, False)
    assert (cuda.images, cuda.image_size, cuda.batch, cuda.no_memory) == (3000, (500, 375), 32, True)
    assert (quick.model, quick.size, quick.images, quick.no_memory) == ("vgg11", 32, 24, True)
    assert (cpu.tar_members, quick.tar_members) == ([500, 5000], [100, 1000])


def test_tar_reading_table_reads_every_member_and_a_compressed_shard_in_one_pass(tmp_path):
    from bench.tar_reading import tar_reading

    rows = tar_reading(tmp_path, (20, 70), searched=2)
    assert [(row["members"], row["kind"]) for row in rows] == [(20, ".tar"), (20, ".tar.gz"), (70, ".tar"),
                                                                (70, ".tar.gz")]
    assert [row["decompression_passes"] for row in rows] == [0, 1, 0, 1]
    assert all(row["read_ms_per_image"] > 0 and row["search_by_name_ms_per_image"] > 0 for row in rows)
    assert list(tmp_path.iterdir()) == []  # the shards are removed


def test_utilisation_without_a_gpu_is_reported_missing_not_zero(monkeypatch):
    import time

    monkeypatch.setattr(bench.torch.cuda, "utilization", lambda: (_ for _ in ()).throw(RuntimeError("no pynvml")))
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    with bench.UtilisationSampler() as sampler:
        time.sleep(0.6)
    assert sampler.summary() == {"source": None, "mean_percent": None, "max_percent": None, "samples": 0}

from pathlib import Path
"""The benchmark scripts at tiny sizes on CPU, on the real data: every part runs end to end."""

import json
import sys

import pytest

REPO = Path(__file__).resolve().parents[2]



def test_nuclei_and_lenet_quick(crchisto_table, data_dir, tmp_path, capsys):
    """The benchmark is thin: each run is a config of the one runner; it prints one JSON line per run."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import nuclei_and_lenet
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "bench"
    nuclei_and_lenet.main(["--out", str(out), "--data", str(data_dir), "--quick", "--device", "cpu"])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    nuclei = [x for x in lines if x["benchmark"] == "nuclei"]
    assert [(x["split"], x["init"]) for x in nuclei] == [("random", "imagenet"), ("image-grouped", "xavier")]
    for x in nuclei:
        m = json.loads((out / x["key"].replace("/", "_") / "metrics.json").read_text())
        assert x["accuracy"] == m["levels"]["image"]["accuracy"] and list(m["levels"]) == ["image"]
        its = [c["iteration"] for c in m["curve"]]
        assert its[0] == 0 and its == sorted(its) and len(its) >= 2
    assert (out / "summary_random" / "curves.png").is_file()
    (lenet,) = [x for x in lines if x["benchmark"] == "lenet"]
    assert lenet["protocol"] == "loco" and lenet["image_total"] > 0


def test_gpu_throughput_cpu_smoke(data_dir, capsys):
    """The throughput benchmark's code path at tiny sizes on CPU (the GPU numbers live in RESULTS.md)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_throughput
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    line = gpu_throughput.main(["--device", "cpu", "--model", "resnet18", "--batch", "32", "--size", "16", "--steps", "2", "--data", str(data_dir), "--profile"])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == line  # one JSON line on stdout
    assert line["gpu"] == "cpu" and line["batch"] == 32 and line["size"] == 16
    for key in ("bare_img_s", "cellmorph_img_s", "cellmorph_steady_img_s", "augment_normalize_ms_per_batch"):
        assert line[key] > 0, key
    assert line["ratio"] == pytest.approx(line["cellmorph_img_s"] / line["bare_img_s"], rel=0.02)  # the two are rounded
    assert "aten::convolution" in captured.err  # the profiler table went to stderr


def test_train_speed_cpu_smoke(data_dir, capsys):
    """The fine-tuning speed benchmark at a tiny size: both bare layouts and train.fit run, one JSON line,
    the ratios follow from the figures it prints (the measured ratio lives in RESULTS.md)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import train_speed
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = train_speed.main(["--data", str(data_dir), "--size", "32", "--n", "16", "--batch", "8", "--epochs", "2", "--steps", "2",
                            "--warmup", "1", "--repeats", "1"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == out and line["fit_layout"] == "channels_last" and line["images"] == 16
    assert len(line["fit_epochs_all"][0]) == 2 and all(v > 0 for v in line["bare_images_per_s"].values())
    # the ratio comes from the unrounded figures (printed to 2 decimals, the ratio to 3): the bound of that rounding
    fit, bare = line["fit_images_per_s"], line["bare_images_per_s"]["channels_last"]
    assert abs(line["ratio"] - fit / bare) <= line["ratio"] * (0.005 / fit + 0.005 / bare) + 0.0005 + 1e-9

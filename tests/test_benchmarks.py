"""The benchmark scripts at tiny sizes on CPU, on the real data: every part runs end to end."""

import json
import sys

import pytest

from tests.conftest import REPO


def test_nuclei_and_lenet_quick(crchisto_table, data_dir, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import nuclei_and_lenet
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "bench"
    nuclei_and_lenet.main(["--out", str(out), "--data", str(data_dir), "--quick", "--device", "cpu"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # one JSON line at the end
    results = json.loads((out / "results.json").read_text())
    assert summary["quick"] is True and results["seed"] == 0
    splits = results["nuclei"]["splits"]
    assert splits["random"]["n_train"] + splits["random"]["n_test"] == results["nuclei"]["n_nuclei"]
    runs = results["nuclei"]["runs"]
    assert [(r["split"], r["init"]) for r in runs] == [("random", "imagenet"), ("image-grouped", "xavier")]
    for r in runs:
        assert r["iterations"][0] == 0 and r["iterations"] == sorted(r["iterations"]) and len(r["test_accuracy"]) >= 2
        assert r["final_test_accuracy"] == r["test_correct"] / r["n_test"] and r["n_test"] == splits[r["split"]]["n_test"]
        assert f"nuclei_{r['split']}_{r['run']}_{r['arch']}" in summary
    assert (out / "curves_random.png").stat().st_size > 10_000 and (out / "curves_image-grouped.png").is_file()
    (lenet,) = results["lenet"]["runs"]
    assert lenet["protocol"] == "loco" and lenet["n_folds"] == 1 and lenet["images_total"] > 0
    assert (out / "lenet" / "lenet-lab-dropout-loco" / "metrics.json").is_file()

    # The same command again resumes: finished nuclei runs are kept, not trained again, and a part not
    # run this time keeps its earlier results.
    nuclei_and_lenet.main(["--out", str(out), "--data", str(data_dir), "--quick", "--device", "cpu", "--parts", "nuclei"])
    printed = capsys.readouterr().out
    assert printed.count(", kept") == 2 and "test accuracy" not in printed
    again = json.loads((out / "results.json").read_text())
    assert again["nuclei"]["runs"] == runs and again["lenet"] == results["lenet"]


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

"""The GPU benchmark script's --quick mode on the real data, on CPU: every part runs end to end."""

import json
import sys

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

"""The run's report.html a scientist reads (issue 24, item 6), on real images through the CLI, checked in a real
headless browser: example images per class and the most confident mistakes (thumbnails decoded again from the files
predictions.parquet names), the row-normalised confusion matrix, accuracy per group, wall time, ROC AUC of a binary
task, fine-tuning curves; sections that do not apply are left out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MAX_REPORT_BYTES = 600_000  # thumbnails are small and bounded in number


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(report: Path, tmp_path: Path, height: int) -> tuple[str, np.ndarray]:
    """The DOM after the page loaded (chromium --dump-dom) and a screenshot (--screenshot), or a printed skip."""
    browser = _browser()
    if browser is None:
        print("SKIP reason: chromium not installed (apt-get install -y chromium; .ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install -y chromium; .ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / f"{report.parent.name}.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", f"--window-size=1300,{height}", report.as_uri()], capture_output=True, timeout=120)
    return dom, np.asarray(Image.open(shot).convert("RGB"))


@pytest.mark.slow
def test_run_report_of_the_quickstart_in_chromium(quick_run, tmp_path):
    pred = pd.read_parquet(quick_run / "predictions.parquet")
    assert "Image_Path_RGB" in pred.columns and all(Path(p).is_file() for p in pred["Image_Path_RGB"])  # rows traceable to files
    report = quick_run / "report.html"
    assert report.stat().st_size < MAX_REPORT_BYTES, report.stat().st_size
    dom, im = _render(report, tmp_path, 3000)
    for section in ("Example images per class", "Most confident mistakes", "Confusion matrix, row-normalised (treatments)",
                    "Accuracy per group", "wall time"):
        assert section in dom, section
    assert "Fine-tuning curves" not in dom and "ROC AUC" not in dom  # frozen, 6 classes: neither applies
    config = re.search(r"<h2>Config</h2><pre>(.*?)</pre>", dom, re.S).group(1)
    assert "[frozen]" in config and "[finetune]" not in config  # the unused section left out
    thumbs = re.findall(r'<img src="data:image/png;base64,[^"]+"', dom)
    held = pred[pred["Metadata_MoA"].notna()]
    n_classes = held["Metadata_MoA"].nunique()
    assert 0 < len(thumbs) <= 3 * n_classes + 8
    rates = re.search(r"<table class=\"rates\">(.*?)</table>", dom, re.S).group(1)
    assert rates.count("%") >= n_classes  # one row of fractions per class
    # the mistakes name their files
    mistakes = re.search(r"<div class=\"mistakes\">(.*?)</div>", dom, re.S).group(1)
    assert "bbbc021v1_" in mistakes and "called" in mistakes
    assert im.shape[0] == 3000 and (im.std(axis=2) > 20).sum() > 5_000  # coloured pixels: thumbnails and plots drawn


@pytest.mark.slow
def test_binary_finetuned_image_only_run_report(data_dir, tmp_path):
    """A tiny fine-tune of the BBBC013 translocation plate (binary, wells, no compounds): ROC AUC per level,
    fine-tuning curves from folds/NN/history.json, no treatment wording, no [frozen] section."""
    out = tmp_path / "transloc"
    env = {**os.environ, "CELLMORPH_DATA": str(data_dir)}
    sets = ["model.name=resnet18", "model.input_size=32", "finetune.epochs=2", "finetune.batch_size=64", "finetune.eval_epochs=[1, 2]",
            "device=cpu", "outputs=[]", "save_model=false", "dataset.options={crops_per_well = 4}"]
    res = subprocess.run([sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / "translocation" / "bbbc013-scratch.toml"),
                          "--out", str(out), *[a for s in sets for a in ("--set", s)]], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "training_curves.png").is_file() and (out / "folds" / "00" / "history.json").is_file()
    report = out / "report.html"
    assert report.stat().st_size < MAX_REPORT_BYTES
    dom, im = _render(report, tmp_path, 2400)
    scores = re.search(r"<h2>Scores per level</h2>(.*?)</table>", dom, re.S).group(1)
    assert "ROC AUC (translocated vs not translocated" in scores or "ROC AUC (" in scores
    aucs = [float(x) for x in re.findall(r"<td>(0\.\d{3}|1\.000)</td>", scores)]
    assert aucs, scores
    assert "Fine-tuning curves" in dom and 'src="training_curves.png"' in dom
    assert "treatment" not in dom.lower()  # image-only data: no treatment wording anywhere
    config = re.search(r"<h2>Config</h2><pre>(.*?)</pre>", dom, re.S).group(1)
    assert "[finetune]" in config and "[frozen]" not in config
    assert "Example images per class" in dom
    assert (im.std(axis=2) > 20).sum() > 2_000

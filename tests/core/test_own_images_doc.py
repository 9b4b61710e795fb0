"""docs/own-images.md (issue 24, item 7): the README points at it, and its config is a valid config of the runner."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from cellmorph.config import parse_config

REPO = Path(__file__).resolve().parents[2]


def test_readme_points_at_the_worked_example_and_its_config_parses():
    doc = (REPO / "docs" / "own-images.md").read_text()
    assert "docs/own-images.md" in (REPO / "README.md").read_text()
    assert "src/cellmorph/data/datasets/folder.py" not in (REPO / "README.md").read_text()  # not a source file any more
    (toml,) = [b for b in re.findall(r"```toml\n(.*?)```", doc, re.S) if "[dataset]" in b]
    cfg = parse_config(tomllib.loads(toml), "docs/own-images.md")
    assert cfg.dataset.name == "folder" and cfg.dataset.label.startswith("Metadata_") and cfg.evaluation.group == "Metadata_Patient"
    for section in ("## 1. The table", "## 2. The config", "## 3. The CLI", "## 4. The same from Python"):
        assert section in doc

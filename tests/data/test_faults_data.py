"""Faults in a user's data and cache, made the way they happen: a real BBBC013 TIFF truncated or with
flipped bytes, an LZW TIFF, a float export with NaN, a grey image among RGB ones, a store write killed with
SIGKILL, a cache folder that cannot be written. Each must be a CellmorphError naming the file and the fix."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellmorph.data.catalog import load_dataset
from cellmorph.errors import CellmorphError
from cellmorph.data.preprocess import read_image
from cellmorph.data.store import build_store

REPO = Path(__file__).resolve().parents[2]
GFP = "Channel1-01-A-01.tif"  # 640 x 640 uint8, two zlib (deflate) strips


@pytest.fixture
def bbbc013_tiff(data_dir, tmp_path) -> Path:
    src = data_dir / "bbbc013" / GFP
    if not src.is_file():
        pytest.skip(f"{src} not found")
    dst = tmp_path / GFP
    shutil.copyfile(src, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy: the second strip is cut off


def _flip_strip_bytes(path: Path) -> None:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == 8  # deflate: the fault hits the zlib stream itself
        start = page.dataoffsets[0] + page.databytecounts[0] // 2
    data = bytearray(path.read_bytes())
    for i in range(start, start + 64):  # a bad sector's worth of bit flips inside the first compressed strip
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_strip_bytes], ids=["truncated", "bit-flipped"])
def test_damaged_zlib_tiff(bbbc013_tiff, damage):
    assert read_image(bbbc013_tiff).shape == (640, 640, 1)  # intact, it reads
    damage(bbbc013_tiff)
    with pytest.raises(CellmorphError) as e:
        read_image(bbbc013_tiff)
    msg = str(e.value)
    assert msg.startswith(f"{bbbc013_tiff}: cannot decode image") and "corrupt or truncated; re-export or re-download it" in msg


def test_lzw_tiff_reads(bbbc013_tiff, tmp_path):
    pixels = tifffile.imread(bbbc013_tiff)
    lzw = tmp_path / "lzw.tif"
    tifffile.imwrite(lzw, pixels, compression="lzw")  # needs imagecodecs, a dependency
    assert np.array_equal(read_image(lzw)[:, :, 0], pixels)


# Run as if imagecodecs were not installed: tifffile then falls back to Python's zlib for deflate and has no LZW.
_WITHOUT_IMAGECODECS = """
import sys
sys.modules["imagecodecs"] = None
from cellmorph.errors import CellmorphError
from cellmorph.data.preprocess import read_image
for path in sys.argv[1:]:
    try:
        read_image(path)
    except CellmorphError as err:
        print(err)
"""


def test_without_imagecodecs(bbbc013_tiff, tmp_path):
    lzw = tmp_path / "lzw.tif"
    tifffile.imwrite(lzw, tifffile.imread(bbbc013_tiff), compression="lzw")
    _truncate(bbbc013_tiff)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_IMAGECODECS, str(lzw), str(bbbc013_tiff)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lzw_msg, trunc_msg = proc.stdout.splitlines()
    assert lzw_msg.startswith(f"{lzw}: ") and "Install imagecodecs" in lzw_msg and "corrupt" not in lzw_msg
    assert trunc_msg.startswith(f"{bbbc013_tiff}: ") and "error" in trunc_msg and "corrupt or truncated" in trunc_msg  # zlib.error


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_tiff_with_non_finite_pixels(bbbc013_tiff, tmp_path, bad):
    pixels = tifffile.imread(bbbc013_tiff).astype(np.float32) / 255  # a float export, e.g. from a flat-field step
    pixels[100:110, 200:205] = bad
    path = tmp_path / "flatfield.tif"
    tifffile.imwrite(path, pixels)
    with pytest.raises(CellmorphError) as e:
        read_image(path)
    assert str(e.value) == (
        f"{path}: 50 of 409600 pixels are NaN or infinite. Re-export the image with finite values "
        "(e.g. replace NaN/inf by 0) or remove its row from the table."
    )


def _rgb_folder(tmp_path: Path, grey: int | None = None, small: int | None = None) -> None:
    """Six RGB PNGs in a folder-dataset CSV; image `grey` saved grey, image `small` saved at another size."""
    rng = np.random.default_rng(0)
    for i in range(6):
        size = 48 if i == small else 64
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img[:, :, 0] if i == grey else img).save(tmp_path / f"im{i}.png")
    pd.DataFrame({"Image_Path_RGB": [f"im{i}.png" for i in range(6)], "Metadata_MoA": ["A", "B"] * 3}).to_csv(tmp_path / "images.csv", index=False)


def test_grey_among_rgb_says_channels(tmp_path):
    _rgb_folder(tmp_path, grey=3)
    table = load_dataset("folder", tmp_path, csv="images.csv")
    with pytest.raises(CellmorphError) as e:
        build_store(table, image_size=32, cache=tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'im3.png'} has 1 channel(s) where the first row's {tmp_path / 'im0.png'} has 3.")
    assert "same channels" in msg and "image_size" not in msg


def test_other_size_says_image_size(tmp_path):
    _rgb_folder(tmp_path, small=2)
    table = load_dataset("folder", tmp_path, csv="images.csv")
    with pytest.raises(CellmorphError) as e:
        build_store(table, image_size=0, cache=tmp_path / "cache")
    assert str(e.value).startswith(f"{tmp_path / 'im2.png'}: 48x48 pixels but the first row's {tmp_path / 'im0.png'} 64x64.")
    assert "Set dataset.image_size" in str(e.value)
    assert build_store(table, image_size=32, cache=tmp_path / "cache").images.shape == (6, 3, 32, 32)


# Build a store, but die by SIGKILL halfway through writing images.npy (no cleanup code runs).
_KILLED_BUILD = """
import os, signal, sys
import numpy as np
from cellmorph.data.catalog import load_dataset
from cellmorph.data.store import build_store

def half_then_die(f, arr):
    f.write(arr.tobytes()[: arr.nbytes // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

np.save = half_then_die
build_store(load_dataset("folder", sys.argv[1], csv="images.csv"), image_size=32, cache=sys.argv[2])
"""


def test_killed_store_write_leaves_nothing_behind(tmp_path):
    _rgb_folder(tmp_path)
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tmp_path), str(cache)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (folder,) = (cache / "store").iterdir()
    (leftover,) = folder.glob(".images.npy.tmp-*")
    assert leftover.stat().st_size > 0 and not (folder / "images.npy").exists()  # no half store to be read
    # Files that are not this store's own temporaries stay: a user's note, another store's live write.
    (folder / "notes.txt").write_text("mine")
    other = cache / "store" / "another-key"
    other.mkdir()
    (other / ".images.npy.tmp-abc123").write_bytes(b"another build in progress")

    table = load_dataset("folder", tmp_path, csv="images.csv")
    store = build_store(table, image_size=32, cache=cache)
    assert store.images.shape == (6, 3, 32, 32)
    assert not list(folder.glob(".*.tmp-*")) and (folder / "notes.txt").read_text() == "mine"
    assert (other / ".images.npy.tmp-abc123").is_file()
    assert np.array_equal(build_store(table, image_size=32, cache=cache).images, store.images)  # from the cache


def test_store_without_index_is_rebuilt(tmp_path):
    """Killed between images.npy and index.parquet: the store is incomplete and is built again, not read."""
    _rgb_folder(tmp_path)
    table = load_dataset("folder", tmp_path, csv="images.csv")
    first = build_store(table, image_size=32, cache=tmp_path / "cache")
    (index,) = (tmp_path / "cache" / "store").glob("*/index.parquet")
    index.unlink()
    again = build_store(table, image_size=32, cache=tmp_path / "cache")
    assert index.is_file() and np.array_equal(again.images, first.images)


def test_cache_under_a_file_is_not_writable(tmp_path, monkeypatch):
    _rgb_folder(tmp_path)
    (tmp_path / "not-a-folder").write_text("")
    cache = tmp_path / "not-a-folder" / "cache"
    monkeypatch.setenv("CELLMORPH_CACHE", str(cache))
    table = load_dataset("folder", tmp_path, csv="images.csv")
    with pytest.raises(CellmorphError) as e:
        build_store(table, image_size=32)
    assert str(e.value).startswith(f"the cache folder {cache} is not writable; set CELLMORPH_CACHE to a writable folder")
    assert "--out" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the under-a-file case covers root")
def test_read_only_cache(tmp_path, monkeypatch):
    _rgb_folder(tmp_path)
    cache = tmp_path / "cache"
    table = load_dataset("folder", tmp_path, csv="images.csv")
    built = build_store(table, image_size=32, cache=cache)
    monkeypatch.setenv("CELLMORPH_CACHE", str(cache))
    for folder in (cache, cache / "store"):
        folder.chmod(0o555)
    try:
        assert np.array_equal(build_store(table, image_size=32).images, built.images)  # a complete store is only read
        with pytest.raises(CellmorphError, match=f"the cache folder {cache} is not writable; set CELLMORPH_CACHE to a writable folder"):
            build_store(table, image_size=16)
    finally:
        for folder in (cache, cache / "store"):
            folder.chmod(0o755)


def test_cli_truncated_tiff_is_one_line(bbbc013_tiff, tmp_path):
    """The whole path a user takes: `cellmorph run` on a folder dataset with a truncated TIFF."""
    rows = [bbbc013_tiff.name]
    for i in range(1, 4):
        shutil.copyfile(bbbc013_tiff, tmp_path / f"field{i}.tif")
        rows.append(f"field{i}.tif")
    _truncate(bbbc013_tiff)
    pd.DataFrame({"Image_Path_GFP": rows, "Metadata_MoA": ["A", "B", "A", "B"]}).to_csv(tmp_path / "screen.csv", index=False)
    config = tmp_path / "broken.toml"
    config.write_text(
        'name = "broken"\nmode = "frozen"\n\n[dataset]\nname = "folder"\nimage_size = 64\n'
        f'options = {{csv = "{tmp_path / "screen.csv"}"}}\n\n[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\n'
        '\n[evaluation]\nprotocol = "holdout-25"\n'
    )
    env = {**os.environ, "CELLMORPH_CACHE": str(tmp_path / "cache")}
    cli = Path(sys.executable).with_name("cellmorph")
    proc = subprocess.run([str(cli), "run", str(config), "--out", str(tmp_path / "run"), "--data", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert str(bbbc013_tiff) in out and "corrupt or truncated; re-export or re-download it" in out


# --- labels and rows of a user's CSV, through the CLI -----------------------------------------------------------


def _cellmorph(*args, cwd: Path, env: dict | None = None) -> tuple[int, str]:
    """`python -m cellmorph ARGS` in a subprocess, this tree's package first: (exit code, stdout + stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CELLMORPH_CACHE": str(cwd / "cache"), "CELLMORPH_DATA": str(cwd), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "cellmorph", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _folder_run_config(tmp_path: Path, csv: Path) -> Path:
    config = tmp_path / "screen.toml"
    config.write_text(
        'name = "screen"\nmode = "frozen"\ndevice = "cpu"\n\n[dataset]\nname = "folder"\nimage_size = 32\n'
        f'options = {{csv = "{csv}"}}\n\n[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\ninput_size = 32\n'
        '\n[evaluation]\nprotocol = "holdout-25"\n'
    )
    return config


def _only_error_line(code: int, out: str) -> str:
    assert code == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1 and out.startswith("error: "), out
    return out


def test_labels_differing_only_in_case_or_spaces_are_one_line_listing_them(tmp_path):
    """'DNA damage ' (a trailing space) is 'DNA damage'; 'dna damage' and 'DNA  damage' beside it are no new
    classes but an error naming every spelling, the column and the file."""
    _rgb_folder(tmp_path)
    csv = tmp_path / "images.csv"
    df = pd.read_csv(csv)
    df["Metadata_MoA"] = ["DNA damage", "Eg5", "dna damage", "Eg5 ", "DNA  damage ", " Eg5"]
    df.to_csv(csv, index=False)
    code, out = _cellmorph("run", _folder_run_config(tmp_path, csv), "--out", tmp_path / "run", cwd=tmp_path)
    line = _only_error_line(code, out)
    assert line == (f"error: labels differ only in case or spaces: 'DNA  damage' / 'DNA damage' / 'dna damage' "
                    f"(column Metadata_MoA in {csv}); make them one spelling"), line
    assert not (tmp_path / "run").exists()


def test_surrounding_spaces_are_stripped_from_labels(tmp_path):
    _rgb_folder(tmp_path)
    csv = tmp_path / "images.csv"
    pd.read_csv(csv).assign(Metadata_MoA=["DNA damage", "Eg5", "DNA damage ", "Eg5", " DNA damage", " "]).to_csv(csv, index=False)
    table = load_dataset("folder", tmp_path, csv="images.csv")
    assert table.classes == ["DNA damage", "Eg5"]
    assert table.df["Metadata_MoA"].tolist()[:5] == ["DNA damage", "Eg5", "DNA damage", "Eg5", "DNA damage"]


def test_a_duplicated_csv_row_is_one_line_naming_its_image(tmp_path):
    """The same image with the same metadata twice would count twice (in training and in the scores)."""
    _rgb_folder(tmp_path)
    csv = tmp_path / "images.csv"
    df = pd.read_csv(csv)
    pd.concat([df, df.iloc[[3, 1]]]).to_csv(csv, index=False)
    code, out = _cellmorph("run", _folder_run_config(tmp_path, csv), "--out", tmp_path / "run", cwd=tmp_path)
    line = _only_error_line(code, out)
    assert line == (f"error: {csv}: row 6 repeats row 3 in every column (Image_Path_RGB {tmp_path / 'im3.png'}); "
                    "each image may be listed once: remove the duplicate row(s)"), line
    assert not (tmp_path / "run").exists()


# --- decompression bombs: refused from the header, before a pixel is decoded --------------------------------------


def _tiff_bomb(path: Path, side: int = 16000) -> Path:
    """A real zlib TIFF of side x side x 3 zeros (~0.8 MB on disk, 768 MB decoded), written tile by tile."""
    tile = np.zeros((640, 640, 3), np.uint8)
    tifffile.imwrite(path, data=(tile for _ in range((side // 640) ** 2)), shape=(side, side, 3), dtype=np.uint8,
                     photometric="rgb", compression="zlib", tile=(640, 640))
    return path


def _png_bomb(path: Path, side: int = 16000) -> Path:
    """A real RGB PNG of side x side zeros (~0.7 MB on disk, 768 MB decoded), its IDAT streamed through zlib."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row = zlib.compressobj(9), bytes(3 * side + 1)  # filter byte 0, then side RGB zeros
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# cellmorph's CLI, then the process's own peak resident memory (VmHWM: since its exec) into $PEAK_FILE. Not the
# child's ru_maxrss from wait4: Linux carries the spawning process's high-water mark (this test session's, GBs)
# across fork and exec, so that figure would be the session's whatever the child did.
_PEAK_CHILD = """
import os
from cellmorph.cli import main
try:
    main()
finally:
    with open(os.environ["PEAK_FILE"], "w") as f:
        f.write(next(x.split()[1] for x in open("/proc/self/status") if x.startswith("VmHWM:")))
"""


def _peak_cli(*args, cwd: Path) -> tuple[int, str, float]:
    """`cellmorph ARGS` in a new process: (exit code, output, the process's peak resident memory in MB)."""
    peak = cwd / "peak.kb"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CELLMORPH_CACHE": str(cwd / "cache"), "CELLMORPH_DATA": str(cwd), "PEAK_FILE": str(peak)}
    env.pop("CELLMORPH_MAX_PIXELS", None)
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=cwd)
    return proc.returncode, proc.stdout.strip(), int(peak.read_text()) / 1024


@pytest.mark.parametrize("kind", ["tiff", "png"])
def test_decompression_bomb_is_one_line_and_never_decoded(tmp_path, kind):
    """A 0.8 MB file that decodes to 768 MB (16000 x 16000 x 3 zeros) is refused from its header with an honest
    line (not "corrupt"), and the process's memory stays that of a run refused on a truncated file."""
    _rgb_folder(tmp_path)
    ordinary = tmp_path / f"ordinary.{'tif' if kind == 'tiff' else 'png'}"
    tifffile.imwrite(ordinary, np.full((64, 64, 3), 7, np.uint8), photometric="rgb", compression="zlib") if kind == "tiff" else \
        Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(ordinary)
    _truncate(ordinary)  # the control: a file refused after the same start-up, without a big decode
    bomb = (_tiff_bomb if kind == "tiff" else _png_bomb)(tmp_path / f"bomb.{'tif' if kind == 'tiff' else 'png'}")
    assert bomb.stat().st_size < 1_000_000
    lines = pd.read_csv(tmp_path / "images.csv")
    peaks = {}
    for first in (ordinary, bomb):
        csv = tmp_path / f"{first.stem}.csv"
        lines.assign(Image_Path_RGB=[first.name, *lines["Image_Path_RGB"][1:]]).to_csv(csv, index=False)
        code, out, peaks[first] = _peak_cli("run", _folder_run_config(tmp_path, csv), "--out", tmp_path / "run", cwd=tmp_path)
        line = _only_error_line(code, out)
    assert line == (f"error: {bomb}: 256,000,000 pixels, over cellmorph's limit of 100,000,000 (a decompression bomb, "
                    "or a very large image); if the image is real, raise the limit: CELLMORPH_MAX_PIXELS=256000000"), line
    assert peaks[bomb] < peaks[ordinary] + 200, peaks  # not one of the 768 MB decoded
    assert not (tmp_path / "run").exists()


def test_max_pixels_setting_is_the_one_limit_of_every_reader(tmp_path, monkeypatch):
    """CELLMORPH_MAX_PIXELS sets the limit for TIFF (tifffile) and PNG (Pillow) alike; Pillow's own limit does not
    decide (nor is it changed), and a bad value is named."""
    png, tif = tmp_path / "a.png", tmp_path / "a.tif"
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(png)
    tifffile.imwrite(tif, np.zeros((100, 120), np.uint16))
    monkeypatch.setenv("CELLMORPH_MAX_PIXELS", "11999")
    for path in (png, tif):
        with pytest.raises(CellmorphError) as e:
            read_image(path)
        assert str(e.value) == (f"{path}: 12,000 pixels, over cellmorph's limit of 11,999 (a decompression bomb, or a very "
                                "large image); if the image is real, raise the limit: CELLMORPH_MAX_PIXELS=12000")
    monkeypatch.setenv("CELLMORPH_MAX_PIXELS", "12000")
    assert read_image(png).shape == (100, 120, 1) and read_image(tif).shape == (100, 120, 1)
    monkeypatch.delenv("CELLMORPH_MAX_PIXELS")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse 12,000 pixels (> 2 x 1000)
    assert read_image(png).shape == (100, 120, 1)
    assert Image.MAX_IMAGE_PIXELS == 1000
    field = tmp_path / "cell-painting.tif"  # the largest real fields: 2160 x 2160, 16-bit
    tifffile.imwrite(field, np.zeros((2160, 2160), np.uint16), compression="zlib")
    assert read_image(field).shape == (2160, 2160, 1)
    monkeypatch.setenv("CELLMORPH_MAX_PIXELS", "lots")
    with pytest.raises(CellmorphError, match=r"^CELLMORPH_MAX_PIXELS='lots': expected a whole number of pixels"):
        read_image(png)

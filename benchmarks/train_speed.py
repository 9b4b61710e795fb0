"""Fine-tuning speed: `train.fit` beside a bare forward + backward + optimiser loop of the same model, batch,
input size and optimiser, in one process on the same cores.

    CELLMORPH_DATA=../shared/data python benchmarks/train_speed.py [--model tf_efficientnet_lite0] [--size 128] [--batch 32]

Bare loop: `create_model(model, "imagenet", num_classes=K)` in train mode, a fixed random float batch already
normalised (in the layout cellmorph trains in on that device, and also the other one: both are reported),
cross-entropy, `zero_grad`, `backward`, SGD step (momentum 0.9, lr 1e-3), `--steps` timed steps after
`--warmup` untimed ones. No data work at all: the upper bound of what training that network can do here.
cellmorph: `train.fit` on real BBBC021 subset images (uint8, resized once at the start as fit does) with the
default FinetuneConfig (augmentation on: dihedral flips, intensity jitter, blur, noise; class weights), for
`--epochs` epochs of `--n` images; its images/s is fit's own per-epoch figure (the training steps, augmentation
included; the one-off resize excluded), the best epoch after the first. The two alternate `--repeats` times
and the best of each is reported with every measurement. ratio = cellmorph / the bare loop in the same layout
(`ratio`), and / the faster bare layout (`ratio_vs_best_layout`).
With `--compile`, also the bare loop of `torch.compile(model)` (inductor, channels_last; its compile time, taken in
the warm-up steps, is reported apart): whether compiling would raise the ceiling on this device.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date

import numpy as np
import torch
import torch.nn.functional as F


def bare_loop(model_name: str, classes: int, batch: int, size: int, steps: int, warmup: int, dev: torch.device, channels_last: bool,
              compile_: bool = False, timings: dict | None = None) -> float:
    """Images/s of plain training steps of the network on one fixed, normalised batch (`compile_`: through
    torch.compile; the warm-up's seconds go to `timings["warmup_s"]`)."""
    from cellmorph.models.factory import create_model
    from cellmorph.models.train import FUSED_DEVICES

    model = create_model(model_name, "imagenet", num_classes=classes).to(dev).train()
    x = torch.randn(batch, 3, size, size, device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch, device=dev) % classes
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=dev.type in FUSED_DEVICES or None)  # as train.make_optimizer
    run = torch.compile(model) if compile_ else model

    def step():
        loss = F.cross_entropy(run(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_warm = time.perf_counter()
    for _ in range(warmup):
        step()
    if timings is not None:
        timings["warmup_s"] = round(time.perf_counter() - t_warm, 1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def cellmorph_fit(images: torch.Tensor, labels: np.ndarray, classes: int, model_name: str, size: int, batch: int, epochs: int,
                  dev: torch.device) -> tuple[float, list[float]]:
    """train.fit's best per-epoch images/s after the first epoch (and every epoch's)."""
    from cellmorph.config import FinetuneConfig
    from cellmorph.models.factory import create_model
    from cellmorph.models.train import InputSpec, fit

    model = create_model(model_name, "imagenet", num_classes=classes)
    cfg = FinetuneConfig(epochs=epochs, batch_size=batch)
    spec = InputSpec(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    hist = fit(model, images, labels, classes, cfg, spec, dev, seed=0)
    per_epoch = [float(v) for v in hist.images_per_s]
    return max(per_epoch[1:] or per_epoch), per_epoch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128, help="input size of both loops (the CPU fine-tuning size the docs use)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=320, help="real subset images fit trains on per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="fit epochs; the best after the first is reported")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of the bare loop")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (the cores)")
    ap.add_argument("--data", default=None, help="datasets folder (default $CELLMORPH_DATA)")
    ap.add_argument("--compile", action="store_true", help="also time the bare loop through torch.compile (channels_last)")
    args = ap.parse_args(argv)

    from cellmorph.data.catalog import load_dataset
    from cellmorph.data.store import build_store
    from cellmorph.models.train import channels_last_training, pick_device

    dev = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = load_dataset("bbbc021-subset", args.data)
    store = build_store(table, 0)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(store.images), size=min(args.n, len(store.images)), replace=False))
    images = torch.from_numpy(np.ascontiguousarray(store.images[pick]))
    names = store.index["Metadata_MoA"].astype(str).to_numpy()[pick]
    classes = sorted(set(names))
    labels = np.array([classes.index(v) for v in names])
    ours_layout = channels_last_training(dev)

    load0 = os.getloadavg()[0]
    bare = {"channels_last": [], "contiguous": []}
    ours, epochs = [], []
    for _ in range(max(1, args.repeats)):
        for layout in bare:
            bare[layout].append(bare_loop(args.model, len(classes), args.batch, args.size, args.steps, args.warmup, dev, layout == "channels_last"))
        best, per_epoch = cellmorph_fit(images, labels, len(classes), args.model, args.size, args.batch, args.epochs, dev)
        ours.append(best)
        epochs.append(per_epoch)
    compiled, compile_info = [], {}
    if args.compile:
        for _ in range(max(1, args.repeats)):
            compiled.append(bare_loop(args.model, len(classes), args.batch, args.size, args.steps, args.warmup, dev, True, True, compile_info))
    same = "channels_last" if ours_layout else "contiguous"
    best_bare = {k: max(v) for k, v in bare.items()}
    out = {
        "benchmark": "train_speed", "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg_1min_start": round(load0, 2),
        "load_avg_1min_end": round(os.getloadavg()[0], 2), "model": args.model, "size": args.size, "batch": args.batch,
        "images": len(pick), "classes": len(classes), "fit_layout": same,
        "bare_images_per_s": {k: round(v, 2) for k, v in best_bare.items()},
        "bare_all": {k: [round(x, 2) for x in v] for k, v in bare.items()},
        "fit_images_per_s": round(max(ours), 2), "fit_epochs_all": [[round(x, 2) for x in e] for e in epochs],
        "ratio": round(max(ours) / best_bare[same], 3), "ratio_vs_best_layout": round(max(ours) / max(best_bare.values()), 3),
        "target_ratio": 0.9,
    }
    if compiled:
        out |= {"bare_compiled_images_per_s": round(max(compiled), 2), "bare_compiled_all": [round(x, 2) for x in compiled],
                "compile_warmup_s_last": compile_info.get("warmup_s"),
                "compiled_vs_eager_channels_last": round(max(compiled) / best_bare["channels_last"], 3)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

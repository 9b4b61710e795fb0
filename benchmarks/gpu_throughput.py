"""Training throughput on one GPU, in one process: a bare PyTorch loop on synthetic on-GPU tensors
versus cellmorph's real end-to-end fine-tuning (real BBBC021 subset, uint8 on the GPU, augmentation,
normalisation) with the same model, batch size, resolution, optimizer and precision.

    CELLMORPH_DATA=../shared/data python benchmarks/gpu_throughput.py [--model resnet50] [--batch 256] [--compile]
    # where does the time outside the network go?  (tables on stderr)
    CELLMORPH_DATA=../shared/data python benchmarks/gpu_throughput.py --profile --sync-debug

Prints one JSON line: images/s for both and their ratio, plus two attributions of the difference:
cellmorph's steady-state images/s (CUDA-event-timed epochs, without the per-run set-up inside `fit`:
the host-to-device copy and the one resize of the uint8 stack) and the time of the augmentation and
normalisation of one batch measured on its own. `--device cpu` with a small model and size is a
smoke run (what the tests do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date

import numpy as np
import torch
import torch.nn.functional as F


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model_name: str, batch: int, size: int, steps: int, warmup: int, compile_: bool, dev: torch.device) -> float:
    import timm
    from cellmorph.models.train import FUSED_DEVICES

    model = timm.create_model(model_name, num_classes=6).to(dev).to(memory_format=torch.channels_last).train()
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=dev.type in FUSED_DEVICES or None)  # as train.make_optimizer
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,), device=dev)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(dev)
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def real_batch_source(batch: int, data: str | None):
    """The real subset as uint8 (whole batches only, as the bare loop), its labels and class count."""
    from cellmorph.data.catalog import load_dataset
    from cellmorph.data.store import build_store

    table = load_dataset("bbbc021-subset", data)
    store = build_store(table, 0)
    n = (len(store.images) // batch) * batch
    images = torch.from_numpy(np.asarray(store.images[:n]))
    classes = table.classes
    y = table.df.Metadata_MoA.map({c: i for i, c in enumerate(classes)}).to_numpy()[:n]
    return images, y, len(classes)


def cellmorph_loop(model_name: str, batch: int, size: int, steps: int, compile_: bool, real: tuple, dev: torch.device, profile: bool = False, sync_debug: bool = False) -> dict:
    from cellmorph.config import FinetuneConfig
    from cellmorph.models.factory import create_model, normalization
    from cellmorph.models.train import InputSpec, fit

    images, y, n_classes = real
    n = len(images)
    model = create_model(model_name, "random", num_classes=n_classes)
    mean, std = normalization(model)
    spec = InputSpec(size=size, mean=mean, std=std)
    steps_per_epoch = n // batch
    cfg = FinetuneConfig(epochs=2, batch_size=batch, optimizer="sgd", lr=0.01, compile=compile_)
    fit(model, images, y, n_classes, cfg, spec, dev, seed=0)  # warm-up: cudnn autotune, compile, allocator
    epochs = max(1, steps // steps_per_epoch)
    cfg = FinetuneConfig(epochs=epochs, batch_size=batch, optimizer="sgd", lr=0.01, compile=compile_)
    _sync(dev)
    t0 = time.perf_counter()
    hist = fit(model, images, y, n_classes, cfg, spec, dev, seed=1)
    _sync(dev)
    out = {"img_s": epochs * n / (time.perf_counter() - t0), "steady_img_s": float(np.median(hist.images_per_s))}
    if sync_debug and dev.type == "cuda":  # every host-device sync inside an epoch becomes a warning on stderr
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(model, images, y, n_classes, cfg.model_copy(update={"epochs": 1}), spec, dev, seed=2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            fit(model, images, y, n_classes, cfg.model_copy(update={"epochs": 2}), spec, dev, seed=3)
            _sync(dev)
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)
    return out


def augment_ms(batch: int, size: int, images: torch.Tensor, dev: torch.device, reps: int = 20) -> float:
    """Milliseconds per batch for what cellmorph adds in front of the network, on its own: `fit`'s own
    per-step `training_batch` (index, augment, normalise, channels_last) on the already resized stack."""
    from cellmorph.config import AugmentConfig
    from cellmorph.models.train import InputSpec, resize_uint8_stack, training_batch

    x_all = resize_uint8_stack(images.to(dev), size)
    spec = InputSpec(size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    gen = torch.Generator(device=dev).manual_seed(0)
    cfg = AugmentConfig()

    def one():
        return training_batch(x_all, torch.randperm(len(x_all), device=dev, generator=gen)[:batch], spec, cfg, gen)

    for _ in range(3):
        one()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        one()
    _sync(dev)
    return 1000 * (time.perf_counter() - t0) / reps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--data", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run at tiny sizes)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of 2 cellmorph epochs (torch.profiler) on stderr")
    ap.add_argument("--sync-debug", action="store_true", help="CUDA: warn (stderr) at every host-device sync in one cellmorph epoch")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    real = real_batch_source(a.batch, a.data)  # read once, for both cellmorph measurements
    bare1 = bare_loop(a.model, a.batch, a.size, a.steps, 10, a.compile, dev)
    e2e = cellmorph_loop(a.model, a.batch, a.size, a.steps, a.compile, real, dev, a.profile, a.sync_debug)
    bare2 = bare_loop(a.model, a.batch, a.size, a.steps, 10, a.compile, dev)
    bare = (bare1 + bare2) / 2
    aug = augment_ms(a.batch, a.size, real[0], dev)
    line = {
        "benchmark": "gpu_throughput",
        "date": date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": a.model,
        "batch": a.batch,
        "size": a.size,
        "precision": "bf16 autocast, channels_last" if dev.type == "cuda" else "fp32",
        "compile": a.compile,
        "bare_img_s": round(bare, 1),
        "bare_img_s_runs": [round(bare1, 1), round(bare2, 1)],
        "cellmorph_img_s": round(e2e["img_s"], 1),
        "ratio": round(e2e["img_s"] / bare, 4),
        "cellmorph_steady_img_s": round(e2e["steady_img_s"], 1),
        "steady_ratio": round(e2e["steady_img_s"] / bare, 4),
        "bare_ms_per_step": round(1000 * a.batch / bare, 2),
        "augment_normalize_ms_per_batch": round(aug, 2),
    }
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()

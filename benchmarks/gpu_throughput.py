"""Training throughput on one GPU, in one process: a bare PyTorch loop on synthetic on-GPU tensors
versus cellmorph's real end-to-end fine-tuning (real BBBC021 subset, uint8 on the GPU, augmentation,
normalisation) with the same model, batch size, resolution, optimizer and precision.

    CELLMORPH_DATA=../shared/data python benchmarks/gpu_throughput.py [--model resnet50] [--batch 256] [--compile]

Prints one JSON line: images/s for both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date

import numpy as np
import torch
import torch.nn.functional as F


def bare_loop(model_name: str, batch: int, size: int, steps: int, warmup: int, compile_: bool) -> float:
    import timm

    dev = torch.device("cuda")
    model = timm.create_model(model_name, num_classes=6).to(dev).to(memory_format=torch.channels_last).train()
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,), device=dev)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def cellmorph_loop(model_name: str, batch: int, size: int, steps: int, compile_: bool, data: str | None) -> float:
    from cellmorph.config import FinetuneConfig
    from cellmorph.datasets import load_dataset
    from cellmorph.models import create_model, normalization
    from cellmorph.store import build_store
    from cellmorph.train import InputSpec, fit

    dev = torch.device("cuda")
    table = load_dataset("bbbc021-subset", data)
    store = build_store(table, 0)
    n = (len(store.images) // batch) * batch  # whole batches only, as the bare loop
    images = torch.from_numpy(np.asarray(store.images[:n]))
    classes = table.classes
    y = table.df.Metadata_MoA.map({c: i for i, c in enumerate(classes)}).to_numpy()[:n]
    model = create_model(model_name, "random", num_classes=len(classes))
    mean, std = normalization(model)
    spec = InputSpec(size=size, mean=mean, std=std)
    steps_per_epoch = n // batch
    cfg = FinetuneConfig(epochs=2, batch_size=batch, optimizer="sgd", lr=0.01, compile=compile_)
    fit(model, images, y, len(classes), cfg, spec, dev, seed=0)  # warm-up: cudnn autotune, compile, allocator
    epochs = max(1, steps // steps_per_epoch)
    cfg = FinetuneConfig(epochs=epochs, batch_size=batch, optimizer="sgd", lr=0.01, compile=compile_)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit(model, images, y, len(classes), cfg, spec, dev, seed=1)
    torch.cuda.synchronize()
    return epochs * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    bare1 = bare_loop(a.model, a.batch, a.size, a.steps, 10, a.compile)
    e2e = cellmorph_loop(a.model, a.batch, a.size, a.steps, a.compile, a.data)
    bare2 = bare_loop(a.model, a.batch, a.size, a.steps, 10, a.compile)
    bare = (bare1 + bare2) / 2
    print(
        json.dumps(
            {
                "benchmark": "gpu_throughput",
                "date": date.today().isoformat(),
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "model": a.model,
                "batch": a.batch,
                "size": a.size,
                "precision": "bf16 autocast, channels_last",
                "compile": a.compile,
                "bare_img_s": round(bare, 1),
                "bare_img_s_runs": [round(bare1, 1), round(bare2, 1)],
                "cellmorph_img_s": round(e2e, 1),
                "ratio": round(e2e / bare, 4),
            }
        )
    )


if __name__ == "__main__":
    main()

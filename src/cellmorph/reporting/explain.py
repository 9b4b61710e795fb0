"""Looking inside a network: activation maximisation (as keras-vis, Kensert et al. Fig 5) and
Grad-CAM saliency on images.

Activation maximisation: start from a grey image with a little noise and follow the gradient that
raises a filter's mean activation, regularised by random jitter (roll), periodic 3x3 blur and a small
L2 decay, so the picture shows structure rather than adversarial high-frequency noise.
Grad-CAM (Selvaraju et al. 2017): the last feature map weighted by the spatial mean of the class
score's gradient, rectified and upsampled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellmorph.models.augment import blur3x3
from cellmorph.errors import CellmorphError
from cellmorph.models.train import InputSpec
from cellmorph.storage import EXPLAIN, RUN, writing


def get_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        hints = [i["module"] for i in getattr(model, "feature_info", [])] or list(modules)[:10]
        raise CellmorphError(f"layer '{name}' not in the model. Layers to try: {', '.join(hints)}.")
    return modules[name]


def default_layers(model: nn.Module) -> list[str]:
    """A few layers from shallow to deep: timm's feature_info stages."""
    info = [i["module"] for i in getattr(model, "feature_info", [])]
    return info[1:] if len(info) > 2 else info


def activation_maximization(
    model: nn.Module, layer: str, filters: list[int], spec: InputSpec, size: int = 128, steps: int = 128, lr: float = 0.05, jitter: int = 4, blur_every: int = 4, decay: float = 1e-4, seed: int = 0, device: torch.device | None = None
) -> np.ndarray:
    """For each filter, the input (F x C x size x size, values in [0, 1]) that maximises its mean activation."""
    device = device or next(model.parameters()).device
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    module = get_layer(model, layer)
    acts = {}
    handle = module.register_forward_hook(lambda m, i, o: acts.__setitem__("out", o))
    g = torch.Generator(device="cpu").manual_seed(seed)
    in_chans = getattr(model, "in_chans", 3) or 3
    img = (0.5 + 0.05 * torch.randn(len(filters), in_chans, size, size, generator=g)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([img], lr=lr)
    idx = torch.tensor(filters, device=device)
    try:
        for step in range(steps):
            dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
            x = torch.roll(img, shifts=(dx, dy), dims=(-2, -1))
            model(spec(x.clamp(0, 1)))
            out = acts["out"]
            if out.shape[1] <= int(idx.max()):
                raise CellmorphError(f"layer '{layer}' has {out.shape[1]} filters; asked for filter {int(idx.max())}.")
            score = out[torch.arange(len(filters), device=device), idx].mean(dim=(-2, -1)).sum()
            loss = -score + decay * (img - 0.5).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if blur_every and (step + 1) % blur_every == 0:
                    img.copy_(blur3x3(img))
                img.clamp_(0, 1)
    finally:
        handle.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    return img.detach().cpu().numpy()


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (B x H x W in [0, 1], input resolution) for network input x, for `classes`
    (default: the predicted class); returns (maps, predicted classes)."""
    model.eval()
    feats = model.forward_features(x)
    feats.retain_grad()
    logits = model.forward_head(feats)
    pred = logits.argmax(1)
    target = pred if classes is None else classes
    model.zero_grad(set_to_none=True)
    logits.gather(1, target[:, None]).sum().backward()
    weights = feats.grad.mean(dim=(-2, -1), keepdim=True)
    cam = F.relu((weights * feats).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    return cam.detach().cpu().numpy(), pred.detach().cpu().numpy()


def to_rgb(img: np.ndarray) -> np.ndarray:
    """C x H x W in [0, 1] -> H x W x 3 for display (1 channel -> grey, 2 -> R, G, zero B)."""
    c = img.shape[0]
    if c == 1:
        img = np.repeat(img, 3, axis=0)
    elif c == 2:
        img = np.concatenate([img, np.zeros_like(img[:1])])
    elif c > 3:
        img = img[:3]
    lo, hi = img.min(), img.max()
    return ((img - lo) / max(hi - lo, 1e-8)).transpose(1, 2, 0)


def write_am_grid(path, results: dict[str, dict[str, np.ndarray]], filters: list[int], title: str) -> None:
    """results[layer][model_label] = F x C x H x W. One row per (layer, model), one column per filter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellmorph.io import atomic_path

    rows = [(layer, label, imgs) for layer, per in results.items() for label, imgs in per.items()]
    fig, axes = plt.subplots(len(rows), len(filters), figsize=(1.9 * len(filters), 2.0 * len(rows)), squeeze=False)
    for r, (layer, label, imgs) in enumerate(rows):
        for c, f in enumerate(filters):
            ax = axes[r, c]
            ax.imshow(to_rgb(imgs[c]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or rows[r - 1][0] != layer:
                ax.set_title(f"filter {f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{layer}\n{label}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_gradcam_grid(path, images: np.ndarray, cams: np.ndarray, captions: list[str], title: str) -> None:
    """images: B x C x H x W uint8; cams: B x H x W. Two rows: the image, the image with the map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellmorph.io import atomic_path

    b = len(images)
    fig, axes = plt.subplots(2, b, figsize=(2.3 * b, 5), squeeze=False)
    for i in range(b):
        rgb = to_rgb(images[i].astype(np.float32) / 255)
        axes[0, i].imshow(rgb)
        axes[0, i].set_title(captions[i], fontsize=7)
        axes[1, i].imshow(rgb)
        axes[1, i].imshow(cams[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def explain_run(cfg, weights, out, data_dir=None, layers: list[str] | None = None, filters: list[int] | None = None, n_images: int = 8, steps: int = 128, am_size: int = 128, device_name: str = "auto") -> dict:
    """Activation maximisation (pretrained vs fine-tuned, side by side) and Grad-CAM overlays on the
    held-out images of the fold whose weights are given. Writes activation_maximization.png and gradcam.png."""
    out = Path(out).expanduser()
    with writing(out, RUN if (out / "dataset.json").is_file() else EXPLAIN):  # a user's folder is refused, not overwritten
        return _explain(cfg, weights, out, data_dir, layers, filters, n_images, steps, am_size, device_name)


def _explain(cfg, weights, out, data_dir, layers, filters, n_images, steps, am_size, device_name) -> dict:
    import json

    from cellmorph.data.catalog import load_dataset
    from cellmorph.data.store import build_store
    from cellmorph.models.factory import create_model, default_input_size
    from cellmorph.models.train import make_input_spec, pick_device

    weights = Path(weights)
    if not weights.is_file():
        raise CellmorphError(f"{weights}: weights file not found. Run a fine-tune with finetune.save_models = true; it writes folds/NN/model.pt.")
    device = pick_device(device_name)
    table = load_dataset(cfg.dataset.name, data_dir, label=cfg.dataset.label, **cfg.dataset.options)
    store = build_store(table, cfg.dataset.image_size)
    classes = table.classes
    c = store.images.shape[1]
    before = create_model(cfg.model.name, cfg.model.init, num_classes=len(classes), in_chans=c).to(device)
    after = create_model(cfg.model.name, str(weights), num_classes=len(classes), in_chans=c).to(device)
    size = cfg.model.input_size or default_input_size(cfg.model.name)
    spec = make_input_spec(after, size, cfg.finetune.normalize, torch.from_numpy(np.asarray(store.images)))
    layers = layers or default_layers(after)
    filters = filters or [0, 1, 2, 3, 4, 5]
    init_label = "ImageNet" if cfg.model.init == "imagenet" else cfg.model.init
    results = {
        layer: {
            f"before ({init_label})": activation_maximization(before, layer, filters, spec, size=am_size, steps=steps, device=device),
            "fine-tuned": activation_maximization(after, layer, filters, spec, size=am_size, steps=steps, device=device),
        }
        for layer in layers
    }
    write_am_grid(out / "activation_maximization.png", results, filters, f"{cfg.model.name}: filters' preferred inputs, before vs after fine-tuning")

    fold_json = weights.parent / "fold.json"
    info = json.loads(fold_json.read_text()) if fold_json.is_file() else {}
    held = info.get("held_out")
    df = table.df
    if "index" in info:  # the fold's own held-out rows, under the config's protocol (any dataset, any grouping)
        from cellmorph.evaluation.protocols import make_folds

        folds = {f.name: f for f in make_folds(df, table.label, cfg.evaluation)[0]}
        rows = folds[held].test if held in folds else np.arange(len(df))
    else:
        rows = np.arange(len(df))
    rows = rows[np.linspace(0, len(rows) - 1, min(n_images, len(rows))).astype(int)]
    imgs = torch.from_numpy(np.asarray(store.images[rows])).to(device)
    x = spec(imgs.float() / 255)
    cams, pred = grad_cam(after, x)
    truth = df[cfg.dataset.label].astype(str).to_numpy()[rows]
    name = df["Metadata_Compound"].astype(str).to_numpy() if "Metadata_Compound" in df.columns else np.full(len(df), "")
    captions = [f"{name[r]}\ntrue {t}\npred {classes[p]}".lstrip("\n") for r, t, p in zip(rows, truth, pred)]
    write_gradcam_grid(out / "gradcam.png", store.images[rows], cams, captions, f"Grad-CAM, fine-tuned {cfg.model.name}" + (f", held out: {held}" if held else ""))
    return {"layers": layers, "filters": filters, "held_out": held, "images": [int(r) for r in rows]}

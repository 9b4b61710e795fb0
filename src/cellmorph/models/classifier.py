"""The network-level classifier: frozen features + logistic regression, or a fine-tuned network, trained on an
ImageTable (or a store built from one), predicting on uint8 arrays or tables, saved to and loaded from a
self-contained bundle (cellmorph.models.bundle). The runner's final model, `cellmorph predict` and the
notebook API (`cellmorph.Classifier`) all use this one class.

Every path goes through the same code as `cellmorph run`: the config is built only by
`cellmorph.config.override` (validated), images by the store, features by `train.forward_batches`,
fine-tuning by `train.fit`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator
from pathlib import Path

import numpy as np
import torch

from cellmorph.config import ExperimentConfig, override
from cellmorph.data.store import build_store, open_store, trained_on
from cellmorph.data.table import ImageTable, labelled_mask
from cellmorph.errors import CellmorphError
from cellmorph.models.backbone import StagePooled, frozen_width
from cellmorph.models.bundle import bundle_meta, load_bundle, load_state, save_bundle
from cellmorph.models.factory import INIT_WORDS, check_model_config, create_model, default_input_size, normalization, pre_logits
from cellmorph.models.features import extract_features, frozen_head, head_C, head_groups
from cellmorph.models.heads import check_head, head_proba
from cellmorph.models.inference import map_batches
from cellmorph.models.mc_dropout import mc_dropout_proba, seeded
from cellmorph.progress import make_progress, progress_shown
from cellmorph.models.train import InputSpec, disk_images, fit as _fit, fits_in_memory, fold_batch_norm, forward_batches, make_input_spec, pick_device, resize_uint8_stack

_FOLD_LOCK = threading.Lock()


def join_outputs(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """{name: list of per-batch arrays} -> {name: one array} (names with no batch left out)."""
    return {k: np.concatenate(v) for k, v in parts.items() if v}


class Classifier:
    """An image classifier trained by transfer learning: frozen features + logistic regression, or fine-tuned.

    Args:
        model: a timm model name (or torchvision's alexnet/googlenet, cellmorph's lenet/gendernet);
            None keeps the config's (default tf_efficientnet_lite0).
        init: "imagenet", "xavier", "gaussian", "random" or a weights file; None keeps the config's.
        mode: "frozen" or "finetune"; None keeps the config's.
        config: the `ExperimentConfig` to start from (default: every default).
        overrides: {dotted.field: value} changes, validated: a typo raises a CellmorphError naming the field.

    Example:
        >>> import cellmorph as cm
        >>> clf = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides={"frozen.C": 1.0})
        >>> clf.fit(table).save("moa-model")
        >>> cm.Classifier.load("moa-model").predict(images)[:2]
        ['DNA damage', 'Eg5 inhibitors']
    """

    def __init__(self, model: str | None = None, init: str | None = None, mode: str | None = None, *,
                 config: ExperimentConfig | None = None, overrides: dict | None = None):
        named = {"model.name": model, "model.init": init, "mode": mode}
        changes = {**{k: v for k, v in named.items() if v is not None}, **(overrides or {})}
        cfg = override(config or ExperimentConfig(), changes)
        check_model_config(cfg.model.name, cfg.model.init)
        self._reset(cfg)

    def _reset(self, cfg: ExperimentConfig, source: str = "this classifier") -> None:
        self.config = cfg
        self.classes: list[str] = []
        self._source = source
        self._net: torch.nn.Module | None = None  # finetune: the network; frozen: the backbone
        self._folded: tuple | None = None  # frozen: (backbone, its batch-norm-folded inference copy)
        self._head: dict[str, torch.Tensor] = {}  # frozen: mean, scale, coef, intercept (float64)
        self._spec: InputSpec | None = None
        self._channels = 0
        self._trained_on: dict = {}
        # Out-of-fold predictions of the run that produced this model (Metadata_*, label, prob_<class>):
        # the conformal calibration data `cellmorph predict` uses. None for a model fitted outside a run.
        self.calibration = None
        self.calibration_info: dict = {}  # where it came from (run, protocol, aggregation), saved in bundle.json
        # the training units' feature profiles for the distance novelty score (novelty.reference_profiles); None outside a run
        self.reference = None
        # the training images' features for the image novelty score (novelty.image_reference); None outside a run
        self.image_reference = None

    def __repr__(self) -> str:
        m = self.config.model
        state = f"{len(self.classes)} classes" if self._net is not None else "not fitted"
        return f"Classifier({m.name!r}, init={m.init!r}, mode={self.config.mode!r}; {state})"

    @property
    def net(self) -> torch.nn.Module | None:
        """The network (finetune) or the backbone (frozen); None before fit."""
        return self._net

    @contextmanager
    def using(self, net: torch.nn.Module):
        """Run the block with `net` (same architecture, other weights: a fold model) in place of the fitted
        network, then restore it (`cellmorph predict --ensemble`)."""
        saved, self._net = self._net, net
        try:
            yield self
        finally:
            self._net = saved

    @property
    def spec(self) -> InputSpec | None:
        """How images are resized and normalised for the network."""
        return self._spec

    @property
    def source(self) -> str:
        """What this classifier is, for messages ("model bundle PATH", "this classifier")."""
        return self._source

    @property
    def trained_on(self) -> dict:
        """What it was trained on (dataset, images, store key, seed, image shape, channel columns)."""
        return self._trained_on

    @property
    def channels(self) -> int:
        """The number of image channels the fitted model takes (0 before fit)."""
        return self._channels

    def fit(self, table: ImageTable, progress: bool = True) -> Classifier:
        """Train on the labelled rows of `table` (rows with an empty or NaN label are skipped).

        Args:
            table: an `ImageTable` (e.g. from `load_dataset`); its label column names the classes.
            progress: show progress (decoding, features, training steps) on the console; False: silent.
        Returns:
            self, fitted: `classes` holds the class names in probability-column order.

        Example:
            >>> clf = Classifier("tf_efficientnet_lite0").fit(table)
            >>> clf.classes[0]
            'Aurora kinase inhibitors'
        """
        check_labelled(table)
        cfg = override(self.config, {"dataset.label": table.label}) if table.label != self.config.dataset.label else self.config
        n = int(labelled_mask(table.df, table.label).sum())
        with progress_shown(progress), make_progress() as bar:
            store = open_store(table, cfg.dataset.image_size)
            what = f"fitting {cfg.model.name} ({cfg.mode}) on {n} labelled images"
            if cfg.mode == "finetune":
                task = bar.add_task(what, total=cfg.finetune.epochs * max(1, n // min(cfg.finetune.batch_size, n)))
                self.fit_store(table, store, cfg, on_step=lambda: bar.advance(task))
            else:  # the features show their own progress; then one logistic head
                task = bar.add_task(what, total=1)
                self.fit_store(table, store, cfg)
                bar.advance(task)
        return self

    def fit_store(self, table: ImageTable, store, cfg: ExperimentConfig | None = None, on_step=None, group: str | None = None) -> Classifier:
        """`fit` on a store already built from `table` (the runner's final model reuses its store); `on_step()`
        after each training step (progress bars). `group`: the column whose groups frozen.C = "auto"'s inner split
        keeps whole (default: evaluation.group; the runner passes its protocol's)."""
        cfg = cfg or self.config
        check_labelled(table)
        lab = labelled_mask(table.df, table.label)
        classes = table.classes
        idx = np.flatnonzero(lab)
        y = table.df[table.label].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()[idx].astype(np.int64)
        device = pick_device(cfg.device)
        self._reset(cfg)
        if cfg.mode == "frozen":
            self._fit_frozen(store, idx, y, device, head_groups(table.df, cfg.evaluation.group if group is None else group, idx))
        else:
            size = cfg.model.input_size or default_input_size(cfg.model.name)
            images = torch.from_numpy(np.asarray(store.images)) if store.decoded or fits_in_memory(store.shape, size) else disk_images(store, size, device)
            self._fit_finetune(images[torch.from_numpy(idx)], y, len(classes), device, on_step)
        self.classes, self._channels = classes, store.shape[1]
        self._trained_on = trained_on(table, store, len(idx), cfg.seed)
        return self

    def _fit_frozen(self, store, idx: np.ndarray, y: np.ndarray, device: torch.device, groups: np.ndarray | None = None) -> None:
        """Backbone features (as the runner: cached when the weights are fixed) + the standardised multinomial
        logistic head of features.logistic_head, kept as plain tensors."""
        cfg = self.config
        m, fz = cfg.model, cfg.frozen
        with seeded(device, cfg.seed):  # random/xavier/gaussian backbones: reproducible from the seed
            self._net = create_model(m.name, m.init, num_classes=0, in_chans=store.shape[1])
            mean, std = normalization(self._net)
            self._spec = InputSpec(size=m.input_size or default_input_size(m.name), mean=mean, std=std)
            if m.init == "imagenet" or m.init not in INIT_WORDS:  # fixed weights: the runner's cached features are this backbone's
                feats = extract_features(store, m, fz.tta, fz.batch_size, device, stages=fz.stage_pooled)[idx]
            else:
                feats = self._features(torch.from_numpy(np.asarray(store.images))[torch.from_numpy(idx)], device).numpy()
        cw = None if fz.class_weight == "none" else "balanced"
        C, cols, _ = head_C(fz.C, feats, y, groups, cw, cfg.seed, fz.features, self._net.num_features if fz.features == "auto" else None)
        arrays = frozen_head(feats, y, C, cols, cw, cfg.seed)
        self._head = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in arrays.items()}

    def _fit_finetune(self, images: torch.Tensor, y: np.ndarray, n_classes: int, device: torch.device, on_step=None) -> None:
        """Every layer trained with the config's recipe, as one fold of the runner."""
        cfg = self.config
        size = cfg.model.input_size or default_input_size(cfg.model.name)
        with seeded(device, cfg.seed):
            self._net = create_model(cfg.model.name, cfg.model.init, num_classes=n_classes, in_chans=images.shape[1], drop_rate=cfg.model.drop_rate)
            x = resize_uint8_stack(images.to(device), size)
            self._spec = make_input_spec(self._net, size, cfg.finetune.normalize, x)
            _fit(self._net, x, y, n_classes, cfg.finetune, self._spec, device, cfg.seed, on_step=on_step)

    def _features(self, images: torch.Tensor, device: torch.device, on_batch=None) -> torch.Tensor:
        """Frozen: the backbone's features, through its batch-norm-folded copy (`fold_batch_norm`, made once per
        backbone), as the runner's feature extraction computes them (frozen.batch_size images per batch)."""
        fz = self.config.frozen
        with _FOLD_LOCK:  # output_batches runs batches in threads: one fold, in channels_last once
            if self._folded is None or self._folded[0] is not self._net:
                folded = fold_batch_norm(self._net, self._channels or images.shape[1]).to(device).eval()
                folded.to(memory_format=torch.channels_last)  # as forward_batches wants it: no relayout per batch
                self._folded = (self._net, StagePooled(folded) if fz.stage_pooled else folded)
        return forward_batches(self._folded[1], images, self._spec, device, fz.batch_size, tta=fz.tta, on_batch=on_batch)

    def proba_and_features(self, x: torch.Tensor, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
        """Frozen: the probabilities and the backbone features of checked uint8 images from ONE backbone pass
        (the same numbers as `_proba` and `embed`)."""
        feats = self._features(x, pick_device(self.config.device), on_batch)
        return head_proba(feats, self._head), feats.numpy().astype(np.float32, copy=False)

    def predict_proba(self, images: np.ndarray | torch.Tensor | ImageTable) -> np.ndarray:
        """Class probabilities.

        Args:
            images: uint8 N x C x H x W (numpy or torch; C the model's channels; H, W any: resized to the
                model's input size as the runner does), taken as cellmorph's store holds images; or an
                `ImageTable`, decoded by the store (dataset.image_size of the config).
        Returns:
            N x len(classes) float32; column j is `classes[j]`.

        Example:
            >>> probs = Classifier.load("moa-model").predict_proba(np.zeros((2, 3, 256, 256), np.uint8))
            >>> probs.shape
            (2, 6)
        """
        return self.proba(self.as_images(images))

    def proba(self, x: torch.Tensor, on_batch=None, mc_dropout: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Probabilities of checked uint8 images (`_images`); `on_batch(n)` after each batch (progress bars).
        mc_dropout = N > 0 (finetune only): dropout kept active, N passes; returns (mean, std) over the passes."""
        device = pick_device(self.config.device)
        if self.config.mode == "frozen":
            if mc_dropout:
                raise CellmorphError(f"{self._source}: MC dropout needs a fine-tuned model (mode = \"finetune\"); this one is frozen (a logistic head).")
            return head_proba(self._features(x, device, on_batch), self._head)
        ft = self.config.finetune
        batch = max(ft.batch_size, 64)
        if not mc_dropout:
            x = resize_uint8_stack(x.to(device), self._spec.size)
            return forward_batches(self._net, x, self._spec, device, batch, tta=ft.tta, on_batch=on_batch).softmax(dim=1).numpy().astype(np.float32, copy=False)
        return mc_dropout_proba(self._net, self._spec, x, mc_dropout, device, batch, self.config.seed, self.config.model.drop_rate, self._source, on_batch)

    @property
    def batch_size(self) -> int:
        """Images per forward pass when predicting (frozen.batch_size; fine-tuned: finetune.batch_size, at least 64)."""
        return self.config.frozen.batch_size if self.config.mode == "frozen" else max(self.config.finetune.batch_size, 64)

    def outputs(self, batches, *, features: bool = False, mc_dropout: int = 0, seed: int = 0, fold_models=(), on_batch=None,
                per_batch=None) -> dict[str, np.ndarray]:
        """Per-image outputs of a stream of (rows, uint8 batch) (`stream.field_batches` with `batch_size`): only one
        batch of pixels is held at a time, so memory does not grow with the number of images beyond these outputs.

        Returns {"probs": N x K float32, and with features=True "features": N x D float32 (the features the head
        reads: frozen backbone, or fine-tuned pre-logits), with mc_dropout=N "std" (over N dropout passes, seeded by
        `seed`; "probs" is then their mean), with fold_models (`nn.Module`s of the same architecture) the mean of
        their probabilities}. Batch by batch the same numbers as `proba`/`embed` on the whole array.
        `per_batch(images, feats, notes)`: called with each uint8 batch, its features (computed for it even when
        features=False, unless per_batch.needs_features is False: then feats may be None) and the batch's notes
        (the third item of an annotated stream, `field_batches(..., annotate=)`, else None), returns {name: one small
        number per image} (QC, image novelty), concatenated into the result: per-image numbers are derived while the
        batch is in memory, never kept as pixels.

        Example:
            >>> out = clf.outputs(field_batches(table, 0, batch=clf.batch_size), features=True)
            >>> out["probs"].shape, out["features"].shape
            ((660, 6), (660, 1280))
        """
        parts: dict[str, list] = {}
        for out in self.output_batches(batches, features=features, mc_dropout=mc_dropout, seed=seed, fold_models=fold_models, per_batch=per_batch):
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
            if on_batch is not None:
                on_batch(len(out["probs"]))
        return join_outputs(parts)

    def output_batches(self, batches, *, features: bool = False, mc_dropout: int = 0, seed: int = 0, fold_models=(),
                       per_batch=None) -> Iterator[dict[str, np.ndarray]]:
        """`outputs` batch by batch: one dict of per-image arrays per batch of `batches`, in stream order (frozen, on
        a CPU: several batches at once, `models.inference.map_batches`; the same bits as one batch at a time, on
        any number of cores, see `forward_batches`)."""
        if self._net is None:
            raise CellmorphError(f"{self._source} is not fitted: call fit(table) or Classifier.load(path) first.")
        device = pick_device(self.config.device)
        frozen = self.config.mode == "frozen"
        if mc_dropout and frozen:
            raise CellmorphError(f"{self._source}: MC dropout needs a fine-tuned model (mode = \"finetune\"); this one is frozen (a logistic head).")
        if frozen:  # on a CPU, one stream batch per core at once, each in parts of models.inference.CPU_PART images

            def frozen_batch(item) -> dict:
                images, notes = item[1], (item[2] if len(item) > 2 else None)
                feats = self._features(self.as_images(images), device)
                out = {"probs": head_proba(feats, self._head)}
                feats = feats.numpy().astype(np.float32, copy=False)
                if features:
                    out["features"] = feats
                if per_batch is not None:
                    out.update({k: np.asarray(v) for k, v in per_batch(np.asarray(images), feats, notes).items()})
                return out

            yield from map_batches(frozen_batch, batches, device)
            return
        nets = list(fold_models) or [self._net]
        tta = self.config.finetune.tta
        for net in nets:
            net.to(device).eval().to(memory_format=torch.channels_last)
        want = features or (per_batch is not None and getattr(per_batch, "needs_features", True))  # one more pass
        with seeded(device, seed):
            for item in batches:
                images, notes = item[1], (item[2] if len(item) > 2 else None)
                x = resize_uint8_stack(self.as_images(images).to(device), self._spec.size)
                out: dict = {}
                if mc_dropout:
                    out["probs"], out["std"] = mc_dropout_proba(self._net, self._spec, x, mc_dropout, device, len(x), None, self.config.model.drop_rate, self._source)
                else:
                    probs = [forward_batches(net, x, self._spec, device, len(x), tta=tta).softmax(dim=1).numpy() for net in nets]
                    out["probs"] = np.mean(np.asarray(probs, np.float64), axis=0) if len(nets) > 1 else probs[0].astype(np.float32, copy=False)
                feats = None
                if want:
                    net = pre_logits(self._net, self._source)
                    feats = forward_batches(net, x, self._spec, device, len(x), tta=tta).numpy().astype(np.float32, copy=False)
                    if features:
                        out["features"] = feats
                if per_batch is not None:
                    out.update({k: np.asarray(v) for k, v in per_batch(np.asarray(images), feats, notes).items()})
                yield out

    def predict(self, images: np.ndarray | torch.Tensor | ImageTable) -> list[str]:
        """The most probable class of each image.

        Args:
            images: as `predict_proba`.
        Returns:
            One class name per image.

        Example:
            >>> Classifier.load("moa-model").predict(table)[:1]
            ['Protein synthesis']
        """
        return [self.classes[i] for i in self.predict_proba(images).argmax(axis=1)]

    def embed(self, images: np.ndarray | torch.Tensor | ImageTable) -> np.ndarray:
        """Per-image embeddings: the pooled features the classifier's head reads (frozen: the backbone's
        features; fine-tuned: the network's pre-logit features), for profiling (`cellmorph.profiling.profiles`).

        Args:
            images: as `predict_proba`.
        Returns:
            N x D float32 (D = the backbone's feature width, e.g. 1280 for EfficientNet-Lite0).

        Example:
            >>> Classifier.load("moa-model").embed(np.zeros((2, 3, 256, 256), np.uint8)).shape
            (2, 1280)
        """
        x = self.as_images(images)
        device = pick_device(self.config.device)
        if self.config.mode == "frozen":
            return self._features(x, device).numpy().astype(np.float32, copy=False)
        x = resize_uint8_stack(x.to(device), self._spec.size)
        net = pre_logits(self._net, self._source)
        return forward_batches(net, x, self._spec, device, max(self.config.finetune.batch_size, 64), tta=self.config.finetune.tta).numpy().astype(np.float32, copy=False)

    def as_images(self, images) -> torch.Tensor:
        """`images` checked and as the uint8 N x C x H x W tensor the other methods take (an ImageTable is
        decoded by the store); a clear error for the wrong type, dtype, shape or channel count."""
        if self._net is None:
            raise CellmorphError(f"{self._source} is not fitted: call fit(table) or Classifier.load(path) first.")
        if isinstance(images, ImageTable):
            images = build_store(images, self.config.dataset.image_size).images
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise CellmorphError(f"images must be a uint8 N x C x H x W numpy array or torch tensor, or an ImageTable; got {type(images).__name__}.")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise CellmorphError(
                f"images must be uint8 N x C x H x W (0-255, as cellmorph's store holds them); got {images.dtype} with shape {tuple(images.shape)}."
            )
        if images.shape[1] != self._channels:
            raise CellmorphError(f"{self._source}: the model expects {self._channels} channels, the images have {images.shape[1]} (shape N x C x H x W = {tuple(images.shape)}).")
        return images

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save the fitted classifier as a bundle folder (model.safetensors, bundle.json, config.toml, and
        calibration.parquet when `calibration` holds a run's out-of-fold predictions).

        Args:
            path: the folder to create.
            overwrite: replace an existing bundle there (a folder that is not a bundle is never replaced).
        Returns:
            The bundle folder.

        Example:
            >>> Classifier("tf_efficientnet_lite0").fit(table).save("moa-model")
            PosixPath('moa-model')
        """
        if self._net is None:
            raise CellmorphError(f"{self._source} is not fitted: call fit(table) before save.")
        cfg, spec = self.config, self._spec
        state = self._net.state_dict()
        if cfg.mode == "frozen":
            state = {**{f"backbone.{k}": v for k, v in state.items()}, **{f"head.{k}": v for k, v in self._head.items()}}
        cal = self.calibration is not None
        meta = bundle_meta(cfg, self.classes, self._channels, spec.size, spec.mean, spec.std, spec.normalize_mode, self._trained_on,
                           self.calibration_info if cal else None, len(self.calibration) if cal else 0)
        return save_bundle(path, state, meta, cfg, overwrite, calibration=self.calibration, reference=self.reference,
                           image_reference=self.image_reference)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Classifier:
        """Load a bundle saved by `save`; needs no weights package and no download.

        Args:
            path: the bundle folder.
            device: "cpu", "cuda", ... to predict on; None keeps the config's ("auto": CUDA when available).
        Returns:
            A fitted `Classifier`.
        Raises:
            CellmorphError naming the bundle and what does not match (missing files, newer format, weights
            that do not fit the architecture).

        Example:
            >>> clf = Classifier.load("moa-model")
            >>> clf.classes[:1], clf.channels
            (['Aurora kinase inhibitors'], 3)
        """
        b = load_bundle(path)
        meta, spec = b.meta, b.meta["input"]
        cfg = override(b.config, {"device": device}) if device is not None else b.config
        frozen = cfg.mode == "frozen"
        with seeded(torch.device("cpu"), 0):  # only the architecture: the weights come from the bundle
            net = create_model(cfg.model.name, "random", num_classes=0 if frozen else len(meta["classes"]), in_chans=spec["channels"], drop_rate=cfg.model.drop_rate)
        where = str(b.path / "model.safetensors")
        head = {}
        if frozen:
            load_state(net, {k.removeprefix("backbone."): v for k, v in b.tensors.items() if k.startswith("backbone.")}, where)
            head = check_head(b.tensors, len(meta["classes"]), frozen_width(net, cfg.frozen.stage_pooled), where)
        else:
            load_state(net, b.tensors, where)
        clf = cls.__new__(cls)
        cls._restore(clf, cfg, f"model bundle {b.path}", net.eval(), head,
                     InputSpec(size=spec["size"], mean=tuple(spec["mean"]), std=tuple(spec["std"]), normalize_mode=spec["normalize"]),
                     list(meta["classes"]), spec["channels"], meta.get("trained_on", {}))
        clf.calibration, clf.calibration_info = b.calibration, meta.get("calibration", {})
        clf.reference = b.reference
        if b.image_reference is not None:
            width = head["mean"].shape[0] if frozen else getattr(net, "num_features", None)
            if width is not None and b.image_reference["features"].shape[1] != width:
                raise CellmorphError(f"{b.path / 'image_reference.npz'}: features of width {b.image_reference['features'].shape[1]}, but the "
                                     f"network gives {width}: the file belongs to another model. Run the experiment again to rewrite the bundle.")
        clf.image_reference = b.image_reference
        return clf

    def _restore(self, cfg: ExperimentConfig, source: str, net, head: dict, spec: InputSpec, classes: list[str], channels: int, trained_on: dict) -> None:
        """A fitted state read from a bundle (Classifier.load)."""
        self._reset(cfg, source=source)
        self._net, self._head, self._spec = net, head, spec
        self.classes, self._channels, self._trained_on = classes, channels, trained_on


def check_labelled(table: ImageTable) -> None:
    """Training needs labels: a table loaded without its label column (new images) is refused, naming it."""
    if not table.labelled:
        raise CellmorphError(f"{table.source}: no labelled rows in column '{table.label}' to train on. Load the table with its label "
                             "column (load_dataset(..., label=\"Metadata_...\")); a table without labels can only be predicted.")

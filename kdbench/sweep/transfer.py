"""Transfer sets and bias adjustment in a sweep: checked before training, applied to student runs.

Planning (:func:`load_sources`, :func:`check_pairs`, :func:`unlabelled_refusal`) refuses every bad
transfer set or bias request before anything trains. A student run then trains on
:func:`student_data`, and its row reports the bias adjustments (:func:`bias_columns`).

The held-out validation split (a recipe's ``val_fraction``, :func:`kdbench.data.holdout`) is always
taken from the suite's whole training set, so it holds images of the classes a transfer set leaves
out: the bias search needs them. The engine holds out a split of whatever data it is given; a transfer
run is given a transfer set drawn from the suite's training set *without* those held-out images, so the
student never trains on an image the search is tuned on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..bias import Bias, error_counts, search_offset, shifted
from ..data import DataSplits, holdout, load_dataset
from ..data.transfer import TransferSet
from ..errors import KdbenchError
from ..method import Batch, Method, Outputs, Probe
from .columns import Col
from .request import Request

_SYNTHETIC = "synthetic:"


def source_name(req: Request, name: str) -> str:
    """The dataset a transfer set's ``dataset`` loads: synthetic too when the sweep runs on synthetic data."""
    if req.dataset.startswith(_SYNTHETIC) and not name.startswith(_SYNTHETIC):
        return _SYNTHETIC + name
    return name


def load_sources(req: Request, data: DataSplits) -> dict[str, DataSplits]:
    """The other datasets the pairs' transfer sets name, loaded once (as the suite's: limit, padding, device)."""
    names = sorted({p.transfer.dataset for p in req.pairs if p.transfer.dataset})
    out = {}
    for name in names:
        # An ImageFolder is read at the suite's image size; padding as the suite's (e.g. MNIST to 32).
        out[name] = load_dataset(source_name(req, name), data_dir=req.data_dir, download=req.download,
                                 limit=req.limit or None, **req.resolution.kwargs(),
                                 imagefolder_size=data.info.img_size, pad_to=req.pad_to).to(data.train_images.device)
    return out


def check_pairs(req: Request, data: DataSplits, sources: Mapping[str, DataSplits]) -> None:
    """Every pair's transfer set and bias request fit the data and the recipe; else a KdbenchError."""
    info = data.info
    for pair in req.member_pairs:
        where = f"pair {pair.label}"
        pair.transfer.check(info, where)
        if pair.transfer.dataset:
            pair.transfer.check_source(info, sources[pair.transfer.dataset].info, where)
        pair.bias.check(info.num_classes, info.name, where)
        recipe = req.recipe_for(pair.student)
        if pair.bias.search:
            if recipe.val_fraction == 0:
                raise KdbenchError(f"{where}: bias = \"val\" searches the offset on held-out training images, but "
                                   f"the recipe of {pair.student} holds out none; set [recipe] val_fraction (e.g. "
                                   "0.1) in the suite file, or give the offset (bias = { 3 = 3.5 })")
            if not pair.transfer.absent_classes(info.num_classes):
                raise KdbenchError(f"{where}: bias = \"val\" searches an offset for the classes the transfer set "
                                   "leaves out, and it leaves out none; add exclude_classes or only_classes to "
                                   "its transfer set, or drop the search")
        if pair.transfer.unlabelled and recipe.early_stop:
            raise KdbenchError(f"{where}: early stopping watches validation accuracy, which an unlabelled transfer "
                               f"set has no labels for; set early_stop = 0 for {pair.student}'s recipe")


def unlabelled_refusal(method: Method, student: Probe, teachers: Sequence[Probe],
                       image_shape: tuple[int, ...]) -> str:
    """Why ``method`` (set up) cannot train without labels ('' when it can).

    A method without teachers learns from the labels alone. Any other method is run once on outputs of
    the probed shapes with ``batch.labels = None``, as the engine hands it an unlabelled batch: one that
    reads the labels (DKD's target class) fails here, before training, instead of in its first step.
    """
    if method.max_teachers == 0:
        return f"method '{method.name}' learns from the labels alone, and an unlabelled transfer set has none"
    n, gen = 8, torch.Generator().manual_seed(0)  # its own generator: planning leaves the global one alone

    def randn(*shape: int) -> Tensor:
        return torch.randn(n, *shape, generator=gen)

    def outputs(p: Probe) -> Outputs:
        return Outputs(randn(p.num_classes), {i: randn(*s) for i, s in p.stages.items()},
                       randn(*p.pooled) if p.pooled else None)

    batch = Batch(torch.zeros(n, *image_shape), None, 0, 1)  # no labels: the point
    try:
        with torch.no_grad():
            terms = method(outputs(student), [outputs(t) for t in teachers], batch)
    except Exception as exc:  # whatever it raises, it cannot run without labels
        return (f"method '{method.name}' cannot train without labels (unlabelled transfer set): "
                f"{type(exc).__name__}: {exc}")
    if not terms:
        return f"method '{method.name}' has no loss term besides cross-entropy on the labels"
    return ""


def student_data(data: DataSplits, transfer: TransferSet, sources: Mapping[str, DataSplits], *,
                 val_fraction: float) -> DataSplits:
    """The data a student run trains on: ``data`` itself, or its transfer set drawn from the training
    images the validation split leaves (so no held-out image is ever trained on)."""
    if transfer.empty:
        return data
    base = holdout(data, val_fraction)[0] if val_fraction else data
    return transfer.apply(base, other=sources.get(transfer.dataset))


def validation_split(data: DataSplits, val_fraction: float) -> tuple[Tensor, Tensor]:
    """The held-out (images, labels) of the suite's whole training set: what the bias search is tuned on."""
    _, images, labels = holdout(data, val_fraction)
    return images, labels


def _adjusted(name: str, logits: Tensor, labels: Tensor, offsets: Mapping[int, float]) -> dict:
    errors, per_class = error_counts(shifted(logits, offsets), labels, logits.shape[1])
    return {f"{Col.TEST_ERRORS}_{name}": errors,
            **{f"{Col.CLASS_ERRORS}_{name}.{i}": n for i, n in enumerate(per_class)}}


def bias_columns(transfer: TransferSet, bias: Bias, logits: Tensor | None, labels: Tensor,
                 val: tuple[Tensor, Tensor] | None = None) -> dict:
    """A student row's bias columns: the offsets, and the test errors (overall, per class) with them.

    ``logits``: the last epoch's test logits (None for a run without an evaluated epoch); ``val``: the
    student's logits on the held-out images and their labels, for the search.
    """
    cols: dict = {Col.BIAS_GIVEN: json.dumps({str(c): o for c, o in bias.given}) if bias.given else "",
                  Col.BIAS_VAL: ""}
    if logits is None:
        return cols
    labels = labels.to(logits.device)
    if bias.given:
        cols.update(_adjusted("bias_given", logits, labels, bias.offsets))
    if bias.search and val is not None:
        absent = transfer.absent_classes(logits.shape[1])
        val_logits, val_labels = val[0], val[1].to(val[0].device)
        offset, errors = search_offset(val_logits, val_labels, absent)
        offsets = dict.fromkeys(absent, offset)
        cols.update({Col.BIAS_VAL: json.dumps({str(c): o for c, o in offsets.items()}),
                     Col.BIAS_VAL_IMAGES: len(val_labels),
                     Col.BIAS_VAL_ERRORS_BEFORE: error_counts(val_logits, val_labels, val_logits.shape[1])[0],
                     Col.BIAS_VAL_ERRORS_AFTER: errors})
        cols.update(_adjusted("bias_val", logits, labels, offsets))
    return cols


def transfer_columns(transfer: TransferSet, *, train_size: int, num_classes: int) -> dict:
    """A student row's transfer columns: its label ('' for none), absent classes and training-set size."""
    return {Col.TRANSFER: transfer.label, Col.TRANSFER_ABSENT: json.dumps(list(transfer.absent_classes(num_classes))),
            Col.TRANSFER_TRAIN_SIZE: train_size}

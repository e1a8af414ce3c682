"""A validation split whose images lie flat in one folder (ILSVRC-2012's ``val/`` as distributed), labelled by a file.

Two labels files are read, looked for in this order:

- ``<split>_labels.txt`` beside the split folder, or ``labels.txt`` inside it: one image per line, its file name and
  its class folder name (as in ``train/``), separated by whitespace or a comma, e.g.
  ``ILSVRC2012_val_00000001.JPEG n01751748``;
- ``LOC_val_solution.csv`` beside the split folder (the Kaggle ImageNet download): ``ImageId,PredictionString``, the
  class being the first word of the prediction string.

Anything else is refused with the layouts kdbench reads.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import KdbenchError

KAGGLE_FILE = "LOC_val_solution.csv"


def flat_labels(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(file, label) for every image of a flat ``split_dir``, labels indexing ``classes`` (the training split's)."""
    files = {p.name: p for p in split_dir.iterdir() if p.is_file()}
    stems = {p.stem: p for p in files.values()}
    index = {c: i for i, c in enumerate(classes)}
    named = [split_dir.parent / f"{split_dir.name}_labels.txt", split_dir / "labels.txt"]
    if (found := next((p for p in named if p.is_file()), None)) is not None:
        pairs = _read_pairs(found)
        lookup = files
    elif (found := split_dir.parent / KAGGLE_FILE).is_file():
        pairs = _read_kaggle(found)
        lookup = stems
    else:
        raise KdbenchError(
            f"ImageFolder split {split_dir} holds images but no class folders, and no labels file says their classes. "
            f"Either sort them into {split_dir}/<class>/<image> as in train/, or add {named[0]} with one line per "
            f"image, '<file name> <class folder name>' (e.g. 'ILSVRC2012_val_00000001.JPEG n01751748'), or put "
            f"Kaggle's {KAGGLE_FILE} in {split_dir.parent}")
    samples = []
    for line, (name, label) in enumerate(pairs, start=1):
        if label not in index:
            raise KdbenchError(f"{found} line {line}: class '{label}' is no class folder of train/ (e.g. "
                               f"{', '.join(classes[:3])}); labels name the class folders of train/")
        if name not in lookup:
            raise KdbenchError(f"{found} line {line}: image '{name}' is not in {split_dir}")
        samples.append((str(lookup[name]), index[label]))
    if len(samples) != len(files) - (split_dir / "labels.txt").is_file():
        labelled = {Path(f).name for f, _ in samples}
        missing = sorted(n for n in files if n not in labelled and n != "labels.txt")[:3]
        raise KdbenchError(f"{found} labels {len(samples)} images but {split_dir} holds {len(files)} files (unlabelled: "
                           f"{', '.join(missing)}{', ...' if len(missing) == 3 else ''}); label every image, once")
    return sorted(samples)


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        words = raw.replace(",", " ").split()
        if not words:
            continue
        if len(words) != 2:
            raise KdbenchError(f"{path} line {n}: '{raw.strip()}' is not '<file name> <class folder name>'")
        out.append((words[0], words[1]))
    return out


def _read_kaggle(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise KdbenchError(f"{path}: expected the columns ImageId,PredictionString of Kaggle's ImageNet download")
    return [(r["ImageId"], (r["PredictionString"] or "").split()[0] if r["PredictionString"] else "") for r in rows]

"""Data: the dataset catalogue (:mod:`.datasets`), its sources (:mod:`.sources`, :mod:`.imagefolder`),
a dataset in memory (:mod:`.splits`) and the on-device loader (:mod:`.loader`)."""

from .datasets import DATASETS, load_dataset
from .loader import (
    Loader,
    TrainBatch,
    Views,
    apply_views,
    augment,
    draw_views,
    fixed_views,
    normalize,
    view_count,
    view_index,
)
from .sources import NORMALISATION, digits_split_indices, resolve_data_dir
from .splits import DatasetInfo, DataSplits, holdout, holdout_indices, pad_images

__all__ = [
    "DATASETS", "NORMALISATION", "DatasetInfo", "DataSplits", "digits_split_indices", "holdout", "holdout_indices",
    "load_dataset", "pad_images",
    "resolve_data_dir", "Loader", "TrainBatch", "Views", "apply_views", "augment", "draw_views", "fixed_views",
    "normalize", "view_count", "view_index",
]

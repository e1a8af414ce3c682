"""Data: the dataset catalogue (:mod:`.datasets`) and the on-device loader (:mod:`.loader`)."""

from .datasets import (
    DATASETS,
    NORMALISATION,
    DatasetInfo,
    DataSplits,
    digits_split_indices,
    load_dataset,
    pad_images,
    resolve_data_dir,
)
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

__all__ = [
    "DATASETS", "NORMALISATION", "DatasetInfo", "DataSplits", "digits_split_indices", "load_dataset", "pad_images", "resolve_data_dir",
    "Loader", "TrainBatch", "Views", "apply_views", "augment", "draw_views", "fixed_views", "normalize",
    "view_count", "view_index",
]

"""Data sets: readers of the real formats, writers of synthetic data in them, tf.data pipelines."""
from larq_landmarks.datasets.readers import (  # noqa: F401
    DatasetError,
    Record,
    read_aflw2000,
    read_aflw_pifa,
    read_mpii_json,
    read_mpii_mat,
    read_pts,
    read_pts_folder,
    read_300w_lp,
    to_columns,
)

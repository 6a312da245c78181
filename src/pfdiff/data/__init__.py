"""Data: sources (digits, generated MNIST-1D, IDX, CIFAR, npz) with validation, and the long-tailed protocol."""

from pfdiff.data.longtail import (ClassGroups, balanced_indices, class_counts, class_groups, longtail_counts, longtail_indices,
                                  stratified_split)
from pfdiff.data.sources import (SOURCES, ArrayDataset, DataError, dataset_options, load_cifar, load_dataset,
                                 load_digits_dataset, load_idx, load_mnist1d, load_mnist_folder, load_npz, mnist1d_cache_dir, read_idx,
                                 validate_arrays, write_synthetic_npz)

__all__ = ["ClassGroups", "balanced_indices", "class_counts", "class_groups", "longtail_counts", "longtail_indices", "stratified_split",
           "SOURCES", "ArrayDataset", "DataError", "dataset_options", "load_cifar", "load_dataset", "load_digits_dataset", "load_idx",
           "load_mnist1d", "load_mnist_folder", "mnist1d_cache_dir", "load_npz", "read_idx", "validate_arrays", "write_synthetic_npz"]

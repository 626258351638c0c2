"""Datasets -> batches on the training device. Importing the package registers the built-in datasets."""

from teskd.data import cifar as _cifar  # noqa: F401  (registers cifar100, cifar10)
from teskd.data import imagefolder as _imagefolder  # noqa: F401  (registers imagefolder, imagenet)

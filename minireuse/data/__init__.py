"""Datasets: CIFAR-10 loading, normalisation, augmentation and batching."""
from .cifar import (ARCHIVE_NAME, CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, FOLDER_NAME,
                    NUM_CLASSES, OFFICIAL_MD5, OFFICIAL_URL, BatchIterator, CorruptDataError,
                    DataNotFoundError, channel_stats, check_archive, crop_flip, file_md5, limit,
                    load_cifar10, normalize, random_crop_flip, safe_load_pickle, verify_md5)
from .sample import sample_images

__all__ = ["ARCHIVE_NAME", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "FOLDER_NAME",
           "NUM_CLASSES", "OFFICIAL_MD5", "OFFICIAL_URL", "BatchIterator", "CorruptDataError",
           "DataNotFoundError", "channel_stats", "check_archive", "crop_flip", "file_md5", "limit",
           "load_cifar10", "normalize", "random_crop_flip", "safe_load_pickle", "sample_images", "verify_md5"]

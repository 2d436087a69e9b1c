"""mixq.data: calibration and evaluation data (text, zero-shot tasks, images), read from
the shared data directory (`data_dir()`), and tokenization into fixed windows."""

from mixq.data.paths import data_dir, data_file
from mixq.data.tasks import TASK_FILES, TASK_NAMES, LastWordExample, MCExample, iter_task, load_task
from mixq.data.text import (
    DEFAULT_CALIBRATION,
    TEST_SPLITS,
    TEXT_DATASETS,
    calibration_windows,
    check_context,
    load_text,
    sample_windows,
    token_windows,
)
from mixq.data.tokenize import TextEncoder, bos_of, hf_encoder, tokenization_record
from mixq.data.vision import CIFAR10_MEAN, CIFAR10_STD, cifar10_split_indices, load_cifar10

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_CALIBRATION",
    "TASK_FILES",
    "TASK_NAMES",
    "TEST_SPLITS",
    "TEXT_DATASETS",
    "LastWordExample",
    "MCExample",
    "TextEncoder",
    "bos_of",
    "check_context",
    "hf_encoder",
    "tokenization_record",
    "calibration_windows",
    "cifar10_split_indices",
    "data_dir",
    "data_file",
    "iter_task",
    "load_cifar10",
    "load_task",
    "load_text",
    "sample_windows",
    "token_windows",
]

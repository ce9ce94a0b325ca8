"""Shared by every track: datasets, classifiers, checkpoint I/O, configs, training helpers."""

from .checkpoint import load_classifier, save_classifier
from .config import ConfigError, load_config, save_config
from .datasets import DATASETS, DatasetInfo, dataset_info, load_dataset, to_tensors
from .models import ARCHS, ClassifierConfig, build_classifier, classifier_config_for

__all__ = [
    "ARCHS", "DATASETS", "ClassifierConfig", "ConfigError", "DatasetInfo", "build_classifier",
    "classifier_config_for", "dataset_info", "load_classifier", "load_config", "load_dataset",
    "save_classifier", "save_config", "to_tensors",
]

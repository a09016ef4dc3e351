"""MNIST tutorial: train RCGM / TwinFlow / flow matching on CPU and sample digits in one
network evaluation (``twinflow mnist train | sample | evaluate | train-classifier``).

The method itself is ``twinflow.TwinFlowLoss`` and ``twinflow.UnifiedSampler``; this package
only holds the data, the network, the loop and the metric.
"""

from .checkpoint import SHIPPED, load_model, read_config
from .data import load_mnist
from .evaluate import evaluate, shipped_checkpoint
from .metrics import Classifier, frechet_distance, load_classifier
from .sample import class_grid_labels, generate, sampler_for, save_grid
from .train import TrainSettings, train
from .unet import MnistUNet

__all__ = ["MnistUNet", "TrainSettings", "train", "load_mnist", "load_model", "read_config",
           "generate", "sampler_for", "save_grid", "class_grid_labels", "evaluate",
           "shipped_checkpoint", "SHIPPED", "Classifier", "load_classifier", "frechet_distance"]

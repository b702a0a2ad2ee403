"""Models laid out for splitting into local blocks."""
from sgr_ext.models.resnet_cifar import CifarResNet, resnet32, resnet110
from sgr_ext.models.small_cnn import DigitsCNN

__all__ = ["CifarResNet", "DigitsCNN", "resnet32", "resnet110"]

"""distill: Data Distillation (Radosavovic et al., CVPR 2018) for R-CNN detectors."""

from distill.errors import (
    Cancelled,
    CocoFormatError,
    DistillError,
    ImageDecodeError,
    InputError,
    ModelFileError,
    TrainingError,
)

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "CocoFormatError",
    "DistillError",
    "ImageDecodeError",
    "InputError",
    "ModelFileError",
    "TrainingError",
    "__version__",
]

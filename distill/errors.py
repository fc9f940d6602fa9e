"""The exceptions distill raises.

::

    DistillError                 base of everything distill raises on purpose
    ├── InputError               bad user input: a file, a field, an option (CLI exit code 2)
    │   ├── CocoFormatError      a COCO dataset/results file that does not validate
    │   ├── ImageDecodeError     an image that cannot be read (corrupt, truncated, too large)
    │   └── ModelFileError       a model directory / weights file that is missing, wrong or truncated
    ├── TrainingError            training cannot go on (e.g. the loss became NaN/Inf)
    └── Cancelled                a step was asked to stop (its checkpoint / partial output is kept)

Messages say what was found, what was expected and what to check.
"""

from __future__ import annotations


class DistillError(Exception):
    """Base class of the errors distill raises deliberately."""


class InputError(DistillError):
    """A user-supplied file, field or option is invalid."""


class CocoFormatError(InputError):
    """A COCO file fails validation.

    ``file`` is the path of the file (or ``"<memory>"``), ``field`` the JSON path of the bad value,
    e.g. ``annotations[17].keypoints``.
    """

    def __init__(self, file: str, field: str, problem: str, hint: str = "") -> None:
        self.file = file
        self.field = field
        self.problem = problem
        self.hint = hint
        message = f"{file}: {field}: {problem}" if field else f"{file}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ImageDecodeError(InputError):
    """An image file cannot be decoded into an RGB array."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ModelFileError(InputError):
    """A model directory or weights file cannot be loaded."""


class TrainingError(DistillError):
    """Training had to stop (non-finite loss, empty dataset, ...)."""


class Cancelled(DistillError):
    """A step stopped because its cancel check said so.

    Whatever the step had made stays resumable (a training checkpoint, a ``.partial`` predictions file), and
    nothing it leaves claims to be complete: running the same step again continues where it stopped.
    ``where`` says what was interrupted, e.g. ``training at iteration 40 of 300``.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        super().__init__(f"cancelled: {where}")

"""Exceptions raised by vlad. Every message names the offending file, option or value and what is allowed."""

from __future__ import annotations


class VladError(Exception):
    """Base class for all errors vlad raises on purpose (bad input, missing weights, unknown names)."""


class ImageLoadError(VladError):
    """An image file is missing, empty, corrupt, not an image, too large or of an unusable shape."""


class UnknownScorerError(VladError, KeyError):
    """A scorer name is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class BackboneError(VladError):
    """A backbone spec is malformed, names an unknown model, or its weights cannot be found."""


class WeightsNotFoundError(BackboneError):
    """Pretrained weights are not on disk and cannot be downloaded."""


class DatasetError(VladError):
    """A dataset root does not have the expected layout."""


class ConfigError(VladError, ValueError):
    """An option or configuration value is out of range or of the wrong kind."""


class MissingDependencyError(VladError, ImportError):
    """An optional package is not installed; the message names it and the ``pip install 'vlad[extra]'`` that adds it.

    Raised by :func:`vlad._optional.require`. Also an ImportError, so ``except ImportError`` keeps working.
    """

"""Optional dependencies in one place: :func:`require` imports one or says, in one wording, how to install it.

Example:
    >>> peft = require("peft", "train", what="a LoRA adapter")  # doctest: +SKIP
    vlad.errors.MissingDependencyError: a LoRA adapter needs the 'peft' package: pip install 'vlad[train]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vlad.errors import MissingDependencyError

MESSAGE = "{what} needs the '{module}' package: pip install 'vlad[{extra}]'"


def require(module: str, extra: str, *, what: str = "this feature") -> ModuleType:
    """The imported ``module``, or :class:`~vlad.errors.MissingDependencyError` with :data:`MESSAGE`.

    Args:
        module: the import name, e.g. ``"torch"`` or ``"transformers"``.
        extra: the vlad extra that installs it (``clip``, ``detect``, ``explain``, ``train``, ``ui``).
        what: what needs it, as the message starts, e.g. ``"the winclip scorer"`` or ``"--lvlm openai:..."``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(MESSAGE.format(what=what, module=module, extra=extra)) from exc

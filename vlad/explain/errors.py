"""Errors of the explainer. Each message is one line naming the server, model or option and what to do."""

from __future__ import annotations

from vlad.errors import VladError


class LVLMError(VladError):
    """A language-model backend could not give a usable answer (the caller falls back to the template)."""


class LVLMUnavailable(LVLMError):
    """The server cannot be reached, timed out, or the model cannot be loaded."""


class ResponseFormatRejected(LVLMError):
    """The server refused the ``response_format`` field (HTTP 400/422 naming it)."""


class LVLMBadReply(LVLMError):
    """The server answered with something that is not an OpenAI chat completion."""

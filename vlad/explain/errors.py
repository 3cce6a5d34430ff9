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


class LVLMTruncated(LVLMError):
    """The reply stopped at the token limit (``finish_reason == "length"``), even after a retry with more tokens.

    Attributes:
        max_tokens: the limit the last request had.
        partial: the text received before the cut.
    """

    def __init__(self, message: str, *, max_tokens: int, partial: str = "") -> None:
        super().__init__(message)
        self.max_tokens = max_tokens
        self.partial = partial


class TooManyImages(LVLMError):
    """The server takes fewer pictures per prompt than were sent (vLLM's ``--limit-mm-per-prompt``).

    Attributes:
        limit: the most pictures one request may carry (at least 1; a limit of 0 is reported as "no images").
    """

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class SchemaRejected(LVLMError):
    """The server takes ``response_format`` but cannot compile this JSON schema (vLLM's structured-output backends
    answer HTTP 400); the request is sent again without it."""


class SamplingRejected(LVLMError):
    """The server refuses the extra sampling fields (``top_k``, ``min_p``, ``repetition_penalty``) that pin vLLM's
    defaults; requests go on without them."""


class ContextTooLong(LVLMError):
    """The prompt does not leave room for the answer in the model's context (vLLM's ``--max-model-len``).

    Attributes:
        context: the model's context length in tokens.
        prompt_tokens: the prompt's length in tokens as the server counted it, when it said.
    """

    def __init__(self, message: str, *, context: int, prompt_tokens: int | None = None) -> None:
        super().__init__(message)
        self.context = context
        self.prompt_tokens = prompt_tokens

    @property
    def room(self) -> int | None:
        """Tokens left for the answer, when the server said how long the prompt is."""
        return None if self.prompt_tokens is None else self.context - self.prompt_tokens

"""Several OpenAI-compatible servers serving one model (vLLM replicas) behind one backend:
``--lvlm openai:URL1,URL2,...[#model]``.

:class:`BackendPool` spreads requests over the healthy replicas (the one with the fewest requests in flight first),
never more than ``max_in_flight`` at once on one replica (``VLAD_LVLM_MAX_IN_FLIGHT``, default 4; the limit is per
process, so per Ray worker). A replica that cannot be reached, times out or answers HTTP 5xx is taken out and the
request is retried on another; a taken-out replica is probed again (``GET /v1/models``) after ``recheck_after``
seconds and comes back when it answers. Only when every replica is down does a request fail
(:class:`~vlad.explain.errors.LVLMUnavailable`, naming each one), and the explainer then falls back to the template
as it does for one server. Other errors (a reply that is not a chat completion, an unknown model) are the same on
every replica and are raised as they are.

The replicas are any model backends (``stream``, ``complete``, ``list_models``): :func:`vlad.explain.backends.
load_backend` builds one :class:`~vlad.explain.backends.OpenAIBackend` per URL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vlad.errors import ConfigError
from vlad.explain.errors import LVLMError, LVLMUnavailable

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT_ENV = "VLAD_LVLM_MAX_IN_FLIGHT"
DEFAULT_MAX_IN_FLIGHT = 4
RECHECK_AFTER = 30.0


@dataclass(eq=False)
class Replica:
    """One server of the pool and what the pool knows about it."""

    backend: Any
    in_flight: int = 0
    served: int = 0
    down: str | None = None
    down_at: float = 0.0
    probing: bool = False

    @property
    def name(self) -> str:
        return str(getattr(self.backend, "base_url", None) or self.backend.spec)


class BackendPool:
    """Model backends serving the same model, used as one (see the module docstring).

    Args:
        backends: one per replica.
        spec: the spec the pool answers to (``openai:URL1,URL2#model``).
        max_in_flight: most requests at once per replica (default: ``VLAD_LVLM_MAX_IN_FLIGHT``, else 4).
        recheck_after: seconds before a taken-out replica is probed again.
    """

    is_model = True

    def __init__(
        self,
        backends: Sequence[Any],
        *,
        spec: str,
        max_in_flight: int | None = None,
        recheck_after: float = RECHECK_AFTER,
    ) -> None:
        if not backends:
            raise ConfigError("an LVLM pool needs at least one server")
        limit = max_in_flight if max_in_flight is not None else _env_limit()
        if limit < 1:
            raise ConfigError(f"{MAX_IN_FLIGHT_ENV} must be a whole number >= 1, got {limit}")
        self.replicas = [Replica(b) for b in backends]
        self.max_in_flight, self.recheck_after, self._spec = limit, recheck_after, spec
        self._cond = threading.Condition()

    @property
    def spec(self) -> str:
        return self._spec

    # ------------------------------------------------------------------ health
    def _mark_down(self, replica: Replica, exc: BaseException) -> None:
        with self._cond:
            if replica.down is None:
                logger.warning("LVLM replica %s taken out: %s", replica.name, exc)
            replica.down, replica.down_at = str(exc), time.monotonic()
            self._cond.notify_all()

    def _mark_up(self, replica: Replica) -> None:
        with self._cond:
            if replica.down is not None:
                logger.info("LVLM replica %s is back", replica.name)
            replica.down = None
            self._cond.notify_all()

    def _probe(self, replica: Replica) -> None:
        """A health check (``list_models``) that puts a replica back when it answers."""
        try:
            replica.backend.list_models()
        except LVLMError as exc:
            self._mark_down(replica, exc)
        else:
            self._mark_up(replica)
        finally:
            replica.probing = False

    def _probe_due(self) -> None:
        """Start background probes of taken-out replicas whose wait is over (called holding the lock)."""
        now = time.monotonic()
        for r in self.replicas:
            if r.down is not None and not r.probing and now - r.down_at >= self.recheck_after:
                r.probing = True
                threading.Thread(target=self._probe, args=(r,), daemon=True, name="vlad-lvlm-probe").start()

    def list_models(self) -> list[str]:
        """Health-check every replica now; the models the first healthy one lists.

        Raises:
            LVLMUnavailable: no replica answered.
        """
        listed: list[str] | None = None
        for r in self.replicas:
            try:
                models = r.backend.list_models()
            except LVLMError as exc:
                self._mark_down(r, exc)
                continue
            self._mark_up(r)
            listed = models if listed is None else listed
        if listed is None:
            raise LVLMUnavailable(self._all_down())
        return listed

    def _all_down(self) -> str:
        return f"all {len(self.replicas)} LVLM servers are down: " + "; ".join(
            f"{r.name} ({r.down})" for r in self.replicas
        )

    # ------------------------------------------------------------------ dispatch
    def _acquire(self, tried: set[Replica]) -> Replica:
        """The least busy healthy replica not yet tried, waiting while all are at their limit."""
        with self._cond:
            while True:
                self._probe_due()
                healthy = [r for r in self.replicas if r.down is None and r not in tried]
                if not healthy:
                    raise LVLMUnavailable(self._all_down())
                free = [r for r in healthy if r.in_flight < self.max_in_flight]
                if free:
                    best = min(free, key=lambda r: (r.in_flight, r.served))
                    best.in_flight += 1
                    return best
                self._cond.wait(timeout=1.0)

    def _release(self, replica: Replica) -> None:
        with self._cond:
            replica.in_flight -= 1
            self._cond.notify_all()

    def _call(self, request: Callable[[Any], Any]) -> Any:
        tried: set[Replica] = set()
        while True:
            replica = self._acquire(tried)
            try:
                result = request(replica.backend)
            except LVLMUnavailable as exc:
                self._mark_down(replica, exc)
                tried.add(replica)
                continue
            finally:
                self._release(replica)
            replica.served += 1
            return result

    def complete(self, messages: list[dict], *, max_tokens: int = 512, json_schema: dict | None = None) -> str:
        """The whole reply from one healthy replica (failing over to another when one is down)."""
        return self._call(lambda b: b.complete(messages, max_tokens=max_tokens, json_schema=json_schema))

    def stream(self, messages: list[dict], *, max_tokens: int = 512, json_schema: dict | None = None) -> Iterator[str]:
        """The reply's pieces from one healthy replica; fails over only before the first piece arrives."""
        tried: set[Replica] = set()
        while True:
            replica, started = self._acquire(tried), False
            try:
                for piece in replica.backend.stream(messages, max_tokens=max_tokens, json_schema=json_schema):
                    started = True
                    yield piece
                replica.served += 1
                return
            except LVLMUnavailable as exc:
                self._mark_down(replica, exc)
                if started:
                    raise
                tried.add(replica)
            finally:
                self._release(replica)

    @property
    def model(self) -> str:
        """The model of the first healthy replica."""
        return self._call(lambda b: b.model)

    def wait_ready(self, timeout: float) -> list[str]:
        """Polls until a replica lists its models or ``timeout`` s pass (then raises LVLMUnavailable)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.list_models()
            except LVLMUnavailable:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(1.0)

    def check(self) -> list[tuple[str, bool | None, str]]:
        """Each replica's capability rows, the item prefixed with the replica."""
        return [(f"{r.name} {item}", ok, detail) for r in self.replicas for item, ok, detail in r.backend.check()]


def _env_limit() -> int:
    text = os.environ.get(MAX_IN_FLIGHT_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IN_FLIGHT
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{MAX_IN_FLIGHT_ENV}={text!r}: give a whole number >= 1") from None

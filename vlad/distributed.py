"""The Ray engine: the same inspection pipeline on many machines and GPUs (``vlad detect|eval --engine ray``).

The driver lists paths and never decodes an input. Ray Data reads and decodes them in parallel tasks; a pool of actors
runs the one pipeline (:meth:`vlad.Detector.iter_inspect`), each actor building its :class:`~vlad.Detector` once from
a picklable factory and receiving the few-shot references once (through the object store). Records stream back as
batches finish, with overlays and legends already PNG-encoded on the workers; the caller writes them
(:class:`vlad.reportlog.RecordWriter`), so rows are the local engine's rows.

- Per-image scorers: batches of the scorer's ``batch_size``. Transductive scorers (MuSc): each group (a product, an
  eval category) is one batch, as in the local engine, so the scores are the same.
- Faults: the actors are restartable and their tasks retried (Ray Data's defaults), so a worker that dies mid-batch
  is replaced and its batch scored again; records arriving twice are dropped here, so each input is yielded once.

Ray is imported only when this engine runs (``pip install 'vlad[ray]'``).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vlad._optional import require
from vlad.errors import ConfigError, VladError

if TYPE_CHECKING:
    from vlad.pipeline import Detector, InspectionRecord

logger = logging.getLogger(__name__)

DECODE_CPUS = 0.25
"""CPUs Ray reserves for one decode task (decoding is light next to scoring)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    Attributes:
        address: ``None`` (a Ray already initialised in this process, else a local one), ``auto`` (the cluster this
            machine belongs to) or ``ray://HOST:10001`` (Ray Client, e.g. a KubeRay head service).
        workers: actors in the pool (each loads the models once).
        gpus_per_worker: GPUs per actor (fractions share a GPU, e.g. 0.5: two actors per GPU).
        cpus_per_worker: CPUs per actor.
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def check(self) -> None:
        """Raises ConfigError naming the option that is out of range."""
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ConfigError("--gpus-per-worker and --cpus-per-worker must be >= 0")
        address = self.address
        if address not in (None, "auto") and not str(address).startswith("ray://") and ":" not in str(address):
            raise ConfigError(f"--ray-address {address!r}: give auto, ray://HOST:PORT or HOST:PORT")


@dataclass
class Group:
    """Inputs scored together: one product with its references (an eval category, the inputs of ``vlad detect``).

    Attributes:
        key: a unique name for the group.
        object_name: the product name the pipeline scores them as.
        paths: the inputs (paths the workers can read).
        references: normal references (PIL images or uint8 arrays) for few-shot scoring; empty: zero-shot.
    """

    key: str
    object_name: str
    paths: list[str]
    references: list[Any] = field(default_factory=list)


@dataclass
class RemoteRecord:
    """One input's record as it comes back: the image is not shipped; overlay and legend come as PNG bytes."""

    group: str
    record: InspectionRecord
    overlay_png: bytes | None = None
    legend_png: bytes | None = None


@contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """The ``ray`` module, connected: an existing connection is reused; one started here is shut down at the end."""
    ray = require("ray", "ray", what="--engine ray")
    require("ray.data", "ray", what="--engine ray")
    options.check()
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False, configure_logging=False, log_to_driver=True)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        yield ray
    finally:
        if started:
            ray.shutdown()


def ray_inspect(
    factory: Callable[[], Detector],
    groups: Sequence[Group],
    options: RayOptions,
    *,
    transductive: bool = False,
    batch_size: int = 8,
) -> Iterator[RemoteRecord]:
    """Inspect every group's paths on a Ray actor pool; yields each input's record once, as batches finish.

    Args:
        factory: builds the pipeline on a worker (picklable: a module-level function or a ``functools.partial``).
        groups: the inputs, by product.
        options: where and how wide.
        transductive: the scorer scores a batch jointly (MuSc): each group is one batch.
        batch_size: inputs per batch for per-image scorers.
    """
    items = [{"key": g.key, "pos": i, "path": p} for g in groups for i, p in enumerate(g.paths)]
    if not items:
        return
    with ray_session(options) as ray:
        _check_capacity(ray.cluster_resources(), options)
        shared = [ray.put({g.key: (g.object_name, list(g.references)) for g in groups})]
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * options.workers * 8))
        ds = ds.map(_decode, num_cpus=DECODE_CPUS)
        args = {
            "fn_constructor_args": (factory, shared),
            "compute": ray.data.ActorPoolStrategy(size=options.workers),
            "num_cpus": options.cpus_per_worker,
            "num_gpus": options.gpus_per_worker or None,
            "batch_format": "numpy",
        }
        if transductive:
            ds = ds.groupby("key", num_partitions=len(groups)).map_groups(_Inspector, **args)
        else:
            ds = ds.map_batches(_Inspector, batch_size=batch_size, **args)
        seen: set[tuple[str, int]] = set()
        for row in ds.iter_rows():
            ident = (str(row["key"]), int(row["pos"]))
            if ident in seen:  # a retried batch that had already delivered part of its output
                continue
            seen.add(ident)
            record, overlay, legend = pickle.loads(row["payload"])
            yield RemoteRecord(ident[0], record, overlay, legend)


def _check_capacity(resources: dict[str, float], options: RayOptions) -> None:
    """The pool and one decode task must fit, or Ray waits forever: an error on a fixed-size (local) Ray, a warning
    on a cluster (an autoscaler may add nodes)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    n, problems = options.workers, []
    if n * options.cpus_per_worker + DECODE_CPUS > cpus:
        fit = math.floor(100 * max(cpus - DECODE_CPUS, 0) / n) / 100
        problems.append(
            f"--workers {n} x --cpus-per-worker {options.cpus_per_worker:g} and {DECODE_CPUS} CPU for decoding "
            f"do not fit in this Ray's {cpus:g} CPUs (try --cpus-per-worker {fit:g} or fewer workers)"
        )
    if n * options.gpus_per_worker > gpus:
        problems.append(
            f"--workers {n} x --gpus-per-worker {options.gpus_per_worker:g} do not fit in this Ray's {gpus:g} GPUs"
        )
    if problems and options.address is None:
        raise ConfigError("; ".join(problems))
    for problem in problems:
        logger.warning("%s; waiting for the cluster to grow", problem)


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    """A Ray Data task: read and decode one path with vlad's loader (an error message when it cannot)."""
    from vlad.data import load_image

    try:
        row["image"], row["error"] = np.asarray(load_image(row["path"]), dtype=np.uint8), ""
    except VladError as exc:
        row["image"], row["error"] = np.zeros((1, 1, 3), np.uint8), str(exc)
    return row


class _Inspector:
    """A Ray Data actor: builds the pipeline once, then inspects batches of decoded images."""

    def __init__(self, factory: Callable[[], Detector], shared: list[Any]) -> None:
        import ray

        self.detector = factory()
        self.groups: dict[str, tuple[str, list[Any]]] = ray.get(shared[0])
        self.current: str | None = None
        logger.info("inspector ready in process %d", os.getpid())

    def _use(self, key: str) -> str:
        """Fit the group's references (only when the group changes); returns its product name."""
        name, refs = self.groups[key]
        if key != self.current:
            if refs:
                self.detector.fit(refs)
            elif self.detector.references:
                self.detector.clear_references()
            self.current = key
        return name

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"key": [], "pos": [], "payload": []}
        keys = [str(k) for k in batch["key"]]
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            name = self._use(key)
            # a path that did not decode goes in as the path: the pipeline reads it again and reports why it fails
            items = [batch["path"][i] if batch["error"][i] else batch["image"][i] for i in rows]
            for record in self.detector.iter_inspect(items, name):
                i = rows[record.index]
                record.source, record.index = str(batch["path"][i]), int(batch["pos"][i])
                out["key"].append(key)
                out["pos"].append(int(batch["pos"][i]))
                out["payload"].append(pickle.dumps(_shippable(record)))
        return out


def _shippable(record: InspectionRecord) -> tuple[InspectionRecord, bytes | None, bytes | None]:
    """The record without its decoded image, its overlay and legend as PNG bytes."""
    from vlad.reportlog import encode_png

    overlay, legend = encode_png(record.overlay), encode_png(record.legend)
    record.image = record.overlay = record.legend = None
    record.base_result = None
    return record, overlay, legend

"""A pipeline for Ray workers that dies once, mid-run, the way a worker process crashes (no clean exit): the first
worker to reach its second input while ``flag`` exists removes the flag and exits at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlad.pipeline import Detector


class CrashOnceDetector(Detector):
    """A :class:`Detector` whose process exits (``os._exit``) after its first scored record, once per flag file."""

    def __init__(self, flag: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flag = Path(flag)
        self.scored = 0

    def iter_inspect(self, items, object_name=None, **kwargs):
        for record in super().iter_inspect(items, object_name, **kwargs):
            self.scored += 1
            if self.scored >= 2 and self.flag.exists():
                self.flag.unlink()
                os._exit(1)
            yield record


def crash_once_detector(flag: str) -> Detector:
    return CrashOnceDetector(flag, scorer="winclip", backbone="random:tiny", device="cpu", overlays=True)

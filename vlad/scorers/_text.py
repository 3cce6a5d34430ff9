"""Text prototypes shared by the CLIP scorers: the compositional prompt ensemble plus user-added phrases.

Rules (later) add anomalous concepts to the abnormal set and acceptable ones to the normal set through
``extra_normal`` / ``extra_anomalous``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vlad.backbones.clip import ClipBackbone
from vlad.resources import load_prompt_file


def compose_prompts(object_name: str, states: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template applied to every state applied to the object name."""
    return [template.format(state.format(object_name)) for state in states for template in templates]


@dataclass
class PromptEnsemble:
    """A prompt bank from ``prompts/<name>.yaml`` (``normal_states``, ``anomalous_states``, ``templates``).

    Attributes:
        extra_normal: phrases (with ``{}`` for the object or without) added to the normal set.
        extra_anomalous: phrases added to the anomalous set.
    """

    name: str = "winclip"
    extra_normal: tuple[str, ...] = ()
    extra_anomalous: tuple[str, ...] = ()
    _bank: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._bank = load_prompt_file(self.name)

    def prompts(self, object_name: str) -> tuple[list[str], list[str]]:
        """(normal prompts, anomalous prompts) for ``object_name``."""
        templates = self._bank["templates"]
        normal = compose_prompts(object_name, [*self._bank["normal_states"], *self.extra_normal], templates)
        anomalous = compose_prompts(object_name, [*self._bank["anomalous_states"], *self.extra_anomalous], templates)
        return normal, anomalous

    def states(self, object_name: str) -> tuple[list[str], list[str]]:
        """(normal states, anomalous states) with the object name filled in, without the photo templates."""
        normal = [s.format(object_name) for s in [*self._bank["normal_states"], *self.extra_normal]]
        anomalous = [s.format(object_name) for s in [*self._bank["anomalous_states"], *self.extra_anomalous]]
        return normal, anomalous

    def prototypes(self, backbone: ClipBackbone, object_name: str) -> torch.Tensor:
        """(2, D) normalised [normal, anomalous] prototypes (mean of normalised embeddings, renormalised)."""
        normal, anomalous = self.prompts(object_name)
        return torch.stack([backbone.text_prototype(normal), backbone.text_prototype(anomalous)])

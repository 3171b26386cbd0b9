"""Label suggestions from look-alikes: a choice for an unlabeled task from its labeled
neighbours (weighted kNN vote), or zero-shot from the label names (CLIP) before anything is
labeled; and likely mislabels (labeled tasks whose labeled neighbours say otherwise).

Only for labeling configs with a `Choices` control on the image (whole-image labels). The vote
and the detector are plain functions over vectors, measured in tests/test_suggestions.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from lookalike.core.embedding import Embedder
from lookalike.errors import BadRequestError, LookalikeError
from lookalike.service.runtime import Runtime

log = logging.getLogger(__name__)

# Zero-shot prompts, averaged per label (CLIP's ImageNet recipe, shortened).
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a bright photo of a {}.",
)
ZERO_SHOT_TEMPERATURE = 100.0  # CLIP's logit scale
MULTI_CHOICE_SHARE = 0.5  # a multiple-choice label is suggested when half the vote carries it


@dataclass(frozen=True)
class ChoicesControl:
    """The config's `Choices` on the image: where suggestions go."""

    from_name: str
    to_name: str
    choices: tuple[str, ...]
    multiple: bool

    @classmethod
    def find(cls, label_config: str, image_name: str | None = None) -> ChoicesControl | None:
        try:
            controls = LabelInterface(label_config).controls
        except Exception:  # an unparsable config: no suggestions, the rest works
            return None
        for control in controls:
            if control.tag != "Choices" or not control.labels:
                continue
            to_name = control.to_name[0] if control.to_name else ""
            if image_name is None or to_name == image_name:
                multiple = str(control.attr.get("choice", "single")).lower() == "multiple"
                return cls(control.name, to_name, tuple(control.labels), multiple)
        return None

    def result(self, labels: Sequence[str], confidence: float) -> dict[str, Any]:
        """One Label Studio result item pre-selecting `labels`."""
        return {
            "from_name": self.from_name,
            "to_name": self.to_name,
            "type": "choices",
            "value": {"choices": list(labels)},
            "score": round(float(confidence), 4),
        }


@dataclass(frozen=True)
class Suggestion:
    labels: tuple[str, ...]
    confidence: float  # the winning share of the neighbours' weighted vote, or a softmax prob


def knn_vote(
    neighbours: np.ndarray,
    neighbour_labels: Sequence[Sequence[str]],
    queries: np.ndarray,
    k: int,
    multiple: bool = False,
) -> list[Suggestion | None]:
    """For each query vector: the labels of its k most similar labeled neighbours, each vote
    weighted by its (positive) cosine similarity. None where no neighbour votes."""
    if len(neighbours) == 0 or len(queries) == 0:
        return [None] * len(queries)
    similarities = np.asarray(queries, np.float32) @ np.asarray(neighbours, np.float32).T
    k = min(k, similarities.shape[1])
    top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    out: list[Suggestion | None] = []
    for row, picks in zip(similarities, top, strict=True):
        votes: dict[str, float] = {}
        total = 0.0
        for j in picks.tolist():
            weight = max(float(row[j]), 0.0)
            total += weight
            for label in set(neighbour_labels[j]):
                votes[label] = votes.get(label, 0.0) + weight
        if total <= 0 or not votes:
            out.append(None)
            continue
        ranked = sorted(votes.items(), key=lambda item: (-item[1], item[0]))
        if multiple:
            chosen = tuple(
                label for label, weight in ranked if weight / total >= MULTI_CHOICE_SHARE
            )
            chosen = chosen or (ranked[0][0],)
        else:
            chosen = (ranked[0][0],)
        out.append(Suggestion(chosen, votes[chosen[0]] / total))
    return out


def zero_shot(embedder: Embedder, labels: Sequence[str], queries: np.ndarray) -> list[Suggestion]:
    """Before anything is labeled (CLIP models): the label whose prompts match best."""
    texts = [template.format(label) for label in labels for template in PROMPT_TEMPLATES]
    prompts = embedder.embed_text(texts).reshape(len(labels), len(PROMPT_TEMPLATES), -1)
    centroids = prompts.mean(axis=1)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    logits = ZERO_SHOT_TEMPERATURE * (np.asarray(queries, np.float32) @ centroids.T)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    best = probabilities.argmax(axis=1)
    return [
        Suggestion((labels[i],), float(probabilities[n, i])) for n, i in enumerate(best.tolist())
    ]


@dataclass(frozen=True)
class Mislabel:
    task_id: int
    labeled: tuple[str, ...]
    neighbours_say: str
    score: float  # the share of the neighbours' vote against the given label


def likely_mislabels(
    task_ids: Sequence[int],
    vectors: np.ndarray,
    labels: Sequence[Sequence[str]],
    k: int,
    threshold: float = 0.5,
) -> list[Mislabel]:
    """Labeled tasks whose k nearest labeled neighbours (themselves left out) mostly carry
    another label: more than `threshold` of the weighted vote. Most likely first."""
    n = len(task_ids)
    if n < 3:
        return []
    vectors = np.asarray(vectors, np.float32)
    similarities = vectors @ vectors.T
    np.fill_diagonal(similarities, -np.inf)  # leave one out
    k = min(k, n - 1)
    top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    found = []
    for i, picks in enumerate(top):
        votes: dict[str, float] = {}
        total = 0.0
        for j in picks.tolist():
            weight = max(float(similarities[i, j]), 0.0)
            total += weight
            for label in set(labels[j]):
                votes[label] = votes.get(label, 0.0) + weight
        if total <= 0:
            continue
        own = set(labels[i])
        others = [(w, label) for label, w in votes.items() if label not in own]
        if not others:
            continue
        weight, label = max(others)
        against = 1.0 - sum(votes.get(x, 0.0) for x in own) / total
        if against > threshold and weight / total > threshold:
            found.append(Mislabel(int(task_ids[i]), tuple(sorted(own)), label, round(against, 4)))
    return sorted(found, key=lambda m: -m.score)


# ---------------------------------------------------------------------------- in a project
def labeled_examples(rt: Runtime, project: int, control: ChoicesControl):
    """(task ids, vectors, labels) of the project's labeled tasks that carry a choice."""
    state = rt.state(project)
    choices = set(control.choices)
    labeled = {
        task: sorted(labels & choices)
        for task, labels in state.labels.by_task().items()
        if labels & choices
    }
    vectors = state.vectors.get(labeled)
    ids = [t for t in labeled if t in vectors]
    matrix = np.stack([vectors[t] for t in ids]) if ids else np.empty((0, 0), np.float32)
    return ids, matrix, [labeled[t] for t in ids]


def suggest_for(
    rt: Runtime,
    project: int,
    label_config: str,
    task_ids: Sequence[int],
    label: str | None = None,
) -> tuple[dict[int, list[dict[str, Any]]], str]:
    """The result each task's Lookalike prediction carries (a pre-selected choice), and a note
    for the reply. `label`: a person chose it for all of them (bulk suggestion)."""
    control = ChoicesControl.find(label_config)
    if control is None:
        if label:
            raise BadRequestError("this project's labeling config has no Choices to suggest")
        return {}, ""
    if label is not None:
        if label not in control.choices:
            raise BadRequestError(f"{label!r} is not one of {list(control.choices)}")
        result = [control.result([label], 1.0)]
        return {t: result for t in task_ids}, f"label '{label}' suggested for them"
    if not rt.settings.suggestions or not task_ids:
        return {}, ""
    targets = rt.state(project).vectors.get(task_ids)
    ids = [t for t in task_ids if t in targets]
    if not ids:
        return {}, ""
    queries = np.stack([targets[t] for t in ids])
    _, neighbours, labels = labeled_examples(rt, project, control)
    if len(neighbours):
        votes = knn_vote(neighbours, labels, queries, rt.settings.suggest_k, control.multiple)
        how = "from labeled look-alikes"
    else:
        try:
            embedder = rt.embedder()
            if not embedder.supports_text:
                return {}, ""
            votes = list(zero_shot(embedder, control.choices, queries))
        except LookalikeError as exc:  # no model here: no zero-shot, the queue still works
            log.warning("project %s: no zero-shot suggestions: %s", project, exc)
            return {}, ""
        how = "zero-shot from the label names"
    out = {
        t: [control.result(v.labels, v.confidence)]
        for t, v in zip(ids, votes, strict=True)
        if v is not None
    }
    return out, (f"labels suggested {how}" if out else "")

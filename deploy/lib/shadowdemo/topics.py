"""Zero-shot topic classifier over MiniLM embeddings: the classifier reference of the demo.

Each topic's prototype is the normalized mean embedding of a few short descriptions; the logits
are a scaled cosine, so a softmax over them gives soft labels a student can be distilled from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shadowdemo.minilm import MiniLM

TOPICS: tuple[str, ...] = (
    "sports",
    "politics",
    "technology",
    "health",
    "finance",
    "travel",
    "food",
    "science",
)
# 20 * cosine: cosines between sentences and descriptions differ by ~0.1-0.3, which this scale
# turns into confident but not one-hot soft labels.
LOGIT_SCALE = 20.0

_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "sports": ("sports", "a football match, teams, players and scores", "athletes and games"),
    "politics": ("politics", "government, elections and laws", "politicians and parliament"),
    "technology": ("technology", "computers, software and gadgets", "tech companies and apps"),
    "health": ("health", "medicine, doctors and illness", "symptoms, treatment and hospitals"),
    "finance": ("finance", "money, markets and investing", "stocks, banks and interest rates"),
    "travel": ("travel", "trips, flights and hotels", "visiting places on holiday"),
    "food": ("food", "cooking, recipes and restaurants", "dishes, meals and eating"),
    "science": ("science", "scientific research and discoveries", "physics, biology, space"),
}


class TopicTeacher:
    """MiniLM fp32 embeddings + a cosine head against fixed topic prototypes."""

    def __init__(self, encoder: MiniLM | None = None) -> None:
        self.encoder = encoder if encoder is not None else MiniLM("fp32")
        protos = []
        for topic in TOPICS:
            emb = self.encoder.encode(_DESCRIPTIONS[topic]).astype(np.float64).mean(axis=0)
            protos.append(emb / np.linalg.norm(emb))
        self.prototypes = np.stack(protos).astype(np.float32)  # [K, 384]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.encoder.encode(texts)  # unit norm, so the dot product is the cosine
        return (LOGIT_SCALE * emb @ self.prototypes.T).astype(np.float32)


def label_outputs(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label_id INT64 [N], label BYTES [N]) for a logits array [N, K]."""
    ids = logits.argmax(axis=1).astype(np.int64)
    names = np.array([TOPICS[i].encode() for i in ids], dtype=np.object_)
    return ids, names

"""A distilled student: hashed words and bigrams -> linear layer, trained by KL to the teacher.

Stands for the "distilled small model" optimization: orders of magnitude cheaper than the
transformer teacher, right most of the time, wrong on inputs unlike its distillation corpus.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from shadowdemo.topics import TOPICS, TopicTeacher
from shadowdemo.training_corpus import training_sentences

N_FEATURES = 4096
# Bigrams add phrase cues ("interest rates") but, weighted fully, the student overfits to the
# distillation corpus's sentence frames; a quarter weight measured best on the demo's traffic.
BIGRAM_WEIGHT = 0.25
_WORD = re.compile(r"[a-z0-9']+")


def featurize(texts: Sequence[str]) -> torch.Tensor:
    """[N, N_FEATURES] float32: L2-normalized counts of hashed unigrams and bigrams."""
    out = torch.zeros((len(texts), N_FEATURES), dtype=torch.float32)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        bigrams = [f"{a} {b}" for a, b in itertools.pairwise(words)]
        for grams, weight in ((words, 1.0), (bigrams, BIGRAM_WEIGHT)):
            for gram in grams:
                # crc32, not hash(): Python's str hash is salted per process, and the student must
                # be the same in every stub and every run.
                out[row, zlib.crc32(gram.encode()) % N_FEATURES] += weight
    return torch.nn.functional.normalize(out, p=2.0, dim=1)


class TopicStudent:
    def __init__(self, *, teacher: TopicTeacher | None = None, seed: int = 0, steps: int = 300):
        torch.manual_seed(seed)
        teacher = teacher if teacher is not None else TopicTeacher()
        corpus = training_sentences()
        soft = torch.softmax(torch.from_numpy(teacher.logits(corpus)), dim=1)
        feats = featurize(corpus)
        self.linear = torch.nn.Linear(N_FEATURES, len(TOPICS))
        # Weight decay keeps buckets never seen in training near zero instead of at random init.
        opt = torch.optim.AdamW(self.linear.parameters(), lr=0.05, weight_decay=0.1)
        # Full-batch, fixed step count: the same weights in every run, a fraction of a second.
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                log_p = torch.log_softmax(self.linear(feats), dim=1)
                loss = torch.nn.functional.kl_div(log_p, soft, reduction="batchmean")
                loss.backward()
                opt.step()
        self.final_loss = float(loss.detach())
        self.linear.eval()

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            return self.linear(featurize(texts)).numpy().astype(np.float32)

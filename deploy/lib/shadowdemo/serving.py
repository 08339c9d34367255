"""Triton Python-backend glue shared by every model in deploy/models.

Each model.py subclasses one of these and names its variant; all decoding of the BYTES input,
error reporting and per-request isolation lives here once.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

MAX_SENTENCES = 64
SEED = 0


def _setup_torch() -> None:
    torch.manual_seed(SEED)
    # Seven stubs share the CPU: one thread each keeps them from oversubscribing it, and makes
    # every result independent of how busy the machine is.
    torch.set_num_threads(int(os.environ.get("SHADOWDEMO_THREADS", "1")))


def decode_texts(request: Any) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, "text")
    if tensor is None:
        raise ValueError("missing input 'text'")
    values = tensor.as_numpy()
    if values.ndim != 1:
        raise ValueError(f"input 'text' must have shape [N], got {list(values.shape)}")
    if not 1 <= values.shape[0] <= MAX_SENTENCES:
        raise ValueError(f"input 'text' must hold 1..{MAX_SENTENCES} sentences, got {len(values)}")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


class _Base:
    def initialize(self, args: dict[str, str]) -> None:
        _setup_torch()
        self.model_name = args.get("model_name", "?")
        self.load()

    def load(self) -> None:
        raise NotImplementedError

    def outputs(self, texts: list[str]) -> list[Any]:
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            # One bad request gets its own error response; the others in the batch still answer.
            try:
                tensors = self.outputs(decode_texts(request))
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:
                error = pb_utils.TritonError(f"{self.model_name}: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses

    def finalize(self) -> None:
        return None


class EmbeddingModel(_Base):
    """text BYTES [N] -> embedding FP32 [N, 384]."""

    variant = "fp32"

    def load(self) -> None:
        from shadowdemo.minilm import MiniLM

        self.encoder = MiniLM(self.variant, seed=SEED)

    def outputs(self, texts: list[str]) -> list[Any]:
        return [pb_utils.Tensor("embedding", self.encoder.encode(texts))]


class TopicModel(_Base):
    """text BYTES [N] -> logits, probabilities, topic_scores FP32 [N, K]; label_id INT64 [N];
    label BYTES [N].

    One output per kind the comparators know: logits, probabilities, a dense score tensor
    (each topic's relevance in [-1, 1]: the teacher's cosine to the topic prototype, the student's
    estimate of it), integer class ids and text labels.
    """

    student = False

    def load(self) -> None:
        from shadowdemo.student import TopicStudent
        from shadowdemo.topics import TopicTeacher

        teacher = TopicTeacher()
        self.classifier: TopicTeacher | TopicStudent = (
            TopicStudent(teacher=teacher, seed=SEED) if self.student else teacher
        )

    def outputs(self, texts: list[str]) -> list[Any]:
        from shadowdemo.topics import LOGIT_SCALE, label_outputs

        logits = self.classifier.logits(texts)
        ids, names = label_outputs(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        return [
            pb_utils.Tensor("logits", logits),
            pb_utils.Tensor("probabilities", probabilities.astype(np.float32)),
            pb_utils.Tensor("topic_scores", (logits / LOGIT_SCALE).astype(np.float32)),
            pb_utils.Tensor("label_id", ids),
            pb_utils.Tensor("label", names),
        ]

"""The light model pair, light_ref and light_cand: numpy only, for coverage tests and benchmarks.

Both models take `x` FP32 [N, 8] (1..64 rows of 8 features) and answer
    scores = x @ W + b          FP32  [N, 4]   (W 8x4 and b: fixed, seeded, shared by both)
    probs  = softmax(scores)    FP32  [N, 4]
    label  = argmax(scores)     INT64 [N]
in microseconds, so a test can send hundreds of requests and a benchmark measures the proxy, not
the model. No torch: a stub loads in a second or two.

The planted divergence: light_cand runs this same code on the same bytes, so it answers
bit-identically to light_ref, EXCEPT on rows whose last feature x[i, 7] is exactly 13.0
(PLANT_MARKER). On such a row it adds 4.0 (PLANT_BOOST) to scores[i, (argmax + 1) % 4] before the
softmax and argmax, so its scores, probs and label all differ from the reference's. A client
chooses which rows (and so which requests) diverge: precision and recall of the flagging can be
checked exactly.

The marker feature has zero weight in W: the reference's answer to a planted row is the answer to
the same row unplanted. The other weights are small (|W| <= 0.25, |b| <= 0.1), so the boost always
moves the argmax when the row's other features lie in [-2, 2] (the seeded W guarantees it up to
2.36); standard-normal features flip too (none of 200,000 rows did not).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

try:  # Present only inside Triton's backend stub; forward() needs nothing but numpy.
    import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
except ImportError:
    pb_utils = None

F32 = npt.NDArray[np.float32]

N_FEATURES = 8
N_CLASSES = 4
MAX_ROWS = 64
PLANT_MARKER = 13.0
PLANT_BOOST = 4.0
SEED = 0


def _constants() -> tuple[F32, F32]:
    rng = np.random.default_rng(SEED)
    weights = rng.uniform(-0.25, 0.25, (N_FEATURES, N_CLASSES)).astype(np.float32)
    weights[N_FEATURES - 1] = 0.0  # the marker feature: planting never changes the reference
    bias = rng.uniform(-0.1, 0.1, N_CLASSES).astype(np.float32)
    # Shared by every request: read-only, so no caller can change a model's answers.
    weights.setflags(write=False)
    bias.setflags(write=False)
    return weights, bias


W, B = _constants()


def planted_rows(x: F32) -> npt.NDArray[np.bool_]:
    """Boolean [N]: the rows light_cand answers differently (last feature exactly 13.0)."""
    mask: npt.NDArray[np.bool_] = x[:, N_FEATURES - 1] == np.float32(PLANT_MARKER)
    return mask


def forward(x: F32, *, plant: bool) -> tuple[F32, F32, npt.NDArray[np.int64]]:
    """(scores, probs, label) for `x` FP32 [N, 8]; `plant`: light_cand's boost on marked rows."""
    scores = x @ W + B
    if plant:
        rows = np.flatnonzero(planted_rows(x))
        # Unmarked rows are left untouched: their bytes stay identical to the reference's.
        target = (scores[rows].argmax(axis=1) + 1) % N_CLASSES
        scores[rows, target] += np.float32(PLANT_BOOST)
    # Softmax shifted by the row maximum, so a large score cannot overflow exp.
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)
    label = scores.argmax(axis=1).astype(np.int64)
    return scores, probs, label


def read_x(request: Any) -> F32:
    """Input `x` of a Triton request, checked: FP32 [N, 8] with 1..64 rows."""
    tensor = pb_utils.get_input_tensor_by_name(request, "x")
    if tensor is None:
        raise ValueError("missing input 'x'")
    x: F32 = tensor.as_numpy()
    # Triton checks the dtype and the [-1, 8] shape against config.pbtxt; the row count is ours.
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"input 'x' must hold 1..{MAX_ROWS} rows, got {x.shape[0]}")
    return x


class LightModel:
    """Triton Python-backend model; model.py of light_ref and light_cand subclasses it."""

    plant = False  # light_cand sets True

    def initialize(self, args: dict[str, str]) -> None:
        self.model_name = args.get("model_name", "?")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            # One bad request gets its own error response, named after the model.
            try:
                scores, probs, label = forward(read_x(request), plant=self.plant)
                tensors = [
                    pb_utils.Tensor("scores", scores),
                    pb_utils.Tensor("probs", probs),
                    pb_utils.Tensor("label", label),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:
                error = pb_utils.TritonError(f"{self.model_name}: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses

    def finalize(self) -> None:
        return None

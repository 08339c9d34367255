"""Triton Python-backend glue of the decoupled LM models (lm_fp32, lm_int8, lm_bf16, lm_fp32_twin),
for Triton's generate extension.

A decoupled model may send any number of responses per request, and Triton's `generate`
endpoint refuses an answer of more than one ("generate expects model to produce exactly 1
response, use generate stream ..."): so, as Triton's vLLM backend does, the request says how to
answer. `stream` false (the default) sends the whole answer as one response, which both
`generate` and `generate_stream` accept; `stream` true sends one response per token, then one
carrying `finish_reason`, for `generate_stream` only.

Every knob is an optional input: Triton's generate endpoints make one from a top-level key of the
JSON or a key of its `parameters` object. A request through `/infer` may pass a knob as a request
parameter instead; an input wins where both are given.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

# torch is imported in initialize only: Triton also loads each model.py in a short-lived
# auto-complete stub, which then need not spend a CPU-second importing it.
if TYPE_CHECKING:
    from shadowdemo.lm import Finish, LanguageModel, Token

DEFAULT_MAX_TOKENS = 24
MAX_NEW_TOKENS = 256
MAX_TEMPERATURE = 10.0
MAX_LOGPROBS = 10
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BadRequest(ValueError):
    """The request itself is wrong: answered 400, not 500."""


@dataclass(frozen=True)
class Knobs:
    prompt: str
    stream: bool
    max_tokens: int
    temperature: float
    seed: int
    num_logprobs: int


def _scalar(request: Any, params: dict[str, Any], name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is not None:
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise BadRequest(f"input {name!r} must hold one value, got {values.size}")
        value = values[0]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value.item()
    return params.get(name)


# name: (type, lowest, highest, default) of each numeric knob.
_NUMBERS: dict[str, tuple[type, float, float, float]] = {
    "max_tokens": (int, 1, MAX_NEW_TOKENS, DEFAULT_MAX_TOKENS),
    "temperature": (float, 0.0, MAX_TEMPERATURE, 0.0),
    "seed": (int, 0, 2**63 - 1, 0),
    "num_logprobs": (int, 0, MAX_LOGPROBS, 0),
}


def _number(name: str, raw: Any) -> Any:
    kind, low, high, default = _NUMBERS[name]
    if raw is None:
        return kind(default)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise BadRequest(f"{name!r} must be a number, got {raw!r}")
    # A float where an integer is due must be whole (2.0 is 2, 2.5 is an error).
    if not (math.isfinite(raw) and low <= raw <= high and kind(raw) == raw):
        what = "an integer" if kind is int else "a number"
        raise BadRequest(f"{name!r} must be {what} in [{low:g}, {high:g}], got {raw!r}")
    return kind(raw)


def parse(request: Any) -> Knobs:
    params = json.loads(request.parameters() or "{}")
    prompt = _scalar(request, params, "text_input")
    if prompt is None:
        raise BadRequest("missing 'text_input' (the prompt, a string)")
    if not isinstance(prompt, str):
        raise BadRequest(f"'text_input' must be a string, got {prompt!r}")
    stream = _scalar(request, params, "stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}")
    numbers = {name: _number(name, _scalar(request, params, name)) for name in _NUMBERS}
    return Knobs(prompt=prompt, stream=bool(stream), **numbers)


def _bytes(values: list[str], shape: tuple[int, ...]) -> npt.NDArray[np.object_]:
    return np.array([v.encode() for v in values], dtype=np.object_).reshape(shape)


def outputs(model: LanguageModel, tokens: list[Token], k: int, finish: Finish | None) -> list[Any]:
    """The tensors of one response: `tokens` (all of an answer, or the one of a stream event),
    and `finish_reason` only when `finish` is given (the answer's last response)."""
    n = len(tokens)
    pieces = [t.piece for t in tokens]
    top_ids = [i for t in tokens for i in t.top_ids]
    out = [
        pb_utils.Tensor("text_output", _bytes(["".join(pieces)], (1,))),
        pb_utils.Tensor("tokens", _bytes(pieces, (n,))),
        pb_utils.Tensor("token_ids", np.array([t.token_id for t in tokens], dtype=np.int64)),
        pb_utils.Tensor("logprobs", np.array([t.logprob for t in tokens], dtype=np.float32)),
        pb_utils.Tensor(
            "top_logprobs",
            np.array([v for t in tokens for v in t.top_logprobs], dtype=np.float32).reshape(n, k),
        ),
        pb_utils.Tensor("top_tokens", _bytes([model.vocab.piece(i) for i in top_ids], (n, k))),
    ]
    if finish is not None:
        out.append(pb_utils.Tensor("finish_reason", _bytes([finish.reason], (1,))))
    return out


class GenerateModel:
    """One decoupled LM; each model.py names its variant."""

    variant = "fp32"

    def initialize(self, args: dict[str, str]) -> None:
        import torch

        from shadowdemo.lm import LanguageModel

        torch.manual_seed(0)
        # Eleven stubs share the CPU: one thread each, and results independent of the load.
        torch.set_num_threads(int(os.environ.get("SHADOWDEMO_THREADS", "1")))
        self.model_name = args.get("model_name", "?")
        self.lm = LanguageModel(self.variant)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            # One bad request gets its own error; the others still answer.
            try:
                self._answer(request, sender)
            except BadRequest as exc:
                self._fail(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception as exc:
                self._fail(sender, f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
        return None

    def _fail(self, sender: Any, message: str, code: Any) -> None:
        error = pb_utils.TritonError(f"{self.model_name}: {message}", code)
        sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=_FINAL)

    def _answer(self, request: Any, sender: Any) -> None:
        from shadowdemo.lm import Finish

        knobs = parse(request)
        try:
            self.lm.prompt_ids(knobs.prompt)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        steps = self.lm.generate(
            knobs.prompt,
            max_tokens=knobs.max_tokens,
            temperature=knobs.temperature,
            seed=knobs.seed,
            num_logprobs=knobs.num_logprobs,
        )
        k = knobs.num_logprobs
        tokens: list[Token] = []
        for step in steps:
            if isinstance(step, Finish):
                final = outputs(self.lm, [] if knobs.stream else tokens, k, step)
                sender.send(pb_utils.InferenceResponse(output_tensors=final), flags=_FINAL)
                return
            if not knobs.stream:
                tokens.append(step)
                continue
            if sender.is_cancelled():
                sender.send(flags=_FINAL)  # the client is gone: stop generating
                return
            sender.send(
                pb_utils.InferenceResponse(output_tensors=outputs(self.lm, [step], k, None))
            )

    def finalize(self) -> None:
        return None

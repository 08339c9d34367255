"""Semantic similarity of two generated answers: both texts embedded by a model the user names.

Opt-in (``semantic.embedding_url``): it costs an inference per compared copy. The embedding
server is a V2 one (Triton serving the demo's MiniLM: one BYTES input of texts, one FP32 output
of vectors) or an OpenAI-compatible ``/v1/embeddings``. Both texts go in one call. A failure
costs the copy its ``semantic`` verdict (counted), never its comparison.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import numpy as np

from ..errors import UpstreamError, translate_upstream_error
from ..settings import SemanticSettings

log = logging.getLogger("shadowproxy.semantic")

Vectors = np.ndarray[Any, np.dtype[np.float32]]


class EmbeddingFailed(Exception):
    """The embedding server did not give two vectors for two texts."""


class Embedder:
    """Owned by the compare stage (``Comparer``); ``close`` when it closes."""

    def __init__(self, settings: SemanticSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def embed(self, texts: list[str]) -> Vectors:
        """One row per text; raises ``EmbeddingFailed`` saying why."""
        s = self.settings
        base = s.embedding_url.rstrip("/")
        try:
            if s.api == "openai":
                body: dict[str, Any] = {"model": s.embedding_model, "input": texts}
                async with self._client().post(f"{base}/v1/embeddings", json=body) as r:
                    answer = await self._json(r)
                rows = sorted(answer.get("data") or [], key=lambda d: d.get("index", 0))
                vectors = np.asarray([d["embedding"] for d in rows], dtype=np.float32)
            else:
                tensor = {
                    "name": s.embedding_input,
                    "datatype": "BYTES",
                    "shape": [len(texts)],
                    "data": texts,
                }
                body = {"inputs": [tensor], "outputs": [{"name": s.embedding_output}]}
                url = f"{base}/v2/models/{s.embedding_model}/infer"
                async with self._client().post(url, json=body) as r:
                    answer = await self._json(r)
                out = next(o for o in answer["outputs"] if o["name"] == s.embedding_output)
                vectors = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        except EmbeddingFailed:
            raise
        except (KeyError, TypeError, ValueError, StopIteration) as exc:
            raise EmbeddingFailed(f"{s.embedding_model}: not an embeddings answer ({exc})") from exc
        except Exception as exc:
            err: UpstreamError = translate_upstream_error(exc, s.embedding_model, base)
            raise EmbeddingFailed(str(err)) from exc
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise EmbeddingFailed(
                f"{s.embedding_model}: {vectors.shape} vectors for {len(texts)} texts"
            )
        return vectors

    async def _json(self, r: aiohttp.ClientResponse) -> Any:
        if r.status != 200:
            text = (await r.text())[:200]
            raise EmbeddingFailed(f"{self.settings.embedding_model} answered {r.status}: {text}")
        return await r.json(content_type=None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

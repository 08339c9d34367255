"""The demo model repository on a real Triton server: I/O contract, determinism, divergences."""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from proxy.demo.corpus import sentences
from proxy.tritonserver import TritonServer, TritonStartError
from tests.triton_fixture import DEMO_MODELS

pytestmark = pytest.mark.triton

EMBEDDERS = ("minilm_fp32", "minilm_fp32_twin", "minilm_int8", "minilm_bf16", "minilm_traced")
CLASSIFIERS = ("topic_teacher", "topic_student")
N_TOPICS = 8


@pytest.fixture(scope="module")
def client(triton_server: TritonServer) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(triton_server.url.removeprefix("http://"))
    yield client
    # An open keep-alive connection holds Triton's shutdown until its exit timeout.
    client.close()


def infer(
    client: httpclient.InferenceServerClient, model: str, texts: list[str], *, binary: bool = True
) -> dict[str, np.ndarray]:
    text = httpclient.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary)
    names = (
        ["embedding"]
        if model in EMBEDDERS
        else ["logits", "probabilities", "topic_scores", "label_id", "label"]
    )
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
    result = client.infer(model, [text], outputs=outputs)
    return {n: result.as_numpy(n) for n in names}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a64 * b64, axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def test_all_models_ready(triton_server: TritonServer) -> None:
    assert triton_server.check_models() == dict.fromkeys(DEMO_MODELS, "ready")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", DEMO_MODELS)
def test_io_contract(client: httpclient.InferenceServerClient, model: str, binary: bool) -> None:
    texts = sentences(3, seed=11)
    out = infer(client, model, texts, binary=binary)
    if model in EMBEDDERS:
        emb = out["embedding"]
        assert emb.dtype == np.float32 and emb.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    else:
        assert out["logits"].dtype == np.float32 and out["logits"].shape == (3, N_TOPICS)
        assert out["label_id"].dtype == np.int64 and out["label_id"].shape == (3,)
        assert out["label"].shape == (3,)
        assert np.array_equal(out["label_id"], out["logits"].argmax(axis=1))
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(out["topic_scores"] * 20, out["logits"], rtol=1e-5, atol=1e-5)
        # Binary mode gives bytes, JSON mode gives str: either way a topic name.
        assert all(len(v) > 0 and isinstance(v, bytes | str) for v in out["label"])


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_same_request_same_bytes(client: httpclient.InferenceServerClient, model: str) -> None:
    texts = sentences(8, seed=3)
    first, second = infer(client, model, texts), infer(client, model, texts)
    for name in first:
        if first[name].dtype == np.object_:  # BYTES: compare the values, not object pointers
            assert first[name].tolist() == second[name].tolist(), name
        else:
            assert first[name].tobytes() == second[name].tobytes(), name


def test_request_bounds(client: httpclient.InferenceServerClient) -> None:
    assert infer(client, "minilm_fp32", sentences(64))["embedding"].shape == (64, 384)
    with pytest.raises(InferenceServerException, match=r"1\.\.64 sentences"):
        infer(client, "minilm_fp32", sentences(65))


@pytest.fixture(scope="module")
def embeddings(client: httpclient.InferenceServerClient) -> dict[str, np.ndarray]:
    texts = sentences(32, seed=5)
    return {m: infer(client, m, texts)["embedding"] for m in EMBEDDERS}


def test_twin_is_the_reference(embeddings: dict[str, np.ndarray]) -> None:
    assert np.array_equal(embeddings["minilm_fp32_twin"], embeddings["minilm_fp32"])


def test_traced_matches_reference(embeddings: dict[str, np.ndarray]) -> None:
    assert cosines(embeddings["minilm_traced"], embeddings["minilm_fp32"]).min() > 0.9999


@pytest.mark.parametrize("model", ["minilm_int8", "minilm_bf16"])
def test_reduced_precision_diverges(embeddings: dict[str, np.ndarray], model: str) -> None:
    cos = cosines(embeddings[model], embeddings["minilm_fp32"])
    assert cos.min() < 0.99999  # measurably different from the reference...
    assert cos.min() > 0.9  # ...but still the same model


def test_student_mostly_agrees_with_teacher(client: httpclient.InferenceServerClient) -> None:
    texts = sentences(64)
    teacher = infer(client, "topic_teacher", texts)["label_id"]
    student = infer(client, "topic_student", texts)["label_id"]
    assert 0.5 <= float(np.mean(teacher == student)) <= 0.999


# A model that needs nothing but numpy: the launcher tests start in seconds.
_TOY_MODEL = """
import os
import sys

sys.path.insert(0, os.environ["SHADOWPROXY_SITE_PACKAGES"])
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        {init}

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("n", np.array([1], dtype=np.int64))])
            for _ in requests
        ]
"""
_TOY_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "text", data_type: TYPE_STRING, dims: [ -1 ] } ]
output [ { name: "n", data_type: TYPE_INT64, dims: [ 1 ] } ]
"""


def _toy_repo(root: Path, models: dict[str, str]) -> Path:
    for name, init in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(_TOY_CONFIG)
        model_py = textwrap.dedent(_TOY_MODEL).replace("{init}", init)
        (root / name / "1" / "model.py").write_text(model_py)
    return root


def test_model_failing_at_initialize_is_named(tmp_path: Path) -> None:
    repo = _toy_repo(
        tmp_path / "repo", {"fine": "pass", "broken": "raise RuntimeError('weights missing')"}
    )
    server = TritonServer(repo, workdir=tmp_path / "work", models=["fine", "broken"])
    with pytest.raises(TritonStartError, match=r"broken(.|\n)*weights missing") as caught:
        server.__enter__()
    summary = str(caught.value).split("--- last", 1)[0]
    assert "fine" not in summary


def test_dead_stub_is_reported(tmp_path: Path) -> None:
    repo = _toy_repo(tmp_path / "repo", {"toy": "pass"})
    with TritonServer(repo, workdir=tmp_path / "work", models=["toy"]) as server:
        assert server.check_models() == {"toy": "ready"}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and str(repo / "toy") in _cmdline(proc):
                os.kill(int(proc.name), signal.SIGKILL)
        state = server.check_models()["toy"]
        assert "stub of toy is dead" in state and "not healthy" in state


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""

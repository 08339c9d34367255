"""The demo model repository on a real Triton server: I/O contract, determinism, divergences."""

from __future__ import annotations

import importlib.util
import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from comparators import MetricSpec, compare_outputs
from proxy.demo.corpus import sentences
from proxy.tritonserver import TritonServer, TritonStartError
from tests.triton_fixture import DEMO_MODELS

pytestmark = pytest.mark.triton

EMBEDDERS = ("minilm_fp32", "minilm_fp32_twin", "minilm_int8", "minilm_bf16", "minilm_traced")
CLASSIFIERS = ("topic_teacher", "topic_student")
TEXT_MODELS = EMBEDDERS + CLASSIFIERS
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
@pytest.mark.parametrize("model", TEXT_MODELS)
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


@pytest.mark.parametrize("model", TEXT_MODELS)
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


# The light pair (deploy/lib/shadowdemo/light.py): numpy only, a divergence the client plants.
LIGHT_MODELS = ("light_ref", "light_cand")
LIGHT_OUTPUTS = ("scores", "probs", "label")
PLANT_MARKER = 13.0  # x[i, 7] == 13.0: light_cand answers row i differently
N_CLASSES = 4


def _load_light() -> ModuleType:
    """deploy/lib/shadowdemo/light.py by path (it is not a package of the venv): its constants and
    forward() need nothing but numpy, so the tests can check the served numbers against them."""
    path = Path(__file__).resolve().parents[2] / "deploy" / "lib" / "shadowdemo" / "light.py"
    spec = importlib.util.spec_from_file_location("shadowdemo_light", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


light = _load_light()


def light_rows(n: int, *, seed: int, planted: tuple[int, ...] = ()) -> np.ndarray:
    """`n` rows of features in [-2, 2] (where a plant always flips the label); `planted` rows
    carry the marker in their last feature."""
    x = np.random.default_rng(seed).uniform(-2.0, 2.0, (n, 8)).astype(np.float32)
    x[list(planted), 7] = PLANT_MARKER
    return x


def infer_light(
    client: httpclient.InferenceServerClient, model: str, x: np.ndarray, *, binary: bool = True
) -> dict[str, np.ndarray]:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in LIGHT_OUTPUTS]
    result = client.infer(model, [tensor], outputs=outputs)
    return {n: result.as_numpy(n) for n in LIGHT_OUTPUTS}


def same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(a[n].tobytes() == b[n].tobytes() for n in LIGHT_OUTPUTS)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", LIGHT_MODELS)
def test_light_io_contract(
    client: httpclient.InferenceServerClient, model: str, binary: bool
) -> None:
    x = light_rows(5, seed=1)
    out = infer_light(client, model, x, binary=binary)
    assert out["scores"].dtype == np.float32 and out["scores"].shape == (5, N_CLASSES)
    assert out["probs"].dtype == np.float32 and out["probs"].shape == (5, N_CLASSES)
    assert out["label"].dtype == np.int64 and out["label"].shape == (5,)
    # The served numbers are x @ W + b with the shared seeded constants, then softmax and argmax.
    np.testing.assert_allclose(out["scores"], x @ light.W + light.B, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, atol=1e-6)
    assert np.array_equal(out["label"], out["scores"].argmax(axis=1))


def test_light_binary_and_json_give_the_same_bytes(
    client: httpclient.InferenceServerClient,
) -> None:
    # JSON carries each FP32 value as a number; none may be rounded on the way in or out.
    x = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    for model in LIGHT_MODELS:
        assert same_bytes(
            infer_light(client, model, x, binary=True), infer_light(client, model, x, binary=False)
        ), model


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_light_pair_is_bit_identical_without_plant(
    client: httpclient.InferenceServerClient, binary: bool
) -> None:
    rng = np.random.default_rng(3)
    # Every row count from 1 to 64, features from tiny to large: no row may differ by a bit.
    for n in range(1, 65):
        x = (rng.standard_normal((n, 8)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
        x[x == PLANT_MARKER] = 0.0
        ref = infer_light(client, "light_ref", x, binary=binary)
        cand = infer_light(client, "light_cand", x, binary=binary)
        assert same_bytes(ref, cand), f"{n} rows"


def test_light_divergence_only_on_planted_requests(
    client: httpclient.InferenceServerClient,
) -> None:
    n_requests = 40
    # Request i holds 1 + i % 12 rows; these requests carry the marker on these rows.
    planted: dict[int, tuple[int, ...]] = {
        3: (0,),
        7: (2, 5),
        11: (0, 1, 2),
        12: (0,),
        19: (5,),
        26: (2,),
        33: (0, 6),
        39: (1,),
    }
    flagged: set[int] = set()
    for i in range(n_requests):
        x = light_rows(1 + i % 12, seed=100 + i, planted=planted.get(i, ()))
        ref = infer_light(client, "light_ref", x, binary=i % 2 == 0)
        cand = infer_light(client, "light_cand", x, binary=i % 2 == 0)
        # The proxy's default comparators (metric auto): each output must flag on its own.
        verdicts = compare_outputs(ref, cand, lambda _name: MetricSpec())
        if any(v.flagged for v in verdicts):
            flagged.add(i)
            assert all(v.flagged for v in verdicts), [v.reason for v in verdicts]
        rows = list(planted.get(i, ()))
        differs = np.zeros(len(x), dtype=bool)
        for name in LIGHT_OUTPUTS:
            differs |= (ref[name] != cand[name]).reshape(len(x), -1).any(axis=1)
        assert np.flatnonzero(differs).tolist() == rows, f"request {i}"
        if not rows:
            continue
        # Each planted row: +4 on the class after the reference's argmax, and the label flips...
        target = (ref["label"][rows] + 1) % N_CLASSES
        expected = ref["scores"][rows].copy()
        expected[np.arange(len(rows)), target] += 4.0
        np.testing.assert_allclose(cand["scores"][rows], expected, rtol=0, atol=1e-6)
        assert np.array_equal(cand["label"][rows], target)
        # ...and the probabilities move clearly (total variation), not by round-off.
        total_variation = 0.5 * np.abs(cand["probs"][rows] - ref["probs"][rows]).sum(axis=1)
        assert total_variation.min() > 0.1
        # The marker feature has no weight: the reference answers a planted row as if unplanted.
        unplanted = x.copy()
        unplanted[rows, 7] = 0.0
        assert np.array_equal(infer_light(client, "light_ref", unplanted)["scores"], ref["scores"])
    assert flagged == set(planted)  # precision and recall 1.0


def test_light_plant_flips_every_label_in_range() -> None:
    # The bound the docs promise, for every class the reference may pick: with features in
    # [-2, 2], its lead over the next class is below the +4 boost, so the label must flip.
    assert not light.W[7].any()
    for top in range(N_CLASSES):
        nxt = (top + 1) % N_CLASSES
        lead = 2.0 * np.abs(light.W[:7, top] - light.W[:7, nxt]).sum() + light.B[top] - light.B[nxt]
        assert lead < light.PLANT_BOOST, (top, lead)


@pytest.mark.parametrize("model", LIGHT_MODELS)
def test_light_row_bounds(client: httpclient.InferenceServerClient, model: str) -> None:
    assert infer_light(client, model, light_rows(64, seed=4))["label"].shape == (64,)
    for n in (0, 65):
        with pytest.raises(InferenceServerException, match=rf"{model}: .*1\.\.64 rows, got {n}"):
            infer_light(client, model, np.zeros((n, 8), dtype=np.float32))


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


def test_traced_version_2_is_staged_not_served(triton_server: TritonServer) -> None:
    """``minilm_traced/2`` waits in the repository: its config serves version 1 until a rollout
    (the demo's) loads both; the suite's server answers with version 1."""
    client = httpclient.InferenceServerClient(triton_server.url.removeprefix("http://"))
    try:
        assert client.get_model_metadata("minilm_traced")["versions"] == ["1"]
        assert not client.is_model_ready("minilm_traced", "2")
        config = client.get_model_config("minilm_traced")
        assert config["version_policy"] == {"specific": {"versions": [1]}}
    finally:
        client.close()

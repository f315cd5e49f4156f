"""Zero-shot classification, similarity and tagging against transformers' own forward pass."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignsearch.encoders.classify import BACKGROUND_PROMPTS, against_background, choose_tags
from alignsearch.encoders.model import Encoder
from conftest import run
from helpers import write_labels

LABELS = ["a red car", "a dog", "a photo of the beach at night"]


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return Encoder(str(tiny_model), device="cpu")


def test_probabilities_equal_transformers_forward(encoder, tiny_model, corpus):
    from transformers import AlignModel

    from helpers import reference_processor

    model = AlignModel.from_pretrained(tiny_model).eval()
    processor = reference_processor(tiny_model)
    paths = [corpus / "img001.jpg", corpus / "img002.jpg"]
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        out = model(**processor(text=LABELS, images=images, padding=True, return_tensors="pt"))
    expected = out.logits_per_image.softmax(-1).numpy()
    ours = encoder.classify(paths, LABELS)
    got = np.array([[e["probability"] for e in r] for r in ours])
    assert np.abs(got - expected).max() < 1e-5
    assert [e["label"] for e in ours[0]] == LABELS
    sims = np.array([[e["similarity"] for e in r] for r in ours])
    assert np.allclose(sims / model.temperature.item(), out.logits_per_image.numpy(), atol=1e-4)


def test_prompt_ensembling_is_the_normalised_mean(encoder):
    templates = ("a photo of {}", "a picture of {}")
    vec = encoder.encode_labels(["a dog"], templates)[0]
    parts = encoder.encode_text(["a photo of a dog", "a picture of a dog"])
    mean = parts.mean(axis=0)
    assert np.allclose(vec, mean / np.linalg.norm(mean), atol=1e-6)
    assert not np.allclose(vec, encoder.encode_labels(["a dog"])[0], atol=1e-3)


def test_similarity_and_logit(encoder, corpus):
    r = encoder.similarity("a dog", corpus / "img004.jpg")
    v = float(encoder.encode_text(["a dog"])[0] @ encoder.encode_images([corpus / "img004.jpg"])[0])
    assert r["similarity"] == pytest.approx(v, abs=1e-6)
    assert r["logit"] == pytest.approx(v / encoder.temperature, abs=1e-6)


def test_cli_classify_json_and_similarity(tiny_model, corpus):
    out = json.loads(run("classify", corpus / "img001.jpg", "--labels", "a cat", "--labels", "a dog",
                         "--template", "a photo of {}", "--model", tiny_model, "--json").stdout)
    assert out[0]["image"].endswith("img001.jpg")
    assert [e["label"] for e in out[0]["labels"]] == ["a cat", "a dog"]
    assert sum(e["probability"] for e in out[0]["labels"]) == pytest.approx(1.0, abs=1e-6)
    sim = json.loads(run("similarity", "--text", "a cat", "--image", corpus / "img001.jpg", "--model", tiny_model, "--json").stdout)
    assert set(sim) == {"text", "image", "similarity", "logit"}


@pytest.mark.slow
def test_tags_from_stored_vectors_equal_tags_from_encoding(tmp_path, corpus, tiny_model, encoder):
    ix = tmp_path / "ix"
    run("index", corpus, "--index", ix, "--model", tiny_model, "--device", "cpu")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n\n")
    out = json.loads(run("tag", "--labels-file", labels_file, "--threshold", "0.15", "--top", "2", "--index", ix, "--json").stdout)
    assert out["images"] == 18 and out["tags"] > 0

    import alignsearch

    engine = alignsearch.open(ix)
    hits = engine.search(text="x", k=100)
    probs = against_background(encoder.encode_images([h.path for h in hits]), encoder.encode_labels(LABELS),
                               encoder.encode_text(list(BACKGROUND_PROMPTS)), encoder.temperature)
    expected = choose_tags(probs, LABELS, 0.15, 2)
    for hit, want in zip(hits, expected):
        got = engine.tags(hit.id)
        assert [label for label, _ in got] == [label for label, _ in want]
        assert np.allclose([p for _, p in got], [p for _, p in want], atol=2e-3)  # stored vectors are fp16

    for label in LABELS:
        tagged = {h.id for h in hits if label in [t for t, _ in engine.tags(h.id)]}
        filtered = json.loads(run("query", "x", "-k", "100", "--tag", label, "--json", "--index", ix).stdout)["results"]
        assert {h["id"] for h in filtered} == tagged
    assert json.loads(run("query", "x", "--tag", "no such label", "--json", "--index", ix).stdout)["results"] == []

    # the engine answers classify and similarity with the index's model, as the encoder does
    assert engine.classify(hits[0].path, LABELS)[0]["probability"] == pytest.approx(
        encoder.classify([hits[0].path], LABELS)[0][0]["probability"], abs=1e-6)
    assert engine.similarity("a dog", hits[0].path) == pytest.approx(encoder.similarity("a dog", hits[0].path))

    # images indexed later are tagged with the same labels
    from conftest import make_images

    make_images(corpus / "later", 3, seed=21)
    summary = json.loads(run("index", "--index", ix, "--json").stdout)
    assert summary["tags"]["images"] == 21


@pytest.mark.slow  # two `tag` runs, each loading the model
def test_the_engines_info_lists_the_tags_as_info_and_tags_do(indexed_images, tmp_path):
    """GET /api/info is the engine's info(): the tags and the folders not listed were added by the CLI alone, so
    the server's info lacked them. A remembered label that tags nothing yet is listed with 0, as `tags` lists it."""
    import alignsearch

    _, ix = indexed_images(6)
    labels = write_labels(tmp_path / "labels.txt", ["a cat", "a dog"])
    run("tag", "--labels-file", labels, "--threshold", "0", "--top", "1", "--index", ix)
    run("tag", "--labels-file", write_labels(tmp_path / "never.txt", ["a zebra"]), "--threshold", "1",
        "--index", ix)
    listed = {e["label"]: e["images"] for e in json.loads(run("tags", "--json", "--index", ix).stdout)}
    engine = alignsearch.open(ix)
    try:
        info = engine.info()
    finally:
        engine.close()
    assert info["tags"] == listed == json.loads(run("info", "--json", "--index", ix).stdout)["tags"], info["tags"]
    assert listed["a zebra"] == 0 and sum(listed.values()) == 6 and info["listing_errors"] == []

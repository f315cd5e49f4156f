"""The encoder against transformers' own AlignProcessor + AlignModel, on a checkpoint loaded by from_pretrained."""

import numpy as np
import pytest
from PIL import Image

from alignsearch.errors import BadInputError, ModelLoadError
from alignsearch.encoders.model import Encoder, image_spec_from_processor
from helpers import reference_embeddings


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return Encoder(str(tiny_model), device="cpu")


def test_image_embeddings_match_transformers(encoder, tiny_model):
    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in [(50, 90), (120, 40), (40, 40)]]
    ours = encoder.encode_images(images)
    ref = reference_embeddings(tiny_model, images=images)
    cosine = (ours * ref).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_text_embeddings_match_transformers(encoder, tiny_model):
    texts = ["red car on beach", "a dog", "a photo of a small cat at night"]
    ours = encoder.encode_text(texts)
    ref = reference_embeddings(tiny_model, texts=texts)
    assert (ours * ref).sum(axis=1).min() >= 0.9999


def test_batching_and_padding_do_not_change_text_vectors(encoder):
    alone = encoder.encode_text(["a dog"])[0]
    batched = encoder.encode_text(["a dog", "a photo of a big red car on the road at night"])[0]
    assert float(alone @ batched) >= 0.9999


def test_long_text_is_truncated_not_an_error(encoder):
    long = " ".join(["red car"] * 200)
    vecs = encoder.encode_text([long, "a dog"])
    assert vecs.shape == (2, encoder.dim)
    assert float(vecs[0] @ encoder.encode_text([" ".join(["red car"] * 40)])[0]) >= 0.9999  # both cut at 64 tokens


def test_preprocessing_comes_from_the_checkpoint_config(encoder):
    spec = encoder.spec
    assert spec.resize == (40, 40) and spec.crop == (32, 32)  # the tiny config, not the class defaults (346/289)
    assert spec.rescale_offset and abs(spec.rescale_factor - 1 / 127.5) < 1e-12
    assert spec.mean is None and spec.include_top_std is None


def test_spec_reads_class_style_processor_attributes():
    class Proc:
        do_resize, size, resample = True, {"height": 346, "width": 346}, 2
        do_center_crop, crop_size = True, {"height": 289, "width": 289}
        do_rescale, rescale_factor, rescale_offset = True, 1 / 127.5, True
        do_normalize, image_mean, image_std, include_top = False, [0.5] * 3, [0.5] * 3, False

    spec = image_spec_from_processor(Proc())
    assert spec.resize == (346, 346) and spec.crop == (289, 289) and spec.output_size == (289, 289)


def test_image_inputs_path_bytes_and_pil_agree(encoder, tmp_path):
    img = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    path = tmp_path / "x.png"
    img.save(path)
    a, b, c = encoder.encode_images([str(path), path.read_bytes(), img])
    assert float(a @ b) > 0.99999 and float(a @ c) > 0.99999


def test_unreadable_query_image_is_a_clear_error(encoder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(BadInputError, match="bad.jpg"):
        encoder.encode_images([bad])


def test_missing_checkpoint_says_how_to_use_a_local_copy(tmp_path):
    with pytest.raises(ModelLoadError, match="--model"):
        Encoder(str(tmp_path / "no-such-model"), device="cpu")


def test_fingerprint_tells_checkpoints_apart(encoder, other_model, tiny_model):
    assert Encoder(str(tiny_model), device="cpu").fingerprint == encoder.fingerprint
    assert Encoder(str(other_model), device="cpu").fingerprint != encoder.fingerprint


def test_bf16_on_cpu_stays_close_to_fp32(encoder, tiny_model):
    fast = Encoder(str(tiny_model), device="cpu", text_bf16=True)  # the older spelling of precision="bf16"
    from alignsearch.encoders.backend import openvino_bf16  # bf16 runs on OpenVINO where this CPU has it, else torch

    assert (fast.plan.backend, fast.plan.text, fast.plan.image) == ("openvino" if openvino_bf16() else "torch", "bf16", "bf16")
    texts = ["red car on beach", "a dog"]
    assert (fast.encode_text(texts) * encoder.encode_text(texts)).sum(axis=1).min() >= 0.99
    crops = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    close = (fast.encode_crops(crops) * encoder.encode_crops(crops)).sum(axis=1)
    assert close.min() >= 0.999 and not np.array_equal(fast.encode_crops(crops), encoder.encode_crops(crops))


def test_empty_lists_encode_to_no_rows(encoder):
    """alignsearch.Encoder(...).encode_text([]) raised IndexError from deep in the tokenizer and
    encode_images([]) ValueError from np.stack: an empty batch is (0, dim), as encode_crops already answered."""
    for got in (encoder.encode_text([]), encoder.encode_images([])):
        assert got.shape == (0, encoder.dim) and got.dtype == np.float32

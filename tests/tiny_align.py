"""Builds a tiny random ALIGN checkpoint in a directory, saved the way real checkpoints are."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the of on in at with and photo picture image red green blue yellow black white car beach dog cat "
    "night day small big large circle square triangle purple top bottom sky road tree house person man woman "
    "filled outlined"
).split()


def build_tiny_align(out: Path, seed: int = 0, full_size: bool = False, image: tuple[int, int] = (40, 32),
                     text_init: float = 1.0, text_hidden: int = 32, vision_channels: tuple[int, int, int] = (16, 24, 32),
                     vision_hidden: int = 64, vision_strides: tuple[int, int, int] = (1, 2, 2),
                     extra_words: tuple[str, ...] = ()) -> Path:
    """full_size: align-base's geometry (EfficientNet-B7, BERT-base, 640-d, 289 px) with random
    weights, for speed benchmarks; otherwise a model small enough for unit tests (the quality
    benchmark widens its towers with text_hidden, vision_channels, vision_hidden and vision_strides;
    extra_words: whole words added to the vocabulary, which otherwise spells them letter by letter)."""
    import torch
    from transformers import AlignConfig, AlignModel, AlignProcessor, BertTokenizer, EfficientNetImageProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [w for w in extra_words if w not in WORDS]
    vocab += list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(out), model_max_length=64)

    vision = dict(
        image_size=64,
        width_coefficient=1.0,
        depth_coefficient=0.25,
        hidden_dim=vision_hidden,
        in_channels=[32, *vision_channels[:2]],
        out_channels=list(vision_channels),
        kernel_sizes=[3, 3, 5],
        strides=list(vision_strides),
        num_block_repeats=[1, 1, 1],
        expand_ratios=[1, 6, 6],
        depthwise_padding=[],
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=text_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * text_hidden,
        max_position_embeddings=64,
        initializer_range=text_init,  # 1.0: large random weights, so distinct texts get distinct vectors
    )
    size, crop = image
    if full_size:
        text, vision, (size, crop) = {"vocab_size": len(vocab)}, {"image_size": 289}, (346, 289)
    config = AlignConfig(text_config=text, vision_config=vision, projection_dim=640 if full_size else 8)
    torch.manual_seed(seed)
    model = AlignModel(config).eval()
    with torch.no_grad():
        probe = model.get_image_features(pixel_values=torch.zeros(1, 3, crop, crop))
    dim = (probe if isinstance(probe, torch.Tensor) else probe.pooler_output).shape[-1]
    if dim != config.projection_dim:  # the image embedding's width is the vision tower's last channels
        config = AlignConfig(text_config=text, vision_config=vision, projection_dim=int(dim))
        torch.manual_seed(seed)
        model = AlignModel(config).eval()
    model.save_pretrained(out)
    image_processor = EfficientNetImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=2,
        do_center_crop=True,
        crop_size={"height": crop, "width": crop},
        do_rescale=True,
        rescale_factor=1 / 127.5,
        rescale_offset=True,
        do_normalize=False,
        include_top=False,
    )
    AlignProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out

"""Fine-tuning: pairs loading, the recipe end to end on CPU, resume, and quality well above chance."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from alignsearch.surfaces.cli import main
from alignsearch.errors import BadInputError
from alignsearch.encoders.finetune import retrieval_metrics
from alignsearch.encoders.pairs import load_pairs
from shapes_data import all_specs, write_set
from tiny_align import build_tiny_align
from conftest import run

pytestmark = [pytest.mark.slow]


def test_pairs_from_folder_csv_jsonl_parquet_with_bad_pairs_reported(tmp_path):
    folder = tmp_path / "pairs"
    write_set(folder, all_specs(False)[:3], 1, seed=0)
    (folder / "orphan.png").write_bytes((folder / sorted(p.name for p in folder.glob("*.png"))[0]).read_bytes())
    (folder / "empty.png").write_bytes(b"x")
    (folder / "empty.txt").write_text("   ")
    loaded = load_pairs(folder)
    assert len(loaded.pairs) == 3
    assert {why for _, why in loaded.skipped} == {"no caption file orphan.txt", "empty caption"}

    names = sorted(p.name for p in folder.glob("*.png"))[:2]
    (folder / "pairs.csv").write_text("file,text\n" + "\n".join(f"{n},caption {i}" for i, n in enumerate(names)) + "\nmissing.png,x\n")
    csv_pairs = load_pairs(folder / "pairs.csv", image_column="file", caption_column="text")
    assert [p.caption for p in csv_pairs.pairs] == ["caption 0", "caption 1"]
    assert csv_pairs.skipped[0][1] == "image file missing"
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": "c"}) for n in names))
    assert len(load_pairs(folder / "pairs.jsonl").pairs) == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": names, "caption": ["a", ""]}), folder / "pairs.parquet")
    parquet = load_pairs(folder / "pairs.parquet")
    assert len(parquet.pairs) == 1 and parquet.skipped[0][1] == "empty caption"
    with pytest.raises(BadInputError, match="--image-column"):
        load_pairs(folder / "pairs.csv")


def test_contrastive_loss_is_aligns_own_and_spares_identical_captions(tiny_model):
    import torch
    from transformers import AlignModel

    from alignsearch.encoders.finetune import contrastive_loss

    model = AlignModel.from_pretrained(str(tiny_model)).eval()
    ids = torch.randint(5, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        logits = out.logits_per_text
        assert torch.allclose(contrastive_loss(logits, ["a", "b", "c", "d"]), out.loss, atol=1e-6)
        # two pairs share a caption: they are positives of each other, not negatives
        aligned = torch.tensor([[9.0, 9.0, 0, 0], [9.0, 9.0, 0, 0], [0, 0, 9.0, 0], [0, 0, 0, 9.0]])
        assert contrastive_loss(aligned, ["x", "x", "c", "d"]) < contrastive_loss(aligned, ["x", "y", "c", "d"])


def test_retrieval_metrics():
    eye = np.eye(6, dtype=np.float32)
    assert retrieval_metrics(eye, eye)["image_to_text_R@1"] == 1.0
    shifted = np.roll(eye, 1, axis=0)
    m = retrieval_metrics(eye, shifted)
    assert m["text_to_image_R@1"] == 0.0 and m["text_to_image_R@5"] == 1.0
    assert "text_to_image_R@10" not in m  # 6 pairs: R@10 would be 1.0 whatever the vectors


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ALIGN from random weights, fine-tuned for a few epochs on generated shapes (~30 s)."""
    base_dir = tmp_path_factory.mktemp("ft")
    base = build_tiny_align(base_dir / "base", image=(72, 64), text_init=0.02)
    write_set(base_dir / "train", all_specs(held_out=False), 12, seed=1)
    (base_dir / "train" / "broken.png").write_bytes(b"not a png")
    (base_dir / "train" / "broken.txt").write_text("a broken image")
    result = CliRunner().invoke(main, ["finetune", str(base_dir / "train"), "--model", str(base), "--out",
                                       str(base_dir / "tuned"), "--epochs", "6", "--batch-size", "48", "--lr", "2e-3",
                                       "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return base_dir, base, result


def test_finetune_saves_a_checkpoint_the_engine_uses(trained, tmp_path):
    base_dir, base, result = trained
    assert "skipped" in result.output and "broken.png" in result.output  # reported, not fatal
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["epoch"] == 6 and "text_to_image_R@10" in metrics
    tuned = base_dir / "tuned"
    assert (tuned / "config.json").exists() and (tuned / "processor_config.json").exists()
    assert (tuned / "checkpoint" / "trainer_state.pt").exists()

    corpus = tmp_path / "corpus"
    truth = write_set(corpus, all_specs(held_out=False), 2, seed=7, captions=False)
    run("index", corpus, "--index", tmp_path / "ix", "--model", tuned, "--device", "cpu")
    colour_hits = chance = 0
    for colour in ("red", "green", "blue", "yellow", "purple"):
        out = json.loads(run("query", colour, "-k", "10", "--json", "--index", tmp_path / "ix").stdout)["results"]
        colour_hits += sum(truth[h["relpath"]].colour == colour for h in out)
        chance += 10 * sum(s.colour == colour for s in truth.values()) / len(truth)
    assert colour_hits >= 2 * chance, (colour_hits, chance)  # well above chance after a short training


def test_resume_continues_from_the_last_epoch(trained):
    base_dir, base, _ = trained
    result = CliRunner().invoke(main, ["finetune", str(base_dir / "train"), "--model", str(base), "--out",
                                       str(base_dir / "tuned"), "--epochs", "7", "--batch-size", "48", "--lr", "2e-3",
                                       "--device", "cpu", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output and "after epoch 6" in result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["epoch"] == 7


def test_resume_with_another_freeze_is_bad_usage_and_writes_nothing(trained):
    """`finetune --resume` with a --freeze other than the training's said the model cannot be loaded (exit 4) after
    loading it: the options differ, which is usage (exit 2), said before anything is trained or written."""
    base_dir, base, _ = trained
    state = base_dir / "tuned" / "checkpoint" / "trainer_state.pt"
    before = state.read_bytes()
    result = CliRunner().invoke(main, ["finetune", str(base_dir / "train"), "--model", str(base), "--out",
                                       str(base_dir / "tuned"), "--epochs", "9", "--batch-size", "48", "--lr", "2e-3",
                                       "--device", "cpu", "--resume", "--freeze", "text"])
    assert result.exit_code == 2, result.output
    assert "it froze no tower, this run freezes text; give the same --freeze" in result.output
    assert state.read_bytes() == before


def test_resume_without_a_checkpoint_refuses_to_replace_the_model_in_out(trained, tmp_path):
    """`finetune --resume` where OUT held a fine-tuned model but no checkpoint (deleted to save space: a copy of the
    model and its optimizer state; or left aside by a save cut short) trained from --model again without a word,
    and its save replaced OUT's weights: the earlier training was lost by asking to continue it. Refused, exit 2,
    before anything is trained; a new or empty OUT has nothing to lose and starts."""
    base_dir, base, _ = trained
    out = tmp_path / "tuned"
    shutil.copytree(base_dir / "tuned", out)
    shutil.rmtree(out / "checkpoint")
    before = (out / "model.safetensors").read_bytes()
    result = CliRunner().invoke(main, ["finetune", str(base_dir / "train"), "--model", str(base), "--out", str(out),
                                       "--epochs", "7", "--batch-size", "48", "--device", "cpu", "--resume"])
    assert result.exit_code == 2, result.output
    assert "holds no checkpoint to continue" in result.output and "epoch" not in result.output
    assert (out / "model.safetensors").read_bytes() == before
    from alignsearch.encoders.finetune import check_resume

    (tmp_path / "empty").mkdir()
    assert not check_resume(tmp_path / "empty") and not check_resume(tmp_path / "new")


def test_bad_data_is_a_clear_error(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["finetune", str(tmp_path / "empty"), "--model", str(tiny_model), "--out", str(tmp_path / "o")])
    assert result.exit_code == 6 and "usable image-caption pairs" in result.output


def test_resume_of_a_finished_training_says_so_and_reports_its_last_epoch(trained):
    """`finetune --resume` with no epoch left (the checkpoint ran as many as --epochs, or more) said only that it
    resumed and printed `{"out": ...}`: no metrics, no word that nothing was trained. It says so, with the --epochs
    that would train further, and prints the last epoch's metrics as a training that ran does."""
    from alignsearch.encoders.finetune import TRAINER_STATE, load_trainer_state

    base_dir, base, _ = trained
    done = int(load_trainer_state(base_dir / "tuned" / "checkpoint" / TRAINER_STATE)["epoch"])
    result = CliRunner().invoke(main, ["finetune", str(base_dir / "train"), "--model", str(base), "--out",
                                       str(base_dir / "tuned"), "--epochs", str(done), "--batch-size", "48",
                                       "--lr", "2e-3", "--device", "cpu", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "nothing left to train" in result.stderr and f"give --epochs above {done}" in result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["epoch"] == done and "loss" in printed and "temperature" in printed


def test_column_options_with_a_folder_are_bad_usage(tmp_path, tiny_model):
    """`finetune FOLDER --image-column foo` trained on the folder's .txt captions and dropped the option without a
    word (it names a column of a CSV, JSONL or parquet file): refused, exit 2, before the model loads."""
    folder = tmp_path / "pairs"
    write_set(folder, all_specs(False)[:3], 1, seed=0)
    for option in ("--image-column", "--caption-column"):
        result = CliRunner().invoke(main, ["finetune", str(folder), "--model", str(tiny_model), "--out",
                                           str(tmp_path / "out"), option, "foo"])
        assert result.exit_code == 2 and "name columns of a CSV, JSONL or parquet file" in result.output, result.output
    assert not (tmp_path / "out").exists()

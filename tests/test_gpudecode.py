"""The GPU JPEG decode stage (indexer/gpudecode.py), its logic run on the CPU with the Pillow decoder
(indexer/jpegdecoders/pillow.py: real JPEGs, real decodes), which needs no torchvision (CI cannot install it beside
its CPU torch); the crops' parity is checked with Pillow and with torchvision's decode_jpeg on the CPU where it is
installed. The test that needs CUDA is marked `gpu` (nvJPEG through torchvision, and nvImageCodec)."""

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from alignsearch.media.images import DECODE_MARGIN, ImageSpec, decode
from indexer import gpudecode, jpegdecoders
from indexer.jpegdecoders.pillow import PillowDecoder
from indexer.scan import Found

SPEC = ImageSpec(resize=(40, 40), resample=int(Image.BILINEAR), crop=(32, 32), rescale_factor=1 / 127.5,
                 rescale_offset=True, mean=None, std=None, include_top_std=None)


def jpeg(arr: np.ndarray, mode: str = "RGB", orientation: int | None = None, quality: int = 92,
         progressive: bool = False) -> bytes:
    img = Image.fromarray(arr).convert(mode)
    out = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[gpudecode.ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    img.save(out, "JPEG", quality=quality, progressive=progressive, **kw)
    return out.getvalue()


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth and asymmetric: a gradient, a block in one corner (a turn or a flip shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, int(rng.integers(0, 255)))], -1)
    arr[: h // 3, : w // 4] = rng.integers(0, 255, 3)
    return arr.astype(np.uint8)


def found(folder: Path, name: str, data: bytes) -> Found:
    path = folder / name
    path.write_bytes(data)
    st = path.stat()
    return Found(str(folder), name, st.st_size, st.st_mtime)


def cpu_item(f: Found):
    from indexer.decode import read_item

    return read_item(f, SPEC)


def gpu_items(files, workers=0, decoder="pillow", **kw):
    reader = gpudecode.read_items(files, SPEC, workers, gpudecode.GpuDecodeOptions(device="cpu", decoder=decoder, **kw))
    return {it.found.relpath: it for it in reader}, reader.stats


@pytest.fixture(params=["pillow", "torchvision"])
def cpu_decoder(request):
    """The stage's decoders that run on the CPU: Pillow always, torchvision where it is installed."""
    why = jpegdecoders.unavailable("cpu", request.param)
    if why:
        pytest.skip(why)
    return request.param


def huffman_zeroed(good: bytes) -> bytes:
    """A JPEG whose first Huffman table is zeroed: decode_jpeg and Pillow refuse it, its header still reads."""
    i = good.find(b"\xff\xc4")
    return good[: i + 4] + bytes(40) + good[i + 44 :]


# -- header decisions, no torchvision needed ------------------------------------------------------------------

def test_probe_sends_what_the_gpu_does_not_read_to_the_cpu():
    good = jpeg(photo(64, 48))
    assert gpudecode.probe(good) == gpudecode.Probe(64, 48, 1, None)
    assert gpudecode.probe(jpeg(photo(64, 48), orientation=6)).orientation == 6
    png = io.BytesIO()
    Image.fromarray(photo(8, 8)).save(png, "PNG")
    assert gpudecode.probe(png.getvalue()).reason == "PNG (not JPEG)"
    assert gpudecode.probe(jpeg(photo(64, 48), mode="CMYK")).reason == "CMYK JPEG"
    big = jpeg(photo(400, 300))
    assert gpudecode.probe(big[: len(big) * 3 // 4]).reason.startswith("no end-of-image marker")
    assert gpudecode.probe(b"not an image").reason == "header not readable"
    assert gpudecode.probe(good, max_pixels=64 * 48 - 1).reason == "too many pixels for the GPU path"
    assert gpudecode.probe(jpeg(photo(64, 48), mode="L")).reason is None  # greys decode to RGB on both paths


@pytest.mark.slow
@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (1000, 700), (320, 240), (6000, 4000)])
def test_draft_factor_is_pillows(size):
    """The reduction the GPU path applies is the scale Pillow's draft decode picks on the CPU path."""
    side = DECODE_MARGIN * max(SPEC.resize)
    img = Image.open(io.BytesIO(jpeg(photo(*size))))
    img.draft("RGB", (side, side))
    f = gpudecode.draft_factor(*size, SPEC)
    assert img.size == ((size[0] + f - 1) // f, (size[1] + f - 1) // f)


def test_choose_says_why_not():
    ok = dict(ocr=False, use_ray=False, spec_problem=None, why_not=lambda: None)
    assert gpudecode.choose(None, "cuda", **ok) == (True, "on")
    assert gpudecode.choose(True, "cuda", **ok) == (True, "on")
    assert gpudecode.choose(False, "cuda", **ok) == (False, "off (--no-gpu-decode)")
    assert gpudecode.choose(None, "cpu", **ok) == (False, "off: the encoder is not on a CUDA device")
    assert gpudecode.choose(None, "cuda", **{**ok, "ocr": True})[1].startswith("off: --ocr")
    assert gpudecode.choose(None, "cuda", **{**ok, "use_ray": True}) == (False, "off: Ray's actors decode")
    assert gpudecode.choose(None, "cuda", **{**ok, "why_not": lambda: "no CUDA device"}) == (False, "off: no CUDA device")
    assert gpudecode.unsupported(SPEC) is None
    assert "filter 1" in gpudecode.unsupported(ImageSpec(**{**SPEC.__dict__, "resample": int(Image.LANCZOS)}))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_as_pillow_does(orientation):
    import torch

    arr = photo(6, 4)
    img = Image.fromarray(arr)
    img.getexif()[gpudecode.ORIENTATION] = orientation
    want = np.asarray(ImageOps.exif_transpose(img))
    got = gpudecode.orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


def test_without_torchvision_the_stage_says_so_and_runs_on_the_cpu_with_pillow(monkeypatch):
    from indexer.jpegdecoders import nvjpeg

    monkeypatch.setattr(nvjpeg, "load", lambda: None)
    monkeypatch.delenv(jpegdecoders.ENV, raising=False)
    jpegdecoders.forget()
    try:
        assert gpudecode.unavailable("cuda").startswith("torchvision is not installed")
        assert gpudecode.unavailable("cpu") is None and jpegdecoders.build("cpu").name == "pillow"
    finally:
        jpegdecoders.forget()


def test_the_decoder_is_picked_by_option_then_environment(monkeypatch):
    assert jpegdecoders.pick(None, "cuda", torchvision_works=False) == "torchvision"  # says why it cannot run
    assert jpegdecoders.pick(None, "cuda:1", torchvision_works=True) == "torchvision"
    assert jpegdecoders.pick(None, "cpu", torchvision_works=True) == "torchvision"
    assert jpegdecoders.pick(None, "cpu", torchvision_works=False) == "pillow"
    assert jpegdecoders.pick("nvimgcodec", "cuda", torchvision_works=True) == "nvimgcodec"
    monkeypatch.setenv(jpegdecoders.ENV, "NVImgCodec")
    assert jpegdecoders.requested(None) == "nvimgcodec" and jpegdecoders.requested("pillow") == "pillow"
    jpegdecoders.forget()
    try:
        assert gpudecode.unavailable("cpu") == "nvImageCodec decodes on a CUDA device, not on cpu"
        assert gpudecode.unavailable("cpu", "pillow") is None
        assert gpudecode.unavailable("cuda", "pillow") == "Pillow decodes on the CPU, not on cuda"
        monkeypatch.setenv(jpegdecoders.ENV, "libjpeg")
        assert gpudecode.unavailable("cuda").startswith("no JPEG decoder is named 'libjpeg'")
        monkeypatch.setenv(jpegdecoders.ENV, "auto")
        assert jpegdecoders.requested(None) is None
    finally:
        jpegdecoders.forget()


def test_the_pillow_decoder_gives_the_whole_picture_as_stored_and_refuses_a_broken_one():
    import torch

    arr = photo(120, 90)
    good, turned, grey = jpeg(arr), jpeg(arr, orientation=6), jpeg(arr, mode="L")
    out = PillowDecoder("cpu").decode([good, turned, grey])
    want = np.asarray(Image.open(io.BytesIO(good)).convert("RGB"))
    assert [tuple(o.shape) for o in out] == [(3, 90, 120)] * 3 and all(o.dtype == torch.uint8 for o in out)
    assert np.array_equal(out[0].permute(1, 2, 0).numpy(), want)
    assert np.array_equal(out[1].numpy(), out[0].numpy())  # not turned: the stage turns by the probe's orientation
    assert np.array_equal(out[2][0].numpy(), out[2][2].numpy())  # grey: three equal planes
    big = jpeg(photo(400, 300))
    for bad in (huffman_zeroed(big), big[: len(big) // 2]):
        with pytest.raises(Exception):
            PillowDecoder("cpu").decode([good, bad])


def test_gpu_decode_on_a_cpu_encoder_is_refused(tmp_path, tiny_model):
    from conftest import run

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(photo(64, 48)))
    out = run("index", folder, "--index", tmp_path / "ix", "--model", tiny_model, "--device", "cpu", "--gpu-decode",
              code=None)
    assert out.exit_code != 0 and "--gpu-decode cannot run here: the encoder is not on a CUDA device" in out.output


# -- the stage, run on the CPU through torchvision ----------------------------------------------------------------

def test_device_crops_match_the_cpu_path_and_orientation_is_honoured(tmp_path, cpu_decoder):
    files = [found(tmp_path, f"o{o}.jpg", jpeg(photo(120, 90, seed=o), orientation=o)) for o in range(1, 9)]
    files.append(found(tmp_path, "big.jpg", jpeg(photo(1000, 760))))  # reduced first (draft factor 4)
    files.append(found(tmp_path, "grey.jpg", jpeg(photo(90, 70), mode="L")))
    files.append(found(tmp_path, "progressive.jpg", jpeg(photo(100, 80), progressive=True)))
    got, stats = gpu_items(files, decoder=cpu_decoder, batch_images=4)
    assert stats.gpu_images == len(files) and stats.cpu_images == 0 and stats.batches == 3
    assert stats.decoder == cpu_decoder
    for f in files:
        item, want = got[f.relpath], cpu_item(f)
        assert (item.width, item.height, item.format, item.sha256) == (want.width, want.height, want.format, want.sha256)
        assert item.photo == want.photo
        crop = item.crop.numpy()
        assert crop.shape == want.crop.shape == (32, 32, 3)
        # an orientation applied wrongly moves the block in the corner: far more than a level or two
        assert np.abs(crop.astype(int) - want.crop.astype(int)).max() <= 2, f.relpath
        bits = bin(int(item.phash[:16], 16) ^ int(want.phash[:16], 16)).count("1")
        assert bits <= 4 and item.phash[17:] == want.phash[17:], (f.relpath, item.phash, want.phash)


@pytest.mark.slow
def test_files_the_gpu_does_not_take_go_to_the_cpu_workers_in_the_same_run(tmp_path):
    """A PNG, a CMYK JPEG, a cut-off JPEG, a JPEG the decoder rejects and a PNG named .jpg, among good JPEGs in
    the same batches: each ends as the CPU path ends it (decoded, or failed with its reason); one worker process
    takes them while the GPU path runs."""
    good = jpeg(photo(400, 300))
    no_tables = huffman_zeroed(good)
    png = io.BytesIO()
    Image.fromarray(photo(70, 50)).save(png, "PNG")
    files = [found(tmp_path, f"good{i}.jpg", jpeg(photo(80 + i, 64, seed=i))) for i in range(5)]
    files.insert(1, found(tmp_path, "shape.png", png.getvalue()))
    files.insert(2, found(tmp_path, "cmyk.jpg", jpeg(photo(60, 40), mode="CMYK")))
    files.insert(3, found(tmp_path, "rejected.jpg", no_tables))
    files.insert(4, found(tmp_path, "cut.jpg", good[: len(good) * 3 // 4]))
    files.insert(5, found(tmp_path, "png-named.jpg", png.getvalue()))
    files.append(found(tmp_path, "missing.jpg", good))
    (tmp_path / "missing.jpg").unlink()
    got, stats = gpu_items(files, workers=1, batch_images=3)
    assert sorted(got) == sorted(f.relpath for f in files)
    for f in files:
        item, want = got[f.relpath], cpu_item(f)
        assert (item.crop is None) == (want.crop is None), f.relpath
        assert item.reason == want.reason, f.relpath
        assert (item.width, item.height, item.format) == (want.width, want.height, want.format), f.relpath
    assert isinstance(got["shape.png"].crop, np.ndarray) and isinstance(got["cmyk.jpg"].crop, np.ndarray)
    assert got["rejected.jpg"].reason.startswith("cannot decode image")
    assert stats.gpu_images == 5 and stats.read_failed == 1
    assert stats.to_cpu == {"not a JPEG by name": 1, "CMYK JPEG": 1, "rejected by the GPU decoder": 1,
                            "no end-of-image marker (cut off, or data after it)": 1, "PNG (not JPEG)": 1}


def test_a_batch_the_decoder_rejects_is_retried_file_by_file_and_only_the_bad_file_goes_to_the_cpu(tmp_path,
                                                                                                   monkeypatch):
    """One broken JPEG (its header reads, so it reaches the decoder) among good ones in one batch: the batch's
    decode fails, each file is decoded alone, the good ones stay on the stage's path and only the broken one is
    handed to a CPU worker process, which fails it with the CPU path's reason."""
    calls = []
    decode = PillowDecoder.decode

    def counted(self, datas):
        calls.append(len(datas))
        return decode(self, datas)

    monkeypatch.setattr(PillowDecoder, "decode", counted)
    files = [found(tmp_path, f"good{i}.jpg", jpeg(photo(90 + 10 * i, 70, seed=i))) for i in range(4)]
    files.insert(2, found(tmp_path, "broken.jpg", huffman_zeroed(jpeg(photo(400, 300)))))
    assert gpudecode.probe((tmp_path / "broken.jpg").read_bytes()).reason is None
    got, stats = gpu_items(files, workers=1, batch_images=8)
    assert calls == [5, 1, 1, 1, 1, 1]  # the batch, then each of its files alone
    assert stats.batches == 1 and stats.gpu_images == 4 and stats.cpu_images == 1
    assert stats.to_cpu == {"rejected by the GPU decoder": 1}
    import torch

    for f in files[:2] + files[3:]:
        item, want = got[f.relpath], cpu_item(f)
        assert isinstance(item.crop, torch.Tensor) and item.reason is None, f.relpath  # the stage's crop
        assert np.abs(item.crop.numpy().astype(int) - want.crop.astype(int)).max() <= 2, f.relpath
    broken = got["broken.jpg"]
    assert broken.crop is None and broken.reason == cpu_item(files[2]).reason
    assert broken.reason.startswith("cannot decode image")


def test_when_the_device_fails_the_files_go_to_the_cpu(tmp_path, monkeypatch):
    """Out of GPU memory while resizing (say): the batch's files are decoded by the CPU path, none is lost."""

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpudecode, "crop_on_device", out_of_memory)
    files = [found(tmp_path, f"p{i}.jpg", jpeg(photo(60, 40, seed=i))) for i in range(5)]
    got, stats = gpu_items(files, batch_images=2)
    assert sorted(got) == sorted(f.relpath for f in files)
    assert all(isinstance(it.crop, np.ndarray) and it.reason is None for it in got.values())
    assert stats.gpu_images == 0 and stats.to_cpu == {"GPU resize failed": 5}


def test_a_batch_mixing_device_and_cpu_crops_encodes_as_one(tmp_path, tiny_model):
    from alignsearch.encoders.model import Encoder
    from indexer.pipeline import stack_crops

    files = [found(tmp_path, "a.jpg", jpeg(photo(90, 60))), found(tmp_path, "b.jpg", jpeg(photo(60, 90, seed=3)))]
    png = io.BytesIO()
    Image.fromarray(photo(70, 50)).save(png, "PNG")
    files.append(found(tmp_path, "c.png", png.getvalue()))
    got, _ = gpu_items(files)
    crops = [got[f.relpath].crop for f in files]
    stacked = stack_crops(crops)
    assert tuple(stacked.shape) == (3, 32, 32, 3) and str(stacked.dtype) == "torch.uint8"
    enc = Encoder(str(tiny_model), "cpu", precision="fp32", backend="torch")
    from_cpu = enc.encode_crops(np.stack([cpu_item(f).crop for f in files]))
    assert (enc.encode_crops(stacked) * from_cpu).sum(axis=1).min() > 0.999


@pytest.mark.slow
def test_reads_stay_bounded_while_the_encoder_is_slow(tmp_path):
    files = [found(tmp_path, f"p{i:03d}.jpg", jpeg(photo(48, 40, seed=i))) for i in range(120)]
    opts = dict(batch_images=2, queue_batches=1, threads=2, decoder="pillow")
    reader = gpudecode.read_items(files, SPEC, 0, gpudecode.GpuDecodeOptions(device="cpu", **opts))
    seen = 0
    for _ in reader:
        seen += 1
        time.sleep(0.01)  # the encoder, slower than the reads
    bound = gpudecode.ahead_bound(gpudecode.GpuDecodeOptions(device="cpu", **opts))
    assert seen == 120 and bound == 2 * 4 + 2 * 7
    assert 0 < reader.stats.max_ahead <= bound
    assert reader.stats.feeder_wait > 0  # the feeder waited for room: the queues were full


def test_stopping_early_ends_the_threads(tmp_path):
    import threading

    files = [found(tmp_path, f"p{i:03d}.jpg", jpeg(photo(48, 40, seed=i))) for i in range(60)]
    reader = iter(gpudecode.read_items(files, SPEC, 0, gpudecode.GpuDecodeOptions(device="cpu", batch_images=2,
                                                                                  decoder="pillow")))
    next(reader)
    reader.close()
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name.startswith("gpudecode-") and t.is_alive()]


def test_index_through_the_gpu_stage_matches_the_cpu_path(tmp_path, tiny_model, monkeypatch):
    """`index` with the stage chosen (run on the CPU here): the same files indexed, failed and described, and
    vectors at cosine > 0.999 to the CPU decode's; the run reports the stage's figures. The decoder is chosen
    through the environment, as a user would choose nvImageCodec."""
    import sqlite3

    from conftest import index_json
    from alignsearch.storage import catalog, state, vectors as vec
    from indexer import job

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        (folder / f"p{i}.jpg").write_bytes(jpeg(photo(100 + 10 * i, 80, seed=i), orientation=1 + i % 8))
    Image.fromarray(photo(50, 40)).save(folder / "x.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")

    def indexed(ix):
        db = sqlite3.connect(ix / "catalog.db")
        rows = db.execute("SELECT relpath, status, width, height, format, vec_row, phash FROM files LEFT JOIN phashes "
                          "ON phashes.file_id = files.id ORDER BY relpath").fetchall()
        db.close()
        engine = catalog.connect(ix / "catalog.db")
        with engine.connect() as conn:
            store = vec.load(conn, ix, state.read(conn).model.dim)
        engine.dispose()
        return rows, store

    cpu = index_json(tmp_path / "cpu", folder, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    assert "gpu_decode" not in cpu["times"]["extra"]
    monkeypatch.setattr(job, "_gpu_decode", lambda opts, encoder: "on (test: on the CPU)")
    monkeypatch.setenv(jpegdecoders.ENV, "pillow")
    gpu = index_json(tmp_path / "gpu", folder, "--model", tiny_model, "--device", "cpu", "--workers", "0")
    stage = gpu["times"]["extra"]["gpu_decode"]
    assert stage["gpu_images"] == 6 and stage["cpu_images"] == 2 and stage["note"] == "on (test: on the CPU)"
    assert stage["decoder"] == "pillow"
    assert (gpu["added"], gpu["failed"]) == (cpu["added"], cpu["failed"]) == (7, 1)
    (rows_c, store_c), (rows_g, store_g) = indexed(tmp_path / "cpu"), indexed(tmp_path / "gpu")
    assert [r[:5] for r in rows_c] == [r[:5] for r in rows_g]
    for rc, rg in zip(rows_c, rows_g):
        if rc[5] is not None:
            assert float(store_c.get(np.array([rc[5]]))[0] @ store_g.get(np.array([rg[5]]))[0]) > 0.999, rc[0]
            assert rg[6] is not None


@pytest.mark.slow
def test_parity_on_real_photos(tmp_path, tiny_model, capsys, cpu_decoder):
    """scikit-image's photographs at camera and web size: the GPU path's embeddings against the exact CPU
    path's with the tiny model (the real model's figure is measured on the GPU: benchmarks/bench_index.py)."""
    data = pytest.importorskip("skimage.data")
    from alignsearch.encoders.model import Encoder

    files = []
    for name in ("astronaut", "coffee", "chelsea"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        for w, h in ((4000, 3000), (1280, 960)):
            buf = io.BytesIO()
            img.resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
            files.append(found(tmp_path, f"{name}-{w}.jpg", buf.getvalue()))
    got, stats = gpu_items(files, decoder=cpu_decoder)
    assert stats.gpu_images == len(files)
    enc = Encoder(str(tiny_model), "cpu", precision="fp32", backend="torch")
    crops = np.stack([got[f.relpath].crop.numpy() for f in files])
    exact = np.stack([decode((tmp_path / f.relpath).read_bytes(), enc.spec).crop for f in files])
    cosine = (enc.encode_crops(crops) * enc.encode_crops(exact)).sum(axis=1)
    diff = np.abs(crops.astype(int) - exact.astype(int))
    with capsys.disabled():
        print(f"\nGPU-path logic on the CPU ({cpu_decoder}) vs the exact decode, {len(files)} photos: cosine min {cosine.min():.6f} "
              f"mean {cosine.mean():.6f}; pixels differ by {diff.mean():.3f} levels on average, max {diff.max()}")
    assert cosine.min() >= 0.999 and diff.max() <= 2


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["torchvision", "nvimgcodec"])
def test_on_cuda_the_crops_stay_on_the_device_and_match(tmp_path, tiny_model, decoder):
    torch = pytest.importorskip("torch")
    if gpudecode.unavailable("cuda", decoder):
        pytest.skip(f"needs CUDA with {decoder}: {gpudecode.unavailable('cuda', decoder)}")
    from alignsearch.encoders.model import Encoder

    files = [found(tmp_path, f"p{i}.jpg", jpeg(photo(640 + 40 * i, 480, seed=i), orientation=1 + i % 8))
             for i in range(10)]
    files.append(found(tmp_path, "cmyk.jpg", jpeg(photo(60, 40), mode="CMYK")))
    files.append(found(tmp_path, "progressive.jpg", jpeg(photo(400, 300), progressive=True)))  # either path
    reader = gpudecode.read_items(files, SPEC, 0, gpudecode.GpuDecodeOptions(device="cuda", batch_images=4,
                                                                             decoder=decoder))
    got = {it.found.relpath: it for it in reader}
    assert reader.stats.decoder == decoder
    assert reader.stats.gpu_images + reader.stats.cpu_images == 12 and reader.stats.cpu_images in (1, 2)
    assert all(got[f"p{i}.jpg"].crop.device.type == "cuda" for i in range(10))
    for f in files:
        want = cpu_item(f).crop
        crop = got[f.relpath].crop
        crop = crop.cpu().numpy() if not isinstance(crop, np.ndarray) else crop
        assert np.abs(crop.astype(int) - want.astype(int)).max() <= 3, f.relpath  # nvJPEG's IDCT is not libjpeg's
    enc = Encoder(str(tiny_model), "cuda", precision="fp32")
    on_device = enc.encode_crops(torch.stack([got[f"p{i}.jpg"].crop for i in range(10)]))
    exact = enc.encode_crops(np.stack([cpu_item(files[i]).crop for i in range(10)]))
    assert (on_device * exact).sum(axis=1).min() > 0.999

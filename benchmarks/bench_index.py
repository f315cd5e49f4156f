"""Indexing throughput, whole process, against the naive transformers loop run alongside.

    python benchmarks/bench_index.py [--images 64] [--repeats 3] [--device cpu]
    python benchmarks/bench_index.py --gpu-decode --corpus camera --images 2000 --device cuda --parity 16 --out DIR

Both sides start a fresh process, load the same checkpoint (align-base geometry, random weights)
and encode the same generated JPEGs; ours also writes the catalog, vectors and FAISS index.

--gpu-decode (issue 29) measures, in one run over photographs made from scikit-image's samples (--corpus camera:
12 MP, web: ~1 MP), `index --gpu-decode` against `index --no-gpu-decode` (today's CPU decode) and the naive loop,
the GPU decode stage alone, and (--parity N) the embeddings of N pictures through the GPU decode against the exact
CPU decode; with the GPU's utilisation during each, and where the time went. --decoders torchvision,nvimgcodec
measures each JPEG decoder of the stage (indexer/jpegdecoders: index, the stage alone, parity), one that is not
installed being reported as such ("auto": the one `index` picks). Each stage is guarded: one that
fails or runs out of time is reported as such and the others still are; the figures go to --out DIR as they
come (results-CORPUS.json, results.md). --smoke runs it all small with the tests' tiny model (records nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE, HERE, GpuUtil, align_base_checkpoint, commit, jpeg_corpus, machine, photo_corpus, record


def timed(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--precision", default=None, help="also measure `index --precision P` (bf16, fp32...)")
    ap.add_argument("--also", action="append", default=[], metavar="ARGS",
                    help="also measure `index ARGS` (repeatable), e.g. --also='--backend onnx'")
    ap.add_argument("--backend", default="auto", help="ours: --backend (auto: ONNX Runtime on CPU, torch on GPU)")
    ap.add_argument("--fast-decode", action="store_true", help="also measure `index --fast-decode` and its cosine to exact")
    ap.add_argument("--gpu-decode", action="store_true",
                    help="issue 29's run: index --gpu-decode against --no-gpu-decode and the naive loop (module doc)")
    ap.add_argument("--corpus", choices=["mixed", "camera", "web"], default="mixed",
                    help="mixed: generated shapes 640x480 to 4000x3000; camera/web: scikit-image's photographs")
    ap.add_argument("--naive-images", type=int, default=None, help="with --gpu-decode: the naive loop over the first N")
    ap.add_argument("--parity", type=int, default=0, help="with --gpu-decode: embeddings of N pictures, GPU vs CPU decode")
    ap.add_argument("--decoders", default="auto", help="with --gpu-decode: the stage's JPEG decoders to measure, "
                    "comma-separated (torchvision, nvimgcodec, pillow; auto: the one index picks)")
    ap.add_argument("--model", default=None, help="the checkpoint (default: align-base geometry, random weights; "
                    "--parity uses a real align-base when one is on the machine)")
    ap.add_argument("--stage-timeout", type=float, default=240, help="with --gpu-decode: seconds for each stage")
    ap.add_argument("--out", default=None, help="with --gpu-decode: where results-CORPUS.json and results.md go")
    ap.add_argument("--smoke", action="store_true", help="with --gpu-decode: tiny model, small pictures, records nothing")
    ap.add_argument("--skip-warm-up", action="store_true",
                    help="with --gpu-decode: no warm-up run (an earlier run filled the export cache already)")
    args = ap.parse_args()

    if args.gpu_decode:
        gpu_decode_run(args)
        return
    model = align_base_checkpoint()
    corpus = jpeg_corpus(args.images)
    naive, ours, stages, fast = [], [], [], []

    def index_once(*extra) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory() as index_dir:
            cmd = [sys.executable, "-m", "alignsearch", "index", str(corpus), "--index", index_dir, "--model", str(model),
                   "--device", args.device, "--batch-size", str(args.batch_size), "--backend", args.backend, "--json", *extra]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            t, out = timed(cmd)
        summary = json.loads(out)
        return t, {**summary["times"], "encoder": summary.get("encoder")}

    t_first, first = index_once()  # untimed warm-up: fills the ONNX cache (an export, once per model) and page cache
    variants = [("--precision " + args.precision, ["--precision", args.precision])] if args.precision else []
    variants += [(extra, extra.split()) for extra in args.also]
    other: dict[str, list] = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        t, _ = timed([sys.executable, str(HERE / "naive_loop.py"), str(model), str(corpus), str(args.batch_size),
                      "cuda" if args.device.startswith("cuda") else "cpu"])
        naive.append(t)
        t, times = index_once()
        ours.append(t)
        stages.append(times)
        for name, extra in variants:
            other[name].append(index_once(*extra))
        if args.fast_decode:
            fast.append(index_once("--fast-decode"))
    n = args.images
    med_naive, med_ours = statistics.median(naive), statistics.median(ours)

    def stage(key, runs=stages):
        return statistics.median(s[key] if key in s else s["extra"][key] for s in runs)

    def variant_line(name, runs) -> str:
        med = statistics.median(t for t, _ in runs)
        st = [times for _, times in runs]
        return (f"- alignsearch index {name}: {med:.1f} s, {n / med:.2f} images/s, {med_naive / med:.2f}x the naive loop; "
                f"encode {stage('encode', st):.1f} s ({n / max(stage('encode', st), 1e-9):.1f} images/s in the encoder), "
                f"waiting on decode {stage('read_wait', st):.1f} s")

    record(
        f"Indexing throughput, {n} JPEGs (640x480 to 4000x3000), align-base geometry with random weights, {args.device}",
        [
            f"- runs: {args.repeats}, batch size {args.batch_size}; medians of whole-process wall time (model load included)",
            f"- encoder that ran: {first['encoder'] if 'encoder' in first else 'torch (before backends)'}; first run "
            f"(exports the ONNX towers when the cache is empty): {t_first:.1f} s",
            f"- naive loop (AlignProcessor + AlignModel, one process): {med_naive:.1f} s, {n / med_naive:.2f} images/s",
            f"- alignsearch index: {med_ours:.1f} s, {n / med_ours:.2f} images/s",
            f"- ratio: {med_naive / med_ours:.2f}x",
            f"- alignsearch stages (median s): waiting on decode {stage('read_wait'):.1f}, decode in workers "
            f"{stage('decode_worker'):.1f} (overlapped), encode {stage('encode'):.1f} ({n / max(stage('encode'), 1e-9):.1f} "
            f"images/s in the encoder), write {stage('write'):.2f}, index build {stage('index_build'):.2f}, "
            f"pipeline wall {stage('wall'):.1f}",
            f"- all runs naive: {', '.join(f'{t:.1f}' for t in naive)}; ours: {', '.join(f'{t:.1f}' for t in ours)}",
        ] + [variant_line(name, runs) for name, runs in other.items()]
        + (fast_lines(fast, n, med_naive, model, corpus, args.device) if fast else []),
    )


def fast_lines(fast, n, med_naive, model, corpus, device) -> list[str]:
    """`--fast-decode` figures, and how far its embeddings move from the exact decode's."""
    import numpy as np

    from alignsearch.media.images import decode
    from alignsearch.encoders.model import Encoder

    med = statistics.median(t for t, _ in fast)
    decode_s = statistics.median(times["decode_worker"] for _, times in fast)
    enc = Encoder(str(model), device, precision="fp32")
    data = [p.read_bytes() for p in sorted(corpus.glob("*.jpg"))[:16]]
    exact_crops = np.stack([decode(d, enc.spec).crop for d in data])
    fast_crops = np.stack([decode(d, enc.spec, fast=True).crop for d in data])
    cosine = (enc.encode_crops(exact_crops) * enc.encode_crops(fast_crops)).sum(axis=1)
    diff = np.abs(exact_crops.astype(int) - fast_crops.astype(int))
    return [f"- alignsearch index --fast-decode: {med:.1f} s, {n / med:.2f} images/s, {med_naive / med:.2f}x the naive loop; "
            f"decode in workers {decode_s:.1f} s; embedding cosine to the exact decode (16 images, random weights): "
            f"min {cosine.min():.4f}, mean {cosine.mean():.4f}; crop pixels differ by {diff.mean():.2f} levels on "
            f"average (p99 {np.percentile(diff, 99):.0f}, max {diff.max()})"]


def real_model() -> str | None:
    """A real align-base on this machine (Hugging Face's cache, or $ALIGNSEARCH_REAL_MODEL), else None."""
    named = os.environ.get("ALIGNSEARCH_REAL_MODEL")
    if named and Path(named, "config.json").exists():
        return named
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    for snapshot in sorted(hub.glob("models--kakaobrain--align-base/snapshots/*")):
        if (snapshot / "config.json").exists():
            return str(snapshot)
    return None


def gpu_decode_run(args) -> None:
    """Issue 29's measurement (module doc): each stage guarded, the figures written as they come."""
    from indexer import gpudecode, jpegdecoders

    if args.smoke:
        os.environ["ALIGNSEARCH_BENCH_DRY"] = "1"  # record() prints, RESULTS.md is left alone
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-index-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"corpus": args.corpus, "images": args.images, "device": args.device, "stages": {}}
    save = lambda: (out / f"results-{args.corpus}.json").write_text(json.dumps(results, indent=2, default=str))  # noqa: E731

    def stage(name, fn):
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {args.corpus}: {name}", file=sys.stderr, flush=True)
        try:
            with GpuUtil() as util:
                value = fn()
            results["stages"][name] = {**value, "gpu_util": util.summary()}
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one stage's failure never loses the others' figures
            results["stages"][name] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
        results["stages"][name]["stage_seconds"] = round(time.perf_counter() - start, 2)
        save()
        return results["stages"][name]

    def finish(n: int) -> None:
        lines = summary_lines(results, n)
        record(f"GPU JPEG decode (issue 29): {n} {args.corpus} JPEGs from scikit-image's photographs, {args.device}", lines)
        with open(out / "results.md", "a") as f:
            f.write(f"## {args.corpus}: {n} JPEGs, {args.device}\n\n- machine: {machine()}\n- commit: {commit()}\n"
                    + "\n".join(lines) + "\n\n")

    built = stage("model", lambda: {"path": str(checkpoint(args))})
    size = (400, 300) if args.smoke and args.corpus == "camera" else (160, 100) if args.smoke else None
    made = stage("corpus", lambda: {"folder": str(corpus_for(args, size))})
    if "error" in built or "error" in made:
        finish(0)
        return
    model, corpus = Path(built["path"]), Path(made["folder"])
    files = sorted(corpus.glob("*.jpg"))
    results["corpus_bytes_mean"] = round(sum(p.stat().st_size for p in files) / len(files))
    n = len(files)
    cuda = args.device.startswith("cuda")

    def index_run(*extra, folder: Path = corpus, decoder: str | None = None) -> dict:
        with tempfile.TemporaryDirectory() as index_dir:
            cmd = [sys.executable, "-m", "alignsearch", "index", str(folder), "--index", index_dir, "--model", str(model),
                   "--device", args.device, "--batch-size", str(args.batch_size), "--json", *extra]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            env = {**os.environ, jpegdecoders.ENV: decoder} if decoder else None
            seconds, text = timed(cmd, args.stage_timeout, env)
        summary = json.loads(text)
        times = summary["times"]
        return {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
                "pipeline_images_per_s": round(n / max(times["wall"], 1e-9), 1), "times": times,
                "encoder": summary.get("encoder"), "added": summary["added"], "failed": summary["failed"]}

    gpu_flag = "--gpu-decode" if cuda else "--no-gpu-decode"  # a CPU-only smoke run has no GPU stage to run
    if not (args.smoke or args.skip_warm_up):  # fills the ONNX text export cache `index` ends with, once
        stage("warm_up", lambda: index_run(gpu_flag, folder=photo_corpus(args.corpus, 32, size=size)))
    device = "cuda" if cuda else "cpu"
    decoders = list(dict.fromkeys(jpegdecoders.chosen(device) if name == "auto" else name
                                  for name in args.decoders.replace(" ", "").split(",") if name))
    results["decoders"] = {name: gpudecode.unavailable(device, name) or "works" for name in decoders}
    save()
    for name in decoders:  # the first is the default's: the one the warm-up ran
        stage(f"index_gpu_decode:{name}", lambda: usable(name, device) and index_run("--gpu-decode", decoder=name))
    stage("index_cpu_decode", lambda: index_run("--no-gpu-decode"))
    for name in decoders:
        stage(f"decode_alone:{name}", lambda: usable(name, device) and decode_alone(corpus, model, args, name))
        if args.parity:
            stage(f"parity:{name}", lambda: usable(name, device) and parity(corpus, model, args, name))
    stage("naive_loop", lambda: naive(corpus, model, args))
    finish(n)


def usable(decoder: str, device: str) -> bool:
    """True, or the decoder's reason it does not run here raised (its stage then reports it)."""
    from indexer import gpudecode

    why = gpudecode.unavailable(device, decoder)
    if why:
        raise RuntimeError(f"{decoder} not available: {why}")
    return True


def checkpoint(args) -> Path:
    """The tests' tiny model (--smoke), --model, or align-base's geometry with random weights (built once)."""
    if args.smoke:
        from tiny_align import build_tiny_align

        model = CACHE / "tiny-align"
        if not (model / "config.json").exists():
            build_tiny_align(model)
        return model
    return Path(args.model) if args.model else align_base_checkpoint()


def corpus_for(args, size) -> Path:
    return photo_corpus(args.corpus, args.images, size=size) if args.corpus != "mixed" else jpeg_corpus(args.images)


def naive(corpus: Path, model: Path, args) -> dict:
    limit = args.naive_images or args.images
    seconds, text = timed([sys.executable, str(HERE / "naive_loop.py"), str(model), str(corpus), str(args.batch_size),
                           "cuda" if args.device.startswith("cuda") else "cpu", str(limit)], args.stage_timeout)
    found = re.search(r"(\d+) images in [\d.]+s \(loading ([\d.]+)s, loop ([\d.]+)s\)", text)
    count, loading, loop = int(found[1]), float(found[2]), float(found[3])
    return {"images": count, "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1),
            "loop_images_per_s": round(count / max(loop, 1e-9), 1), "loading_seconds": loading}


def decode_alone(corpus: Path, model: Path, args, decoder: str) -> dict:
    """The GPU decode stage over the corpus with no encoder behind it: the most it can feed one."""
    from alignsearch.encoders.model import load_image_spec
    from indexer import gpudecode
    from indexer.scan import Found

    device = "cuda" if args.device.startswith("cuda") else "cpu"
    spec = load_image_spec(str(model), local_files_only=True)
    files = [Found(str(corpus), p.name, p.stat().st_size, p.stat().st_mtime) for p in sorted(corpus.glob("*.jpg"))]
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    start = time.perf_counter()
    reader = gpudecode.read_items(files, spec, workers, gpudecode.GpuDecodeOptions(device=device, decoder=decoder))
    count = sum(1 for _ in reader)
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1),
            "stats": reader.stats.to_dict()}


def parity(corpus: Path, model: Path, args, decoder: str) -> dict:
    """Embeddings of the corpus's first --parity pictures (distinct ones) decoded on the GPU by `decoder` against
    the exact CPU decode: fp32 both (the decode's own difference) and the GPU's in bf16 (what `index` runs there)."""
    import numpy as np

    from alignsearch.encoders.model import Encoder
    from alignsearch.media.images import decode
    from indexer import gpudecode
    from indexer.decode import read_item
    from indexer.scan import Found

    real = real_model()
    name = real or str(model)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    files = [p for p in sorted(corpus.glob("*.jpg")) if p.name.endswith("-00000.jpg")][: args.parity]
    found = [Found(str(corpus), p.name, p.stat().st_size, p.stat().st_mtime) for p in files]
    enc = Encoder(name, device, precision="fp32")
    options = gpudecode.GpuDecodeOptions(device=device, decoder=decoder)
    got = {it.found.relpath: it for it in gpudecode.read_items(found, enc.spec, 0, options)}
    gpu_crops = [got[f.relpath].crop for f in found]
    import torch

    on_device = torch.stack([c if isinstance(c, torch.Tensor) else torch.from_numpy(c) for c in gpu_crops]).to(device)
    exact = np.stack([decode(p.read_bytes(), enc.spec).crop for p in files])
    cos = (enc.encode_crops(on_device) * enc.encode_crops(exact)).sum(axis=1)
    bf16 = Encoder(name, device, precision="bf16") if device == "cuda" else None
    cos_bf16 = (bf16.encode_crops(on_device) * enc.encode_crops(exact)).sum(axis=1) if bf16 else None
    diff = np.abs(on_device.cpu().numpy().astype(int) - exact.astype(int))
    bits = [bin(int(got[f.relpath].phash[:16], 16) ^ int(read_item(f, enc.spec).phash[:16], 16)).count("1") for f in found]
    return {"model": name, "real_model": real is not None, "pictures": len(files),
            "cosine_fp32": {"min": float(cos.min()), "mean": float(cos.mean())},
            "cosine_gpu_bf16_vs_exact_fp32": None if cos_bf16 is None else {"min": float(cos_bf16.min()),
                                                                            "mean": float(cos_bf16.mean())},
            "pixel_levels": {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)), "max": int(diff.max())},
            "phash_bits_differing": {"max": max(bits), "mean": float(np.mean(bits))}}


def summary_lines(results: dict, n: int) -> list[str]:
    """The markdown block: each stage's figure, or why it has none."""
    st = results["stages"]

    def get(name):
        return st.get(name, {"error": "not run"})

    def util(s):
        u = s.get("gpu_util")
        return f"GPU {u['mean_pct']:.0f}% mean, {u['peak_pct']:.0f}% peak" if u else "GPU utilisation not sampled"

    lines = [f"- corpus: {n} JPEGs, {results.get('corpus_bytes_mean', 0) / 1e6:.2f} MB each on average"]
    lines += [f"- {name}: failed ({st[name]['error'][:300]})" for name in ("model", "corpus", "warm_up")
              if "error" in st.get(name, {})]
    decoders = list(results.get("decoders", {}))
    runs = [(f"index_gpu_decode:{d}", f"alignsearch index --gpu-decode ({d})") for d in decoders]
    for name, label in runs + [("index_cpu_decode", "alignsearch index --no-gpu-decode (CPU decode)")]:
        s = get(name)
        if "error" in s:
            lines.append(f"- {label}: no figure ({s['error'][:300]})")
            continue
        t = s["times"]
        extra = t.get("extra", {}).get("gpu_decode")
        lines.append(f"- {label}: {s['seconds']:.1f} s whole process, {s['images_per_s']:.0f} images/s; pipeline "
                     f"{t['wall']:.1f} s, {s['pipeline_images_per_s']:.0f} images/s; waiting on decode {t['read_wait']:.1f} s, "
                     f"encode {t['encode']:.1f} s, write {t['write']:.2f} s, decode seconds {t['decode_worker']:.1f}; "
                     f"{util(s)}; failed {s['failed']}")
        if extra:
            lines.append(f"  - GPU stage: {json.dumps(extra)}")
    for d in decoders:
        s = get(f"decode_alone:{d}")
        lines.append(f"- GPU decode stage alone ({d}, no encoder): {s['images_per_s']:.0f} images/s; {util(s)}; "
                     f"{json.dumps(s['stats'])}" if "error" not in s else
                     f"- GPU decode stage alone ({d}): no figure ({s['error'][:300]})")
    s = get("naive_loop")
    lines.append(f"- naive loop (AlignProcessor + AlignModel) over the first {s['images']}: {s['seconds']:.1f} s, "
                 f"{s['images_per_s']:.1f} images/s whole process, {s['loop_images_per_s']:.1f} in its loop; {util(s)}"
                 if "error" not in s else f"- naive loop: no figure ({s['error'][:300]})")
    for d in [d for d in decoders if f"parity:{d}" in st]:
        s = st[f"parity:{d}"]
        if "error" in s:
            lines.append(f"- parity ({d}): no figure ({s['error'][:300]})")
        else:
            which = ("the real align-base" if s["real_model"] else
                     f"{Path(s['model']).name}, RANDOM weights (no real align-base on this machine)")
            lines.append(f"- parity ({d}), {s['pictures']} pictures, {which}: cosine GPU decode vs exact CPU decode (fp32) min "
                         f"{s['cosine_fp32']['min']:.5f}, mean {s['cosine_fp32']['mean']:.5f}; bf16 on the GPU vs exact fp32: "
                         f"{s['cosine_gpu_bf16_vs_exact_fp32']}; crop pixels {s['pixel_levels']}; phash bits "
                         f"{s['phash_bits_differing']}")
    return lines


if __name__ == "__main__":
    main()

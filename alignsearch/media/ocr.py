"""Text in images: RapidOCR (PP-OCR detection + recognition models shipped in its wheel, on ONNX Runtime).

`alignsearch index --ocr` reads the words in every image in the decode workers (indexer/decode.py) and stores
them per file (catalog `photos.ocr`), where the keyword index finds them like a caption. The engine is an
optional extra: `pip install "alignsearch[ocr]"`.

Images without text are cheap: the detector finds no box and the recogniser never runs. The detector sees the
image scaled so its longer side is at most DET_SIDE pixels (PaddleOCR's own default), so its cost does not grow
with camera resolution; text that is small next to the whole picture shrinks with it and may be missed.

This module imports neither torch nor rapidocr at the top: decode workers import it.
"""

from __future__ import annotations

import logging
import os
import re

from alignsearch.errors import BadInputError

log = logging.getLogger(__name__)

# Recognised fragments (one text line each) below this confidence are dropped. Measured (bench_ocr's images):
# on 24 camera-size photos without text the detector's odd boxes came back as 29 fragments, those of two or more
# characters all below 0.74 ("OC" 0.60, "00" 0.66, "__" 0.73); the 70 lines of the rendered signs scored 0.963+.
MIN_CONFIDENCE = 0.75
# A fragment needs this many letters or digits: single characters came back confident from those boxes ("O"
# 0.79, "8" 0.88), and no search is for one character.
MIN_CHARS = 2
_WORD = re.compile(r"\w", re.UNICODE)
# ALIGNSEARCH_OCR_SIDE=736 costs about a third less on photos and misses more small text (benchmarks/RESULTS.md).
DET_SIDE = int(os.environ.get("ALIGNSEARCH_OCR_SIDE", "960"))  # the detector's input: longer side at most this
MISSING = "text in images needs the OCR engine: pip install 'alignsearch[ocr]'"

_engine = None  # one per process (a decode worker loads it on its first image)


class EngineUnavailable(Exception):
    """The engine could not start in this process (not installed, its models missing, ONNX Runtime out of
    memory): no fault of the image it was asked to read."""


def check_available() -> None:
    """Raise the one-line error naming the extra when the engine is not installed (before anything runs)."""
    try:
        import rapidocr  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        raise BadInputError(MISSING) from None


def _get_engine():
    global _engine
    if _engine is None:
        try:
            from rapidocr import RapidOCR
        except Exception:  # noqa: BLE001
            raise BadInputError(MISSING) from None
        for name in ("RapidOCR", "rapidocr"):  # its INFO lines would flood every index run
            logging.getLogger(name).setLevel(logging.ERROR)
        threads = int(os.environ.get("ALIGNSEARCH_OCR_THREADS", "1"))  # one per decode worker: workers are the parallelism
        _engine = RapidOCR(params={
            "Global.log_level": "error",
            "Global.use_cls": False,  # upside-down text is rare in photos; the angle classifier costs a pass per line
            "Global.text_score": MIN_CONFIDENCE,
            "Det.limit_type": "max",
            "Det.limit_side_len": DET_SIDE,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        })
    return _engine


def read_text(image) -> str:
    """The text in a decoded RGB PIL image: its confident fragments, one line each, in reading order as the
    detector returns them; "" when there is none."""
    if image is None or min(image.size) < 8:
        return ""
    try:
        engine = _get_engine()
    except Exception as exc:  # whatever stops it starting, it is the engine's, not the image's
        raise EngineUnavailable(str(exc) or type(exc).__name__) from exc
    result = engine(image)
    texts, scores = getattr(result, "txts", None), getattr(result, "scores", None)
    if not texts:
        return ""
    lines = [t.strip() for t, s in zip(texts, scores) if s >= MIN_CONFIDENCE and len(_WORD.findall(t)) >= MIN_CHARS]
    return "\n".join(lines)

"""Query vectors and their fusion (compose, slerp, late-fusion scorers, reciprocal rank fusion): pure numpy,
no model, no index."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError("the query vector is zero: the weights cancel each other out")
    return (v / norm).astype(np.float32)


def compose(
    text: np.ndarray | None = None,
    image: np.ndarray | None = None,
    negative: np.ndarray | None = None,
    text_weight: float = 2.0,
    image_weight: float = 1.0,
    negative_weight: float = 1.0,
) -> np.ndarray:
    """The ALIGN paper's compound query: normalise each part, weighted sum, subtract the negative,
    normalise the result. A lone text or image is simply its own unit vector."""
    parts = []
    if text is not None:
        parts.append((text_weight if image is not None else 1.0) * unit(text))
    if image is not None:
        parts.append((image_weight if text is not None else 1.0) * unit(image))
    if not parts:
        raise ValueError("a query needs text, an image, or both")
    if negative is not None:
        parts.append(-negative_weight * unit(negative))
    return unit(np.sum(parts, axis=0))


RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009; what Elasticsearch and others use)


def fuse(*rankings: list[int], k: int = RRF_K) -> list[int]:
    """Reciprocal rank fusion: each id scores the sum of 1 / (k + rank) over the lists it is in (rank from 1);
    best first, ties in order of first appearance."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, start=1):
            scores[i] = scores.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=lambda i: -scores[i])


# How the default mode (auto) may weigh keyword evidence (a query word in a caption, the text read in an image
# or a tag) against the similarity ranking (AUTO_FUSION). `rrf` (the default): reciprocal rank fusion, as
# `hybrid`; `belief`: the model's belief over the candidates, a softmax of their standardised similarities, plus
# a share for each keyword match; `gate`: belief or rrf by how far the query's best cosine stands above null
# queries' (below). Measured: benchmarks/bench_auto.py (RESULTS.md): neither belief nor the gate beat rrf over
# every case, so they are there for the benchmark.
# The one definition of auto's fusion. The engine reads it as engine.AUTO_FUSION (imported from here), the name
# bench_auto.py and the tests set to run auto with another fusion.
AUTO_FUSION = "rrf"

# belief's constants: set on bench_auto.py's seeds 0,1,2 only (the best place-name MRR with a wrong caption's R@1 >= 0.8, among the
# settings that rank a caption match first in a 5-image library searched with a random model); figures on
# held-out seeds in RESULTS.md. In standard deviations of the candidates' similarities: the model's belief in a
# candidate halves every 0.1 sd below the best one, so a model that singles out a few images holds its belief
# there, and against BELIEF_NONE ("none of these"): a best candidate at most 1.75 sd above the mean is believed at
# most half (with n candidates none stands more than sqrt(n - 1) sd out: so it is among 4 or fewer).
BELIEF_TEMPERATURE = 0.15
BELIEF_NONE = 1.75
KEYWORD_SHARE = 0.2  # what a keyword match (the best ranked one) adds to the model's belief (at most 1)


def belief(similarity: np.ndarray, temperature: float = BELIEF_TEMPERATURE, none: float = BELIEF_NONE) -> np.ndarray:
    """The model's belief that each candidate is the one meant: a softmax over the candidates and "none of
    these" of the similarity standardised against the candidates' own mean and spread (none: the standardised
    score of "none of these"), / temperature. Sums to at most 1; what is left is the belief in none."""
    s = np.asarray(similarity, np.float64)
    if len(s) == 0:
        return s
    spread = float(s.std())
    z = (s - s.mean()) / spread if spread > 1e-12 else np.zeros_like(s)
    top = max(none, float(z.max()))
    e = np.exp((z - top) / temperature)
    return e / (np.exp((none - top) / temperature) + e.sum())


def keyword_fusion(similarity: np.ndarray, vector_rank: np.ndarray, keyword_rank: np.ndarray,
                   method: str = "belief") -> np.ndarray:
    """The fused score of each candidate (higher first; ties go to the similarity). similarity: the vector
    side's exact score; vector_rank: its rank by similarity (from 1); keyword_rank: its rank among the keyword
    matches (from 1), 0 when it is no match.
    - belief: belief(similarity) + KEYWORD_SHARE * (RRF_K + 1) / (RRF_K + keyword rank) for a match. A match
      goes first where the model believes in no candidate more than in it by the share (an unknown word: the
      belief is spread thin or left to none), and stays behind the images the model singles out (a caption
      naming the wrong subject); the keyword ranking decays as slowly as RRF's.
    - rrf: 1 / (RRF_K + vector rank) + 1 / (RRF_K + keyword rank) for a match (reciprocal rank fusion)."""
    keyword_rank = np.asarray(keyword_rank, np.int64)
    match = keyword_rank > 0
    if method == "rrf":
        return 1.0 / (RRF_K + np.asarray(vector_rank, np.float64)) + np.where(
            match, 1.0 / (RRF_K + np.maximum(keyword_rank, 1)), 0.0)
    if method != "belief":
        raise ValueError(f"fusion must be one of belief, rrf, got {method!r}")
    share = np.where(match, KEYWORD_SHARE * (RRF_K + 1) / (RRF_K + np.maximum(keyword_rank, 1)), 0.0)
    return belief(similarity) + share


# The gate (`gate`): whether the model recognises the query, measured against null queries. A query's best
# cosine over the index means nothing on its own (its scale is the model's: a word the tiny benchmark model never
# saw scores 0.44 where a known one scores 0.65; another model, another scale), so it is compared with the best
# cosines that meaningless queries (NULL_PROMPTS random letter strings, and the empty text) get from the same
# text tower on the same index: z = (best - their mean) / their sd (at least NULL_SD_FLOOR). Below GATE_Z the
# model has nothing to say (an unknown word, a place name): keyword evidence leads (reciprocal rank fusion);
# from GATE_Z up it recognises the query: its order leads and a match is only nudged (belief). GATE_Z was
# chosen on bench_auto.py's seeds 0,1,2 only; held-out figures in RESULTS.md.
NULL_PROMPTS = 16
NULL_SD_FLOOR = 0.01
GATE_Z = 1.65


def null_prompts(n: int = NULL_PROMPTS, seed: int = 0) -> list[str]:
    """n meaningless queries, the same on every call: the empty text and random letter strings of 3 to 10
    letters."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return [""] + ["".join(rng.choice(letters, 3 + i % 8).tolist()) for i in range(n - 1)]


def null_z(best: float, null_best: np.ndarray, floor: float = NULL_SD_FLOOR) -> float:
    """How far a query's best cosine stands above the null queries' best cosines, in their sd (at least floor)."""
    null_best = np.asarray(null_best, np.float64)
    return float((best - null_best.mean()) / max(float(null_best.std()), floor))


def gate(z: float, threshold: float | None = None) -> str:
    """The fusion for a query whose best cosine stands z null sds out: rrf (keyword evidence leads) below
    threshold (None: GATE_Z), belief (the model's order leads) from it up."""
    return "belief" if z >= (GATE_Z if threshold is None else threshold) else "rrf"


def gated_fusion(z: float, similarity: np.ndarray, vector_rank: np.ndarray, keyword_rank: np.ndarray,
                 threshold: float | None = None) -> np.ndarray:
    """keyword_fusion with the method the gate picks for z (with no keyword match both keep the similarity order)."""
    return keyword_fusion(similarity, vector_rank, keyword_rank, gate(z, threshold))


@dataclass(frozen=True)
class Fused:
    """Candidates ranked by fuse_candidates. Arrays are in the candidates' order; `order` lists them best first."""
    order: np.ndarray
    scores: np.ndarray  # the fused score (higher first)
    vector_rank: np.ndarray  # the rank by similarity (from 1)
    beliefs: np.ndarray | None  # with belief: the model's belief part of each score (the rest is the keyword share)


# Equal vectors' cosines summed in float32 differ by where the rows stand in the matrix, by about 1e-8 (seen: 1e-9 to
# 1.3e-8, a few float32 steps: 640 roundings of 6e-8 x partial sums of ~0.1, mostly cancelling). The cosines within
# NEAR of a neighbour's in the sorted cosines are summed again in float64, where equal rows give equal sums (then
# rounded alike to float32); the others, further than any product's error from every other, keep their float32
# order. Only those: float64 for every candidate cost about 5x the product, and a float64 copy of the candidates 8
# bytes a number (3 GB for collapse's deepest look). Cost: benchmarks/bench_exact_ties.py (1.3-1.6x the product on random
# candidates, 2.4-3.3x on 50,000 equal rows, a library's black video frames). Wider NEARs (1e-5, 1e-6) swept in many more
# random candidates, and comparing the rows of each near pair to re-sum only equal ones was 12-17x the product on
# equal rows (unrecorded runs of this session). The gap allowed grows with the cosine: a float32 step is 6e-8 from
# 0.5 to 1, and copies with cosines near 0.9 (an image query's own copies) were seen 2.4e-7 apart (4 steps), past
# NEAR alone (a reviewer's sweep: 19 of 200 copies unequal); NEAR_STEPS steps of the cosine's own magnitude then.
# Copies further apart than that keep the ANN's order (not seen).
NEAR = 1e-7
NEAR_STEPS = 16
CHUNK = 8192  # rows summed in float64 at a time: bounded memory however many are near


def near_equal(values: np.ndarray) -> np.ndarray:
    """Which values lie within NEAR, or NEAR_STEPS float32 steps of their magnitude, of another (a boolean mask;
    pure)."""
    near = np.zeros(len(values), bool)
    if len(values) < 2:
        return near
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    gap = np.maximum(NEAR, NEAR_STEPS * np.spacing(np.abs(ranked[1:]).astype(np.float32)))
    close = np.diff(ranked) <= gap
    near[order[1:][close]] = True
    near[order[:-1][close]] = True
    return near


# How far past a cut the engine looks for those tied with the last one kept: FAISS cut its top list, the exact path its
# best, the keyword index its limit with no regard to names, so of two copies of a photo (equal vectors, on IVF-PQ
# equal codes in one list and so equal approximate scores; or one caption, equal bm25) tied at the cut it kept the
# one indexed first, before the engine could list them by name (settle_ties): a Ray run and a local run showed
# different files. Of those past the cut only the ones that may tie with the last are kept (tied_at_cut,
# through_ties). A run of more copies than this straddling a cut spends the margin (margin_spent): the engine asks
# again with WIDER_MARGIN times the margin, until the run ends or nothing is left past it (the ANN and exact paths: up
# to engine.SETTLE_MAX + 1 past the cut, a longer run of copies being left in its ANN order, engine._wider); the
# keyword limit is not asked again: matches equal in bm25 are cut there in name order (keywords.TIE_ORDER).
TIE_MARGIN = 40
WIDER_MARGIN = 4


def margin_spent(kept: int, asked: int, more: bool) -> bool:
    """Whether a cut with a tie margin must be asked again wider (pure): it kept every candidate asked for (each one
    past the cut tied with the last before it) and more may lie past them (more). A run of 41 copies straddling the
    cut was cut in the index's order (the one indexed last left out, whatever its name)."""
    return kept >= asked and more


def tied_at_cut(scores: np.ndarray, depth: int, *also: np.ndarray) -> int:
    """How many of the scores (best first) a cut at depth keeps: the first depth, and those after within near_equal's
    gap of the last of them (pure): the candidates past a cut (TIE_MARGIN) that may tie with the k-th (a
    copy), and none of the others, whose re-rank cost 3-17% a search (RESULTS.md, bench_tie_margin; trimmed so,
    0.98-1.07x the search of k alone). also: further keys the order ranked by after the scores (a late-fused query's
    tiebreak), each within its gap of the k-th's too: a product's many zeros are not ties, a copy's are."""
    scores = np.asarray(scores, np.float32)
    if len(scores) <= depth or depth <= 0:
        return max(0, min(depth, len(scores)))
    tied = np.ones(len(scores) - depth, bool)
    for key in (scores, *also):
        key = np.asarray(key, np.float32)
        last = float(key[depth - 1])
        gap = max(NEAR, NEAR_STEPS * float(np.spacing(np.float32(abs(last)))))
        tied &= np.abs(key[depth:] - last) <= gap
    return depth + int(np.cumprod(tied).sum())  # the run right after the cut (ranked by the keys: where ties stand)


def cosines_f64(rows: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """rows @ probe summed in float64, as float32, CHUNK rows at a time."""
    out = np.empty(len(rows), np.float32)
    probe = probe.astype(np.float64)
    for start in range(0, len(rows), CHUNK):
        out[start : start + CHUNK] = rows[start : start + CHUNK].astype(np.float64) @ probe
    return out


def best_first(scores: np.ndarray, similarity: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Candidate indices best first: by score, ties by similarity, then by tiebreak, then in the candidates' order."""
    return np.lexsort((-tiebreak, -similarity, -scores))


def settle_ties(order: Sequence[int], keys: Sequence[np.ndarray], name: Callable[[int], str]) -> list[int]:
    """The ranking with each run of candidates equal in every key (score, similarity, tiebreak: the same vector
    under two names, a copy) ordered by name. Before, such a run kept the ANN's order, which is the order ids were
    given: a Ray run, whose workers finish in any order, and a local run listed the same two copies in opposite
    orders. order: candidate indices best first (best_first); name(i): what candidate i is shown as."""
    order = np.asarray(order, dtype=np.int64)
    return by_name(order, tied_runs(order, keys), name).tolist()


def by_name(order: np.ndarray, runs: Sequence[tuple[int, int]], name: Callable[[int], str]) -> np.ndarray:
    """A copy of order with each [start, end) run of it sorted by name (pure)."""
    order = order.copy()
    for s, e in runs:
        order[s:e] = sorted(order[s:e].tolist(), key=name)
    return order


def _run_starts(order: np.ndarray, keys: Sequence[np.ndarray]) -> np.ndarray:
    """Whether each place of order starts a run: its candidate differs from the one before in some key."""
    starts = np.zeros(len(order), bool)
    starts[:1] = True
    for key in keys:
        ranked = np.asarray(key)[order]
        starts[1:] |= ranked[1:] != ranked[:-1]
    return starts


def tied_runs(order: np.ndarray, keys: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """The [start, end) positions in `order` of each run of two or more candidates equal in every key (pure): the
    runs settle_ties orders by name, found without a look at the others, so that the cut at k can be settled first."""
    if len(order) < 2:
        return []
    starts = np.flatnonzero(_run_starts(order, keys))
    ends = np.append(starts[1:], len(order))
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e - s > 1]


def shared_ranks(similarity: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Each candidate's rank by similarity, then tiebreak (from 1, best first); candidates equal in both share the
    best rank of their run (1, 2, 2, 4). Ranked one after the other, as they were, two copies of a photo took ranks in
    the candidates' order (the ANN's, the order their ids were given), so their fused scores differed by that order
    and settle_ties never saw them as equal."""
    order = np.lexsort((-tiebreak, -similarity))
    ranks = np.empty(len(order), np.int64)
    ranks[order] = _run_ranks(order, (similarity, tiebreak))
    return ranks


def _run_ranks(order: np.ndarray, keys: Sequence[np.ndarray]) -> np.ndarray:
    """Each place of order's rank (from 1): the place where its run of candidates equal in every key starts."""
    return np.maximum.accumulate(np.where(_run_starts(order, keys), np.arange(1, len(order) + 1), 0)).astype(np.int64)


def keyword_ranks(bm25: Sequence[float]) -> np.ndarray:
    """The rank (from 1) of each keyword match, given best first with its bm25 score (the keyword index's order,
    keywords.search; lower is better): matches equal in bm25 share the best rank of their run (1, 2, 2, 4), as
    shared_ranks gives equal similarities one. Ranked one after the other, two copies of a photo with one caption
    took ranks in the keyword index's order (their ids', the order they were indexed in), so their fused scores
    differed by that order. The engine calls it through this module (query.keyword_ranks), so that a benchmark can
    put the sequential ranks in its place."""
    bm25 = np.asarray(bm25, np.float64)
    return _run_ranks(np.arange(len(bm25)), (bm25,))


def through_ties(bm25: Sequence[float], limit: int) -> int:
    """How many of the keyword matches (best first, with their bm25 scores) to keep for `limit`: the first `limit`,
    and those after them equal in bm25 to the last kept (pure). The keyword index cut its list at the limit in the
    order of the ids, so of two copies with one caption at the limit one was a match and the other none."""
    n = min(limit, len(bm25))
    while 0 < n < len(bm25) and bm25[n] == bm25[n - 1]:
        n += 1
    return n


def fuse_candidates(similarity: np.ndarray, keyword_rank: np.ndarray, method: str = AUTO_FUSION,
                    z: float | None = None, tiebreak: np.ndarray | None = None) -> Fused:
    """How the engine ranks the candidates of a fused search (auto, and hybrid with rrf): the similarity rank
    (ties by tiebreak; equal in both: one rank, shared_ranks), the fused score (keyword_fusion), the order
    (best_first).
    similarity: each candidate's vector score, in the order the candidates are held (the engine: its ANN
    results best first, then keyword-only matches), which settles equal fused scores; keyword_rank: the rank among
    the keyword matches (from 1), 0 for none; method: rrf, belief, or gate: gate(z), rrf where z is None (no null
    scale: keyword evidence leads); tiebreak: what orders equal similarities first (late fusion's mean cosine;
    None: nothing)."""
    similarity = np.asarray(similarity)
    tiebreak = similarity if tiebreak is None else np.asarray(tiebreak)
    if method == "gate":
        method = "rrf" if z is None else gate(z)
    vector_rank = shared_ranks(similarity, tiebreak)
    scores = keyword_fusion(similarity, vector_rank, keyword_rank, method)
    return Fused(order=best_first(scores, similarity, tiebreak), scores=scores, vector_rank=vector_rank,
                 beliefs=belief(similarity) if method == "belief" else None)


def fuse_hits(similarity: dict[int, float], keyword: list[int], method: str = AUTO_FUSION,
              z: float | None = None, bm25: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """(id, fused score) of the candidates, best first: fuse_candidates, the engine's auto ranking, without the
    engine. similarity: every candidate's vector score (keyword matches included), in the candidates' order,
    which settles equal similarities (a dict in id order: by id); keyword: the keyword matches, best first; bm25:
    their scores (equal ones share a rank: keyword_ranks), None: a rank each."""
    ids = list(similarity)
    ranks = range(1, len(keyword) + 1) if bm25 is None else keyword_ranks(bm25).tolist()
    at = dict(zip(keyword, ranks))
    fused = fuse_candidates(np.array([similarity[i] for i in ids], np.float64),
                            np.array([at.get(i, 0) for i in ids], np.int64), method=method, z=z)
    return [(ids[i], float(fused.scores[i])) for i in fused.order]


# Composed queries (image + text): how the two halves are combined. README "How composition works" has the
# measurements behind the default (benchmarks/bench_quality.py --suite compose).
COMPOSE_METHODS = ("auto", "sum", "slerp", "product", "weicom")
# What "auto" means: the best R@1 and R@10 on held-out compositions (bench_quality --suite compose, RESULTS.md
# 2026-12-04 16:34): weicom 0.562 / 0.969, product 0.552 / 0.938, slerp 0.333, the sum 0.240 / 0.885.
DEFAULT_COMPOSE = "weicom"
LATE_FUSION = ("product", "weicom")  # scored from the two halves' similarities, not from one query vector
CALIBRATION_SAMPLE = 2048  # WeiCom: stored vectors each query's similarities are standardised against


def resolve_compose(method: str) -> str:
    if method not in COMPOSE_METHODS:
        raise ValueError(f"compose must be one of {', '.join(COMPOSE_METHODS)}, got {method!r}")
    return DEFAULT_COMPOSE if method == "auto" else method


def slerp(image: np.ndarray, text: np.ndarray, a: float) -> np.ndarray:
    """Spherical interpolation from the image (a=0) to the text (a=1) along the great circle (Jang et al.
    2024, arXiv 2405.00571); a unit vector, so it searches like any query."""
    i, t = unit(image), unit(text)
    theta = float(np.arccos(np.clip(i @ t, -1.0, 1.0)))
    if theta < 1e-6:
        return unit((1 - a) * i + a * t)
    if np.pi - theta < 1e-6:
        raise ValueError("the image and the text point in opposite directions: slerp has no path between them")
    return unit((np.sin((1 - a) * theta) * i + np.sin(a * theta) * t) / np.sin(theta))


@dataclass(frozen=True)
class Parts:
    """A query's encoded halves, each a unit vector (or None), with the weights the user gave."""

    text: np.ndarray | None = None
    image: np.ndarray | None = None
    negative: np.ndarray | None = None
    text_weight: float = 2.0
    image_weight: float = 1.0
    negative_weight: float = 1.0

    @property
    def compound(self) -> bool:
        return self.text is not None and self.image is not None


class Scorer:
    """The vector side of a search: the query vectors whose ANN neighbours are the candidates (`probes`),
    and the exact score of a stored unit vector. One probe: the score is the cosine to it. Two probes
    (late fusion): the image's and the text's cosines, fused (`method`)."""

    def __init__(self, probes: list[np.ndarray], method: str = "sum", text_share: float = 2 / 3):
        self.probes = [p.astype(np.float32) for p in probes]
        self.method = method
        self.text_share = text_share
        self.stats: np.ndarray | None = None  # WeiCom: (mean, std) of each probe's similarities on a sample

    @property
    def late(self) -> bool:
        return len(self.probes) == 2

    @property
    def vector(self) -> np.ndarray:
        """The one query vector of a single-vector scorer."""
        if self.late:
            raise ValueError("a late-fusion query has no single query vector")
        return self.probes[0]

    def calibrate(self, sample: np.ndarray) -> None:
        """WeiCom's per-query statistics, from a fixed sample of the stored vectors."""
        sims = np.clip(sample.astype(np.float32) @ np.stack(self.probes, axis=1), -1, 1)
        self.stats = np.stack([sims.mean(axis=0), np.maximum(sims.std(axis=0), 1e-6)])

    def parts(self, stored: np.ndarray, exact: bool = False) -> np.ndarray:
        """Cosines of each stored vector to each probe: (n, probes). exact: equal stored vectors (a copy's, or one
        shared) score exactly alike (settle_ties then lists them by name): a float32 product gave two equal rows
        cosines a last bit apart by where they stood in the matrix, and the copies' order was that bit's."""
        if len(stored) == 0:
            return np.zeros((0, len(self.probes)), np.float32)
        probes = np.stack(self.probes, axis=1)
        cosines = stored.astype(np.float32) @ probes
        if exact:
            for j in range(probes.shape[1]):
                near = near_equal(cosines[:, j])
                if near.any():
                    cosines[near, j] = cosines_f64(stored[near], probes[:, j])
        return np.clip(cosines, -1.0, 1.0)

    def fused(self, parts: np.ndarray) -> np.ndarray:
        """The score from the cosines: the cosine itself, or the late fusion of image (column 0) and text (1)."""
        if not self.late:
            return parts[:, 0]
        if self.method == "product":  # "both must hold" (Psomas et al., i-CIR): negative evidence counts as none
            return np.maximum(parts[:, 0], 0) * np.maximum(parts[:, 1], 0)
        # WeiCom (Psomas et al., rscir): standardise each similarity against the sample, normal CDF, blend
        if self.stats is None:
            raise ValueError("weicom needs calibrate() first")
        z = (parts - self.stats[0]) / self.stats[1]
        cdf = 0.5 * (1.0 + _erf(z / np.sqrt(2.0)))  # the standard normal CDF
        return ((1 - self.text_share) * cdf[:, 0] + self.text_share * cdf[:, 1]).astype(np.float32)

    def tiebreak(self, parts: np.ndarray) -> np.ndarray:
        """What orders equal scores: for late fusion the halves' weighted mean cosine, so the many images a
        product scores 0 (one half negative) still come in a meaningful order, negatives included."""
        if not self.late:
            return parts[:, 0]
        return ((1 - self.text_share) * parts[:, 0] + self.text_share * parts[:, 1]).astype(np.float32)

    def score(self, stored: np.ndarray) -> np.ndarray:
        return self.fused(self.parts(stored))

    def order(self, parts: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
        """Indices best first: by score, ties by tiebreak, then by position (stable)."""
        scores = self.fused(parts) if scores is None else scores
        return np.lexsort((-self.tiebreak(parts), -scores))


_erf = np.frompyfunc(math.erf, 1, 1)


def scorer(parts: Parts, method: str = "auto") -> Scorer:
    """How to score stored vectors for this query. A lone text or image (with or without a negative) is one
    vector whatever the method. For a compound query:
    - sum: the ALIGN paper's weighted sum of the unit vectors (text 2 : image 1), minus the negative;
    - slerp: spherical interpolation from the image to the text at a = text_weight / (text_weight +
      image_weight) (2/3 with the default weights); the negative is taken off the text half;
    - product: max(cos(image), 0) * max(cos(text), 0) from two searches (late fusion, intersection
      semantics); the weights are not used except for the negative, taken off the text half;
    - weicom: each cosine standardised on a fixed sample of the index, normal CDF, blended with the text's
      share text_weight / (text_weight + image_weight).
    auto is DEFAULT_COMPOSE, or the sum when a weight is zero or negative (slerp and late fusion need positive
    shares and refuse such weights)."""
    asked, method = method, resolve_compose(method)
    if asked == "auto" and not (parts.text_weight > 0 and parts.image_weight > 0):
        method = "sum"  # a zero or negative weight steers the weighted sum: the other methods need shares
    if not parts.compound or method == "sum":
        return Scorer([compose(parts.text, parts.image, parts.negative, parts.text_weight, parts.image_weight,
                               parts.negative_weight)])
    text = parts.text
    if parts.negative is not None:  # the text half says what to add and what to take away
        text = unit(parts.text_weight * unit(parts.text) - parts.negative_weight * unit(parts.negative))
    total = parts.text_weight + parts.image_weight
    if parts.text_weight <= 0 or parts.image_weight <= 0:
        raise ValueError(f"--compose {method} needs positive text and image weights")
    share = parts.text_weight / total
    if method == "slerp":
        return Scorer([slerp(parts.image, text, share)], method)
    return Scorer([unit(parts.image), unit(text)], method, text_share=share)

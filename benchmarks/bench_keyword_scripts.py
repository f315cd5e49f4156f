"""Keyword relevance across scripts: the keyword index before schema 16 (--base, default e20fef2 = 7589e18^: marks
other than Thai and Lao ones were separators, no pointing dropped, Khmer and Myanmar not clustered) against this
tree, each tree writing and searching its own catalog in its own process (PYTHONPATH at its tree).

    python benchmarks/bench_keyword_scripts.py [--base e20fef2 | --base-tree PATH] [--docs 40] [--seed 0] [--no-save]
        [--held-out] [--variants]

The nukta change (schema 18) was measured with --base 60d5458 (main at schema 17) --held-out: the set below, where
its loss was found, and HELD_OUT, nukta words written after the change and run as a section of their own.

The data is CONSTRUCTED, not collected (no network here): per script a vocabulary of everyday nouns written out
below by hand (VOCAB: each lemma's written form, with its diacritics or pointing, and the form people type without
them), chosen before any run and not changed after seeing a result; the words the schema-16 commits used as their
examples (كتب, الدرس, שלום, हिन्दी, दिल/दाल, ភ្នំពេញ, ទឹក/ទូក, ရန်ကုန်, ကား) are left out so the set is held out
from the change. Tone and vowel-sign minimal pairs that are different words (Thai ข้าว/ข่าว/ขาว, Hindi कम/काम, दिन/दीन,
मेला/मैला) and homographs that only pointing tells apart (Arabic عِلْم science / عَلَم flag, Hebrew סֵפֶר book / סַפָּר
barber) are in on purpose: they are where dropping marks or keeping them can lose.

Documents: --docs captions per script (random.Random(seed)), each 2 or 3 distinct lemmas of that script, joined the
way the script is written (a space; none for Thai, Khmer, Myanmar, Chinese/Japanese). Each occurrence is written in
its full form (harakat, niqqud, accents, nukta) or its bare form with probability 1/2; a Hindi nukta letter written
in full is half the time the precomposed code point (U+0958-U+095F) instead of letter + U+093C. One catalog holds all
scripts' documents (catalog.upsert_file + catalog.set_photo, the code an index run uses; name words `c/<n>.jpg`).

Queries: every lemma, typed bare and (where it differs) typed in full. Relevant: the documents holding the lemma in
either form; a bare query of a homograph (علم, ספר) also has the other lemma's documents relevant (the bare
spelling is both words), a full-form query only its own. Search: keywords.search(conn, keywords.parse(q), 10) as the
keyword mode (engine._keyword_matches) runs it, and auto's keyword list (parse partial_last, evidence_only).
R@10 = relevant documents in the top 10 / min(10, relevant documents); MRR = 1 / rank of the first relevant one in
the top 10 (0 if none); P@10 = relevant / returned in the top 10 (1 when none returned). Means per query.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import base_worktree, load_note, record  # noqa: E402

BASE = "e20fef2"  # 7589e18^, the commit before schema 16's keyword index

# script: (joiner, [(lemma id, full form, bare form)]); the bare form is what is typed without marks
VOCAB: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "Arabic": (" ", [
        ("ar-book", "كِتَاب", "كتاب"), ("ar-school", "مَدْرَسَة", "مدرسة"), ("ar-sea", "بَحْر", "بحر"),
        ("ar-sun", "شَمْس", "شمس"), ("ar-moon", "قَمَر", "قمر"), ("ar-market", "سُوق", "سوق"),
        ("ar-mountain", "جَبَل", "جبل"), ("ar-house", "بَيْت", "بيت"), ("ar-city", "مَدِينَة", "مدينة"),
        ("ar-cat", "قِطَّة", "قطة"), ("ar-flower", "وَرْدَة", "وردة"), ("ar-river", "نَهْر", "نهر"),
        ("ar-science", "عِلْم", "علم"), ("ar-flag", "عَلَم", "علم")]),
    "Hebrew": (" ", [
        ("he-book", "סֵפֶר", "ספר"), ("he-barber", "סַפָּר", "ספר"), ("he-sea", "יָם", "ים"),
        ("he-sun", "שֶׁמֶשׁ", "שמש"), ("he-city", "עִיר", "עיר"), ("he-house", "בַּיִת", "בית"),
        ("he-mountain", "הַר", "הר"), ("he-market", "שׁוּק", "שוק"), ("he-child", "יֶלֶד", "ילד"),
        ("he-dog", "כֶּלֶב", "כלב"), ("he-cat", "חָתוּל", "חתול"), ("he-flower", "פֶּרַח", "פרח"),
        ("he-river", "נָהָר", "נהר")]),
    "Thai": ("", [
        ("th-market", "ตลาด", "ตลาด"), ("th-sea", "ทะเล", "ทะเล"), ("th-house", "บ้าน", "บ้าน"),
        ("th-cat", "แมว", "แมว"), ("th-dog", "หมา", "หมา"), ("th-flower", "ดอกไม้", "ดอกไม้"),
        ("th-river", "แม่น้ำ", "แม่น้ำ"), ("th-temple", "วัด", "วัด"), ("th-book", "หนังสือ", "หนังสือ"),
        ("th-rice", "ข้าว", "ข้าว"), ("th-news", "ข่าว", "ข่าว"), ("th-white", "ขาว", "ขาว"),
        ("th-tiger", "เสือ", "เสือ"), ("th-shirt", "เสื้อ", "เสื้อ")]),
    "Khmer": ("", [
        ("km-market", "ផ្សារ", "ផ្សារ"), ("km-sea", "សមុទ្រ", "សមុទ្រ"), ("km-house", "ផ្ទះ", "ផ្ទះ"),
        ("km-cat", "ឆ្មា", "ឆ្មា"), ("km-dog", "ឆ្កែ", "ឆ្កែ"), ("km-flower", "ផ្កា", "ផ្កា"),
        ("km-river", "ទន្លេ", "ទន្លេ"), ("km-pagoda", "វត្ត", "វត្ត"), ("km-book", "សៀវភៅ", "សៀវភៅ"),
        ("km-food", "ម្ហូប", "ម្ហូប"), ("km-forest", "ព្រៃ", "ព្រៃ"), ("km-child", "កូន", "កូន")]),
    "Myanmar": ("", [
        ("my-market", "ဈေး", "ဈေး"), ("my-sea", "ပင်လယ်", "ပင်လယ်"), ("my-house", "အိမ်", "အိမ်"),
        ("my-cat", "ကြောင်", "ကြောင်"), ("my-dog", "ခွေး", "ခွေး"), ("my-flower", "ပန်း", "ပန်း"),
        ("my-river", "မြစ်", "မြစ်"), ("my-pagoda", "ဘုရား", "ဘုရား"), ("my-book", "စာအုပ်", "စာအုပ်"),
        ("my-rice", "ထမင်း", "ထမင်း"), ("my-forest", "တော", "တော"), ("my-child", "ကလေး", "ကလေး")]),
    "Devanagari": (" ", [
        ("hi-book", "किताब", "किताब"), ("hi-market", "बाज़ार", "बाजार"), ("hi-sea", "समुद्र", "समुद्र"),
        ("hi-house", "घर", "घर"), ("hi-cat", "बिल्ली", "बिल्ली"), ("hi-dog", "कुत्ता", "कुत्ता"),
        ("hi-flower", "फूल", "फूल"), ("hi-river", "नदी", "नदी"), ("hi-temple", "मंदिर", "मंदिर"),
        ("hi-land", "ज़मीन", "जमीन"), ("hi-less", "कम", "कम"), ("hi-work", "काम", "काम"),
        ("hi-day", "दिन", "दिन"), ("hi-poor", "दीन", "दीन"), ("hi-fair", "मेला", "मेला"),
        ("hi-dirty", "मैला", "मैला")]),
    "Latin": (" ", [
        ("la-cafe", "café", "cafe"), ("la-church", "église", "eglise"), ("la-market", "marché", "marche"),
        ("la-forest", "forêt", "foret"), ("la-river", "rivière", "riviere"), ("la-castle", "château", "chateau"),
        ("la-school", "école", "ecole"), ("la-munich", "München", "Munchen"), ("la-zurich", "Zürich", "Zurich"),
        ("la-saopaulo", "São", "Sao"), ("la-pinata", "piñata", "pinata"), ("la-facade", "façade", "facade")]),
    "CJK": ("", [
        ("zh-tokyo", "東京", "東京"), ("zh-osaka", "大阪", "大阪"), ("zh-beijing", "北京", "北京"),
        ("zh-shanghai", "上海", "上海"), ("zh-temple", "寺院", "寺院"), ("zh-station", "駅", "駅"),
        ("zh-park", "公園", "公園"), ("zh-market", "市場", "市場"), ("zh-mountain", "富士山", "富士山"),
        ("zh-flower", "桜", "桜"), ("zh-photo", "写真", "写真"), ("zh-sea", "海", "海")]),
}

# HELD OUT from the nukta change (schema 18): written after it was made, from none of its words (बाज़ार and ज़मीन, of
# VOCAB, are where the loss was found), and run as a section of its own (--held-out). Nukta words of Devanagari,
# Bengali and Gurmukhi, with the form typed without the nukta as bare: loans with a nukta consonant (ग़ज़ल, फ़िल्म,
# ख़बर), the retroflex flaps ड़ ढ़ (सड़क, पढ़ाई; Bengali বাড়ি, আষাঢ়), Bengali য় (সময়, মেয়ে, আয়না) and Gurmukhi ਜ਼ ਸ਼
# ਖ਼ ਫ਼. Pairs the nukta alone tells apart are in on purpose, as homographs (the bare spelling is both words): राज
# (rule) / राज़ (secret), सजा (decorated) / सज़ा (punishment), ਸੇਰ (a seer, a weight) / ਸ਼ੇਰ (lion); so is a word
# whose bare form is another word's, where dropping the nukta can only lose. Words without a nukta are controls.
# The full forms are written here letter and nukta; the corpus writes half of them precomposed (_PRECOMPOSED).
NUKTA_SIGN = {"Devanagari": "\u093c", "Bengali": "\u09bc", "Gurmukhi": "\u0a3c"}
HELD_OUT: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "Devanagari": (" ", [
        ("hi-ghazal", "ग\u093cज\u093cल", "गजल"), ("hi-film", "फ\u093cिल्म", "फिल्म"),
        ("hi-life", "ज\u093cिंदगी", "जिंदगी"), ("hi-news", "ख\u093cबर", "खबर"), ("hi-road", "सड\u093cक", "सडक"),
        ("hi-boy", "लड\u093cका", "लडका"), ("hi-tree", "पेड\u093c", "पेड"), ("hi-read", "पढ\u093cाई", "पढाई"),
        ("hi-secret", "राज\u093c", "राज"), ("hi-rule", "राज", "राज"), ("hi-punish", "सज\u093cा", "सजा"),
        ("hi-adorned", "सजा", "सजा"), ("hi-water", "पानी", "पानी"), ("hi-city", "शहर", "शहर"),
        ("hi-child", "बच्चा", "बच्चा")]),
    "Bengali": (" ", [
        ("bn-time", "সময\u09bc", "সময"), ("bn-girl", "মেয\u09bcে", "মেযে"), ("bn-mirror", "আয\u09bcনা", "আযনা"),
        ("bn-house", "বাড\u09bcি", "বাডি"), ("bn-hill", "পাহাড\u09bc", "পাহাড"), ("bn-month", "আষাঢ\u09bc", "আষাঢ"),
        ("bn-river", "নদী", "নদী"), ("bn-book", "বই", "বই"), ("bn-fish", "মাছ", "মাছ")]),
    "Gurmukhi": (" ", [
        ("pa-life", "ਜ\u0a3cਿੰਦਗੀ", "ਜਿੰਦਗੀ"), ("pa-surely", "ਜ\u0a3cਰੂਰ", "ਜਰੂਰ"), ("pa-news", "ਖ\u0a3cਬਰ", "ਖਬਰ"),
        ("pa-film", "ਫ\u0a3cਿਲਮ", "ਫਿਲਮ"), ("pa-city", "ਸ\u0a3cਹਿਰ", "ਸਹਿਰ"), ("pa-lion", "ਸ\u0a3cੇਰ", "ਸੇਰ"),
        ("pa-seer", "ਸੇਰ", "ਸੇਰ"), ("pa-water", "ਪਾਣੀ", "ਪਾਣੀ"), ("pa-house", "ਘਰ", "ਘਰ"),
        ("pa-river", "ਦਰਿਆ", "ਦਰਿਆ")]),
}

# HELD OUT from the schema-20 change (letter variants and lone CJK characters): written before that change was made and
# not changed after any run (--variants, a section of its own). Arabic words written with a hamza or madda on the
# alef (أسد, إبريق, آثار), a wasla (ٱبن), a final alef maqsura (مستشفى) or teh marbuta (سيارة), typed without them as
# people mostly do (اسد, مستشفي, سياره); Persian words written with Persian yeh and keheh (کتاب, ایران) typed on an
# Arabic keyboard (كتاب, ايران), and with heh-yeh (خانۀ) typed as heh. Homographs the unification merges are in on
# purpose: إله (god) and آلة (machine) are both typed اله; على (on) is typed علي, which is also the name Ali. Words
# with no variant are controls. CJK: lone characters as captions write them next to others: 〇 (U+3007), Kangxi
# radicals (⼭ U+2F2D, as a PDF's text layer writes 山) typed as the ideograph, radicals with no ideograph (⺮, ⻌),
# Extension B and C ideographs next to each other (𩸽𠮷), each typed alone, and BMP ideographs as controls.
VARIANTS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "Arabic": (" ", [
        ("ar-lion", "أسد", "اسد"), ("ar-rabbit", "أرنب", "ارنب"), ("ar-earth", "أرض", "ارض"),
        ("ar-jug", "إبريق", "ابريق"), ("ar-ruins", "آثار", "اثار"), ("ar-son", "ٱبن", "ابن"),
        ("ar-hospital", "مستشفى", "مستشفي"), ("ar-cafe", "مقهى", "مقهي"), ("ar-car", "سيارة", "سياره"),
        ("ar-island", "جزيرة", "جزيره"), ("ar-tree", "شجرة", "شجره"), ("ar-god", "إله", "اله"),
        ("ar-machine", "آلة", "اله"), ("ar-on", "على", "علي"), ("ar-ali", "علي", "علي"),
        ("ar-bread", "خبز", "خبز"), ("ar-desert", "صحراء", "صحراء")]),
    "Persian": (" ", [
        ("fa-book", "کتاب", "كتاب"), ("fa-iran", "ایران", "ايران"), ("fa-child", "کودک", "كودك"),
        ("fa-mountain", "کوه", "كوه"), ("fa-alley", "کوچه", "كوچه"), ("fa-tea", "چای", "چاي"),
        ("fa-sea", "دریا", "دريا"), ("fa-small", "کوچک", "كوچك"), ("fa-houseof", "خانۀ", "خانه"),
        ("fa-city", "شهر", "شهر"), ("fa-flower", "گل", "گل"), ("fa-tree", "درخت", "درخت")]),
    "CJK lone": ("", [
        ("cj-zero", "\u3007", "\u3007"), ("cj-mountain", "\u2f2d", "\u5c71"), ("cj-person", "\u2f08", "\u4eba"),
        ("cj-water", "\u2f54", "\u6c34"), ("cj-sun", "\u2f47", "\u65e5"), ("cj-mother", "\u2e9f", "\u6bcd"),
        ("cj-bamboo-rad", "\u2eae", "\u2eae"), ("cj-walk-rad", "\u2ecc", "\u2ecc"),
        ("cj-hokke", "\U00029e3d", "\U00029e3d"), ("cj-yoshi", "\U00020bb7", "\U00020bb7"),
        ("cj-2000b", "\U0002000b", "\U0002000b"), ("cj-2123d", "\U0002123d", "\U0002123d"),
        ("cj-2a708", "\U0002a708", "\U0002a708"), ("cj-sea", "\u6d77", "\u6d77"), ("cj-cat", "\u732b", "\u732b")]),
}

# a nukta letter written as one code point (Devanagari U+0958-U+095F, Bengali ড় ঢ় য়, Gurmukhi ਲ਼ ਸ਼ ਖ਼ ਗ਼ ਜ਼ ਫ਼: NFC keeps
# them apart, composition exclusions)
_PRECOMPOSED = {unicodedata.normalize("NFD", chr(c)): chr(c)
                for c in (*range(0x0958, 0x0960), 0x09DC, 0x09DD, 0x09DF, 0x0A33, 0x0A36, *range(0x0A59, 0x0A5C), 0x0A5E)}


def corpus(docs: int, seed: int, vocabulary: dict = VOCAB, precomposed_queries: bool = False
           ) -> tuple[list[dict], list[dict]]:
    """(documents: {caption, script, lemmas}, queries: {text, script, form, relevant: [document index]}); with
    precomposed_queries, a full form with a nukta letter is also typed precomposed (form `precomposed`)."""
    rng = random.Random(seed)
    documents: list[dict] = []
    for script, (joiner, vocab) in vocabulary.items():
        for _ in range(docs):
            chosen = rng.sample(vocab, rng.choice((2, 3)))
            written = []
            for _, full, bare in chosen:
                form = full if rng.random() < 0.5 else bare
                if form != bare and script in NUKTA_SIGN and rng.random() < 0.5:
                    form = _precomposed(form)
                written.append(form)
            documents.append({"caption": joiner.join(written), "script": script, "lemmas": [c[0] for c in chosen]})
    queries = []
    for script, (_, vocab) in vocabulary.items():
        for lemma, full, bare in vocab:
            homographs = {other for other, _, b in vocab if b == bare}
            typed = [("bare", bare, homographs), ("full", full, {lemma})]
            if precomposed_queries:
                typed.append(("precomposed", _precomposed(full), {lemma}))
            for form, text, meant in typed:
                if (form == "full" and full == bare) or (form == "precomposed" and text == full):
                    continue
                relevant = [i for i, d in enumerate(documents) if meant & set(d["lemmas"])]
                queries.append({"text": text, "script": script, "form": form, "relevant": relevant})
    return documents, queries


def _precomposed(text: str) -> str:
    for decomposed, one in _PRECOMPOSED.items():
        text = text.replace(decomposed, one)
    return text


# In the tree under test (PYTHONPATH): write the catalog, run every query in both modes, print the ranked documents.
CHILD = r"""
import json, sys
from pathlib import Path
from alignsearch.storage import catalog, keywords

data = json.loads(Path(sys.argv[1]).read_text())
db = catalog.connect(Path(sys.argv[2]))
ids = []
with db.begin() as conn:
    for n, d in enumerate(data["documents"]):
        relpath = f"c/{n}.jpg"
        fid = catalog.upsert_file(conn, {"root": "/photos", "relpath": relpath, "size": 1, "mtime": 0.0,
                                         "status": catalog.INDEXED})
        catalog.set_photo(conn, fid, relpath, {"caption": d["caption"]})
        ids.append(fid)
index = {fid: n for n, fid in enumerate(ids)}
out = {"keyword": [], "auto": []}
with db.connect() as conn:
    for q in data["queries"]:
        for mode, auto in (("keyword", False), ("auto", True)):
            got = keywords.search(conn, keywords.parse(q["text"], partial_last=auto), 10, evidence_only=auto)
            out[mode].append([index[i] for i, _ in got])
print(json.dumps(out))
"""


def ranked(tree: Path, data: Path, folder: Path) -> dict:
    folder.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), str(folder / "catalog.db")], env=env, cwd=tree,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def scores(found: list[int], relevant: list[int]) -> tuple[float, float, float]:
    """(R@10, MRR, P@10) of one query."""
    rel = set(relevant)
    top = found[:10]
    hits = [i for i in top if i in rel]
    first = next((rank for rank, i in enumerate(top, 1) if i in rel), 0)
    return (len(hits) / min(10, len(rel)) if rel else 1.0, 1 / first if first else 0.0,
            len(hits) / len(top) if top else 1.0)


def table(queries: list[dict], old: list, new: list) -> list[str]:
    lines = ["| script | typed | queries | R@10 old | R@10 new | MRR old | MRR new | P@10 old | P@10 new | "
             "queries better / worse (MRR) |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for n, q in enumerate(queries):
        groups.setdefault((q["script"], q["form"]), []).append(n)
    groups[("all", "both")] = list(range(len(queries)))
    for (script, form), members in groups.items():
        o = [scores(old[n], queries[n]["relevant"]) for n in members]
        w = [scores(new[n], queries[n]["relevant"]) for n in members]
        col = [statistics.mean(s[k] for s in group) for k in range(3) for group in (o, w)]
        better = sum(b[1] > a[1] for a, b in zip(o, w))
        worse = sum(b[1] < a[1] for a, b in zip(o, w))
        lines.append(f"| {script} | {form} | {len(members)} | " + " | ".join(f"{c:.3f}" for c in col)
                     + f" | {better} / {worse} |")
    return lines


def losses(queries: list[dict], old: list, new: list, documents: list[dict]) -> list[str]:
    """The queries the new index answers worse (lower R@10, MRR or P@10), each with what it found."""
    out = []
    for n, q in enumerate(queries):
        a, b = scores(old[n], q["relevant"]), scores(new[n], q["relevant"])
        if any(y < x for x, y in zip(a, b)):
            wrong = [documents[i]["caption"] for i in new[n][:10] if i not in set(q["relevant"])][:2]
            out.append(f"  - {q['script']} {q['form']} `{q['text']}`: R@10 {a[0]:.2f} -> {b[0]:.2f}, MRR {a[1]:.2f} -> "
                       f"{b[1]:.2f}, P@10 {a[2]:.2f} -> {b[2]:.2f}" + (f"; not relevant found: {wrong}" if wrong else ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--base-tree", type=Path, help="an existing worktree of the baseline (else one is made of --base)")
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--held-out", action="store_true", help="also the held-out nukta set (HELD_OUT), its own section")
    ap.add_argument("--variants", action="store_true",
                    help="also the held-out letter variant and lone CJK character set (VARIANTS), its own section")
    args = ap.parse_args()
    at_start = os.getloadavg()[0]
    sets = [("the set", VOCAB, False)] + ([("held-out nukta set", HELD_OUT, True)] if args.held_out else [])
    sets += [("held-out letter variant and lone CJK character set", VARIANTS, False)] if args.variants else []
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.base_tree:
            short = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=args.base_tree, check=True).stdout.strip()
            for n, (name, vocabulary, precomposed) in enumerate(sets):
                lines += _section(name, vocabulary, precomposed, args, args.base_tree, short, Path(tmp) / str(n))
        else:
            with base_worktree(args.base) as (_, tree, short):
                for n, (name, vocabulary, precomposed) in enumerate(sets):
                    lines += _section(name, vocabulary, precomposed, args, tree, short, Path(tmp) / str(n))
    lines.append(load_note(at_start))
    record(f"Keyword relevance across scripts, {short} vs this tree (bench_keyword_scripts.py)", lines,
           save=not args.no_save)


def _section(name: str, vocabulary: dict, precomposed: bool, args, base: Path, short: str, tmp: Path) -> list[str]:
    """One set's results: its corpus ranked by the base tree (old) and this one (new), each its own catalog."""
    tmp.mkdir()
    documents, queries = corpus(args.docs, args.seed, vocabulary, precomposed)
    data = tmp / "corpus.json"
    data.write_text(json.dumps({"documents": documents, "queries": queries}, ensure_ascii=False))
    old, new = ranked(base, data, tmp / "old"), ranked(HERE.parent, data, tmp / "new")
    lines = [f"### {name}", "", f"- constructed set (see the script's docstring: hand-written vocabulary, random "
             f"captions, seed {args.seed}): {len(documents)} captions in {len(vocabulary)} scripts ({args.docs} each), "
             f"{len(queries)} queries; old = the keyword index at {short} (--base), new = this tree; nothing tuned "
             "on it", ""]
    for mode in ("keyword", "auto"):
        lines += [f"#### {'keyword mode' if mode == 'keyword' else 'auto mode keyword list (evidence only)'}", ""]
        lines += table(queries, old[mode], new[mode]) + [""]
        worse = losses(queries, old[mode], new[mode], documents)
        lines += [f"- queries answered worse by the new index: {len(worse)}"] + worse
        neither = [f"`{q['text']}`" for n, q in enumerate(queries)
                   if not scores(old[mode][n], q["relevant"])[0] and not scores(new[mode][n], q["relevant"])[0]]
        lines += [f"- queries neither index finds a relevant document for: {', '.join(neither) or 'none'}", ""]
    return lines


if __name__ == "__main__":
    main()

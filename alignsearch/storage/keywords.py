"""Keyword search the way people type it: what a query text means to the keyword index, and running it.

The keyword index (catalog.KEYWORDS, SQLite FTS5, accents folded) holds each file's caption, the text read
in the image, the words of its folders and name, and its tags; catalog.KEYWORDS_TRIGRAM holds the chunks of
that text that contain a digit, for codes and numbers found inside longer tokens.

What a query text means (`parse`):
- words: any of them (`red tram` = red OR tram); results holding more of them, and rarer ones, rank first
  (bm25). Common words (`the`, `on`, ...) are left out unless quoted.
- `AND` (upper case) between two words: both; it binds tighter than `OR` (`a AND b OR c` = (a and b) or c).
- `OR` (upper case): either (what words alone mean too); lower-case `and` / `or` are ordinary (common) words.
- `-word` or `-"a phrase"`: no result holds it.
- `"a phrase"`: those words next to each other, in that order, within one part of a file's text (BREAK).
  A phrase is looked for by its first MAX_PHRASE tokens (a Thai or CJK run is a phrase of its clusters).
- `word*`: words starting with it (`zanzi*` finds Zanzibar); in the default mode (`auto`) the last word is
  also taken as a start when the text does not end in a space (`zanzi` finds Zanzibar as it is typed).
- a chunk with punctuation (`INV-4711`) is a phrase of its words; a chunk holding a digit, 3+ characters,
  is also found inside longer ones (`4711` finds `INV4711A` and `INV-4711-A`).
- accents and case do not matter (`cafe` finds `Café`), nor width: full-width Latin letters and digits are ASCII
  (`BTS` finds `ＢＴＳのライブ`, `ＡＢ１２３` finds `AB123`), half-width katakana is katakana (`narrow`); the
  operators typed full-width (`－`, `＂`, `ＡＮＤ`, `ＯＲ`, `＊`) are the ones above.
- Chinese and Japanese, written without spaces, are indexed a character a token (`spaced`), so `東京` is the
  phrase `東 京` and finds `東京駅` (the unicode61 tokenizer made `東京駅前` one token, found only whole).
  `東京*` is the same phrase (a character is a word start of its own; an older index's whole runs found by it).
  One ideograph is a word (`海` finds `青い海`, and `上海` too: no dictionary tells the words of a run apart); a
  lone kana, like a lone Latin letter, is no query unless quoted (`"ね"`).
  Greek loses its accents there too (`αθηνα` finds `Αθήνα`): unicode61 folds the accents of Latin letters only.
  Final sigma is sigma (`οδοσ` finds `ΟΔΟΣ`), as unicode61 folds it.
- Thai, also written without spaces, is indexed a grapheme cluster a token (a letter with the vowel and tone marks
  that follow it), so `กรุงเทพ` is the phrase `ก รุ ง เ ท พ` and finds `ตลาดกรุงเทพมหานคร`. Its marks are token
  characters of the keyword index (THAI_MARKS): unicode61 took them (Mn) for separators, so a Thai run was cut at
  every mark, `กรุงเทพ` found nothing inside a longer run, and `ข้าว` (rice) found `ข่าว` (news), their tone marks
  dropped.
- Lao is indexed as Thai is (LAO_MARKS: `ຫຼວງພະບາງ` finds `ຕະຫຼາດຫຼວງພະບາງ`, schema 12); `ໝ` and `ໜ` are the two
  letters they stand for (`ຫມ`, `ຫນ`, typed either way).
- Khmer and Myanmar are indexed as Thai is (_SEA_MARKS, schema 16): `ភ្នំពេញ` finds `រាជធានីភ្នំពេញ`.
- Korean (Hangul) is written with spaces, but a particle joins the noun it follows (`서울에서`, in Seoul): a bare
  Hangul word of 2+ syllables is a word start (`서울` finds `서울에서` and `서울의`); quoted it is the word alone.
  Hangul written onto a Latin or digit word is parted from it (_HANGUL_EDGE): `BTS` finds `BTS의 공연`.
  For a word start it counts with that word (_typed_length): `BTS에*` finds `BTS에서`.
- Combining marks (Mn, Mc) of every script are part of their word (schema 16): a Hindi word is one token with its vowel
  signs and virama (`हिन्दी`, not `ह` `न` `द`). Arabic harakat and Hebrew points are dropped (_POINTING), as accents
  are: `كتب` finds `كَتَبَ` and `שלום` finds `שָׁלוֹם`, and each typed pointed finds the bare word; so is the tatweel
  (`كـتـب` is `كتب`). So is the Indic nukta (schema 18; Devanagari to Kannada): `बाजार` finds `बाज़ार`, and `क़` is `क`.
- Arabic and Persian letter variants are one letter (_ARABIC_VARIANTS, schema 20, as Lucene's normalizers): `اسد` finds
  `أسد` (a hamza, madda or wasla on the alef), `مستشفي` finds `مستشفى`, `سياره` finds `سيارة`, `كتاب` finds Persian `کتاب`.
- 〇 and a CJK radical alone are words as an ideograph is (a Kangxi radical, `⼭`, is the ideograph `山`), and ideographs
  beyond the BMP (`𩸽𠮷`) a character a token as the BMP's are (schema 20): `𩸽` finds `𩸽𠮷`.

User text never reaches FTS5 as syntax: every word is quoted.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sqlite3
import unicodedata
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError

from alignsearch.errors import IndexDamagedError
from alignsearch.media import sources


def words(text: str | None) -> list[str]:
    """The words of a query text for the keyword index (letters and digits with their marks, lower-cased, 2+
    characters)."""
    found = _words_in((text or "").lower())
    return list(dict.fromkeys(w for w in found if len(w) > 1 and w not in STOPWORDS))


# Words too common in captions to say anything about a match (so "a dog on the beach" is not a keyword
# match for every caption that has "on" and "the").
STOPWORDS = frozenset("an the of on in at and or with to for by is it its this that from as are be".split())

# Between the parts of a file's keyword text (caption, text read in the image, name, each tag: catalog.keyword_text):
# a token to FTS5's unicode61 (private use, category Co, is a token character) that no query holds (a query's words
# are \w+, which Co is not), so a phrase never matches across two parts, and nothing typed matches it.
BREAK = "\ue000"

# Thai vowel and tone marks (combining, Mn): part of the word they are written in. unicode61 (categories L* N* Co)
# and Python's \w both took them for separators, cutting a Thai run at every mark and dropping the marks, so
# words told apart by a tone mark alone (ข้าว rice, ข่าว news) were one; the keyword index holds them as token
# characters (catalog.create_keywords: tokenchars), and a query's words keep them.
THAI_MARKS = "".join(chr(c) for c in range(0x0E00, 0x0E80) if unicodedata.category(chr(c)) == "Mn")
# Lao (U+0E80-U+0EFF) is written as Thai is, without spaces and with vowel and tone marks (Mn) above and below its
# letters, and was cut at every mark as Thai was: `ຫຼວງພະບາງ` (Luang Prabang) found nothing, its ຼ a separator that
# left `ຫ` and `ວງພະບາງ`, and not inside a longer run; the tone marks dropped (ໄກ່ chicken, ໄກ far, one word).
LAO_MARKS = "".join(chr(c) for c in range(0x0E80, 0x0F00) if unicodedata.category(chr(c)) == "Mn")
# Khmer (U+1780-U+17FF) and Myanmar (U+1000-U+109F, extensions A and B) are written without spaces between words too,
# with vowel signs, medials and the marks that stack a consonant under another (Khmer coeng U+17D2, Myanmar virama
# U+1039; Mn, Mc) after their letters. unicode61 cut their runs at every mark, which left `ភ្នំពេញ` (Phnom Penh) a phrase
# of bare letters found inside `រាជធានីភ្នំពេញ`; with the marks part of a word (TOKEN_CATEGORIES) a run was one token,
# found only whole. So a letter with its marks is a token, as a Thai one is (schema 16).
_SEA_BLOCKS = (range(0x1780, 0x1800), range(0x1000, 0x10A0), range(0xAA60, 0xAA80), range(0xA9E0, 0xAA00))
_SEA_MARKS = "".join(chr(c) for b in _SEA_BLOCKS for c in b if unicodedata.category(chr(c)) in ("Mn", "Mc"))
MARKS = THAI_MARKS + LAO_MARKS + _SEA_MARKS  # the marks a cluster holds (_SPACELESS), kept by the match check (_fold)
# The keyword index's token characters (catalog.create_keywords): unicode61's default (L* N* Co) and the combining marks
# (Mn, Mc) of every script, which it took for separators as it took Thai's (schema 7) and Lao's (schema 12): a Hindi
# word was cut at its vowel signs and virama (`हिन्दी` the tokens `ह` `न` `द`, so `न्दी` found it and `हिन्दी` was a
# phrase of bare consonants), a vocalised Arabic word (`كَتَبَ`) or a pointed Hebrew one (`שָׁלוֹם`) fell into letters.
# Enclosing marks (Me) stay separators, as before: a keycap (U+20E3, `5️⃣`) or circle draws a symbol around what it
# follows, no letter of a word. A query's words keep the marks too (_words_in). The categories option, not tokenchars:
# it names them all by their Unicode category (SQLite 3.25+; remove_diacritics 2 already asks 3.27).
TOKEN_CATEGORIES = "L* N* Co Mn Mc"
# The operators as typed full-width too (a Japanese or Chinese keyboard's `－`, `＂`, `ＡＮＤ`; `＊` in _atom): only where
# they are operators, so a code's `ＡＢ－１２` keeps its form as typed (Atom.typed_code). Read as words, `－cat`
# found what it was to leave out, `＂new york＂` was two words, and `ＡＮＤ` a stop word (an OR).
_TOKEN = re.compile(r'([-\uff0d]?)["\uff02]([^"\uff02]*)["\uff02]?|(\S+)')
_NEGATE = ("-", "\uff0d")
MIN_PREFIX = 2  # shorter starts (`a*`) would match most of the library
MIN_PARTIAL = 3  # the default mode's partial last word: `ca` is no start of anything meant yet
MIN_CODE = 3  # the trigram index finds substrings of 3+ characters
# Atoms looked for at most (the first ones): each is an FTS5 lookup or two, so a 1000-character text of short
# words stays a query of bounded cost (and far from SQLite's 500 terms per compound SELECT).
MAX_ATOMS = 64
# Tokens of one phrase looked for at most (the first ones: the phrase of them holds wherever the whole one does). A
# Thai or CJK run is a phrase of a token per cluster or character, so a 1000-character run was one atom of 1000
# tokens, each a lookup of its whole list (a Thai cluster like า is in most Thai text): `า` typed 1000 times took
# 0.9 s on 20,000 Thai captions (0.05 s at 64), growing with the library.
MAX_PHRASE = 64
# Han ideographs (with extension A and the compatibility block), hiragana, katakana and half-width katakana, a
# character each, and Thai letters with the marks that follow them (a grapheme cluster each: a Thai character
# alone would part a consonant from its vowel and tone): scripts written without spaces between words, whose
# units are tokens of their own. Thai digits stay in runs, as other digits do. Hangul is written with spaces
# (_HANGUL).
_THAI_LETTERS = "".join(chr(c) for c in range(0x0E00, 0x0E80) if unicodedata.category(chr(c)) in ("Lo", "Lm"))
_LAO_LETTERS = "".join(chr(c) for c in range(0x0E80, 0x0F00) if unicodedata.category(chr(c)) in ("Lo", "Lm"))
_SEA_LETTERS = "".join(chr(c) for b in _SEA_BLOCKS for c in b if unicodedata.category(chr(c)) in ("Lo", "Lm"))
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # the BMP's Han ideographs (Extension A, unified, compatibility)
# The CJK radicals supplement (U+2E80-U+2EFF) written as a radical, not an ideograph (⺮ bamboo, ⻌ walk: So, which
# unicode61 took for a separator and \w holds not, so a caption's ⺮ was no word at all): token characters of the
# keyword index (catalog.create_keywords: tokenchars) and of a query (_word), each a word of its own as an ideograph
# is (schema 20). The Kangxi radicals (U+2F00-U+2FD5) and the two supplement ones NFKC maps (⺟ U+2E9F, ⻳ U+2EF3) are
# the ideograph they stand for instead (_RADICALS, in narrow).
RADICALS = "".join(chr(c) for c in range(0x2E80, 0x2F00)
                   if unicodedata.category(chr(c)) == "So" and unicodedata.normalize("NFKC", chr(c)) == chr(c))
# Han written a character a token: the BMP's, 〇 (U+3007, IDEOGRAPHIC NUMBER ZERO, Nl: `二〇二四`; outside the blocks
# above, a lone 〇 was dropped as a lone letter and 〇〇 one token), the unmapped radicals, and the supplementary planes'
# ideographs (Extension B to H and the compatibility supplement, U+20000-U+3134F: 𩸽 hokke, 𠮷 of 𠮷野家), which unicode61
# kept in runs, so `𩸽` found no `𩸽𠮷` (schema 20).
_HAN_ALL = f"{_HAN}\u3007{RADICALS}\U00020000-\U0003134f"
_SPACELESS = re.compile(f"([\u3040-\u30ff{_HAN_ALL}\uff66-\uff9f]"
                        f"|[{_THAI_LETTERS}{_LAO_LETTERS}{_SEA_LETTERS}][{MARKS}]*)")
# A Han ideograph: a word of its own (海 sea, 山 mountain, 猫 cat, 駅 station), typed alone as often as any word, so
# a query of one is kept where a lone letter is dropped (_atom). Kana is not: a lone hiragana is mostly a particle
# (の, は, を: a stop word) and a lone katakana a fragment of a loanword, each in most Japanese captions.
# The supplementary planes' ideographs (Extension B on: 𠮷 of 𠮷野家, 𩸽 hokke) are words alone as well: a lone one was
# dropped where it was quoted found. So are 〇 and a radical (schema 20: dropped as lone letters before).
_IDEOGRAPH = re.compile(f"[{_HAN_ALL}]")
# Hangul syllables and jamo: Korean writes a particle onto the noun before it (서울에서, 서울의), so a bare Hangul
# word is a word start (_atom); Latin words are not, `cat` finding `catalog` would be noise there.
_HANGUL_LETTERS = "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff"  # a class's ranges
_HANGUL = re.compile(f"[{_HANGUL_LETTERS}]+")
# Where Hangul meets a letter or digit of another script (`BTS의`, BTS's; `iPhone으로`, with an iPhone; `2024년`, the
# year 2024): a particle or counter written onto a Latin or digit word. unicode61 kept `bts의` one token, so `BTS`
# found no `BTS의 공연` (a bare Hangul word is a start, _atom, but `BTS` is no Hangul word); split there, `BTS` is a
# word of its own, and `BTS의` typed is the phrase `bts 의`, found where it was.
_HANGUL_EDGE = re.compile(f"(?<=[^\\W_{_HANGUL_LETTERS}])(?=[{_HANGUL_LETTERS}])"
                          f"|(?<=[{_HANGUL_LETTERS}])(?=[^\\W_{_HANGUL_LETTERS}])")
# ำ (SARA AM) as NIKHAHIT and SARA AA (its NFKC and NFKD form, which no composition undoes; some keyboards and OCR
# write it so), a tone mark between them or not: the same vowel to a reader, but the clusters ทํ า to the index
# against ท ำ, so `ทำ` found no text written so, and the default mode's match check (its fold made ำ of them) dropped
# what the keyword index found for `ทํา`.
# Lao has the same vowel (ຳ, U+0EB3; NFKC ໍ and າ): one pattern for both, one scan of the text.
_SARA_AM = re.compile("\u0e4d([\u0e48-\u0e4b]?)\u0e32|\u0ecd([\u0ec8-\u0ecb]?)\u0eb2")


def _sara_am(m: re.Match) -> str:
    return m[1] + "\u0e33" if m[1] is not None else m[2] + "\u0eb3"


# Greek letters (with the polytonic ones) without their accents and breathings (unicode61's remove_diacritics
# folds Latin letters only, so `αθηνα` did not find `Αθήνα`).
_GREEK_BARE = {c: "".join(d for d in unicodedata.normalize("NFD", chr(c)) if not unicodedata.combining(d))
               for c in (*range(0x370, 0x400), *range(0x1F00, 0x2000))
               if unicodedata.normalize("NFD", chr(c)) != chr(c) and unicodedata.category(chr(c)).startswith("L")}
# Final sigma as sigma: unicode61 folds ς to σ (`οδοσ` finds `ΟΔΟΣ`), but Python's lower() writes a word-final Σ as ς,
# so the default mode's evidence found no `οδοσ` in `ΟΔΟΣ` (nor in `οδός`) where the keyword index did.
_GREEK_BARE[ord("ς")] = "σ"
# Lao ໜ and ໝ as the two letters they stand for (ຫນ, ຫມ: their NFKC form, and so typed too), a token each, as
# _SPACELESS makes them when typed so: the match check's NFKD writes them apart, so the index holds them apart
# (ໝາກ, fruit, found typed either way). After _SPACELESS, in the one table: a cluster ໜ with its marks (ໜຶ່) is then
# ຫ and ນຶ່, as ຫນຶ່ typed is.
# Arabic harakat and the other Arabic-script marks (Mn: tanwin, shadda, sukun, the dagger alef U+0670, Quranic marks)
# and Hebrew points and cantillation (Mn), dropped as remove_diacritics drops Latin accents: text is written without
# them as often as with, and a word means the same either way, so `كتب` finds `كَتَبَ` and `שלום` finds `שָׁלוֹם`
# (and the other way round). After NFC (spaced): a hamza or madda a letter takes (أ, آ) is that letter, not dropped;
# a Hebrew presentation form with its point (שּׁ, U+FB2C) is its letter and points (a composition exclusion). With them
# the tatweel (U+0640, Lm: a letter to unicode61), which only draws a word longer (`كـتـب` is `كتب`), as Lucene's
# Arabic normaliser drops it. Marks other scripts need to tell words apart (Indic vowel signs and virama, Thai and
# Lao tone marks, Thaana's vowels) are kept: part of the word (TOKEN_CATEGORIES).
_POINTING = {c: None for block in (range(0x0591, 0x05C8), range(0xFB1E, 0xFB1F), range(0x0600, 0x0700),
                                   range(0x0750, 0x0780), range(0x0870, 0x0900), range(0xFB50, 0xFE00))
             for c in block if unicodedata.category(chr(c)) == "Mn"}
_POINTING[0x0640] = None
# The nukta of the Indic scripts (Devanagari, Bengali, Gurmukhi, Gujarati, Oriya, Telugu, Kannada: U+0900-U+0CFF), the dot
# under a letter for a sound borrowed from Persian, Arabic or English (ज़ za, फ़ fa) or a flap (ड़, ঢ়): dropped as the
# harakat are (schema 18). Hindi is very often typed without it, so `बाजार` found no `बाज़ार` (recall@10 1.0 to 0.6 in
# bench_keyword_scripts), as Lucene's HindiNormalizer drops it for. ड़ and ड (a flap, a stop) sound apart but are typed
# for each other; no word is told from another by a nukta alone often enough to be worth the misses. A precomposed
# nukta letter (क़ U+0958, ड़ U+095C, য় U+09DF, ਜ਼ U+0A5B) is a composition exclusion: NFC (spaced) writes it as its
# letter and the nukta, which is then dropped. The other nuktas (Gujarati's three-dot ones above, Adlam's, historic
# scripts') tell letters apart and stay.
# Listed, not looked up by name: U+0C3C (Telugu) came in Unicode 14, which Python 3.10's unicodedata (13.0) lacks,
# and an index written under 3.10 kept it where 3.11's dropped it (the characters in U+0900-U+0CFF named "... SIGN
# NUKTA" under Unicode 14 and 15).
INDIC_NUKTAS = (0x093C, 0x09BC, 0x0A3C, 0x0ABC, 0x0B3C, 0x0C3C, 0x0CBC)
_POINTING.update((c, None) for c in INDIC_NUKTAS)
# A kana voiced mark no letter took (NFC composed the others): a separator, as it was when unicode61 took every mark
# for one (`xﾞbc` is `x` and `bc`; the match check, _fold, parts them so too), not a token of its own.
# Arabic and Persian letter variants as one letter, as Lucene's ArabicNormalizer and PersianNormalizer make them (schema
# 20): the alef with a hamza or madda (أ إ آ) and the wasla (ٱ, which Lucene leaves) as the bare alef ا, the alef maqsura
# ى as yeh ي, teh marbuta ة as heh ه; Persian (and Urdu) yeh ی and yeh barree ے as Arabic yeh ي, keheh ک as kaf ك, heh
# with yeh ۀ and heh goal ہ as heh ه (the hamza above, U+0654, is dropped with the harakat: _POINTING; so ۂ and ۓ,
# which NFC composes of it, are ه and ي). Each is typed for the other (a hamza left off, an Arabic keyboard's ي ك for
# Persian, ه and ي for ة and ى at a word's end), so `اسد` found no `أسد` and `كتاب` no Persian `کتاب`. After NFC
# (spaced), which composes ا and a hamza typed apart.
# What it loses (bench_keyword_scripts --variants, RESULTS.md 2026-12-07: Arabic typed in full P@10 1.000 -> 0.900,
# MRR 1.000 -> 0.964, while R@10 0.504 -> 0.982): words these letters alone tell apart are one, as in Lucene: على
# (on) and علي (Ali), إله (god) and آلة (machine) both اله; untested, Urdu کی and کے (of) too.
_ARABIC_VARIANTS = {0x0622: "\u0627", 0x0623: "\u0627", 0x0625: "\u0627", 0x0671: "\u0627", 0x0649: "\u064a",
                    0x0629: "\u0647", 0x06CC: "\u064a", 0x06D2: "\u064a", 0x06A9: "\u0643", 0x06C0: "\u0647",
                    0x06C1: "\u0647", 0x06C2: "\u0647", 0x06D3: "\u064a"}  # ۂ ۓ: heh goal, yeh barree with a hamza
_BARE = {**_GREEK_BARE, **_POINTING, **_ARABIC_VARIANTS, 0x0EDC: "\u0eab \u0e99", 0x0EDD: "\u0eab \u0ea1",
         0x3099: " ", 0x309A: " "}


# Full-width Latin letters, digits and punctuation (U+FF01-U+FF5E: `ＢＴＳ`, `２０２４年`, as Chinese and Japanese text
# writes them) as ASCII, the ideographic space (U+3000) as a space, and half-width katakana (U+FF61-U+FF9F) as
# katakana: unicode61 folds no width, so `BTS` found no `ＢＴＳのライブ` (nor `ＢＴＳ` `BTS`) in the keyword index, where
# the default mode's match check (_fold: NFKD) folded them. A table of single characters, not NFKC over the whole
# text: NFKC writes ำ (SARA AM) as two characters (_SARA_AM) and Hangul compatibility jamo as conjoining ones. Each
# character's NFKC form is one character; a half-width voiced mark (ﾞ, ﾟ) is the combining one (U+3099, U+309A), which
# spaced's NFC then composes with the kana before it (ｶﾞ: ガ), as it composes a kana written with its mark apart.
_WIDTH = {c: unicodedata.normalize("NFKC", chr(c)) for c in (*range(0xFF01, 0xFF5F), *range(0xFF61, 0xFFA0))}
_WIDTH[0x3000] = " "
# Kangxi radicals (U+2F00-U+2FD5: ⼭ U+2F2D) and the two CJK radicals supplement characters NFKC maps (⺟, ⻳) as the
# ideograph NFKC makes them (⼭: 山): a PDF's or OCR's text writes them for the ideograph, which they look like; So to
# unicode61, a separator, so a caption's ⼭ was no word and `山` did not find it (schema 20). Only the match check (_fold:
# NFKD) mapped them.
_RADICALS = {c: unicodedata.normalize("NFKC", chr(c)) for c in range(0x2E80, 0x2FE0)
             if unicodedata.normalize("NFKC", chr(c)) != chr(c)}


# Format characters (Unicode category Cf): invisible, no letter of any word. ZERO WIDTH SPACE (U+200B), the joiners
# ZWNJ/ZWJ (U+200C/D: Persian writes a ZWNJ inside a word, `می<U+200C>روم`), WORD JOINER (U+2060), the BOM (U+FEFF), the soft
# hyphen (U+00AD), bidi marks, which a web page or PDF copied into a caption, OCR, or a name carries inside words. To
# unicode61 (tokens: L*, N*, Co) each was a separator: `sun<U+200B>set` was the words `sun` and `set`, so `sunset` did
# not find it, and `sunset` typed with one was the phrase `sun set`, which missed the plain caption. Dropped from both
# the text written and the query (narrow), they join the word they sit in, as a reader sees it. Below U+20000 and the
# tag characters (U+E0000-U+E0FFF: a flag emoji's tags) lie all of them.
_FORMAT_PLANES = (range(0x80, 0x20000), range(0xE0000, 0xE1000))

# Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt, unchanged from Unicode 14 to 16: what a
# renderer draws nothing for where it cannot show it), beside the Cf characters above: variation selectors (FE00-FE0F
# and E0100-E01EF, Mn: `❤️` is U+2764 U+FE0F, a Japanese name's ideograph an ideograph and a selector), the combining
# grapheme joiner (034F, Mn), the Mongolian free variation selectors (180B-180D, 180F, Mn), the Khmer inherent vowels
# (17B4-17B5, Mn, deprecated), the Hangul fillers (115F, 1160, 3164, FFA0, Lo: the `ㅤ` of an "empty" name) and code
# points reserved as ignorable (Cn). unicode61 took an Mn one for a separator (`sun<U+FE0F>set` the words `sun` `set`)
# and an Lo one for a letter (`sun<U+3164>set` a word no query typed without it finds): dropped as the Cf ones are.
# The property's ranges (adjacent lines of the file merged; its Cf ones, already dropped, kept so the list reads as the file
# does); visible marks (accents, Indic vowel signs, Arabic harakat, Thai tone marks) have no part in it.
_DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)


@functools.cache
def _narrowing() -> dict[int, str | None]:
    """_WIDTH, the decimal digits of every script as ASCII ones (`๒๕๖๗`, Thai; `٢٠٢٤`, Arabic-Indic; `२०२४`,
    Devanagari): a year or a number is typed in either, and neither unicode61 nor NFKD (the match check's fold) folds
    them, so `2567` found no `ปี๒๕๖๗` nor `๒๕๖๗` typed `2567`; and the format characters (Cf: _FORMAT_PLANES)
    deleted. One character for one or for none (made by _scanned)."""
    return _scanned()[0]


@functools.cache
def _scanned() -> tuple[dict[int, str | None], tuple[int, ...]]:
    """narrow's table (_narrowing) and the combining marks (Mn, Mc) a word holds (_words_in), but the invisible ones it
    drops (variation selectors): one scan of every character below U+20000 (bench_keyword_format times it), made on
    first use, which a process never searching words is spared."""
    table: dict[int, str | None] = {**_WIDTH, **_RADICALS}
    marks = []
    for plane in _FORMAT_PLANES:
        for c in plane:
            category = unicodedata.category(chr(c))
            if category == "Cf":
                table[c] = None
            elif category in ("Mn", "Mc"):
                marks.append(c)
            elif c not in table and category == "Nd":
                table[c] = str(unicodedata.decimal(chr(c)))
    for first, last in _DEFAULT_IGNORABLE:
        table.update(dict.fromkeys(range(first, last + 1)))
    return table, tuple(c for c in marks if c not in table)


def _words_in(text: str) -> list[str]:
    """The words of text as the keyword index takes them (TOKEN_CATEGORIES): letters, digits (\\w, with `_`, which
    the index parts on: _fold) and the combining marks written in them. Python's \\w holds no mark (`हिन्दी` was `ह`
    `न` `द` to it), nor has re a class of a category: the marks are listed (_scanned). Those above U+FFFF (Brahmi,
    Chakma, Adlam, ...) only for a text that holds such a character: re tests a class with them range by range (below
    U+10000 it is one table), at every separator, and a findall of plain ASCII text took 2.7 times as long."""
    return _word(not text.isascii() and max(text) > "\uffff").findall(text)  # isascii: a flag; max: a scan


@functools.cache
def _word(astral: bool) -> re.Pattern:
    return re.compile(f"[\\w{RADICALS}{_marks(astral)}]+")  # a radical (So) is a word too, as the index's tokenchars


@functools.cache
def _marks(astral: bool = True) -> str:
    """The marks a word holds (_scanned), as the inside of a regex class; only those below U+10000 unless astral."""
    return _class(c for c in _scanned()[1] if astral or c < 0x10000)[1:-1]


# A Latin combining accent (U+0300-U+036F) written with no letter before it (` \u0301 `, a stray key in a caption):
# unicode61, which takes marks as token characters (TOKEN_CATEGORIES) and drops an accent from its token
# (remove_diacritics), would make it an empty token between two words, and the phrase of those words would no longer
# hold there. Dropped: what it came to when marks were separators. Found by a check for any such accent first: NFC
# leaves few, and the lookbehind's class (every mark) would be tried at each character of every text.
_ACCENT = re.compile("[\u0300-\u036f]")


@functools.cache
def _stray_accents() -> re.Pattern:
    return re.compile(f"(?<![\\w{_marks()}])[\u0300-\u036f]+")


# A ZWNJ (U+200C) between two letters of the Arabic script is Persian's mark between a word's stem and its affixes
# (کتاب‌ها, books: کتاب, book, and ها), which keyword search took for a separator before format characters were
# dropped, as unicode61 does and Lucene's Persian analyzer (a space): the stem `کتاب` found `کتاب‌ها`. Dropped with the
# other format characters it joined them, and the stem found nothing (seen end to end in a review). There it is a
# space, on both sides; elsewhere (a ligature breaker in German `Auf<U+200C>lage`, an Indic conjunct's) it is dropped.
_ARABIC = "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufefc"
_PERSIAN_ZWNJ = re.compile(f"(?<=[{_ARABIC}])\u200c(?=[{_ARABIC}])")


def _zwnj_apart(text: str) -> str:
    """text with each ZWNJ between two Arabic-script letters a space (_PERSIAN_ZWNJ); one character for one."""
    return _PERSIAN_ZWNJ.sub(" ", text) if "\u200c" in text else text


def narrow(text: str) -> str:
    """text with full-width ASCII as ASCII, the ideographic space a space, half-width katakana full-width (_WIDTH),
    every script's decimal digits ASCII digits, and no format character (zero-width spaces and joiners, the BOM, the
    soft hyphen: _narrowing) nor other invisible one (variation selectors, the Hangul fillers: _DEFAULT_IGNORABLE) but
    a ZWNJ between Arabic-script letters, which is a space (_zwnj_apart). What the keyword index is written from
    (spaced, coded_chunks) and a query read by (_atom, the match check's _fold): one rule both ways."""
    return _zwnj_apart(text).translate(_narrowing())


def unformatted(text: str) -> str:
    """text without its format characters (narrow's rule for them alone): a query's chunk as typed (Atom.whole,
    typed_code, wide) is then the same with or without them."""
    return _zwnj_apart(text).translate(_format_only())


@functools.cache
def _format_only() -> dict[int, None]:
    return {c: None for c, to in _narrowing().items() if to is None}


def _class(codes) -> str:
    """A regex class of code points, runs of consecutive ones as ranges: the 5,000 of _format_only one by one made a
    class re scans in turn for every character of the text (verify reads every keyword row with it)."""
    runs: list[list[int]] = []
    for c in sorted(codes):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "[" + "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in runs) + "]"


@functools.cache
def _any_format() -> re.Pattern:
    """A format character (Cf) anywhere; or another invisible one (_DEFAULT_IGNORABLE) next to a word's character:
    only there did an older writer's row read otherwise (a variation selector after an emoji, `❤️`, sat between two
    separators, and such rows, every caption with an emoji, were no cause to name or write again)."""
    cf = [c for c in _format_only() if unicodedata.category(chr(c)) == "Cf"]
    rest = _class(set(_format_only()) - set(cf))
    word = f"(?:(?!{rest})[\\w{MARKS}])"  # a Hangul filler is \w (Lo): two of them alone are no word
    return re.compile(f"{_class(cf)}|(?<={word}){rest}|{rest}(?={word})")


def holds_format(body: str) -> bool:
    """Whether a keyword row's text holds a format character or an invisible mark or filler inside or beside a word:
    written before narrow dropped them (a writer now never writes one), its words are cut (or, for a Hangul filler,
    lengthened) where they sit (catalog.format_split_keywords; `verify --repair` writes it again)."""
    return _any_format().search(_zwnj_apart(body)) is not None  # a Persian ZWNJ cut there as it still does


def spaced(text: str) -> str:
    """text as the keyword index holds it and a query looks for it: every character of a script written
    without spaces (_SPACELESS; for Thai and Lao, every letter with its marks) a word of its own (a word of such
    text is then a phrase of characters), Greek letters without their accents. Composed first (NFC): a kana written
    with its voiced mark apart (パ as ハ and U+309A, as macOS names files) was cut from its mark, a token of its own,
    and the query パン never found パン屋 written so. Thai ำ written as ํ and า (_SARA_AM) is ำ, Lao ຳ so too; Lao ໜ
    and ໝ are two letters each (_BARE). Hangul and a letter or digit of another script next to each other are two
    words (_HANGUL_EDGE). Full-width ASCII is ASCII, half-width katakana full-width (narrow, before NFC composes a
    voiced mark)."""
    return _spaced_wide(narrow(text))


def _spaced_wide(text: str) -> str:
    """spaced without narrow: how schema 5-8 wrote the keyword index (Atom.wide)."""
    composed = _HANGUL_EDGE.sub(" ", _SARA_AM.sub(_sara_am, unicodedata.normalize("NFC", text)))
    if _ACCENT.search(composed):
        composed = _stray_accents().sub("", composed)
    return _SPACELESS.sub(r" \1 ", composed).translate(_BARE)


@dataclass(frozen=True)
class Atom:
    """One thing to find: a word or a phrase (tokens), a start of a word (prefix: the last token's), and the
    raw chunk to find inside longer tokens (code) when it holds a digit."""

    tokens: tuple[str, ...]
    prefix: bool = False
    code: str | None = None
    whole: tuple[str, ...] | None = None  # the tokens as typed, where `spaced` changed them (CJK, Greek)
    typed_code: str | None = None  # the code as typed, where `narrow` changed it (full-width)
    wide: tuple[str, ...] | None = None  # the tokens spaced but not narrowed, where `narrow` changed them (schema 5-8)

    def fts(self) -> str:
        """This atom as an FTS5 expression: the tokens quoted (a phrase), `*` for a prefix; CJK or Greek also as
        typed, which is how an index written before `spaced` holds it, and full-width text also spaced but not
        narrowed, as schema 5-8 held it (until its keywords are written again: a reader never upgrades)."""
        forms = dict.fromkeys(_phrase(t, self.prefix) for t in (self.tokens, self.wide, self.whole) if t)
        return f"({' OR '.join(forms)})" if len(forms) > 1 else next(iter(forms))

    def text(self) -> str:
        return " ".join(self.whole or self.tokens) + ("*" if self.prefix else "")

    def trigram(self) -> str:
        """The code as an FTS5 expression for the trigram index; full-width also as typed, which is how an index
        written before `narrow` (schema 8) holds it until its next writer upgrades it: a reader never does, and
        `ＣＤ４５６` typed there found `ＩＮＶＣＤ４５６Ｚ` before the code was narrowed and nothing after."""
        return " OR ".join('"' + c.replace('"', '""') + '"' for c in (self.code, self.typed_code) if c)


def _phrase(tokens: tuple[str, ...], prefix: bool) -> str:
    return '"' + " ".join(tokens).replace('"', '""') + '"' + (" *" if prefix else "")


@dataclass(frozen=True)
class Query:
    """Any of `groups` (each: all of its atoms), none of `excluded`."""

    groups: tuple[tuple[Atom, ...], ...] = ()
    excluded: tuple[Atom, ...] = ()
    words: list[str] = field(default_factory=list)  # what the query looked for, for --explain

    def __bool__(self) -> bool:
        return bool(self.groups)

    def positive(self) -> list[Atom]:
        return [a for g in self.groups for a in g]


def _atom(chunk: str, quoted: bool) -> Atom | None:
    raw = unformatted(chunk).strip()  # `sun<U+200B>set` typed is `sunset` in every form (narrow drops them from tokens)
    # `＊` (full-width, as a Japanese or Chinese keyboard types it) is `*`, as narrow makes the rest of the chunk: kept,
    # `ＡＢ１２３＊` was no word start, its code `AB123*` found only a literal `*`, where `AB123*` finds `AB1234`
    prefix = not quoted and raw.endswith(("*", "\uff0a"))
    raw = raw.rstrip("*\uff0a") if prefix else raw
    tokens = tuple(w.lower() for w in _words_in(spaced(raw)))
    whole = tuple(w.lower() for w in _words_in(raw))[:MAX_PHRASE]
    # a schema 5-8 index (until its next writer: a reader never upgrades) holds `２０２４年` as `２０２４ 年`: found
    # by this, not by the narrowed tokens nor by the run as typed (how an index before schema 5 holds it)
    wide = tuple(w.lower() for w in _words_in(_spaced_wide(raw)))[:MAX_PHRASE] if narrow(raw) != raw else None
    cut = len(tokens) > MAX_PHRASE
    tokens = tokens[:MAX_PHRASE]
    if not tokens:
        return None
    # a lone letter is dropped (`a`, a typo's stray key), but a Hangul syllable is a word (밤 night, 꽃 flower):
    # dropped, `밤` searched for nothing and `서울 AND 밤` was `서울` alone. It stays whole (no word start, as a
    # longer Hangul word is below): one syllable starts too many words (산 mountain: 산책 walk, 산업 industry).
    # A Han ideograph alone is a word too (_IDEOGRAPH): dropped, `海` (sea) or `駅` (station) found nothing.
    if (not quoted and len(tokens) == 1 and not prefix and (tokens[0] in STOPWORDS or (
            len(tokens[0]) < 2 and not _HANGUL.fullmatch(tokens[0]) and not _IDEOGRAPH.fullmatch(tokens[0])))):
        return None
    # A character of a script written without spaces is a word start of its own (`東京*`: 東京 followed by anything,
    # which the phrase of its characters already is); kept, the `*` also finds an older index's whole runs (東京駅前)
    # and --explain shows it as typed. Dropped, `東京*` was `東京` there and in --explain.
    if prefix and _typed_length(tokens, whole) < MIN_PREFIX and not _SPACELESS.fullmatch(tokens[-1]):
        prefix = False
    # A bare Hangul word is also found with the particle written onto it (`서울` in `서울에서`): unicode61 keeps
    # `서울에서` one token, which the word alone never matched. Quoted, it is the word alone, as typed.
    if not quoted and len(tokens[-1]) >= MIN_PREFIX and _HANGUL.fullmatch(tokens[-1]):
        prefix = True
    if cut:  # the phrase's last token stands whole in the text the whole phrase is in
        prefix = False
    code, typed_code = _code(raw) if any(c.isdigit() for c in raw) else (None, None)
    if code is not None and len(code) < MIN_CODE:
        code = typed_code = None
    return Atom(tokens, prefix, code, whole if whole != tokens else None, typed_code, wide if wide != tokens else None)


def _code(raw: str) -> tuple[str, str | None]:
    """The code of a chunk (printable characters only: FTS5 reads a query string up to a NUL, "unterminated
    string"), narrowed (`ＡＢ１２３` typed finds `AB123`: the trigram index holds chunks narrowed, coded_chunks), and
    the same characters as typed where narrowing changed them (Atom.trigram), else None."""
    # narrow maps a character to one: raw holds no format character, which it deletes (_atom: unformatted)
    kept = [(n, c) for n, c in zip(narrow(raw), raw) if n.isprintable()]
    narrowed, typed = "".join(n for n, _ in kept), "".join(c for _, c in kept)
    code = narrowed.strip(".,;:!?()[]{}'")
    start = len(narrowed) - len(narrowed.lstrip(".,;:!?()[]{}'"))
    typed = typed[start : start + len(code)]
    return code, typed if typed != code else None


def _typed_length(tokens: tuple[str, ...], whole: tuple[str, ...] | None) -> int:
    """The length of the last word as typed, for the rules on word starts (MIN_PREFIX, MIN_PARTIAL): a Hangul
    particle parted from the Latin or digit word it is written onto (_HANGUL_EDGE) counts with that word. Counted
    alone (`에`, one syllable), `BTS에*` was the phrase `bts 에` and the default mode's `BTS에`, typed on the way to
    `BTS에서`, found nothing, where both found `BTS에서` before schema 8 parted them (`bts에*`)."""
    last = tokens[-1]
    if whole and _HANGUL.fullmatch(last) and whole[-1] != last and whole[-1].endswith(last):
        return len(whole[-1])
    return len(last)


def parse(text: str | None, partial_last: bool = False) -> Query:
    """What the query text asks of the keyword index (the rules in this module's docstring). partial_last:
    the last bare word is also a word start (the default mode, as people type)."""
    text = text or ""
    groups: list[list[Atom]] = [[]]
    excluded: list[Atom] = []
    join_next = False  # the previous token was AND
    parts = list(_TOKEN.finditer(text))
    for n, m in enumerate(parts):
        negate, phrase, bare = m.group(1), m.group(2), m.group(3)
        operator = narrow(bare) if bare is not None else None
        if operator == "AND":
            join_next = bool(groups[-1])
            continue
        if operator == "OR":
            join_next = False
            continue
        if phrase is None and bare.startswith(_NEGATE) and len(bare) > 1:
            negate, bare = "-", bare[1:]
        quoted = phrase is not None
        atom = _atom(phrase if quoted else bare, quoted)
        if atom is None:
            continue
        if sum(map(len, groups)) + len(excluded) >= MAX_ATOMS:
            break
        if (partial_last and not quoted and not negate and n == len(parts) - 1 and not atom.prefix
                and not text[-1:].isspace() and _typed_length(atom.tokens, atom.whole) >= MIN_PARTIAL
                and not _SPACELESS.fullmatch(atom.tokens[-1])):  # a Thai cluster (3+ with its marks) is whole
            atom = dataclasses.replace(atom, prefix=True)
        if negate:
            excluded.append(atom)
            continue
        if join_next and groups[-1]:
            groups[-1].append(atom)
        else:
            groups.append([atom])
        join_next = False
    found = tuple(tuple(dict.fromkeys(g)) for g in groups if g)
    return Query(tuple(dict.fromkeys(found)), tuple(dict.fromkeys(excluded)),
                 [a.text() for g in found for a in g] + ["-" + a.text() for a in excluded])


def as_query(words) -> Query:
    """A Query as is; a list of words as any of them (the older call)."""
    if isinstance(words, Query):
        return words
    atoms = [a for a in (_atom(w, True) for w in words) if a is not None]
    return Query(tuple((a,) for a in atoms), (), [a.text() for a in atoms])


def coded_chunks(text: str) -> str:
    """The chunks of a file's keyword text that the trigram index holds: those with a digit (codes, numbers,
    dates), MIN_CODE characters or more."""
    chunks = (c.strip(".,;:!?()[]{}'\"") for c in narrow(text).split())  # full-width as ASCII, as the query's code
    return " ".join(dict.fromkeys(c for c in chunks if len(c) >= MIN_CODE and any(ch.isdigit() for ch in c)))


# The order of matches equal in bm25 at the limit: by name (the shown path), then id, so the ones cut there are
# the same whatever order the files were indexed in. By id, a word of a folder (every file of it one bm25 where their
# names are alike) or a caption on 45 copies kept those indexed first; asking again wider until the run ended cost a
# search over 10,000 such files 94-137 ms against 26-65 (RESULTS.md, bench_tie_runs --keyword) and still cut in id
# order past its bound. The name is the one the engine lists such ties by (settle_ties: FileRow.path, i.e.
# sources.location), written in SQL: a list's entry alone, else the root and the relpath joined by one slash. By
# root, then relpath, the cut kept "p/x" where "p q/x" is listed first (' ' sorts before '/'), and a list's rows by
# the list's name, which their shown path does not hold.
# (LIKE is ASCII case-blind in SQLite; a list is a file, its root never ends in a slash: with lower() and rtrim() on
# the root the key cost 12 ms over 10,000 tied rows against 4.7 without, and 1.3 by root and relpath: a throwaway
# sqlite3 timing, not recorded; bench_tie_runs --keyword times the search)
_LISTED = " OR ".join(f"f.root LIKE '%{s}'" for s in sources.LIST_SUFFIXES)
TIE_ORDER = f"CASE WHEN {_LISTED} THEN f.relpath ELSE rtrim(f.root, '/') || '/' || f.relpath END, h.id"


def search(conn, query: Query, limit: int, among=None, evidence_only: bool = False) -> list[tuple[int, float]]:
    """(file id, bm25 score: lower is better) of the indexed files matching `query`, best first, at most
    `limit`; among: only these ids (a filter's matches), applied before the limit so a filter never starves.
    evidence_only: only files whose caption, text read in the image or tags hold the query (`evidence`), decided
    before the limit (filtered after it, a hundred matches by file name alone left none), in rank order until the
    limit is filled (_with_evidence). Each atom is a set of rowids (the word index, or with a code also the trigram index); the sets
    are combined in SQL (INTERSECT for AND, UNION for OR, EXCEPT for -word); the matches rank by bm25 over
    all the query's words, those found only inside longer tokens after them."""
    from alignsearch.storage import catalog, migrate
    from alignsearch.storage.catalog import KEYWORDS, KEYWORDS_TRIGRAM

    if not query:
        return []
    trigram = migrate.schema_of(conn).trigram
    params: list = []

    def atom_sql(a: Atom) -> str:
        params.append(a.fts())
        sql = f"SELECT rowid AS id FROM {KEYWORDS} WHERE {KEYWORDS} MATCH ?"
        if trigram and a.code:
            params.append(a.trigram())
            sql += f" UNION SELECT rowid AS id FROM {KEYWORDS_TRIGRAM} WHERE {KEYWORDS_TRIGRAM} MATCH ?"
        return sql

    def all_of(atoms) -> str:
        return " INTERSECT ".join(f"SELECT id FROM ({atom_sql(a)})" for a in atoms)

    hits = " UNION ".join(f"SELECT id FROM ({all_of(g)})" for g in query.groups)
    if query.excluded:
        hits = f"SELECT id FROM ({hits}) EXCEPT SELECT id FROM ({' UNION '.join(atom_sql(a) for a in query.excluded)})"
    params.append(" OR ".join(a.fts() for a in query.positive()))
    restrict = ""
    if among is not None:
        # The ids travel as one JSON array bound as a parameter (no SQL text from data, any count, a read-only
        # connection). The unary + keeps SQLite from offering the IN to FTS5 as a rowid constraint, which it
        # answers far slower (minutes at 150,000 ids); as a plain filter it costs what the unfiltered query does.
        restrict = " WHERE +h.id IN (SELECT value FROM json_each(?))"
        params.append("[" + ",".join(str(int(i)) for i in among) + "]")
    # evidence_only: every match in rank order (no limit), checked lazily below. As a condition in this SQL, SQLite
    # ran the evidence check (Python, per row) on every match before it sorted and cut them: a 64-word query over
    # 20,000 matching files checked 20,000 rows to keep 100.
    params.append(-1 if evidence_only else int(limit))
    sql = (f"SELECT h.id, r.score FROM ({hits}) h JOIN files f ON f.id = h.id AND f.status = 'indexed' "
           f"LEFT JOIN (SELECT rowid, bm25({KEYWORDS}) AS score FROM {KEYWORDS} WHERE {KEYWORDS} MATCH ?) r "
           f"ON r.rowid = h.id{restrict} ORDER BY r.score IS NULL, r.score, {TIE_ORDER} LIMIT ?")
    try:
        rows = [(int(i), float(s) if s is not None else 0.0) for i, s in conn.exec_driver_sql(sql, tuple(params))]
        return _with_evidence(conn, query, rows, limit) if evidence_only else rows
    except DBAPIError as exc:
        if catalog.not_damage(exc) is not None or not isinstance(exc.orig, sqlite3.DatabaseError):
            raise
        raise damaged(exc.orig) from exc  # FTS5 pages SQLite calls malformed: mended by verify --repair


EVIDENCE_BATCH = 128  # matches whose text is read at once (then twice as many, ...) while the limit is not filled


def _with_evidence(conn, query: Query, ranked: list[tuple[int, float]], limit: int) -> list[tuple[int, float]]:
    """The first `limit` of the ranked matches whose caption, text read in the image or tags hold the query
    (`evidence`), in their order: the same as checking every match, then cutting, but the text is read and checked
    in rank order, batch by batch, until the limit is filled. A match with none of that text (a file found by its
    name alone, uncaptioned) is no evidence, decided without Python's check."""
    kept: list[tuple[int, float]] = []
    checks = _checks(tuple(query.positive()))
    start, batch = 0, max(EVIDENCE_BATCH, int(limit))
    while start < len(ranked) and len(kept) < limit:
        chunk = ranked[start:start + batch]
        texts = _evidence_texts(conn, [i for i, _ in chunk])
        kept += [(i, s) for i, s in chunk if texts.get(i) and _holds(checks, texts[i])]
        start, batch = start + len(chunk), batch * 2
    return kept[:max(int(limit), 0)]


def _evidence_texts(conn, ids: list[int]) -> dict[int, str]:
    """{file id: its tag labels, caption and text read in the image joined by BREAK} for those that have any."""
    from alignsearch.storage import migrate
    from alignsearch.storage.catalog import photos

    parts = [f"(SELECT group_concat(t.label, char({ord(BREAK)})) FROM tags t WHERE t.file_id = h.value)"]
    schema = migrate.schema_of(conn)
    if schema.photos:
        # a catalog older than photos.ocr (a reader cannot upgrade it) has the columns it has
        columns = ("caption", "ocr") if schema.photo_ocr else ("caption",)
        parts += [f"(SELECT p.{c} FROM {photos.name} p WHERE p.file_id = h.value)" for c in columns]
    joined = f" || char({ord(BREAK)}) || ".join(f"coalesce({p}, '')" for p in parts)
    rows = conn.exec_driver_sql(f"SELECT h.value, {joined} FROM json_each(?) h",
                                ("[" + ",".join(str(int(i)) for i in ids) + "]",))
    return {int(i): text for i, text in rows if text and text.strip(BREAK)}


def damaged(cause) -> IndexDamagedError:
    """The error for keyword tables that cannot be read. They are derived from the catalog's captions, text,
    paths and tags, so `verify --repair` writes them again: the advice was "restore it from a backup or index
    into a new --index DIR", which loses the tag labels and the index's settings for nothing."""
    return IndexDamagedError(f"the catalog's keyword index cannot be read ({cause}): run `alignsearch verify "
                             "--repair` (it writes it again from the captions, text, paths and tags)")


# Kana voiced and semi-voiced marks, combining and half-width (narrow makes those combining): after NFC, those left
# are marks no letter took (_fold).
_VOICED = re.compile("[\u3099\u309a\uff9e\uff9f]")


def _fold(text: str) -> list[str]:
    """The words of text as the keyword index sees them: lower case, accents folded (Thai and Lao marks kept: the
    index tells ข้าว from ข่าว)."""
    if _VOICED.search(text):
        # a kana voiced mark that composes with no letter before it (`aﾞb`) is a token of its own to spaced, which
        # unicode61 drops (Mn): the index holds `a b`. Dropped with the other marks below, this check read `ab`, and
        # refused what the keyword index found for `aﾞb` (the phrase `a b`)
        text = _VOICED.sub(" ", unicodedata.normalize("NFC", narrow(text)))
    # NFKD writes ำ (SARA AM) as a mark and a letter: spaced makes it whole again (_SARA_AM), as the index holds it
    # the Arabic letter variants first (_ARABIC_VARIANTS): NFKD writes ۀ (heh with yeh) as ە (U+06D5, Kurdish ae) and a
    # hamza, which no composition after makes ۀ again, so `خانه` found no `خانۀ` here where the keyword index (NFC, then
    # the variants: ه) did; ە itself stays (Sorani Kurdish tells it from ه)
    decomposed = unicodedata.normalize("NFKD", text.lower().translate(_ARABIC_VARIANTS))
    bare = spaced("".join(c for c in decomposed if not unicodedata.combining(c) or c in MARKS))
    # `_` parts words, as unicode61 parts them (punctuation to it, a word character to \w): kept, a tag
    # `golden_retriever` held no `retriever` here, and the default mode dropped what the keyword index found
    return _words_in(bare.replace("_", " "))


@functools.lru_cache(maxsize=256)  # evidence() runs for each row a query finds: its words are folded once
def _folded(tokens: tuple[str, ...]) -> list[str]:
    """The query's words folded as the text's are: folded text against the words as typed found no `café` in
    `Café` and no `ガイド` (its voiced marks folded away) in `観光ガイド`, which the keyword index matched."""
    return [w for t in tokens for w in _fold(t)] or list(tokens)


@functools.lru_cache(maxsize=64)  # evidence() may run for each match a query finds: its atoms are sorted once
def _checks(atoms: tuple[Atom, ...]) -> tuple[frozenset[str], tuple[Atom, ...]]:
    """The query's atoms as (the folded words of those that are one whole word, found by a set intersection; the
    rest: starts of words, phrases, codes, looked for one by one)."""
    whole = [a for a in atoms if len(_folded(a.tokens)) == 1 and not a.prefix and a.code is None]
    return frozenset(_folded(a.tokens)[0] for a in whole), tuple(a for a in atoms if a not in whole)


def _atom_in(atom: Atom, words: list[str], present: set[str], raw: str) -> bool:
    tokens = _folded(atom.tokens)
    n = len(tokens)
    if n > 1 and tokens[0] not in present:  # a phrase whose first word the text lacks: no scan
        found = False
    else:
        found = any(words[i:i + n - 1] == tokens[:-1] and (words[i + n - 1].startswith(tokens[-1]) if atom.prefix
                                                           else words[i + n - 1] == tokens[-1])
                    for i in range(len(words) - n + 1))
    return found or (atom.code is not None and atom.code.lower() in raw)


def evidence(query: Query, text: str) -> bool:
    """Whether text (a caption, the text read in an image, tags: what a person wrote or a picture shows) holds
    any of the query's positive atoms, as the keyword index would match them (a phrase within one of the parts
    that BREAK separates). The default mode fuses keyword
    evidence only when it is found there, never in a file or folder name alone (README: One coherent ranking)."""
    # Whole words are one set intersection per part: each atom scanning the part's words cost the default mode
    # ~0.3 ms a match on a 64-word query (bench_keyword_evidence), run on thousands of matches.
    return _holds(_checks(tuple(query.positive())), text)


def _holds(checks: tuple[frozenset[str], tuple[Atom, ...]], text: str) -> bool:
    """evidence() with the query's _checks made (once for all the matches of one search: hashing a 64-atom query
    for the cache on each match cost a third of the check)."""
    whole, others = checks
    for part in text.split(BREAK):
        if not part or part.isspace():
            continue
        # each part folded once for all the atoms: folded again for each atom (78ea7a9), the default mode's keyword
        # list took twice as long on 4-word queries (bench_keyword_break: most of its hits hold no evidence)
        words, raw = _fold(part), narrow(part).lower()  # raw: for codes, narrowed as the query's are
        present = set(words)
        if not whole.isdisjoint(present) or any(_atom_in(a, words, present, raw) for a in others):
            return True
    return False

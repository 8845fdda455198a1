"""The text signal: what a listing's title, description and the text seen in its photos say.

Two things are looked for, in one normalised form of the text:

* **brand mentions** (brand slug -> the names a listing may call it by, from the catalog): evidence that
  the listing *presents* a brand's product; they feed brand evidence, not counterfeit evidence;
* **counterfeit vocabulary** in several languages (en, de, fr, es, it, pt, ru, tr, zh, ja, ko): words
  sellers use for fakes ("replica", "1:1", "AAA+", "mirror quality", "Fälschung", "高仿", "подделка").

Normalisation (:func:`fold`): NFKC (full-width ``ＲＥＰＬＩＣＡ`` and ``１：１`` become ASCII), casefold
(``ß`` -> ``ss``), Latin/Greek/Cyrillic diacritics dropped (``réplica`` -> ``replica``,
``Fälschung`` -> ``falschung``; Japanese voicing marks are kept), dashes unified, whitespace collapsed.

Matching is whole-word for space-delimited scripts and substring for Chinese, Japanese and Korean,
which do not separate words (``高仿包包`` contains ``高仿``).

False positives are the main risk of a word list, so the list is conservative and every term has a
weight (how much it alone says "counterfeit") and guards:

* words that are also ordinary product descriptions are guarded by the word that follows or precedes
  them: "fake fur", "fake plants", "imitation leather", "Lederimitat", "imitación piel" are materials;
  "replica jersey"/"replica kit" is the official fan version of a sports shirt; "official replica" and
  "1:1 scale replica" are licensed models; "anti-counterfeit label" and "counterfeit detector pen" are
  security products; "falso techo" is a ceiling;
* a negation just before the term ("not a replica", "keine Fälschung", "不是高仿", "no es réplica")
  or just after it (Turkish "sahte değil", Japanese "偽物ではありません", Korean "짝퉁 아닙니다") turns the
  hit off: it is kept in the evidence as negated but scores nothing. Counterfeiters do write "not
  fake", but so do honest sellers, and the other signals catch the former;
* deliberately left out: plain "copy", "clone", "faux", "OEM", "not original" (honest compatible
  accessories say it), "7A"/"10A" (hair-extension grades), "top quality mirror" (a bathroom mirror),
  "reps" (gym repetitions), "pirata" (pirate costumes). "AAA" counts only as "AAA+" or next to
  "quality"/"grade", never "AAA batteries", and then weakly, since gemstones and pearls are graded so.

The text score is an evidence strength in [0, 1]: the strongest term counts fully, each further
distinct term half as much as the previous one (terms in one listing are correlated), each weighted
by where it was seen (title > photo > description).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.domain.curves import noisy_or, require_fraction
from service.domain.model import Signal, SignalName

# --------------------------------------------------------------------------------------------------
# Normalisation

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63"), "-")
# Letters that carry their "accent" in the base character, so NFD cannot strip it.
_LETTERS = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ı": "i", "þ": "th"})
_SPACES = re.compile(r"\s+")


def fold(text: str) -> str:
    """The form all matching is done on: NFKC, casefold, diacritics of Latin/Greek/Cyrillic letters
    dropped, dashes unified, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", text).casefold()
    if s.isascii():  # nothing below changes ASCII but whitespace (the common case, and the fast one)
        return _SPACES.sub(" ", s).strip()
    # Only the combining diacritical marks block is dropped: it holds the accents of Latin, Greek and
    # Cyrillic (й -> и, ё -> е); the kana voicing marks (U+3099/U+309A) must survive (ピ is not ヒ).
    s = "".join(c for c in unicodedata.normalize("NFD", s) if not "\u0300" <= c <= "\u036f")
    s = unicodedata.normalize("NFC", s).translate(_DASHES).translate(_LETTERS)
    return _SPACES.sub(" ", s).strip()


def _display(text: str) -> str:
    """NFKC with whitespace collapsed: the case-preserving form used for short brand names."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()


# Scripts written without spaces between words: matched as substrings, no word boundaries.
_UNSPACED = (
    "\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff"  # Hangul jamo, kana
    "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"  # CJK ideographs, Hangul syllables
)
_UNSPACED_RE = re.compile(f"[{_UNSPACED}]")
# A word character of a space-delimited script: what a whole-word match must not touch.
_WORD = f"[^\\W{_UNSPACED}]"
_R = f"(?!{_WORD})"
_WORD_CHAR = re.compile(_WORD)


def _is_unspaced(ch: str) -> bool:
    return _UNSPACED_RE.match(ch) is not None


# --------------------------------------------------------------------------------------------------
# Where text was seen

TITLE = "title"
DESCRIPTION = "description"


def photo_label(image_index: int) -> str:
    """"photo 1" for image_index 0: photos are numbered from 1 wherever people read them."""
    return f"photo {image_index + 1}"


@dataclass(frozen=True, slots=True)
class PhotoText:
    """Text read (OCR) from one listing photo; lines of a photo may be given one by one."""

    image_index: int
    text: str
    confidence: float = 1.0


# --------------------------------------------------------------------------------------------------
# Brand mentions


@dataclass(frozen=True, slots=True)
class BrandMention:
    brand: str
    name: str  # the alias as the catalog spells it
    where: str  # "title", "description", "photo N"


def _compact(folded: str) -> str:
    """A folded name without separators: the key that "Le Creuset", "le-creuset", "LeCreuset" share."""
    return "".join(ch for ch in folded if ch.isalnum())


class BrandNames:
    """The brands' names compiled for matching (build once per catalog version, reuse per listing).

    Names are matched case-insensitively, as whole words, and with any separators between their words
    ("Le Creuset", "le-creuset", "LeCreuset" are one name), except short ones: a name of at most 3
    letters ("On", "GAP", "H&M") matches only as the catalog writes it or in capitals, since
    "on"/"gap"/"hm" are ordinary words. Names in Chinese, Japanese or Korean match as substrings.
    Names without any letter or digit are ignored.

    Matching looks word n-grams of the listing up in a dictionary instead of running one regular
    expression per name, so its cost depends on the text, not on the size of the catalog.
    """

    SHORT = 3
    MAX_WORDS = 8

    def __init__(self, aliases: Mapping[str, Sequence[str]]) -> None:
        self._spaced: dict[str, list[tuple[str, str]]] = {}  # folded compact key -> [(brand, name)]
        self._short: dict[str, list[tuple[str, str]]] = {}  # case-kept compact key -> [(brand, name)]
        self._unspaced: dict[str, list[tuple[str, str]]] = {}  # folded name -> [(brand, name)]
        self._max_words = 1
        for brand, names in aliases.items():
            if not brand:
                raise ValueError("brand aliases: brand slug must not be empty")
            for name in dict.fromkeys([*names, brand]):  # the catalog's spellings first, the slug last
                folded = fold(name)
                key = _compact(folded)
                # A short slug ("on", "gap") is an identifier, not how a listing writes the brand.
                if not key or (name == brand and name not in names and len(key) <= self.SHORT):
                    continue
                if any(_is_unspaced(c) for c in key):
                    _add(self._unspaced, folded, brand, name)
                elif len(key) <= self.SHORT:
                    for spelling in (_display(name), _display(name).upper()):
                        _add(self._short, _compact(spelling), brand, name)
                else:
                    words = len(_TOKENS.findall(folded))
                    if words > self.MAX_WORDS:
                        raise ValueError(f"brand aliases: {name!r} has more than {self.MAX_WORDS} words")
                    self._max_words = max(self._max_words, words)
                    _add(self._spaced, key, brand, name)

    def find(self, text: str) -> list[tuple[str, str]]:
        """(brand, name) for each brand named in ``text``, in order of first appearance, once each."""
        folded = fold(text)
        found = _ngram_hits(folded, self._spaced, self._max_words)
        found += _ngram_hits(_display(text), self._short, self._max_words)
        for name, owners in self._unspaced.items():
            at = folded.find(name)
            if at >= 0:
                found += [(at, b, n) for b, n in owners]
        seen: set[str] = set()
        out: list[tuple[str, str]] = []
        for _, brand, name in sorted(found, key=lambda t: t[0]):
            if brand not in seen:
                seen.add(brand)
                out.append((brand, name))
        return out


# Words as brand matching sees them: runs of a spaced script, or runs of an unspaced one, apart.
_TOKENS = re.compile(f"{_WORD}+|[{_UNSPACED}]+")


def _add(table: dict[str, list[tuple[str, str]]], key: str, brand: str, name: str) -> None:
    owners = table.setdefault(key, [])
    if (brand, name) not in owners:
        owners.append((brand, name))


def _ngram_hits(
    text: str, table: Mapping[str, list[tuple[str, str]]], max_words: int
) -> list[tuple[int, str, str]]:
    """(position, brand, name) of the longest name starting at each word, skipping what it covers."""
    if not table:
        return []
    words = [(m.start(), m.group().replace("_", "")) for m in _TOKENS.finditer(text)]  # \w minus "_"
    hits: list[tuple[int, str, str]] = []
    i = 0
    while i < len(words):
        longest, owners, key = 0, None, ""
        for n in range(1, min(max_words, len(words) - i) + 1):
            key += words[i + n - 1][1]
            if key in table:
                longest, owners = n, table[key]
        if owners is None:
            i += 1
            continue
        hits += [(words[i][0], b, nm) for b, nm in owners]
        i += longest
    return hits


# --------------------------------------------------------------------------------------------------
# Counterfeit vocabulary


@dataclass(frozen=True, slots=True)
class CounterfeitTerm:
    """One word (family) sellers use for fakes.

    ``pattern`` is a regular expression over :func:`fold`-ed text (lower case, no accents) in which
    ``{L}``/``{R}`` stand for whole-word boundaries; ``{L}`` only at the start of the pattern or of a
    top-level alternative, where it is checked on the match's start (see :meth:`compiled`).
    ``not_before``/``not_after``: folded words that, right after / among the two words before the
    term, make it an ordinary description.
    ``examples`` must each be found (the tests check), so every pattern is exercised.
    """

    key: str
    languages: tuple[str, ...]
    weight: float
    pattern: str
    examples: tuple[str, ...]
    not_before: frozenset[str] = frozenset()
    not_after: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        require_fraction(f"counterfeit term {self.key!r} weight", self.weight)
        # A letter that folding would change (upper case, an accent, й) could never match folded text.
        literal = re.sub(r"\\.|\{[LR]\}", "", self.pattern)
        unfolded = sorted({c for c in literal if c.strip() and fold(c) != c})
        if unfolded:
            raise ValueError(f"counterfeit term {self.key!r}: pattern must be folded, not {unfolded}")

        left = self.pattern.count("{L}")
        if left and left != self.pattern.startswith("{L}") + self.pattern.count("|{L}"):
            raise ValueError(f"counterfeit term {self.key!r}: {{L}} only at the start of an alternative")

    def compiled(self) -> tuple[re.Pattern[str], bool]:
        """The pattern without its leading ``{L}`` and whether the match start must be checked.

        A leading look-behind stops the regex engine from skipping ahead to the pattern's first
        literal; checking the boundary on each match instead makes scanning about 4x faster.
        """
        return re.compile(self.pattern.replace("{L}", "").replace("{R}", _R)), "{L}" in self.pattern


def _words(*words: str) -> frozenset[str]:
    return frozenset(fold(w) for w in words)


# What follows "replica" in a legitimate listing: the fan version of a club's shirt, scale models.
_REPLICA_NEXT = _words(
    "jersey", "jerseys", "kit", "kits", "shirt", "shirts", "home", "away", "football", "soccer", "trikot",
    "maillot", "camiseta", "maglia", "camisa", "forma", "model", "models", "modell", "prop", "props",
)
# ...and what precedes it: licensed models, and Maison Margiela's perfume line called "Replica".
_REPLICA_PREV = _words("scale", "official", "licensed", "offizielle", "offizielles", "officielle",
                       "oficial", "ufficiale", "museum", "massstab", "echelle", "escala", "scala",
                       "margiela")
_MATERIALS = _words(
    "leather", "fur", "suede", "pearl", "pearls", "jewelry", "jewellery", "wood", "marble", "stone",
    "crab", "gold", "silver", "rattan", "crystal", "diamond", "diamonds", "vanilla", "cuir", "perle",
    "perles", "bijoux", "bois", "marbre", "pierre", "fourrure", "daim", "vanille", "piel", "cuero", "perla",
    "perlas", "madera", "marmol", "oro", "plata", "pelle", "legno", "marmo", "argento", "couro", "perola",
    "perolas", "madeira", "marmore", "ouro", "prata", "deri", "inci", "altin", "leder", "pelz", "holz",
)
_FAKE_NEXT = _MATERIALS | _words(
    "plant", "plants", "flower", "flowers", "tan", "lashes", "eyelashes", "lash", "nails", "nail", "snow",
    "grass", "tree", "trees", "blood", "tattoo", "tattoos", "moustache", "mustache", "beard", "food",
    "fruit", "fruits", "cake", "cakes", "money", "piercing", "piercings", "ivy", "succulent", "succulents",
    "greenery", "news", "wound", "wounds", "teeth", "glasses", "freckles", "candle", "candles", "skin",
    "wool", "hair", "book", "books", "rock", "rocks", "brick", "wall", "window", "windows", "camera",
    "cameras", "fell", "pflanze", "pflanzen", "blumen",
)
_ANTI = _words("anti", "against", "prevent", "combat", "fight", "gegen", "schutz", "contre", "lutte",
               "contra", "contro", "lotta", "protection")

DEFAULT_TERMS: tuple[CounterfeitTerm, ...] = (
    # --- English (many are used as loanwords across European listings)
    CounterfeitTerm(
        "counterfeit", ("en",), 0.95, r"{L}counterfeit(?:s|ed)?{R}",
        ("Counterfeit Rolex", "counterfeits"),
        not_before=_words("detector", "detectors", "detection", "pen", "pens", "bill", "bills", "money",
                          "banknote", "banknotes", "note", "notes", "checker", "tester", "currency",
                          "protection", "label", "labels", "sticker", "stickers", "hologram"),
        not_after=_ANTI,
    ),
    CounterfeitTerm("fake", ("en", "de", "fr", "es", "it", "pt"), 0.85, r"{L}fakes?{R}",
                    ("fake bag", "FAKES"), not_before=_FAKE_NEXT),
    CounterfeitTerm("knockoff", ("en",), 0.85, r"{L}knock-?offs?{R}",
                    ("knockoff", "knock-off", "knock‐offs")),
    CounterfeitTerm("bootleg", ("en",), 0.6, r"{L}bootlegs?{R}", ("bootleg",)),
    CounterfeitTerm(
        "replica", ("en", "es", "it", "pt"), 0.6, r"{L}replicas?{R}",
        ("REPLICA watch", "réplica", "Réplicas"),
        not_before=_REPLICA_NEXT, not_after=_REPLICA_PREV,
    ),
    CounterfeitTerm("1:1 copy", ("en", "de", "fr"), 0.9,
                    r"(?<![\d:])1 ?: ?1 "
                    r"(?:copy|replica|replika|replique|kopie|clone|quality|qualitat|qualite)s?{R}",
                    ("1:1 replica", "１：１ COPY", "1:1 Qualität")),
    CounterfeitTerm("1:1", ("en", "zh"), 0.7, r"(?<![\d:])1 ?: ?1(?![\d:])",
                    ("1:1 bag", "bag 1:1", "1:1高仿"),
                    not_before=_words("scale", "ratio", "aspect", "size", "model", "models", "crop",
                                      "square", "format", "massstab", "echelle", "escala", "scala"),
                    not_after=_words("ratio", "aspect", "scale", "format", "crop", "square",
                                     "seitenverhaltnis", "massstab", "echelle", "escala", "scala")),
    CounterfeitTerm("AAA+", ("en",), 0.7, r"{L}a{3,5}\+", ("AAA+", "aaa+ quality")),
    CounterfeitTerm("AAA grade", ("en",), 0.5,
                    r"{L}(?:a{3,5} (?:quality|grade|replica|copy|kalite|qualitat|qualite|calidad)"
                    r"|(?:grade|quality|top) a{3,5}){R}",
                    ("AAA quality", "grade AAA"),
                    not_before=_words("battery", "batteries", "cell", "cells", "akku", "batterie",
                                      "batterien")),
    CounterfeitTerm("mirror quality", ("en",), 0.85,
                    r"{L}mirror[ -]?(?:quality|grade|copy|replica|version){R}",
                    ("mirror quality", "Mirror-Grade")),
    CounterfeitTerm("super copy", ("en", "zh"), 0.9, r"{L}(?:super|high) ?cop(?:y|ies){R}",
                    ("super copy", "High Copy", "supercopy")),
    CounterfeitTerm("super clone", ("en",), 0.9, r"{L}super ?clones?{R}", ("super clone",)),
    CounterfeitTerm(
        "exact copy", ("en", "es", "it", "pt", "fr", "de"), 0.6,
        r"{L}(?:(?:exact|perfect|identical) cop(?:y|ies)"
        r"|cop(?:ia|ie) (?:exacta|perfecta|identica|perfetta|exata|perfeita|exacte|parfaite)"
        r"|(?:exakte|perfekte|identische) kopie){R}",
        ("exact copy", "copia perfecta", "perfekte Kopie"),
    ),
    CounterfeitTerm("unbranded copy", ("en",), 0.7, r"{L}unbranded (?:copy|replica|version){R}",
                    ("unbranded copy",)),
    CounterfeitTerm("dupe", ("en",), 0.5, r"{L}dupes?{R}", ("Dior dupe", "dupes")),
    CounterfeitTerm("designer inspired", ("en",), 0.5, r"{L}designer[ -]inspired{R}", ("designer-inspired",)),
    CounterfeitTerm("inspired by", ("en",), 0.35, r"{L}inspired by{R}", ("Inspired by",)),
    CounterfeitTerm("lookalike", ("en",), 0.4, r"{L}look-?alikes?{R}", ("look-alike", "lookalike")),
    CounterfeitTerm("original quality", ("en",), 0.45,
                    r"{L}(?:oem )?original quality{R}|{L}same (?:quality )?as (?:the )?original{R}",
                    ("OEM original quality", "same quality as original")),
    # --- German
    CounterfeitTerm("Fälschung", ("de",), 0.95, r"{L}(?:falschung(?:en)?|gefalscht(?:e|er|es|en)?){R}",
                    ("Fälschung", "gefälschte Uhr", "Fälschungen"),
                    not_after=_ANTI),
    CounterfeitTerm("Plagiat", ("de", "fr"), 0.6, r"{L}plagiate?{R}", ("Plagiat",)),
    CounterfeitTerm("Nachahmung", ("de",), 0.5, r"{L}nachahmung(?:en)?{R}", ("Nachahmung",)),
    CounterfeitTerm("Nachbildung", ("de",), 0.45, r"{L}nachbildung(?:en)?{R}", ("Nachbildung",),
                    not_after=_REPLICA_PREV),
    CounterfeitTerm("Imitat", ("de",), 0.45, r"{L}imitat{R}",
                    ("Imitat",), not_after=_MATERIALS),
    CounterfeitTerm("Replik", ("de", "tr"), 0.6, r"{L}replik(?:a|as|en|alar)?{R}", ("Replik", "replika"),
                    not_before=_REPLICA_NEXT, not_after=_REPLICA_PREV),
    CounterfeitTerm("Kopie", ("de",), 0.35, r"{L}kopien?{R}", ("Kopie",)),
    CounterfeitTerm("Nachbau", ("de",), 0.35, r"{L}nachbau(?:ten)?{R}", ("Nachbau",)),
    # --- French
    CounterfeitTerm("contrefaçon", ("fr",), 0.95, r"{L}contrefa(?:cons?|its?|ites?){R}",
                    ("contrefaçon", "sac contrefait"), not_after=_ANTI),
    CounterfeitTerm("réplique", ("fr",), 0.6, r"{L}repliques?{R}", ("réplique",),
                    not_before=_REPLICA_NEXT, not_after=_REPLICA_PREV),
    CounterfeitTerm("imitation", ("en", "fr"), 0.45, r"{L}imitations?{R}", ("imitation bag",),
                    not_before=_MATERIALS),
    CounterfeitTerm("copie", ("fr",), 0.35, r"{L}copie{R}", ("copie",),
                    not_before=_words("de", "du", "d", "conforme", "ecran", "privee")),
    # --- Spanish, Italian, Portuguese
    CounterfeitTerm("falsificado", ("es", "pt"), 0.9,
                    r"{L}(?:falsificad[oa]s?|falsificacion(?:es)?|falsificacao|falsificacoes){R}",
                    ("falsificado", "falsificação", "falsificación"), not_after=_ANTI),
    CounterfeitTerm("contraffatto", ("it",), 0.9, r"{L}(?:contraffatt[oaie]|contraffazion[ei]){R}",
                    ("contraffatto", "contraffazione"), not_after=_ANTI),
    CounterfeitTerm("imitación", ("es", "it", "pt"), 0.45,
                    r"{L}(?:imitacion(?:es)?|imitacao|imitacoes|imitazion[ei]){R}",
                    ("imitación", "imitação", "imitazione"), not_before=_MATERIALS),
    CounterfeitTerm(
        "falso", ("es", "it", "pt"), 0.5, r"{L}fals[oa]s?{R}", ("reloj falso", "bolsa falsa"),
        not_before=_words("positivo", "positivos", "negativo", "negativos", "techo", "teto", "soffitto",
                          "fondo", "fundo", "alarma", "alarme", "allarme", "muro", "parete", "amigo", "amico",
                          "testimonio", "testemunho", "piso", "pavimento"),
        not_after=_MATERIALS,
    ),
    CounterfeitTerm("copia", ("es", "it", "pt"), 0.35, r"{L}copias?{R}", ("copia",),
                    not_before=_words("de", "di", "da", "do", "seguridad", "sicurezza", "seguranca", "backup",
                                      "carbon", "carbone")),
    # --- Russian
    CounterfeitTerm("подделка", ("ru",), 0.9, r"{L}(?:подделк(?:а|и|у|е|ои)|поддельн\w*){R}",
                    ("подделка", "поддельный"), not_after=_words("против", "защита", "от")),
    CounterfeitTerm("фейк", ("ru",), 0.85, r"{L}феик(?:и|ов)?{R}", ("фейк",)),
    CounterfeitTerm("люкс копия", ("ru",), 0.85, r"{L}(?:люкс|lux) копи[яию]{R}", ("люкс копия",)),
    CounterfeitTerm("реплика", ("ru",), 0.5, r"{L}реплик(?:а|и|у|ои){R}", ("реплика",)),
    CounterfeitTerm("копия", ("ru",), 0.35, r"{L}копи(?:я|и|ю|еи|ии){R}", ("копия",)),
    CounterfeitTerm("паленый", ("ru",), 0.6, r"{L}пален(?:ыи|ая|ое|ые|ого|ую){R}", ("палёный",)),
    # --- Turkish
    CounterfeitTerm("sahte", ("tr",), 0.8, r"{L}sahte{R}", ("sahte",)),
    CounterfeitTerm("çakma", ("tr",), 0.7, r"{L}cakma{R}", ("çakma",)),
    CounterfeitTerm("imitasyon", ("tr",), 0.45, r"{L}imitasyon{R}", ("İmitasyon",), not_before=_MATERIALS),
    CounterfeitTerm("muadil", ("tr",), 0.35, r"{L}muadil(?:i|dir)?{R}", ("muadil",)),
    # --- Chinese (simplified and traditional)
    CounterfeitTerm("高仿", ("zh",), 0.95, r"高仿", ("高仿包包",)),
    CounterfeitTerm("精仿", ("zh",), 0.95, r"精仿", ("精仿",)),
    CounterfeitTerm("仿品", ("zh",), 0.9, r"仿(?:品|冒)", ("仿品", "仿冒")),
    CounterfeitTerm("假货", ("zh",), 0.85, r"假(?:货|貨|冒)", ("假货", "假貨", "假冒")),
    CounterfeitTerm("A货", ("zh",), 0.9, r"{L}a(?:货|貨)", ("A货", "Ａ貨")),
    CounterfeitTerm("超A", ("zh",), 0.8, r"超a{R}", ("超A",)),
    CounterfeitTerm("1比1", ("zh",), 0.85, r"{L}1比1{R}", ("1比1",)),
    CounterfeitTerm("原单", ("zh",), 0.7, r"原(?:单|單)", ("原单",)),
    CounterfeitTerm("冒牌", ("zh",), 0.85, r"冒牌", ("冒牌",)),
    CounterfeitTerm("山寨", ("zh",), 0.75, r"山寨", ("山寨",)),
    # 复刻 is also the brands' own word for a re-issue ("复刻版" of a sneaker), hence the low weight.
    CounterfeitTerm("复刻", ("zh",), 0.45, r"(?:复|復)刻", ("复刻",)),
    # --- Japanese
    CounterfeitTerm("スーパーコピー", ("ja",), 0.95, r"スーパーコピー", ("スーパーコピー",)),
    CounterfeitTerm("コピー品", ("ja",), 0.8, r"コピー(?:品|商品)", ("コピー品",)),
    CounterfeitTerm("偽物", ("ja",), 0.9, r"偽(?:物|造品)", ("偽物",)),
    CounterfeitTerm("N級", ("ja",), 0.8, r"{L}n級", ("N級",)),
    CounterfeitTerm("パチモン", ("ja",), 0.8, r"パチ(?:モン|もん)", ("パチモン",)),
    CounterfeitTerm("レプリカ", ("ja",), 0.6, r"レプリカ", ("レプリカ",)),
    # --- Korean
    CounterfeitTerm("짝퉁", ("ko",), 0.9, r"짝퉁", ("짝퉁",)),
    CounterfeitTerm("가품", ("ko",), 0.8, r"가품", ("가품",)),
    CounterfeitTerm("미러급", ("ko",), 0.9, r"미러 ?급", ("미러급",)),
    CounterfeitTerm("이미테이션", ("ko",), 0.45, r"이미테이션", ("이미테이션",)),
    CounterfeitTerm("레플리카", ("ko",), 0.6, r"레플리카", ("레플리카",)),
)

# Negations, folded. Space-delimited scripts: one of the three words before the term (within its
# clause). Unspaced scripts: the text right before the term ends with one, or right after starts with one.
_NEGATORS = _words(
    "not", "no", "never", "non", "without", "zero", "don", "dont", "isn", "isnt", "aren", "doesn", "wasn",
    "won", "nicht", "kein", "keine", "keinen", "keiner", "keinerlei", "niemals", "ohne", "pas", "jamais",
    "aucun", "aucune", "sans", "ni", "nunca", "sin", "sem", "senza", "nao", "nem", "не", "нет", "без", "ни",
    "asla",
)
_POST_NEGATORS = _words("degil", "degildir")
_UNSPACED_PRE_NEGATORS = (
    "不是", "并非", "並非", "绝非", "絕非", "绝不", "絕不", "拒绝", "拒絕", "杜绝", "杜絕", "谢绝", "謝絕",
    "没有", "沒有", "防止", "谨防", "謹防", "打击", "打擊", "严防", "嚴防", "非", "无", "無", "防",
)
_UNSPACED_POST_NEGATORS = (
    "ではない", "ではありません", "ではございません", "じゃない", "じゃありません", "ではなく",
    "아님", "아닙니다", "아니에요", "아니다", "아니며",
)
_CLAUSE = re.compile(r"[,.;!?|()\[\]{}/\n，。；！？、]")
_TOKEN = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class TermHit:
    term: CounterfeitTerm
    where: str
    matched: str  # as found in the folded text
    negated: bool


class CounterfeitLexicon:
    """The counterfeit vocabulary compiled once; :meth:`find` lists the terms in one text."""

    def __init__(self, terms: Sequence[CounterfeitTerm] = DEFAULT_TERMS) -> None:
        keys = [t.key for t in terms]
        if len(set(keys)) != len(keys):
            raise ValueError("counterfeit terms must have distinct keys")
        self.terms = tuple(terms)
        self._compiled = [(t, *t.compiled()) for t in self.terms]

    def find(self, text: str, where: str) -> list[TermHit]:
        folded = fold(text)
        spans: list[tuple[CounterfeitTerm, int, int]] = []
        for term, rx, bounded in self._compiled:
            pos = 0
            while (m := rx.search(folded, pos)) is not None:
                a, b = m.span()
                if bounded and a > 0 and _WORD_CHAR.match(folded[a - 1]):
                    pos = a + 1  # inside a word ("areplica"): look again one character on
                    continue
                spans.append((term, a, b))
                pos = b if b > a else a + 1
        # Overlapping hits ("1:1 replica" and "replica") keep the strongest, then the longest.
        spans.sort(key=lambda s: (-s[0].weight, -(s[2] - s[1]), s[1]))
        kept: list[tuple[CounterfeitTerm, int, int]] = []
        for term, a, b in spans:
            if all(b <= ka or a >= kb for _, ka, kb in kept):
                kept.append((term, a, b))
        hits: list[TermHit] = []
        for term, a, b in sorted(kept, key=lambda s: s[1]):
            before, after = _clause_before(folded, a), _clause_after(folded, b)
            prev_words = _TOKEN.findall(before)[-2:]
            next_words = _TOKEN.findall(after)[:1]
            if set(next_words) & term.not_before or set(prev_words) & term.not_after:
                continue  # an ordinary description ("fake fur", "anti-counterfeit")
            hits.append(TermHit(term, where, folded[a:b], _negated(folded[a:b], before, after)))
        return hits


def _clause_before(text: str, start: int) -> str:
    head = text[:start]
    cut = max((m.end() for m in _CLAUSE.finditer(head)), default=0)
    return head[cut:]


def _clause_after(text: str, end: int) -> str:
    tail = text[end:]
    m = _CLAUSE.search(tail)
    return tail[: m.start()] if m else tail


def _negated(matched: str, before: str, after: str) -> bool:
    if _is_unspaced(matched[0]) or _is_unspaced(matched[-1]):
        if before.rstrip().endswith(_UNSPACED_PRE_NEGATORS):
            return True
        # Korean attaches a particle between the noun and the negation: 짝퉁이 아닙니다.
        tail = after.lstrip()
        tail = tail[1:].lstrip() if tail[:1] in ("이", "가", "은", "는") else tail
        if tail.startswith(_UNSPACED_POST_NEGATORS):
            return True
    words = _TOKEN.findall(before)[-3:]
    for i, w in enumerate(words):
        # "No. 1 replica" is a rank, not a negation.
        if w in _NEGATORS and not (w == "no" and i + 1 < len(words) and words[i + 1].isdigit()):
            return True
    return bool(set(_TOKEN.findall(after)[:1]) & _POST_NEGATORS)


DEFAULT_LEXICON = CounterfeitLexicon()


# --------------------------------------------------------------------------------------------------
# Scanning a listing and the text signal


@dataclass(frozen=True, slots=True)
class TextWeights:
    """How much a counterfeit term counts by where it was seen, and which OCR lines are read at all.

    Titles are what the seller chose to headline; photo text is printed on the product or packaging
    (or pasted onto the photo); descriptions carry boilerplate and keyword stuffing.
    """

    title: float = 1.0
    description: float = 0.85
    photo: float = 0.9
    min_ocr_confidence: float = 0.5

    def __post_init__(self) -> None:
        for name in ("title", "description", "photo", "min_ocr_confidence"):
            require_fraction(f"text weights {name}", getattr(self, name))

    def factor(self, where: str) -> float:
        if where == TITLE:
            return self.title
        if where == DESCRIPTION:
            return self.description
        return self.photo


@dataclass(frozen=True, slots=True)
class TextScan:
    """What the listing's texts say: counterfeit terms (with negated ones) and brand mentions."""

    hits: tuple[TermHit, ...] = ()
    mentions: tuple[BrandMention, ...] = ()
    scanned: tuple[str, ...] = ()  # the places read: "title", "description", "photo N"

    def mentions_of(self, brand: str) -> tuple[BrandMention, ...]:
        return tuple(m for m in self.mentions if m.brand == brand)

    def brands(self) -> list[str]:
        return list(dict.fromkeys(m.brand for m in self.mentions))


def _photo_texts(photo_texts: Iterable[PhotoText], min_confidence: float) -> list[tuple[str, str]]:
    by_photo: dict[int, list[str]] = {}
    for line in photo_texts:
        if line.image_index < 0:
            raise ValueError(f"photo text image_index must be >= 0, got {line.image_index}")
        if line.confidence >= min_confidence and line.text.strip():
            by_photo.setdefault(line.image_index, []).append(line.text)
    # Lines of one photo are joined with spaces: a phrase may be split across OCR lines ("1:1" / "copy").
    return [(photo_label(i), " ".join(lines)) for i, lines in sorted(by_photo.items())]


def scan_text(
    title: str,
    description: str = "",
    photo_texts: Iterable[PhotoText] = (),
    brands: BrandNames | None = None,
    lexicon: CounterfeitLexicon = DEFAULT_LEXICON,
    weights: TextWeights | None = None,
) -> TextScan:
    """Scan the listing's title, description and the text read from its photos."""
    w = weights or TextWeights()
    places = [(TITLE, title), (DESCRIPTION, description), *_photo_texts(photo_texts, w.min_ocr_confidence)]
    hits: list[TermHit] = []
    mentions: list[BrandMention] = []
    scanned: list[str] = []
    for where, text in places:
        if not text.strip():
            continue
        scanned.append(where)
        hits += lexicon.find(text, where)
        if brands is not None:
            mentions += [BrandMention(b, n, where) for b, n in brands.find(text)]
    return TextScan(tuple(hits), tuple(mentions), tuple(scanned))


def vocabulary_score(scan: TextScan, weights: TextWeights | None = None) -> float:
    """Counterfeit-vocabulary evidence in [0, 1]: per distinct term its best weight x place factor;
    the strongest counts fully, each next one half as much as the one before."""
    w = weights or TextWeights()
    best: dict[str, float] = {}
    for h in scan.hits:
        if not h.negated:
            best[h.term.key] = max(best.get(h.term.key, 0.0), h.term.weight * w.factor(h.where))
    ranked = sorted(best.values(), reverse=True)
    return noisy_or(v * 0.5**i for i, v in enumerate(ranked))


def _quote_places(places: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(places))


def vocabulary_reason(scan: TextScan) -> str | None:
    """"counterfeit vocabulary: 'replica' (title, photo 2); '高仿' (description)", or None."""
    found: dict[str, list[str]] = {}
    for h in scan.hits:
        if not h.negated:
            found.setdefault(h.term.key, []).append(h.where)
    if not found:
        return None
    parts = [f"'{k}' ({_quote_places(v)})" for k, v in found.items()]
    return "counterfeit vocabulary: " + "; ".join(parts)


def mention_reason(brand: str, mentions: Sequence[BrandMention]) -> str:
    """"title, photo 1 name acme ('Acme')"."""
    names = ", ".join(dict.fromkeys(f"'{m.name}'" for m in mentions))
    where = _quote_places(m.where for m in mentions)
    return f"{where} name{'s' if len({m.where for m in mentions}) == 1 else ''} {brand} ({names})"


def text_signal(scan: TextScan, weights: TextWeights | None = None) -> Signal:
    """The text signal: score = counterfeit-vocabulary evidence; evidence lists every term found
    (negated ones apart) and every brand mentioned, with where. Brand mentions do not raise the score
    (they say *which* brand, not that something is off); fusion reads them as brand evidence."""
    terms: dict[str, dict[str, Any]] = {}
    negated: dict[str, dict[str, Any]] = {}
    for h in scan.hits:
        bucket = negated if h.negated else terms
        entry = bucket.setdefault(
            h.term.key,
            {"term": h.term.key, "languages": list(h.term.languages), "weight": h.term.weight, "where": [],
             "matched": []},
        )
        if h.where not in entry["where"]:
            entry["where"].append(h.where)
        if h.matched not in entry["matched"]:
            entry["matched"].append(h.matched)
    brands: dict[str, list[str]] = {}
    for m in scan.mentions:
        brands.setdefault(m.brand, [])
        if m.where not in brands[m.brand]:
            brands[m.brand].append(m.where)
    sig = Signal(name=SignalName.TEXT, score=vocabulary_score(scan, weights))
    sig.evidence = {
        "terms": list(terms.values()),
        "negated": list(negated.values()),
        "brands_mentioned": brands,
        "scanned": list(scan.scanned),
    }
    reason = vocabulary_reason(scan)
    if reason:
        sig.reasons.append(reason)
    sig.reasons += [mention_reason(b, scan.mentions_of(b)) for b in scan.brands()]
    return sig


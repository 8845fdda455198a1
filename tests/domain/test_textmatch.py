"""The text signal: normalisation, brand mentions, counterfeit vocabulary in many languages, guards."""

from __future__ import annotations

import pytest

from service.domain.model import SignalName
from service.domain.textmatch import (
    DEFAULT_LEXICON,
    DEFAULT_TERMS,
    BrandNames,
    CounterfeitLexicon,
    CounterfeitTerm,
    PhotoText,
    TextWeights,
    fold,
    scan_text,
    text_signal,
    vocabulary_score,
)

BRANDS = BrandNames({
    "acme": ["Acme", "ACME Corp"],
    "le-creuset": ["Le Creuset"],
    "gap": ["GAP"],
    "on": ["On"],
    "hm": ["H&M"],
    "nike": ["Nike", "耐克"],
})


def found(text: str) -> list[str]:
    """Keys of the terms found in ``text`` and not negated."""
    return [h.term.key for h in DEFAULT_LEXICON.find(text, "title") if not h.negated]


# --- normalisation -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "folded"), [
    ("ＲＥＰＬＩＣＡ　１：１", "replica 1:1"),   # full-width letters, digits, colon and space
    ("Fälschung", "falschung"),
    ("STRASSE Straße", "strasse strasse"),      # casefold ß
    ("réplica  imitação\tcontrefaçon", "replica imitacao contrefacon"),
    ("knock‐off — AAA＋", "knock-off - aaa+"),  # unicode hyphen, em dash, full-width plus
    ("İmitasyon çakma değil", "imitasyon cakma degil"),
    ("палёный подделкой", "паленыи подделкои"),  # ё -> е, й -> и
    ("Ａ貨 高仿", "a貨 高仿"),
])
def test_fold(raw: str, folded: str) -> None:
    assert fold(raw) == folded


def test_fold_keeps_kana_voicing_and_hangul() -> None:
    assert fold("ピ") != fold("ヒ")
    assert fold("スーパーコピー") == "スーパーコピー"
    assert fold("짝퉁이 아닙니다") == "짝퉁이 아닙니다"


# --- vocabulary --------------------------------------------------------------------------------------

@pytest.mark.parametrize("term", DEFAULT_TERMS, ids=lambda t: t.key)
def test_every_term_finds_its_examples(term: CounterfeitTerm) -> None:
    assert term.examples
    for example in term.examples:
        assert term.key in found(example), example


def test_lexicon_covers_the_languages() -> None:
    languages = {lang for t in DEFAULT_TERMS for lang in t.languages}
    assert {"en", "de", "zh", "fr", "es", "it", "pt", "ru", "tr", "ja", "ko"} <= languages


@pytest.mark.parametrize(("text", "key"), [
    ("Acme handbag REPLICA top", "replica"),
    ("Acme watch 1:1 copy", "1:1 copy"),
    ("acme sneakers AAA+ grade", "AAA+"),
    ("Acme mirror quality bag", "mirror quality"),
    ("Acme Tasche Fälschung", "Fälschung"),
    ("gefälschte Acme Uhr", "Fälschung"),
    ("Acme Nachbildung Uhr", "Nachbildung"),
    ("acme 高仿包包", "高仿"),
    ("acme 精仿手表", "精仿"),
    ("ACME A货", "A货"),
    ("Acme 1比1 复刻", "1比1"),
    ("sac Acme contrefaçon", "contrefaçon"),
    ("montre réplique Acme", "réplique"),
    ("bolso Acme imitación", "imitación"),
    ("reloj Acme falsificado", "falsificado"),
    ("borsa Acme contraffatta", "contraffatto"),
    ("bolsa Acme réplica", "replica"),
    ("сумка Acme подделка", "подделка"),
    ("Acme люкс копия", "люкс копия"),
    ("Acme çanta çakma", "çakma"),
    ("Acme sahte saat", "sahte"),
    ("Acme スーパーコピー 財布", "スーパーコピー"),
    ("Acme 짝퉁 가방", "짝퉁"),
    ("Acme dupe lipstick", "dupe"),
    ("inspired by Acme", "inspired by"),
    ("OEM original quality Acme charger", "original quality"),
])
def test_counterfeit_vocabulary(text: str, key: str) -> None:
    assert key in found(text)


@pytest.mark.parametrize("text", [
    "fake fur coat", "Fake-Leather jacket", "faux leather bag", "fake plants for the office",
    "Acme replica jersey home 2024", "Official replica helmet", "1:1 scale replica lightsaber",
    "1:1 scale model", "aspect ratio 1:1", "meet at 11:11", "ratio 1:10", "AAA batteries 12 pack",
    "grade AAA battery", "anti-counterfeit hologram label", "counterfeit money detector pen",
    "imitation leather sofa", "Leder Imitat Sitzbezug", "falso techo de yeso", "copia de seguridad",
    "high quality mirror for the bathroom", "top quality mirror", "copy paper A4", "3 sets of 12 reps",
    "Zippo çakmak", "仿真花 装饰", "假一赔十 正品保证", "防伪标签", "imitazione pelle", "OEM battery",
    "Fälschungssicher verpackt", "7A grade hair extensions", "clone trooper figure",
    "Maison Margiela Replica Jazz Club eau de toilette",
])
def test_false_positive_guards(text: str) -> None:
    assert found(text) == [], text


@pytest.mark.parametrize("text", [
    "not a replica", "100% original, not fake", "we don't sell fakes", "keine Fälschung",
    "ist nicht gefälscht", "ce n'est pas une réplique", "no es una réplica", "non contraffatto",
    "não é falsificado", "это не подделка", "sahte değil", "不是高仿", "绝非A货", "拒绝假货",
    "偽物ではありません", "짝퉁이 아닙니다", "without counterfeit parts",
])
def test_negated_terms_are_kept_but_score_nothing(text: str) -> None:
    hits = DEFAULT_LEXICON.find(text, "title")
    assert hits and all(h.negated for h in hits), text
    scan = scan_text(text)
    assert vocabulary_score(scan) == 0.0
    sig = text_signal(scan)
    assert sig.evidence["terms"] == [] and sig.evidence["negated"]


def test_negation_stays_in_its_clause_and_ranks_are_not_negations() -> None:
    assert found("not original, 1:1 replica") == ["1:1 copy"]
    assert found("No. 1 replica seller") == ["replica"]
    assert found("no fake; replica") == ["replica"]
    assert found("areplica, fakery, replicas") == ["replica"]  # whole words only


def test_overlapping_terms_count_once() -> None:
    keys = [h.term.key for h in DEFAULT_LEXICON.find("1:1 replica", "title")]
    assert keys == ["1:1 copy"]


def test_unfolded_pattern_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be folded"):
        CounterfeitTerm("bad", ("de",), 0.5, r"{L}Fälschung{R}", ("x",))
    with pytest.raises(ValueError, match="only at the start"):
        CounterfeitTerm("bad", ("en",), 0.5, r"very {L}bad{R}", ("very bad",))
    with pytest.raises(ValueError, match="weight"):
        CounterfeitTerm("bad", ("en",), 1.5, r"{L}bad{R}", ("bad",))
    with pytest.raises(ValueError, match="distinct keys"):
        CounterfeitLexicon([DEFAULT_TERMS[0], DEFAULT_TERMS[0]])


# --- brand mentions ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "brands"), [
    ("Acme running shoe", ["acme"]),
    ("ＡＣＭＥ shoe", ["acme"]),                        # full-width
    ("Acmeish shoe", []),                                # whole word only
    ("acme-corp bag", ["acme"]),
    ("LeCreuset pot, not le-creuset nor Le  Creuset", ["le-creuset"]),
    ("耐克鞋 正品", ["nike"]),                          # CJK: substring
    ("GAP hoodie", ["gap"]),
    ("mind the gap between", []),                        # short names: as written or in capitals
    ("On running shoe", ["on"]),
    ("put it on the table", []),
    ("H&M shirt and Nike socks", ["hm", "nike"]),
    ("hm, ok", []),
])
def test_brand_mentions(text: str, brands: list[str]) -> None:
    assert [b for b, _ in BRANDS.find(text)] == brands


def test_longest_name_wins_and_large_catalogs_work() -> None:
    names = BrandNames({f"b{i:04d}": [f"Brand {i} Goods"] for i in range(2000)}
                       | {"acme": ["Acme"], "acme-sport": ["Acme Sport"]})
    assert names.find("new Acme Sport shoes") == [("acme-sport", "Acme Sport")]
    found_names = names.find("acme shoes, brand 1999 goods")
    assert found_names == [("acme", "Acme"), ("b1999", "Brand 1999 Goods")]
    assert names.find("brand 1999") == []
    assert names.find("B1999") == [("b1999", "b1999")]  # a long slug is a name too
    with pytest.raises(ValueError, match="more than 8 words"):
        BrandNames({"long": ["a b c d e f g h i"]})


def test_brand_names_validate_and_report_the_catalog_spelling() -> None:
    with pytest.raises(ValueError, match="slug"):
        BrandNames({"": ["x"]})
    assert BRANDS.find("acme corp") == [("acme", "ACME Corp")]
    assert BrandNames({}).find("anything") == []


# --- scanning a listing and the signal ---------------------------------------------------------------

def test_scan_reports_where_terms_and_brands_were_seen() -> None:
    scan = scan_text(
        "Acme bag",
        "great quality, replica",
        [PhotoText(1, "1:1", 0.9), PhotoText(1, "COPY", 0.8), PhotoText(0, "高仿", 0.2),
         PhotoText(2, "ACME", 0.95)],
        brands=BRANDS,
    )
    assert scan.scanned == ("title", "description", "photo 2", "photo 3")
    where = {(h.term.key, h.where) for h in scan.hits}
    # OCR lines of one photo are read together ("1:1" + "COPY"); the low-confidence line is dropped.
    assert where == {("replica", "description"), ("1:1 copy", "photo 2")}
    assert [(m.brand, m.where) for m in scan.mentions] == [("acme", "title"), ("acme", "photo 3")]

    sig = text_signal(scan)
    assert sig.name is SignalName.TEXT and sig.ran
    assert sig.evidence["brands_mentioned"] == {"acme": ["title", "photo 3"]}
    terms = {t["term"]: t for t in sig.evidence["terms"]}
    assert terms["1:1 copy"]["where"] == ["photo 2"] and terms["replica"]["languages"][0] == "en"
    assert sig.reasons[0] == "counterfeit vocabulary: 'replica' (description); '1:1 copy' (photo 2)"
    assert sig.reasons[1] == "title, photo 3 name acme ('Acme')"


def test_place_weights_title_above_photo_above_description() -> None:
    title = vocabulary_score(scan_text("replica"))
    photo = vocabulary_score(scan_text("", "", [PhotoText(0, "replica")]))
    description = vocabulary_score(scan_text("", "replica"))
    assert title == pytest.approx(0.6)
    assert title > photo > description > 0.0


def test_more_distinct_terms_raise_the_score_with_diminishing_returns() -> None:
    one = vocabulary_score(scan_text("replica"))
    two = vocabulary_score(scan_text("replica dupe"))
    three = vocabulary_score(scan_text("replica dupe knockoff"))
    same_twice = vocabulary_score(scan_text("replica", "replica"))
    assert one < two < three <= 1.0
    assert same_twice == one  # the same term in two places is one piece of evidence
    assert two - one < 0.5 * 0.5  # the second term counts at most half its weight


def test_brand_mentions_alone_do_not_score() -> None:
    sig = text_signal(scan_text("Acme original sneakers", brands=BRANDS))
    assert sig.score == 0.0
    assert sig.evidence["brands_mentioned"] == {"acme": ["title"]}


def test_text_weights_validate_and_photo_text_needs_a_valid_index() -> None:
    with pytest.raises(ValueError, match="title"):
        TextWeights(title=1.5)
    with pytest.raises(ValueError, match="image_index"):
        scan_text("x", "", [PhotoText(-1, "replica")])

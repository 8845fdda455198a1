"""The scoring entry point end to end on plain objects: the requirements of fusion as the use case sees
them (copy at a normal vs a low price, authorized sellers, no brand evidence, vocabulary, monotonicity,
verdict thresholds and per-brand overrides)."""

from __future__ import annotations

import itertools
import pickle
from typing import Any

import pytest

import service.domain.assessment as assessment_module
from service.domain.assessment import (
    Assessment,
    BrandContext,
    ListingFacts,
    ScoringParams,
    assess,
    assess_risk,
    wants_closer_look,
)
from service.domain.candidates import candidate_brands
from service.domain.model import Listing, Match, Money, SellerInfo, SignalName, Verdict
from service.domain.policy import VerdictPolicy
from service.domain.pricing import CurrencyTable, UnknownCurrencyError
from service.domain.textmatch import BrandNames, PhotoText, TextScan, scan_text
from tests.domain.builders import copy_of, match, ordinary_seller

PARAMS = ScoringParams(currencies=CurrencyTable({"USD": 1.0, "EUR": 0.92}))
NAMES = BrandNames({"acme": ["Acme"], "beta": ["Beta Goods"]})
ACME = BrandContext("acme", authorized_sellers=frozenset({"acme-store"}))
CONTEXTS = {"acme": ACME}
NO_TEXT = TextScan()


def facts(price: float | None = 100.0, seller: SellerInfo | None = None, currency: str = "USD",
          confirmed: int | None = None) -> ListingFacts:
    return ListingFacts("l-1", Money(price, currency) if price is not None else None,
                        seller if seller is not None else ordinary_seller(), confirmed)


def copy_listing(price: float, seller: SellerInfo | None = None, **kw: object) -> Assessment:
    """A near-duplicate of acme's official photo of SKU-1 (reference price 100 USD)."""
    return assess(facts(price, seller), [copy_of(0.97)], NO_TEXT, CONTEXTS, PARAMS, **kw)  # type: ignore[arg-type]


# --- the requirements --------------------------------------------------------------------------------

def test_copy_at_a_normal_price_is_far_below_the_same_copy_at_30_percent() -> None:
    normal = copy_listing(100.0)
    authorized = copy_listing(100.0, ordinary_seller("acme-store"))
    cheap = copy_listing(30.0)
    assert normal.verdict is Verdict.CLEAR and authorized.verdict is Verdict.CLEAR
    assert cheap.verdict is Verdict.LIKELY_COUNTERFEIT
    assert cheap.risk - normal.risk >= 0.3
    assert cheap.risk - authorized.risk >= 0.3
    assert cheap.brand == normal.brand == "acme"


def test_copy_at_30_percent_is_explained_by_the_copy_and_the_price() -> None:
    cheap = copy_listing(30.0)
    # Shapley shares: the brand evidence (main effect + half the interaction) edges out the price.
    assert cheap.reasons[:2] == [
        "photo 1 is a copy of acme's official photo SKU-1 (ref r-12), similarity 0.97",
        "price 30.00 USD is 30% of the reference price 100.00 USD",
    ]
    assert [s.name for s in cheap.signals] == [SignalName.COPY, SignalName.LOOKALIKE, SignalName.LOGO,
                                               SignalName.KEYPOINTS, SignalName.TEXT, SignalName.PRICE,
                                               SignalName.SELLER]
    price = cheap.signal(SignalName.PRICE)
    assert price is not None and price.score == 1.0 and price.evidence["ratio"] == 0.3


def test_authorized_seller_at_full_price_is_clear_even_with_a_perfect_copy() -> None:
    out = copy_listing(100.0, ordinary_seller("acme-store"))
    assert out.verdict is Verdict.CLEAR and out.risk < 0.05
    assert "seller acme-store is an authorized seller of acme (lowers risk)" in out.reasons
    seller = out.signal(SignalName.SELLER)
    assert seller is not None and seller.score == 0.0 and seller.evidence["authorized"] is True
    assert out.features.authorized


def test_copy_at_30_percent_in_another_currency() -> None:
    out = assess(facts(27.6, currency="EUR"), [copy_of(0.97)], NO_TEXT, CONTEXTS, PARAMS)
    assert out.verdict is Verdict.LIKELY_COUNTERFEIT
    assert out.reasons[1] == "price 27.60 EUR is 30% of the reference price 100.00 USD"


def test_no_brand_evidence_is_clear_whatever_the_price_text_and_seller() -> None:
    bad_seller = SellerInfo("s-new", account_age_days=1, units_sold_30d=900, stock=5000)
    scan = scan_text("REPLICA 1:1 mirror quality AAA+ 高仿", "fake, knockoff, Fälschung", brands=NAMES)
    for price in (0.01, 1.0, 30.0, 100.0):
        out = assess(facts(price, bad_seller, confirmed=9), [copy_of(0.2), match(SignalName.LOOKALIKE, 0.3)],
                     scan, CONTEXTS, PARAMS)
        assert out.brand is None and out.candidates == []
        assert out.verdict is Verdict.CLEAR, price
        price_sig = out.signal(SignalName.PRICE)
        assert price_sig is not None and not price_sig.ran


@pytest.mark.parametrize("title", [
    "Acme replica handbag", "Acme bag FAKE", "Acme Tasche Fälschung", "Acme 高仿 包包", "sac Acme réplique",
    "сумка Acme подделка", "Acme çanta sahte", "borsa Acme contraffatta", "bolso Acme falsificado",
    "Acme スーパーコピー", "Acme 짝퉁", "Acme 1:1 copy", "Acme mirror quality",
])
def test_counterfeit_vocabulary_and_a_brand_in_the_title_is_at_least_review(title: str) -> None:
    out = assess(facts(None), [], scan_text(title, brands=NAMES), CONTEXTS, PARAMS)
    assert out.brand == "acme"
    assert out.verdict in (Verdict.REVIEW, Verdict.LIKELY_COUNTERFEIT), (title, out.risk)
    assert sorted(r.split(":")[0] for r in out.reasons[:2]) == ["counterfeit vocabulary",
                                                                 "title names acme ('Acme')"]


def test_the_same_title_without_vocabulary_or_negated_is_clear() -> None:
    for title in ("Acme handbag, new", "Acme handbag, not a replica", "Acme fake fur collar"):
        out = assess(facts(None), [], scan_text(title, brands=NAMES), CONTEXTS, PARAMS)
        assert out.brand == "acme" and out.verdict is Verdict.CLEAR, title


def test_risk_is_monotone_in_the_price() -> None:
    risks = [copy_listing(float(p)).risk for p in range(150, 0, -5)]  # price falling
    assert all(a <= b for a, b in itertools.pairwise(risks))
    assert risks[0] < 0.2 and risks[-1] > 0.9


@pytest.mark.parametrize("price", [100.0, 60.0, 30.0])
def test_risk_is_monotone_in_the_sellers_record_and_selling(price: float) -> None:
    by_record = [assess(facts(price, confirmed=n), [copy_of(0.9)], NO_TEXT, CONTEXTS, PARAMS).risk
                 for n in range(6)]
    assert all(a <= b for a, b in itertools.pairwise(by_record))
    by_age = [assess(facts(price, SellerInfo("s", account_age_days=d, units_sold_30d=300)), [copy_of(0.9)],
                     NO_TEXT, CONTEXTS, PARAMS).risk for d in range(60, -1, -3)]  # account getting newer
    assert all(a <= b for a, b in itertools.pairwise(by_age))
    by_volume = [assess(facts(price, SellerInfo("s", account_age_days=3, units_sold_30d=u)), [copy_of(0.9)],
                        NO_TEXT, CONTEXTS, PARAMS).risk for u in range(0, 400, 20)]
    assert all(a <= b for a, b in itertools.pairwise(by_volume))
    assert by_record[-1] > by_record[0] and by_age[-1] > by_age[0] and by_volume[-1] > by_volume[0]


def test_risk_is_monotone_in_the_text_and_the_copy_similarity() -> None:
    titles = ["Acme bag", "Acme bag dupe", "Acme bag dupe replica", "Acme bag dupe replica fake"]
    risks = [assess(facts(None), [], scan_text(t, brands=NAMES), CONTEXTS, PARAMS).risk for t in titles]
    assert all(a < b for a, b in itertools.pairwise(risks))
    sims = [copy_listing_at(s / 100) for s in range(20, 100, 5)]
    assert all(a <= b for a, b in itertools.pairwise(sims))


def copy_listing_at(similarity: float) -> float:
    return assess(facts(40.0), [copy_of(similarity)], NO_TEXT, CONTEXTS, PARAMS).risk


def test_new_account_selling_volume_with_a_copy_is_flagged() -> None:
    seller = SellerInfo("s-new", account_age_days=5, units_sold_30d=500)
    out = assess(facts(100.0, seller), [copy_of(0.97)], NO_TEXT, CONTEXTS, PARAMS)
    assert out.verdict in (Verdict.REVIEW, Verdict.LIKELY_COUNTERFEIT)
    assert "seller s-new's account is 5 days old and sold 500 units in 30 days" in out.reasons[:2]


def test_market_prices_stand_in_for_a_missing_reference_price() -> None:
    market = [Money(x, "USD") for x in (95, 100, 105, 98, 102, 1.0, 99_999)]
    ctx = {"acme": BrandContext("acme", market_prices={"SKU-1": market, "SKU-9": [Money(1, "USD")] * 9})}
    m = copy_of(0.97, price=None)
    cheap = assess(facts(35.0), [m], NO_TEXT, ctx, PARAMS)
    normal = assess(facts(99.0), [m], NO_TEXT, ctx, PARAMS)
    assert cheap.verdict is Verdict.LIKELY_COUNTERFEIT and normal.verdict is Verdict.CLEAR
    price = cheap.signal(SignalName.PRICE)
    assert price is not None
    assert price.evidence["market_count"] == 5 and price.evidence["market_outliers"] == 2


# --- verdict policy ----------------------------------------------------------------------------------

def test_default_thresholds_are_respected() -> None:
    for price in range(5, 150, 5):
        out = copy_listing(float(price))
        assert out.verdict is PARAMS.policy.verdict(out.risk)
        assert out.policy == PARAMS.policy


def test_per_brand_policy_override_applies_to_that_brand_only() -> None:
    strict = VerdictPolicy(review_threshold=0.05, likely_threshold=0.5)
    contexts = {"acme": BrandContext("acme", policy=strict), "beta": BrandContext("beta")}
    acme = assess(facts(100.0), [copy_of(0.97)], NO_TEXT, contexts, PARAMS)
    beta = assess(facts(100.0), [copy_of(0.97, brand="beta")], NO_TEXT, contexts, PARAMS)
    assert acme.risk == pytest.approx(beta.risk)
    assert acme.verdict is Verdict.REVIEW and acme.policy == strict
    assert beta.verdict is Verdict.CLEAR and beta.policy == PARAMS.policy


# --- candidates, skipped signals, plumbing -----------------------------------------------------------

def test_the_riskiest_brand_reading_is_reported() -> None:
    # beta has the stronger visual evidence, but its product costs 25 USD: at 30 USD nothing is off.
    # acme's lookalike costs 100 USD: at 30 USD its reading is the suspicious one.
    matches = [copy_of(0.97, brand="beta", sku="B-1", price=Money(25.0, "USD")),
               match(SignalName.LOOKALIKE, 0.9, brand="acme")]
    out = assess(facts(30.0), matches, NO_TEXT, CONTEXTS, PARAMS)
    assert [c.brand for c in out.candidates] == ["beta", "acme"]
    assert out.brand == "acme" and out.verdict is Verdict.LIKELY_COUNTERFEIT
    copy_sig = out.signal(SignalName.COPY)
    assert copy_sig is not None and copy_sig.score == 0.0  # signals are those of the reported brand


def test_skipped_signals_are_reported_and_ignored() -> None:
    skipped = {SignalName.LOGO: "no candidate brand", SignalName.PRICE: "price check disabled"}
    out = assess(facts(30.0), [copy_of(0.97), match(SignalName.LOGO, 0.99)], NO_TEXT, CONTEXTS, PARAMS,
                 skipped=skipped)
    logo, price = out.signal(SignalName.LOGO), out.signal(SignalName.PRICE)
    assert logo is not None and not logo.ran and logo.skipped_because == "no candidate brand"
    assert price is not None and not price.ran and price.score == 0.0
    assert price.skipped_because == "price check disabled"
    assert out.verdict is Verdict.CLEAR  # without the price there is nothing off


def test_photo_text_can_name_the_brand_and_say_replica() -> None:
    scan = scan_text("Handbag", "", [PhotoText(0, "ACME"), PhotoText(0, "replica")], brands=NAMES)
    out = assess(facts(None), [], scan, CONTEXTS, PARAMS)
    assert out.brand == "acme" and out.verdict is Verdict.REVIEW
    text = out.signal(SignalName.TEXT)
    assert text is not None and text.evidence["terms"][0]["where"] == ["photo 1"]


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(UnknownCurrencyError, match=r"price\.currency: unknown currency 'XYZ'"):
        assess(facts(10.0, currency="XYZ"), [], NO_TEXT, {}, PARAMS)
    with pytest.raises(ValueError, match=r"price\.amount"):
        assess(facts(-1.0), [copy_of()], NO_TEXT, CONTEXTS, PARAMS)
    with pytest.raises(ValueError, match=r"seller\.units_sold_30d"):
        assess(facts(10.0, SellerInfo("s", units_sold_30d=-3)), [], NO_TEXT, {}, PARAMS)
    with pytest.raises(ValueError, match="max_candidates"):
        ScoringParams(max_candidates=0)


def test_wants_closer_look() -> None:
    assert not wants_closer_look([], scan_text("Handbag, leather"))
    assert wants_closer_look([], scan_text("Handbag 1:1"))
    assert not wants_closer_look([], scan_text("Handbag, no fake"))
    assert wants_closer_look(candidate_brands([copy_of()]), TextScan())


def test_result_contract_and_pickling() -> None:
    listing = Listing("l-1", "Acme bag", price=Money(30.0, "USD"), seller=ordinary_seller())
    matches = [copy_of(0.97)]
    out = assess(ListingFacts.of(listing, 0), matches, scan_text(listing.title, brands=NAMES), CONTEXTS,
                 PARAMS)
    result = out.to_result(matches, {"copy": "sscd@1"})
    assert result.listing_id == "l-1" and result.verdict is out.verdict and result.brand == "acme"
    assert result.matches == matches and result.model_versions == {"copy": "sscd@1"}
    assert result.reasons == out.reasons and len(result.reasons) <= PARAMS.max_reasons
    # Inputs and outputs cross process boundaries (Ray map step).
    again = pickle.loads(pickle.dumps((PARAMS, NAMES, out)))  # noqa: S301 (our own bytes)
    assert again[2].risk == out.risk
    assert again[1].find("Acme") == [("acme", "Acme")]


# --- the cascade's risk-only reading ------------------------------------------------------------------

def _grid() -> list[tuple[ListingFacts, list[Match], TextScan, dict[str, BrandContext], dict[SignalName, str]]]:
    """Listings that take every branch of a reading: one, two or no brands; reference and market prices;
    no price; authorized, ordinary, new and convicted sellers; brand overrides; skipped signals."""
    market = [Money(p, "USD") for p in (95.0, 100.0, 102.0, 98.0, 105.0, 99.0)]
    ctxs = {"acme": BrandContext("acme", frozenset({"acme-store"}), {"SKU-1": market},
                                 VerdictPolicy(review_threshold=0.3, likely_threshold=0.6)),
            "beta": BrandContext("beta", frozenset(), {"B-1": market[:2]})}
    sellers = [ordinary_seller(), ordinary_seller("acme-store"), None,
               SellerInfo("fresh-1", account_age_days=3, units_sold_30d=400, stock=900)]
    match_sets: list[list[Match]] = [
        [], [copy_of(0.97)], [copy_of(0.45)],
        [copy_of(0.7), match(SignalName.LOOKALIKE, 0.8, brand="beta", sku="B-1", image_id=40)],
        [match(SignalName.LOGO, 0.45, brand="beta", image_id=41), match(SignalName.KEYPOINTS, 0.45)],
        [match(SignalName.LOOKALIKE, 0.9, price=None)],
    ]
    texts = [NO_TEXT, scan_text("Acme replica 1:1 AAA", "", brands=NAMES)]
    skips: list[dict[SignalName, str]] = [{}, {SignalName.PRICE: "off"}, {SignalName.SELLER: "off"},
                                          {SignalName.COPY: "off", SignalName.TEXT: "off"}]
    out = []
    for price, seller, confirmed, ms, text, skip in itertools.product(
            (None, 0.0, 25.0, 100.0, 90.0), sellers, (None, 0, 2), match_sets, texts, skips):
        f = ListingFacts("l-1", Money(price, "EUR") if price is not None else None, seller, confirmed)
        out.append((f, ms, text, ctxs, skip))
    return out


def test_assess_risk_answers_what_assess_reports() -> None:
    """The risk-only reading the cascade asks for hypothetical evidence is the full assessment's risk,
    brand and policy exactly, on every branch (it skips only the sentences)."""
    grid = _grid()
    verdicts = set()
    for f, ms, text, ctxs, skip in grid:
        full = assess(f, ms, text, ctxs, PARAMS, skip)
        quick = assess_risk(f, ms, text, ctxs, PARAMS, skip)
        assert (quick.risk, quick.brand, quick.policy) == (full.risk, full.brand, full.policy), (f, ms, skip)
        verdicts.add(full.verdict)
    assert len(grid) > 2000 and verdicts == set(Verdict)  # the grid reaches every verdict


def test_the_callers_candidates_give_the_same_assessment() -> None:
    """Candidates handed in by the caller (the cascade has made them already) change nothing: on every
    branch of the grid, skipped signals included (there they are made again without the skipped ones),
    the result equals the one without them."""
    grid = _grid()
    for f, ms, text, ctxs, skip in grid:
        known = candidate_brands(ms, text.mentions, PARAMS.visual, PARAMS.brand_evidence)
        full = assess(f, ms, text, ctxs, PARAMS, skip)
        given = assess(f, ms, text, ctxs, PARAMS, skip, candidates=known)
        assert given.to_result(ms) == full.to_result(ms), (f, ms, skip)
        assert given.candidates == full.candidates
        quick = assess_risk(f, ms, text, ctxs, PARAMS, skip, candidates=known)
        assert (quick.risk, quick.brand, quick.policy) == (full.risk, full.brand, full.policy), (f, ms, skip)


def test_a_prior_reading_gives_the_same_assessment_without_reading_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cascade's preliminary reading handed to :func:`assess` (``prior``) is reported as made: on
    every branch of the grid the result equals a fresh assessment, and no reading is made again. A prior
    made with other skipped signals is used only where they cannot change a reading (a skipped logo
    search with no logo match); otherwise the reading is made again, with the skips."""
    grid = _grid()
    reads = [0]
    real = assessment_module._best_reading

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(assessment_module, "_best_reading", counted)
    logo_off = {SignalName.LOGO: "no logo search"}
    for f, ms, text, ctxs, skip in grid:
        full = assess(f, ms, text, ctxs, PARAMS, skip)
        for prior_skip in (skip, {}, {**skip, **logo_off}):
            prior = assess_risk(f, ms, text, ctxs, PARAMS, prior_skip)
            reads[0] = 0
            given = assess(f, ms, text, ctxs, PARAMS, skip, prior=prior)
            assert given.to_result(ms) == full.to_result(ms), (f, ms, skip, prior_skip)
            assert given.candidates == full.candidates
            harmless = prior_skip == skip or (prior_skip == {**skip, **logo_off}
                                               and not any(m.signal is SignalName.LOGO for m in ms))
            assert reads[0] == (0 if harmless else 1), (ms, skip, prior_skip)


def test_assess_risk_raises_as_assess_does() -> None:
    with pytest.raises(UnknownCurrencyError):
        assess_risk(facts(10.0, currency="XYZ"), [copy_of(0.97)], NO_TEXT, CONTEXTS, PARAMS)
    with pytest.raises(ValueError, match="confirmed_counterfeits"):
        assess_risk(facts(10.0, confirmed=-1), [copy_of(0.97)], NO_TEXT, CONTEXTS, PARAMS)

"""PHI detection quality: precision, recall and F2 per category on presidio-research's synthetic set, the share of
PHI-free biomedical sentences wrongly flagged, and time per sentence.

Span-level scoring (../shared/eval/README.md): a detected span is a true positive when it overlaps a gold span of
the same category; a gold span is found when a detection of its category overlaps it. The set's 17 entity types map
to our PhiType categories as in GOLD_TYPES. Types that are not Safe Harbor identifiers (ORGANIZATION, TITLE, NRP:
nationality/religion/politics) and ages of 89 or less are dropped from the gold set, so flagging them counts against
precision. "any PHI" ignores categories: it is what routing depends on (PHI of any kind keeps a question off the
cloud).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, percentile, table
from services.core.settings import ROOT
from services.rag.phi import PhiDetector, PhiType

DATASET = ROOT.parent / "shared" / "eval" / "phi" / "presidio_synth_v2.json"
PHI_FREE = ROOT.parent / "shared" / "eval" / "retrieval" / "scifact" / "queries.jsonl"

GOLD_TYPES: dict[str, PhiType] = {
    "PERSON": PhiType.NAME,
    "STREET_ADDRESS": PhiType.LOCATION,
    "GPE": PhiType.LOCATION,  # cities and countries alike; Safe Harbor needs only places smaller than a state
    "DATE_TIME": PhiType.DATE,  # includes bare years and weekdays, which Safe Harbor allows: recall is lower bound
    "PHONE_NUMBER": PhiType.PHONE_NUMBER,
    "EMAIL_ADDRESS": PhiType.EMAIL_ADDRESS,
    "ZIP_CODE": PhiType.ZIP_CODE,
    "DOMAIN_NAME": PhiType.URL,
    "CREDIT_CARD": PhiType.ACCOUNT_NUMBER,
    "IBAN_CODE": PhiType.ACCOUNT_NUMBER,
    "US_SSN": PhiType.SSN,
    "IP_ADDRESS": PhiType.IP_ADDRESS,
    "US_DRIVER_LICENSE": PhiType.LICENSE_NUMBER,
    "AGE": PhiType.AGE,  # only ages over 89 are kept
}
ANY = "any PHI"


def gold_spans(record: dict) -> list[tuple[str, int, int]]:
    """The record's Safe Harbor spans as (category, start, end)."""
    spans = []
    for span in record["spans"]:
        kind = GOLD_TYPES.get(span["entity_type"])
        if kind is None:
            continue
        if kind is PhiType.AGE and not (span["entity_value"].strip().isdigit() and int(span["entity_value"]) > 89):
            continue
        spans.append((kind.value, span["start_position"], span["end_position"]))
    return spans


def _overlaps(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def score(records: list[dict], detector: PhiDetector) -> tuple[dict[str, Counter], list[float]]:
    """Per category: detections, true-positive detections, gold spans, found gold spans; and ms per sentence."""
    counts: dict[str, Counter] = {}
    timings = []
    for record in records:
        started = time.perf_counter()
        found = [(e.type.value, e.start, e.end) for e in detector.scan(record["full_text"]).entities]
        timings.append((time.perf_counter() - started) * 1000)
        gold = gold_spans(record)
        for category, same in ((None, True), (ANY, False)):
            for det in found:
                c = counts.setdefault(category or det[0], Counter())
                c["detected"] += 1
                c["correct"] += any(_overlaps(det, g) and (not same or g[0] == det[0]) for g in gold)
            for g in gold:
                c = counts.setdefault(category or g[0], Counter())
                c["gold"] += 1
                c["found"] += any(_overlaps(det, g) and (not same or g[0] == det[0]) for det in found)
    return counts, timings


def f_beta(precision: float, recall: float, beta: float = 2.0) -> float:
    """F-beta; beta 2 weighs recall four times as much as precision (a missed identifier is the costly error)."""
    if precision + recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def main() -> None:
    if not DATASET.exists():
        print(f"\nphi_eval skipped: {DATASET} is absent")
        return
    records = json.loads(DATASET.read_text())
    started = time.perf_counter()
    detector = PhiDetector.load()
    load_s = time.perf_counter() - started
    counts, timings = score(records, detector)
    rows = []
    for category in [*(t.value for t in PhiType), ANY]:
        c = counts.get(category)
        if not c:
            continue
        precision = c["correct"] / c["detected"] if c["detected"] else 0.0
        recall = c["found"] / c["gold"] if c["gold"] else 0.0
        rows.append(
            (
                f"{category} (gold {c['gold']}, detected {c['detected']})",
                f"P {precision:.3f}  R {recall:.3f}  F2 {f_beta(precision, recall):.3f}"
                + ("" if c["gold"] else "  (no gold spans: every detection is a false positive)"),
            )
        )
    if PHI_FREE.exists():
        claims = [json.loads(line)["text"] for line in PHI_FREE.read_text().splitlines() if line.strip()]
        flagged = [c for c in claims if detector.scan(c).detected]
        rows.append(
            (
                f"PHI-free biomedical claims flagged (SciFact queries, n={len(claims)})",
                f"{len(flagged) / len(claims):.1%}",
            )
        )
    rows.append(("ms per sentence p50 / p95 (one thread)", f"{median(timings):.1f} / {percentile(timings, 95):.1f}"))
    rows.append(("detector load", f"{load_s:.1f} s"))
    table(f"PHI detection on presidio_synth_v2 ({len(records)} sentences; span overlap, same category)", rows)


if __name__ == "__main__":
    main()

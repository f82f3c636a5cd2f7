"""Sentence-aware chunking: whole sentences packed up to a token budget, with a few sentences of overlap.

Chunks never cross a page, so every chunk has exactly one page number. Token counts come from the embedding
model's own tokenizer (passed in), so a chunk within the budget is never truncated by the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.search.parsing import Page

# Abbreviations whose trailing period does not end a sentence (lower case, without the period).
_ABBREVIATIONS = frozenset(
    [
        "al",
        "approx",
        "cf",
        "dr",
        "e.g",
        "eg",
        "etc",
        "fig",
        "figs",
        "i.e",
        "ie",
        "inc",
        "jr",
        "min",
        "mr",
        "mrs",
        "ms",
        "no",
        "nos",
        "prof",
        "ref",
        "refs",
        "sr",
        "st",
        "vs",
        "vol",
    ]
)
# A sentence ends at . ! ? (plus closing quotes/brackets) followed by white space and a plausible sentence start.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_WORD_BEFORE = re.compile(r"(\S+)[.!?][\"')\]]*$")
_PARAGRAPHS = re.compile(r"\n\s*\n")

TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough to embed whole."""

    index: int
    text: str
    page: int
    tokens: int


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; paragraph breaks always end one, single line breaks (PDF wrapping) never do."""
    sentences: list[str] = []
    for paragraph in _PARAGRAPHS.split(text):
        flat = " ".join(paragraph.split())
        if not flat:
            continue
        start = 0
        for match in _BOUNDARY.finditer(flat):
            before = _WORD_BEFORE.search(flat, start, match.start())
            word = before.group(1).lower().lstrip("(\"'") if before else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue  # "e.g. The", "Smith et al. Showed", initials such as "J. Smith"
            sentences.append(flat[start : match.start()].strip())
            start = match.end()
        sentences.append(flat[start:].strip())
    return [s for s in sentences if s]


def _fit(text: str, tokens: int, max_tokens: int, count_tokens: TokenCounter) -> list[tuple[str, int]]:
    """A sentence over the budget cut in halves at word boundaries until every piece fits."""
    if tokens <= max_tokens:
        return [(text, tokens)]
    words = text.split()
    if len(words) < 2:  # one enormous "word": the model truncates it, nothing better to do
        return [(text, tokens)]
    halves = [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])]
    return [
        piece
        for half, n in zip(halves, count_tokens(halves), strict=True)
        for piece in _fit(half, n, max_tokens, count_tokens)
    ]


def chunk_pages(pages: Sequence[Page], count_tokens: TokenCounter, max_tokens: int, overlap_tokens: int) -> list[Chunk]:
    """Chunks of at most `max_tokens` tokens, each starting with up to `overlap_tokens` tokens of the previous
    chunk's last sentences (same page)."""
    if max_tokens < 16 or overlap_tokens < 0 or overlap_tokens >= max_tokens // 2:
        raise ValueError("need max_tokens >= 16 and 0 <= overlap_tokens < max_tokens / 2")
    chunks: list[Chunk] = []
    for page in pages:
        sentences = split_sentences(page.text)
        counts = count_tokens(sentences) if sentences else []
        units: list[tuple[str, int]] = []
        for sentence, count in zip(sentences, counts, strict=True):
            units.extend(_fit(sentence, count, max_tokens, count_tokens))
        _pack(units, page.number, max_tokens, overlap_tokens, chunks)
    return chunks


def _pack(units: list[tuple[str, int]], page: int, max_tokens: int, overlap: int, out: list[Chunk]) -> None:
    current: list[tuple[str, int]] = []
    fresh = 0  # units in `current` that no earlier chunk holds

    def emit() -> None:
        # Joining sentences with a space can merge tokens, never add any, so the sum is an upper bound.
        out.append(Chunk(len(out), " ".join(s for s, _ in current), page, sum(n for _, n in current)))

    for unit in units:
        if current and sum(n for _, n in current) + unit[1] > max_tokens:
            emit()
            carried: list[tuple[str, int]] = []
            for previous in reversed(current):
                if sum(n for _, n in carried) + previous[1] > overlap:
                    break
                carried.insert(0, previous)
            while carried and sum(n for _, n in carried) + unit[1] > max_tokens:
                carried.pop(0)
            current, fresh = carried, 0
        current.append(unit)
        fresh += 1
    if current and fresh:
        emit()

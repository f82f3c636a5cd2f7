"""The answer that needs no model: the retrieved sentences that best match the question, each with its [n] citation,
or an honest "not in the knowledge base".

A sentence's relevance is its IDF-weighted coverage of the question's content words: the share of the question's
information (rare words weigh more) that the sentence contains, 0 to 1. Unlike the search service's scores (rank
fusion values, comparable only within one response) it means the same thing for every question, so one threshold
can decide "nothing relevant was found".

MIN_COVERAGE = 0.25 was chosen on SciFact (5,183 biomedical abstracts, 300 test claims with judged abstracts;
bench/rag_bench.py re-measures it). With the judged abstract among 8 passages, the best sentence reaches 0.25 for 60%
of claims (SciFact claims paraphrase their abstracts, a hard case: a clinician's question usually shares more words
with its answer); with 8 random abstracts, for 4%, which get the not-found answer. 0.2 let 10% of off-topic questions
through; 0.3 refused about half of the answerable ones. Abstracts chosen for sharing the claim's words pass as often as
judged ones (83%): coverage tells on-topic from off-topic, not right from wrong, which is why every sentence carries
its citation. End to end over 301 indexed abstracts, 84% of claims were answered and 80% cited a judged abstract.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from spacy.lang.en.stop_words import STOP_WORDS

from services.rag.prompts import AnswerStyle, PromptInput
from services.rag.retrieval import Passage

MIN_COVERAGE = 0.25
SENTENCES = {AnswerStyle.CONCISE: 3, AnswerStyle.DETAILED: 6}
MAX_SENTENCE_CHARS = 600
NOT_FOUND = (
    "I could not find this in the knowledge base, so I cannot give a sourced answer. Try rephrasing the question, "
    "or ask an administrator to add a reference that covers it."
)

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
# Sentence ends: ., ! or ? then space and a capital, digit or bracket; and line breaks (lists, headings).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])|\n\s*\n|\n(?=\s*[-*•\d])")
# Words that carry no topic in clinical questions, beyond the general English stop words.
_QUESTION_WORDS = frozenset({"patient", "patients", "recommended", "recommend", "best", "use", "used", "common"})


def terms(text: str) -> list[str]:
    """Content words of `text`: lower case, no stop words, crude plural folding ("arteries" -> "artery")."""
    found = []
    for word in _WORD.findall(text.lower()):
        if word in STOP_WORDS or word in _QUESTION_WORDS or len(word) < 2:
            continue
        if word.endswith("ies") and len(word) > 4:
            word = word[:-3] + "y"
        elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
            word = word[:-1]
        found.append(word)
    return found


def split_sentences(text: str) -> list[str]:
    """Sentences of a passage, whitespace-normalised, without fragments."""
    parts = (" ".join(p.split()) for p in _SENTENCE_END.split(text))
    return [p[:MAX_SENTENCE_CHARS] for p in parts if len(p) >= 20]


@dataclass(frozen=True)
class ScoredSentence:
    """A candidate sentence, the passage it came from (1-based) and its coverage of the question."""

    text: str
    passage: int
    coverage: float


def rank_sentences(query: str, passages: list[Passage]) -> list[ScoredSentence]:
    """Every sentence of every passage with its coverage of the question, best first (ties: earlier passage)."""
    wanted = set(terms(query))
    candidates = [(s, n) for n, p in enumerate(passages, start=1) for s in split_sentences(p.text)]
    if not wanted or not candidates:
        return []
    bags = [set(terms(s)) for s, _ in candidates]
    idf = {t: math.log(1 + len(bags) / (1 + sum(t in bag for bag in bags))) for t in wanted}
    # Words no sentence contains still count in the total, at the highest weight: missing them lowers coverage.
    total = sum(idf.values())
    scored = [
        ScoredSentence(text, n, sum(idf[t] for t in wanted & bag) / total)
        for (text, n), bag in zip(candidates, bags, strict=True)
    ]
    return sorted(scored, key=lambda s: (-s.coverage, s.passage))


def best_coverage(query: str, passages: list[Passage]) -> float:
    """How well the best sentence covers the question (0 when nothing matches)."""
    ranked = rank_sentences(query, passages)
    return ranked[0].coverage if ranked else 0.0


def select_sentences(query: str, passages: list[Passage], style: AnswerStyle) -> list[ScoredSentence]:
    """The sentences of an extractive answer: the best ones above MIN_COVERAGE, without repeats."""
    chosen: list[ScoredSentence] = []
    seen: set[str] = set()
    for sentence in rank_sentences(query, passages):
        if sentence.coverage < MIN_COVERAGE or len(chosen) == SENTENCES[style]:
            break
        key = sentence.text.lower()
        if key not in seen:
            seen.add(key)
            chosen.append(sentence)
    return chosen


class ExtractiveGenerator:
    """Answers by quoting the knowledge base; streams one sentence per delta."""

    model_label = "extractive"

    async def stream(self, prompt: PromptInput) -> AsyncIterator[str]:
        """The answer's deltas: "sentence [n]" each, or the not-found answer."""
        chosen = select_sentences(prompt.query, prompt.passages, prompt.style)
        if not chosen:
            yield NOT_FOUND
            return
        for i, sentence in enumerate(chosen):
            yield f"{'' if i == 0 else ' '}{sentence.text} [{sentence.passage}]"

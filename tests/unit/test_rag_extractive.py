"""The extractive generator: cited sentences that match the question, and an honest not-found."""

from __future__ import annotations

from services.rag.answers import cite
from services.rag.extractive import MIN_COVERAGE, NOT_FOUND, ExtractiveGenerator, rank_sentences
from services.rag.prompts import AnswerStyle, PromptInput
from services.rag.retrieval import Passage

HYPERTENSION = Passage(
    "doc-1", "Hypertension guideline", "chunk-1",
    "Thiazide diuretics are first-line treatment for hypertension in most adults. "
    "ACE inhibitors are preferred for hypertension with diabetes or chronic kidney disease. "
    "Lifestyle changes include salt restriction and exercise.",
    3, 0.9,
)  # fmt: skip
ASTHMA = Passage(
    "doc-2", "Asthma handbook", "chunk-7",
    "Inhaled corticosteroids control persistent asthma. Short-acting beta agonists relieve acute bronchospasm.",
    0, 0.4,
)  # fmt: skip


async def _answer(query: str, passages: list[Passage], style: AnswerStyle = AnswerStyle.CONCISE) -> list[str]:
    return [d async for d in ExtractiveGenerator().stream(PromptInput(query, passages, style))]


async def test_answer_quotes_matching_sentences_with_their_passage_number() -> None:
    deltas = await _answer("What is the first-line treatment for hypertension with diabetes?", [ASTHMA, HYPERTENSION])
    text = "".join(deltas)
    assert len(deltas) >= 2  # one delta per sentence
    assert "ACE inhibitors are preferred for hypertension with diabetes" in text
    assert "[2]" in text and "[1]" not in text  # the asthma passage is number 1 and irrelevant
    citations = cite(text, [ASTHMA, HYPERTENSION])
    assert [(c.index, c.document_id, c.chunk_id, c.page) for c in citations] == [(2, "doc-1", "chunk-1", 3)]


async def test_unrelated_or_missing_passages_give_the_not_found_answer() -> None:
    assert await _answer("Dose of vancomycin for MRSA osteomyelitis?", [ASTHMA, HYPERTENSION]) == [NOT_FOUND]
    assert await _answer("anything at all", []) == [NOT_FOUND]
    assert cite(NOT_FOUND, [ASTHMA]) == []


async def test_detailed_style_allows_more_sentences_than_concise() -> None:
    sentences = " ".join(f"Hypertension finding number {n} concerns kidney disease." for n in range(8))
    passage = Passage("doc-3", "Findings", "chunk-3", sentences, 0, 0.5)
    concise = await _answer("hypertension kidney disease", [passage], AnswerStyle.CONCISE)
    detailed = await _answer("hypertension kidney disease", [passage], AnswerStyle.DETAILED)
    assert (len(concise), len(detailed)) == (3, 6)


def test_coverage_is_between_zero_and_one_and_orders_sentences() -> None:
    ranked = rank_sentences("thiazide diuretics hypertension", [HYPERTENSION])
    assert ranked[0].text.startswith("Thiazide diuretics")
    assert ranked[0].coverage == 1.0 and all(0 <= s.coverage <= 1 for s in ranked)
    assert ranked[-1].coverage < MIN_COVERAGE


def test_cite_reads_grouped_markers_and_ignores_unknown_numbers() -> None:
    citations = cite("A [2, 1]. B [1][9]. C [x].", [HYPERTENSION, ASTHMA])
    assert [c.index for c in citations] == [2, 1]
    assert citations[0].snippet == ASTHMA.text[:500]

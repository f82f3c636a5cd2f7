"""Parsing, chunking and snippets of the search service, on real files and the real model tokenizer."""

from __future__ import annotations

import itertools

import pytest

from services.search.chunking import chunk_pages, split_sentences
from services.search.embeddings import Embedder
from services.search.parsing import (
    HTML,
    MARKDOWN,
    PDF,
    TEXT,
    Page,
    ParseError,
    UnsupportedMediaType,
    media_type_for,
    parse,
)
from services.search.sparse import Bm25Encoder, best_window
from tests.support.pdfs import encrypt_pdf, make_pdf


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """The real model (its tokenizer counts chunk tokens)."""
    return Embedder()


@pytest.mark.parametrize(
    ("declared", "file_name", "expected"),
    [
        ("", "Guide.PDF", PDF),
        ("", "notes.md", MARKDOWN),
        ("", "page.htm", HTML),
        ("text/plain; charset=utf-8", "x.pdf", TEXT),
        ("text/x-markdown", "", MARKDOWN),
    ],
)
def test_media_type_comes_from_the_declaration_or_the_file_name(declared: str, file_name: str, expected: str) -> None:
    assert media_type_for(declared, file_name) == expected


@pytest.mark.parametrize(("declared", "file_name"), [("application/msword", "a.doc"), ("", "scan.tiff"), ("", "")])
def test_unsupported_media_types_are_refused(declared: str, file_name: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        media_type_for(declared, file_name)


def test_pdf_text_keeps_its_page_numbers_and_title() -> None:
    data = make_pdf([["First page on asthma."], [], ["Third page on gout (acute)."]], title="Rheum guide")
    parsed = parse(data, PDF, max_pages=10)
    assert parsed.page_count == 3 and parsed.title == "Rheum guide"
    assert [(p.number, p.text) for p in parsed.pages] == [
        (1, "First page on asthma."),
        (2, ""),
        (3, "Third page on gout (acute)."),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (encrypt_pdf(make_pdf([["secret"]]), "pw"), "password-protected"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>", "damaged"),
        (b"<html>not a pdf</html>", "not a PDF"),
    ],
    ids=["encrypted", "corrupt", "not-pdf"],
)
def test_unreadable_pdfs_raise_a_parse_error_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse(data, PDF, max_pages=10)


def test_pdfs_over_the_page_limit_are_refused() -> None:
    with pytest.raises(ParseError, match="3 pages"):
        parse(make_pdf([["a"], ["b"], ["c"]]), PDF, max_pages=2)


def test_pdf_encrypted_without_a_user_password_opens() -> None:
    data = encrypt_pdf(make_pdf([["Readable by anyone."]]), "")
    assert parse(data, PDF, max_pages=10).pages[0].text == "Readable by anyone."


def test_html_keeps_visible_text_with_block_breaks_and_drops_scripts() -> None:
    html = (
        "<html><head><title>Sepsis</title><style>p{}</style></head><body><h1>Bundle</h1>"
        "<p>Give <b>antibiotics</b> early.</p><script>track()</script><ul><li>Fluids</li><li>Lactate</li></ul>"
        "<table><tr><td>MAP</td><td>65</td></tr></table></body></html>"
    )
    parsed = parse(html.encode(), HTML, max_pages=1)
    assert parsed.title == "Sepsis"
    text = parsed.pages[0].text
    assert "Give antibiotics early." in text and "track" not in text and "p{}" not in text
    assert text.index("Bundle") < text.index("Give") < text.index("Fluids") < text.index("Lactate")
    assert "Fluids\n" in text and "BundleGive" not in text


def test_markdown_is_rendered_to_text_with_its_first_heading_as_title() -> None:
    markdown = "Intro line.\n\n## Dosing\n\nUse **5 mg** daily, see [the label](http://x.example).\n\n```\ncode\n```\n"
    parsed = parse(markdown.encode(), MARKDOWN, max_pages=1)
    assert parsed.title == "Dosing"
    assert "Use 5 mg daily, see the label." in parsed.pages[0].text and "http" not in parsed.pages[0].text


def test_text_decoding_handles_bom_and_legacy_encodings_and_refuses_binary() -> None:
    assert parse("\ufeffcafé".encode(), TEXT, max_pages=1).pages[0].text == "café"
    assert parse("café".encode("cp1252"), TEXT, max_pages=1).pages[0].text == "café"
    with pytest.raises(ParseError, match="binary"):
        parse(b"\x00\x01\x02binary", TEXT, max_pages=1)


def test_sentences_split_at_ends_but_not_at_abbreviations_decimals_or_wrapped_lines() -> None:
    text = "Dr. Smith et al. showed it. The dose was 2.5 mg (p<0.05). See Fig. 2, e.g. Table 1.\nJ. Doe agreed!\n\nNew"
    assert split_sentences(text) == [
        "Dr. Smith et al. showed it.",
        "The dose was 2.5 mg (p<0.05).",
        "See Fig. 2, e.g. Table 1.",
        "J. Doe agreed!",
        "New",
    ]


def test_chunks_respect_the_token_budget_keep_pages_and_overlap(embedder: Embedder) -> None:
    sentences = [f"Sentence {n} describes renal dosing of vancomycin in detail." for n in range(60)]
    pages = [Page(1, " ".join(sentences[:40])), Page(2, " ".join(sentences[40:]))]
    chunks = chunk_pages(pages, embedder.count_tokens, max_tokens=64, overlap_tokens=16)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(embedder.count_tokens([c.text])[0] <= 64 for c in chunks)
    assert {c.page for c in chunks} == {1, 2}
    for before, after in itertools.pairwise(chunks):
        if before.page == after.page:
            last = split_sentences(before.text)[-1]
            assert after.text.startswith(last)  # the overlap repeats the previous chunk's last sentence
    joined = " ".join(c.text for c in chunks)
    assert all(s in joined for s in sentences)  # nothing lost


def test_a_sentence_longer_than_the_budget_is_cut_into_pieces(embedder: Embedder) -> None:
    sentence = " ".join(f"word{n}" for n in range(300)) + "."
    chunks = chunk_pages([Page(0, sentence)], embedder.count_tokens, max_tokens=50, overlap_tokens=0)
    assert len(chunks) > 1 and all(c.tokens <= 50 for c in chunks)
    assert " ".join(c.text for c in chunks) == sentence


def test_snippet_window_centres_on_the_query_terms_and_marks_them() -> None:
    encoder = Bm25Encoder()
    text = "Filler about nothing. " * 30 + "Colchicine treated the gout flares quickly. " + "More filler here. " * 30
    terms = frozenset(encoder.query("treating gout flare").indices)
    snippet, marks = best_window(text, encoder.matches(text, terms), 120)
    assert len(snippet) <= 120 and "gout" in snippet
    assert [snippet[s:e] for s, e in marks] == ["treated", "gout", "flares"]
    short, marks = best_window("Gout.", encoder.matches("Gout.", terms), 120)
    assert short == "Gout." and marks == [(0, 4)]

"""Text out of uploaded files: PDF (page by page), plain text, Markdown and HTML.

Parsing is CPU work on untrusted bytes: callers run it in a worker thread, and every failure becomes a
`ParseError` with a reason safe to show the uploader (never a stack trace, never document text).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import PurePath

from markdown_it import MarkdownIt
from pypdf import PasswordType, PdfReader
from pypdf.errors import FileNotDecryptedError, PdfReadError, PdfStreamError
from selectolax.lexbor import LexborHTMLParser

PDF = "application/pdf"
TEXT = "text/plain"
MARKDOWN = "text/markdown"
HTML = "text/html"
MEDIA_TYPES = (PDF, TEXT, MARKDOWN, HTML)

_BY_SUFFIX = {
    ".pdf": PDF,
    ".txt": TEXT,
    ".text": TEXT,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".html": HTML,
    ".htm": HTML,
}
# Blocks whose boundaries are line breaks in the extracted text (selectolax joins adjacent text nodes).
_HTML_BLOCKS = (
    "address,article,aside,blockquote,br,dd,div,dl,dt,figcaption,figure,footer,h1,h2,h3,h4,h5,h6,header,hr,li,"
    "main,nav,ol,p,pre,section,table,td,th,tr,ul"
)
_HTML_NOISE = ["script", "style", "noscript", "template", "svg", "iframe", "object", "head"]
_BLANK_LINES = re.compile(r"\n\s*\n\s*(\n\s*)+")
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")

log = logging.getLogger(__name__)


class ParseError(Exception):
    """The file cannot be turned into text; the message says why (safe to store and show)."""


class UnsupportedMediaType(ValueError):
    """Neither the declared media type nor the file name names a type we parse."""


@dataclass(frozen=True)
class Page:
    """Text of one page; number 0 for sources without pages."""

    number: int
    text: str


@dataclass(frozen=True)
class ParsedDocument:
    """A file's text by page, plus a title found inside it (HTML <title>, first Markdown heading, PDF info)."""

    pages: list[Page]
    page_count: int
    title: str = ""

    @property
    def has_text(self) -> bool:
        """True when at least one page has something besides white space."""
        return any(p.text.strip() for p in self.pages)


def media_type_for(declared: str, file_name: str) -> str:
    """The media type to parse with: the declared one (parameters dropped), else one guessed from the file name."""
    declared = declared.split(";", 1)[0].strip().lower()
    if declared:
        if declared == "text/x-markdown":
            declared = MARKDOWN
        if declared not in MEDIA_TYPES:
            raise UnsupportedMediaType(f"media type {declared!r} is not supported; use one of {', '.join(MEDIA_TYPES)}")
        return declared
    guessed = _BY_SUFFIX.get(PurePath(file_name).suffix.lower())
    if guessed is None:
        raise UnsupportedMediaType(
            "set metadata.media_type, or a file_name ending in .pdf, .txt, .md, .markdown, .html or .htm"
        )
    return guessed


def parse(data: bytes, media_type: str, *, max_pages: int) -> ParsedDocument:
    """Extract text from `data` of `media_type`; ParseError when it cannot."""
    if media_type == PDF:
        return _parse_pdf(data, max_pages)
    text = decode_text(data)
    if media_type == HTML:
        return html_to_text(text)
    if media_type == MARKDOWN:
        return markdown_to_text(text)
    return ParsedDocument([Page(0, tidy(text))], 1)


def decode_text(data: bytes) -> str:
    """UTF-8 (a BOM is dropped), else Windows-1252; ParseError for binary content."""
    if b"\x00" in data[:8192]:
        raise ParseError("the file looks binary, not text (does its media type match?)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def tidy(text: str) -> str:
    """Runs of spaces collapsed, at most one blank line in a row, no trailing spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> ParsedDocument:
    """Visible text of an HTML page with block boundaries kept as line breaks; <title> as the title."""
    tree = LexborHTMLParser(html)
    title_node = tree.css_first("title")
    title = tidy(title_node.text()) if title_node is not None else ""
    tree.strip_tags(_HTML_NOISE)
    for node in tree.css(_HTML_BLOCKS):
        node.insert_before("\n")
        node.insert_after("\n")
    root = tree.body or tree.root
    text = root.text(deep=True) if root is not None else ""
    return ParsedDocument([Page(0, tidy(text))], 1, title[:500])


def markdown_to_text(markdown: str) -> ParsedDocument:
    """Markdown rendered (CommonMark + tables) and reduced to its text; the first heading as the title."""
    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = parser.parse(markdown)
    title = next((tokens[i + 1].content.strip() for i, t in enumerate(tokens[:-1]) if t.type == "heading_open"), "")
    parsed = html_to_text(f"<body>{parser.renderer.render(tokens, parser.options, {})}</body>")
    return ParsedDocument(parsed.pages, 1, title[:500])


def _parse_pdf(data: bytes, max_pages: int) -> ParsedDocument:
    if not data.lstrip()[:5].startswith(b"%PDF-"):
        raise ParseError("not a PDF file (no %PDF header)")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password only to restrict printing; those open.
            try:
                opened = reader.decrypt("")
            except (NotImplementedError, PdfReadError):
                opened = PasswordType.NOT_DECRYPTED
            if not opened:
                raise ParseError("the PDF is password-protected; upload an unencrypted copy")
        count = len(reader.pages)
        if count > max_pages:
            raise ParseError(f"the PDF has {count} pages; at most {max_pages} are accepted")
        pages = [Page(number, tidy(page.extract_text() or "")) for number, page in enumerate(reader.pages, 1)]
        title = ""
        if reader.metadata is not None and reader.metadata.title:
            title = tidy(str(reader.metadata.title))[:500]
    except ParseError:
        raise
    except FileNotDecryptedError:
        raise ParseError("the PDF is password-protected; upload an unencrypted copy") from None
    except (PdfReadError, PdfStreamError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        # pypdf raises a variety of errors on damaged files; the class name helps operators, the text may not.
        log.info("pdf parse failed", extra={"error": type(exc).__name__})
        raise ParseError(f"the PDF is damaged or malformed ({type(exc).__name__})") from None
    return ParsedDocument(pages, count, title)

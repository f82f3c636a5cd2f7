"""Chat prompts for model answers: numbered knowledge base passages, the clinical context, earlier turns."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from services.rag.retrieval import Passage

PASSAGE_CHARS = 1500  # per passage in a prompt: 8 passages stay well inside a small local model's context


class AnswerStyle(StrEnum):
    """How long answers should be."""

    CONCISE = "concise"
    DETAILED = "detailed"


@dataclass(frozen=True)
class ClinicalContext:
    """The patient situation behind a question. PHI by nature: only ever put in prompts for a local model."""

    specialty: str = ""
    age: int = 0
    sex: str = ""
    medications: tuple[str, ...] = ()
    conditions: tuple[str, ...] = ()
    allergies: tuple[str, ...] = ()
    notes: str = ""

    def describe(self) -> str:
        """One line per known fact ("" when nothing is known); also the text PHI detection scans."""
        lines = [
            f"Specialty: {self.specialty}" if self.specialty else "",
            f"Age: {self.age} years old" if self.age else "",
            f"Sex: {self.sex}" if self.sex else "",
            f"Medications: {', '.join(self.medications)}" if self.medications else "",
            f"Conditions: {', '.join(self.conditions)}" if self.conditions else "",
            f"Allergies: {', '.join(self.allergies)}" if self.allergies else "",
            f"Notes: {self.notes}" if self.notes else "",
        ]
        return "\n".join(line for line in lines if line)


@dataclass(frozen=True)
class Turn:
    """An earlier message of the conversation."""

    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True)
class PromptInput:
    """Everything a model answer is written from."""

    query: str
    passages: list[Passage]
    style: AnswerStyle = AnswerStyle.CONCISE
    system_prompt: str = ""
    clinical_context: ClinicalContext | None = None
    history: list[Turn] = field(default_factory=list)


_INSTRUCTIONS = (
    "You are a clinical reference assistant for licensed clinicians. Answer only from the numbered knowledge base "
    "passages below. Cite every statement with the passage number in square brackets, e.g. [1] or [2][3]. If the "
    "passages do not contain the answer, say that the knowledge base does not cover it; do not answer from memory. "
    "Never invent doses, and never repeat identifying details about patients."
)
_STYLE = {
    AnswerStyle.CONCISE: "Answer in at most four sentences.",
    AnswerStyle.DETAILED: "Give a thorough, structured answer.",
}


def build_messages(prompt: PromptInput) -> list[dict[str, str]]:
    """OpenAI chat messages: instructions (+ the conversation's own), earlier turns, then the passages, the clinical
    context and the question in the last user message."""
    system = f"{_INSTRUCTIONS} {_STYLE[prompt.style]}"
    if prompt.system_prompt:
        system += f"\n\nAdditional instructions from the clinician:\n{prompt.system_prompt}"
    messages = [{"role": "system", "content": system}]
    messages += [{"role": turn.role, "content": turn.content} for turn in prompt.history]
    sources = "\n\n".join(
        f"[{n}] {p.title}{f' (page {p.page})' if p.page else ''}\n{p.text[:PASSAGE_CHARS]}"
        for n, p in enumerate(prompt.passages, start=1)
    )
    parts = [f"Knowledge base passages:\n\n{sources or '(none found)'}"]
    context = prompt.clinical_context.describe() if prompt.clinical_context else ""
    if context:
        parts.append(f"Clinical context:\n{context}")
    parts.append(f"Question: {prompt.query}")
    messages.append({"role": "user", "content": "\n\n".join(parts)})
    return messages

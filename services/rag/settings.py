"""Settings of the rag service (environment variables prefixed RAG_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.core.limits import RAG, SEARCH
from services.core.settings import ServiceSettings


class RagSettings(ServiceSettings):
    """Model endpoints, retrieval and answer limits, PHI detection bounds."""

    model_config = SettingsConfigDict(env_prefix="RAG_", env_file=".env", extra="ignore", frozen=True)

    cloud_base_url: str = Field(
        "",
        description="OpenAI-compatible API base URL of the cloud model, e.g. https://api.openai.com/v1. Empty: no "
        "cloud model. Questions with PHI never reach it.",
    )
    cloud_model: str = Field("gpt-4o-mini", description="Model name sent to the cloud endpoint.")
    cloud_api_key: SecretStr = Field(SecretStr(""), description="Bearer key of the cloud endpoint.")
    local_base_url: str = Field(
        "",
        description="OpenAI-compatible API base URL of a model on our own network (Ollama, llama.cpp server, vLLM), "
        "e.g. http://127.0.0.1:11434/v1. Empty: questions with PHI get extractive answers.",
    )
    local_model: str = Field("llama3.1:8b", description="Model name sent to the local endpoint.")
    local_api_key: SecretStr = Field(SecretStr(""), description="Bearer key of the local endpoint, if it needs one.")
    model_connect_timeout_seconds: float = Field(3.0, description="Connect timeout of model calls.")
    model_read_timeout_seconds: float = Field(
        60.0, description="Longest wait for the next streamed token (or the whole reply when not streaming)."
    )
    model_retries: int = Field(
        2, description="Retries of a model call that failed before its first token (connect errors, 429, 5xx)."
    )
    model_max_tokens: int = Field(800, description="Answer length cap sent to models.")
    model_temperature: float = Field(0.1, description="Sampling temperature sent to models.")
    breaker_failure_threshold: int = Field(
        5, description="Consecutive failures of a model endpoint that open its circuit breaker."
    )
    breaker_recovery_seconds: float = Field(
        30.0, description="How long an open breaker refuses calls before one trial call is let through."
    )
    retrieval_limit: int = Field(
        8, description=f"Chunks retrieved per question (at most {SEARCH.results.maximum}, search's limit per page)."
    )
    retrieval_timeout_seconds: float = Field(10.0, description="Deadline of the search call.")
    history_turns: int = Field(6, description="Earlier messages of the conversation included in model prompts.")
    phi_max_chars: int = Field(
        RAG.phi_text_chars, description="Longest text PHI detection accepts (DetectPhi's limit)."
    )
    phi_workers: int = Field(2, description="Threads running PHI detection off the event loop.")
    phi_score_threshold: float = Field(
        0.35, description="Detections scored below this are ignored (Presidio scores, 0-1)."
    )
    answer_lease_seconds: float = Field(
        10.0,
        gt=0,
        description="A worker's claim on writing an answer, renewed every third of it while it writes: a retry with "
        "the same client message id waits for a live worker's answer, and takes over one whose worker crashed "
        "within this long.",
    )


@lru_cache
def rag_settings() -> RagSettings:
    """The process-wide rag settings (read once)."""
    return RagSettings()

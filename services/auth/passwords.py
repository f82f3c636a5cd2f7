"""Passwords: argon2id hashing and the policy (NIST SP 800-63B-4, OWASP ASVS 5 chapter 6).

Policy: 12 to 128 characters, any characters (no composition rules), not a common password, not built from the
account's email; a 0-100 strength score from length, variety, sequences, repeats and dictionary words, with
every problem named. Hashing runs in worker threads (argon2-cffi releases the GIL) behind a semaphore, so logins
never stall the event loop and memory stays bounded (19 MiB per hash in flight).
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from services.core.limits import AUTH

# Problems that make a password unacceptable whatever its score.
BLOCKING = frozenset({"TOO_SHORT", "TOO_LONG", "COMMON_PASSWORD", "CONTAINS_EMAIL"})

_SEQUENCES = ("abcdefghijklmnopqrstuvwxyz", "0123456789", "qwertyuiop", "asdfghjkl", "zxcvbnm", "1qaz2wsx3edc")
_REPEATED_CHUNK = re.compile(r"(.{2,}?)\1{2,}")
_REPEATED_CHAR = re.compile(r"(.)\1{2,}")


@dataclass(frozen=True)
class Problem:
    """One reason a password is weak: a stable code and a sentence."""

    code: str
    description: str


@dataclass(frozen=True)
class Strength:
    """The verdict on a password."""

    score: int
    problems: list[Problem] = field(default_factory=list)
    min_score: int = 50

    @property
    def acceptable(self) -> bool:
        """True when the policy accepts the password."""
        return self.score >= self.min_score and not any(p.code in BLOCKING for p in self.problems)


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The 40k most common passwords (zxcvbn's ranked list, then Django's), lower-cased."""
    text = resources.files("services.auth").joinpath("data/common_passwords.txt").read_text(encoding="utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip())


def _classes(password: str) -> int:
    kinds = set()
    for ch in password:
        if ch.islower():
            kinds.add("lower")
        elif ch.isupper():
            kinds.add("upper")
        elif ch.isdigit():
            kinds.add("digit")
        else:
            kinds.add("symbol")
    return len(kinds)


def _sequence_chars(lowered: str) -> int:
    """How many characters sit in runs of 3+ alphabet, digit or keyboard steps, in either direction."""
    marked: set[int] = set()
    for i in range(len(lowered) - 2):
        triple = lowered[i : i + 3]
        if any(triple in seq or triple in seq[::-1] for seq in _SEQUENCES):
            marked.update((i, i + 1, i + 2))
    return len(marked)


def _repeated_chars(password: str) -> int:
    covered = sum(len(m.group(0)) for m in _REPEATED_CHAR.finditer(password))
    covered += sum(len(m.group(0)) for m in _REPEATED_CHUNK.finditer(password) if len(set(m.group(1))) > 1)
    return min(covered, len(password))


def _longest_dictionary_word(lowered: str) -> int:
    """Length of the longest common password (4+ letters) inside the password."""
    words = common_passwords()
    best = 0
    for i in range(len(lowered)):
        for j in range(len(lowered), i + max(best, 3), -1):
            if lowered[i:j] in words:
                best = j - i
                break
    return best


def check_strength(password: str, email: str = "", min_score: int = 50) -> Strength:
    """Score `password` (0-100) and list its problems. Only the first AUTH.strength_examined_chars are examined."""
    password = unicodedata.normalize("NFKC", password[: AUTH.strength_examined_chars])
    lowered = password.lower()
    problems: list[Problem] = []
    length = len(password)
    if length < AUTH.password_min_chars:
        problems.append(Problem("TOO_SHORT", f"use at least {AUTH.password_min_chars} characters"))
    if length > AUTH.password_max_chars:
        problems.append(Problem("TOO_LONG", f"use at most {AUTH.password_max_chars} characters"))
    if lowered in common_passwords():
        problems.append(Problem("COMMON_PASSWORD", "this is one of the most common passwords"))
    local_part = email.strip().lower().partition("@")[0]
    if len(local_part) >= 3 and local_part in lowered:
        problems.append(Problem("CONTAINS_EMAIL", "do not build the password from your email address"))

    score = min(40.0, 2.5 * length)
    score += 7.5 * _classes(password)
    score += 15.0 * min(1.0, len(set(password)) / max(1.0, 0.6 * length))
    if length >= 20:
        score += 15.0  # long passphrases are strong even from one character class
    elif _classes(password) == 1:
        problems.append(Problem("LOW_VARIETY", "mix letters, digits and symbols, or use a longer passphrase"))

    sequences = _sequence_chars(lowered)
    if sequences:
        score -= 3.0 * sequences
        problems.append(Problem("SEQUENCE", "avoid sequences such as abc, 123 or qwerty"))
    repeats = _repeated_chars(password)
    if repeats:
        score -= 3.0 * repeats
        problems.append(Problem("REPEATED", "avoid repeated characters or patterns"))
    word = _longest_dictionary_word(lowered)
    if word and length:
        score -= 60.0 * word / length
        problems.append(Problem("DICTIONARY_WORD", "avoid common words and passwords as the main part"))
    if any(p.code == "COMMON_PASSWORD" for p in problems):
        score = min(score, 5.0)
    return Strength(max(0, min(100, round(score))), problems, min_score)


class PasswordHashing:
    """argon2id hashing with the configured cost, off the event loop."""

    def __init__(self, memory_kib: int, time_cost: int, parallelism: int, max_concurrent: int = 4) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._dummy_hash = self._hasher.hash("not a password: equalises timing for unknown emails")

    async def hash(self, password: str) -> str:
        """A new argon2id hash of `password`."""
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when `password` matches. With no stored hash, a dummy is checked so timing reveals nothing."""
        async with self._slots:
            try:
                return await asyncio.to_thread(self._hasher.verify, stored_hash or self._dummy_hash, password) and (
                    stored_hash is not None
                )
            except (VerificationError, InvalidHashError):
                return False

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when the hash was made with other parameters than today's."""
        return self._hasher.check_needs_rehash(stored_hash)

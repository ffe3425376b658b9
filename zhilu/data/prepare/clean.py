"""Cleaning one document: Unicode normalisation, control characters out, length and letter-share filters."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass

from zhilu.errors import ZhiluError

# C0 and C1 control characters but tab, line feed and carriage return.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
NORMAL_FORMS = ("NFC", "NFKC", "none")


@dataclass(frozen=True)
class CleanSettings:
    normalize: str = "NFC"  # Unicode normal form, or none
    min_chars: int = 16  # shorter documents (after cleaning) are dropped as too_short
    max_chars: int = 0  # longer ones as too_long; 0: no limit
    min_alpha: float = 0.25  # documents whose share of letters (str.isalpha) is lower: low_alpha

    def validate(self) -> None:
        if self.normalize not in NORMAL_FORMS:
            raise ZhiluError("--normalize", f"unknown form {self.normalize!r}; valid: {', '.join(NORMAL_FORMS)}")
        if self.min_chars < 0 or self.max_chars < 0:
            raise ZhiluError("--min-chars", "lengths must be at least 0")
        if self.max_chars and self.max_chars < self.min_chars:
            raise ZhiluError("--max-chars", f"{self.max_chars} is below --min-chars {self.min_chars}; valid: 0 (no "
                                            f"limit) or at least {self.min_chars}")
        if not 0 <= self.min_alpha <= 1:
            raise ZhiluError("--min-alpha", f"must be a share from 0 to 1, got {self.min_alpha}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def clean(text: str, settings: CleanSettings) -> tuple[str, str | None]:
    """The cleaned text and, if the document is dropped, why (too_short, too_long, low_alpha)."""
    if settings.normalize != "none":
        text = unicodedata.normalize(settings.normalize, text)
    text = _CONTROL.sub("", text)
    n = len(text)
    if n < max(settings.min_chars, 1):
        return text, "too_short"
    if settings.max_chars and n > settings.max_chars:
        return text, "too_long"
    if settings.min_alpha and sum(map(str.isalpha, text)) < settings.min_alpha * n:
        return text, "low_alpha"
    return text, None

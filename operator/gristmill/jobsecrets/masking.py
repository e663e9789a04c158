"""Secret values a job received, replaced by `***` in its log, result and error.

Values shorter than MIN_MASKED_LENGTH are left alone: a Secret holding `1`, `yes` or
`eu` would turn every digit, word or region in the log into `***`, which hides what
the log is for and reveals that value all the same (every masked spot is it). A
multi-line value (a PEM key) is masked whole and line by line, as jobs print such
values a line at a time.

Output arrives in chunks cut anywhere, so a stream holds back the end of a chunk that
could be the start of a value until the next chunk says whether it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from gristmill.sandbox.base import JobOutcome

MASK = "***"
MIN_MASKED_LENGTH = 4


class Masker:
    def __init__(self, values: Iterable[str]):
        wanted: set[str] = set()
        for value in values:
            wanted.add(value)
            wanted.update(line.strip() for line in value.splitlines())
        # Longest first: a value that contains another is masked whole.
        self.values = sorted((v for v in wanted if len(v) >= MIN_MASKED_LENGTH),
                             key=len, reverse=True)
        self._pattern = (re.compile("|".join(map(re.escape, self.values)))
                         if self.values else None)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def mask(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern else text

    def mask_json(self, value: Any) -> Any:
        """A result or error with every string (keys too) masked."""
        if not self._pattern:
            return value
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, list):
            return [self.mask_json(item) for item in value]
        if isinstance(value, dict):
            return {self.mask(str(k)): self.mask_json(v) for k, v in value.items()}
        return value

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` may be the start of a value (only
        where a value's first character occurs: a large value costs no more per chunk)."""
        keep = 0
        for value in self.values:
            at = text.find(value[0], max(0, len(text) - len(value) + 1))
            while at != -1 and len(text) - at > keep:
                if value.startswith(text[at:]):
                    keep = len(text) - at
                    break
                at = text.find(value[0], at + 1)
        return keep

    def stream(self, emit: Callable[[str], None]) -> MaskedStream:
        return MaskedStream(self, emit)


class MaskedStream:
    """Masks text fed in chunks; `flush` when the output ends."""

    def __init__(self, masker: Masker, emit: Callable[[str], None]):
        self.masker, self.emit = masker, emit
        self.pending = ""

    def feed(self, text: str) -> None:
        if not self.masker:
            self.emit(text)
            return
        masked = self.masker.mask(self.pending + text)
        keep = self.masker.held_back(masked)
        self.pending = masked[len(masked) - keep:] if keep else ""
        if len(masked) > keep:
            self.emit(masked[:len(masked) - keep])

    def flush(self) -> None:
        if self.pending:
            self.emit(self.pending)
            self.pending = ""


def masked_outcome(masker: Masker, outcome: JobOutcome) -> JobOutcome:
    """The outcome with the job's secret values masked in its result and its error."""
    if not masker:
        return outcome
    return JobOutcome(ok=outcome.ok, result=masker.mask_json(outcome.result),
                      error=masker.mask_json(outcome.error))

"""The per-document stages of ``xtuner data prepare`` that datatrove does not ship as we need them.

Each is a datatrove step (formatter or filter), so it runs under any datatrove executor. A filter
drops with a reason (``filter_reason`` on the removed document) that the report counts.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.pii import PIIReplacer
from datatrove.pipeline.writers.disk_base import DiskWriter

from xtuner_lite.data.ngrams import ngrams, stable_hash

SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
BLANK_LINES = re.compile(r"\n{3,}")
# phone numbers (datatrove's PII formatter covers e-mail and IP addresses only): international
# "+CC ..." numbers, and (ddd) ddd-dddd / ddd-ddd-dddd / ddd.ddd.dddd; bare digit groups such as
# year ranges ("1993-2001") or number lists are not matched
PHONE = (
    r"(?<![\w.+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}"
    r"|(?:\(\d{3}\)[ .-]?|\d{3}[.-])\d{3}[.-]\d{4})(?!\w|\.\d)"
)


IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def _digits(match: str) -> bool:
    """A phone number has 7 to 15 digits and is not a (private) IPv4 address."""
    return 7 <= sum(c.isdigit() for c in match) <= 15 and not IPV4.fullmatch(match)


class Normalize(PipelineStep):
    """Unicode normal form (NFKC by default), spaces collapsed, blank-line runs shortened, stripped.
    Own step: datatrove's formatters fix mojibake (ftfy) but do not normalize forms or spacing."""

    name = "🔤 normalize"
    type = "✂️ - FORMAT"

    def __init__(self, form: str = "NFKC", collapse_spaces: bool = True):
        super().__init__()
        self.form = form
        self.collapse_spaces = collapse_spaces

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        for doc in data:
            text = unicodedata.normalize(self.form, doc.text) if self.form else doc.text
            if self.collapse_spaces:
                text = BLANK_LINES.sub("\n\n", SPACES.sub(" ", text))
                text = "\n".join(line.strip() for line in text.split("\n"))
            if text != doc.text:
                self.stat_update("changed")
            doc.text = text.strip()
            yield doc


class HtmlToText(BaseFilter):
    """Main text of an HTML page by datatrove's trafilatura extractor, each page in its sandbox
    process with a time limit. Own step around theirs: their extractor drops a page that times
    out, fails or has no main text without saying which; here each is removed with its reason."""

    name = "⛏ HTML to text"

    def __init__(
        self,
        favour_precision: bool = True,
        timeout: float = 5.0,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.extractor = Trafilatura(favour_precision=favour_precision, timeout=timeout)
        self.sandbox: ExtractorSandbox | None = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        with ExtractorSandbox(timeout=self.extractor.timeout) as self.sandbox:
            yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        try:
            text = self.sandbox.process_document(doc.text, self.extractor.extract)
        except TimeoutError:
            return False, "html_timeout"
        except EOFError:  # the sandbox process died (e.g. out of memory)
            return False, "html_extractor_died"
        except Exception as exc:  # noqa: BLE001 - whatever trafilatura raises on a broken page
            doc.metadata["html_error"] = f"{type(exc).__name__}: {exc}"[:200]
            return False, "html_error"
        if not text or not text.strip():
            return False, "html_no_main_text"
        doc.text = text
        return True


class MaskPII(PIIFormatter):
    """datatrove's e-mail and IP masking plus phone numbers; the masks made are counted per
    document (``metadata["pii"]``) so the report can say what was masked."""

    name = "📞 PII"

    def __init__(self, emails: bool = True, ips: bool = True, phones: bool = True):
        super().__init__(remove_emails=emails, remove_ips=ips)
        self.phones = phones
        self.phone_replacer = PIIReplacer(PHONE, "<phone>", validator=_digits)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        for doc in data:
            before = doc.text
            counts = {}
            for kind, on, replacer in (
                ("email", self.remove_emails, self.emails_replacer),
                ("ip", self.remove_ips, self.ip_replacer),
                ("phone", self.phones, self.phone_replacer),
            ):
                if not on:
                    continue
                found = sum(
                    1
                    for m in replacer.regex.finditer(doc.text)
                    if not replacer.validator or replacer.validator(m.group(0))
                )
                if found:
                    counts[kind] = found
                    doc.text = replacer.replace(doc.text)
                    self.stat_update(f"masked_{kind}", value=found)
            if doc.text != before:
                doc.metadata["pii"] = counts
            yield doc


@functools.cache
def language_identifier():
    """langid.py's model, which ships inside its package (datatrove's fastText language models
    are downloaded at run time, which an offline machine cannot do); loaded once per process."""
    from langid.langid import LanguageIdentifier, model  # decodes the model: keep it cached

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


class LanguageFilter(BaseFilter):
    """Keeps documents whose detected language is listed, with probability ≥ ``min_score``;
    every document is tagged with ``language`` and ``language_score``."""

    name = "🌍 language"

    def __init__(
        self,
        languages: list[str],
        min_score: float = 0.65,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.languages = set(languages)
        self.min_score = min_score

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        language, score = language_identifier().classify(doc.text[:4000])
        doc.metadata["language"], doc.metadata["language_score"] = language, round(float(score), 4)
        self.stat_update(f"language_{language}")
        if language not in self.languages:
            return False, "other_language"
        if score < self.min_score:
            return False, "low_language_score"
        return True


def read_words(words: list[str] | None, words_file: str | None) -> list[str]:
    out = [w.strip().lower() for w in words or [] if w.strip()]
    if words_file:
        lines = Path(words_file).read_text(encoding="utf-8").splitlines()
        out += [w.strip().lower() for w in lines if w.strip() and not w.startswith("#")]
    return out


class BlocklistFilter(BaseFilter):
    """Drops documents containing more than ``max_hits`` whole-word matches of a block list
    (words or phrases, case-insensitive). Own step: datatrove's URL filter judges URLs only."""

    name = "⛔ block list"

    def __init__(
        self, words: list[str], max_hits: int = 0, exclusion_writer: DiskWriter | None = None
    ):
        super().__init__(exclusion_writer)
        self.words = words
        self.max_hits = max_hits
        alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        hits = self.pattern.findall(doc.text) if self.words else []
        if len(hits) > self.max_hits:
            doc.metadata["blocked"] = sorted({h.lower() for h in hits})[:5]
            return False, "blocklist"
        return True


class DecontaminateFilter(BaseFilter):
    """Drops documents sharing a word n-gram with an evaluation set (the n-grams of
    ``xtuner contamination``, hashed once in the main process)."""

    name = "🧪 decontaminate"

    def __init__(
        self,
        grams: frozenset[int],
        n: int = 13,
        max_hits: int = 0,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.grams = grams
        self.n = n
        self.max_hits = max_hits

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        hits = sum(1 for g in ngrams(doc.text, self.n) if stable_hash(g) in self.grams)
        if hits > self.max_hits:
            doc.metadata["eval_ngram_hits"] = hits
            return False, "contaminated"
        return True


def eval_grams(rows_text: list[str], n: int) -> frozenset[int]:
    """Stable hashes of every n-gram of the evaluation texts."""
    return frozenset(stable_hash(g) for text in rows_text for g in ngrams(text, n))

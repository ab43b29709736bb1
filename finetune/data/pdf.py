"""PDF input: a PDF named where an image is accepted becomes one image per page, in page order.

At data-check time (:func:`expand_pdf`) a PDF is opened (a corrupt or password-protected one fails there, with its
reason), its pages counted against `data.max_pdf_pages` (more is a bad sample, never a silent truncation) and each
page turned into a :class:`PdfPage` reference whose pixel size is the page box × `data.pdf_dpi` / 72 — exactly the
size :func:`render_page` will produce (pypdfium2 rounds each side up), so token counting and batching see every
page without rendering one. Pages are rendered (pdfium, through pypdfium2) only when a batch is built, at the scale
the model family can use (`ModelFamily.decode_size`: 1/n of `data.pdf_dpi` for a page larger than its tiling needs).

PDFium is not thread-safe: every call into it here holds one process-wide lock.
"""

from __future__ import annotations

import errno
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.errors import UserError

DEFAULT_PDF_DPI = 144
DEFAULT_MAX_PDF_PAGES = 8

_PDFIUM_LOCK = threading.RLock()


class PdfError(ValueError):
    """A PDF that cannot be read: not a PDF, damaged, password-protected, or without pages."""


class PdfTooManyPages(ValueError):
    """A PDF with more pages than `data.max_pdf_pages`."""


@dataclass(frozen=True)
class PdfPage:
    """One page of a PDF file as an image reference: rendered at `dpi` to `size` (width, height) pixels."""

    path: str
    index: int  # 0-based
    dpi: float
    size: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.path}#page={self.index + 1}"


def is_pdf(ref: Any) -> bool:
    """Whether an image reference names a PDF file (by its suffix)."""
    return isinstance(ref, (str, Path)) and str(ref).lower().endswith(".pdf")


def _pdfium():
    try:
        import pypdfium2
    except ImportError:  # a dependency: only an environment installed before it was one lacks it
        raise UserError(
            "PDF input needs pypdfium2, which this environment lacks: pip install pypdfium2 (or re-run setup)"
        ) from None
    return pypdfium2


def _open(path: str):
    pdfium = _pdfium()
    try:
        return pdfium.PdfDocument(path)
    except pdfium.PdfiumError as err:
        text = str(err)
        if "password" in text.lower():
            raise PdfError(f"PDF {path} is password-protected (encrypted); decrypt it first") from None
        raise PdfError(f"unreadable PDF {path}: {text}") from None


def expand_pdf(path: str | Path, *, dpi: float = DEFAULT_PDF_DPI, max_pages: int = DEFAULT_MAX_PDF_PAGES) -> list:
    """The pages of the PDF at `path` as :class:`PdfPage` references, without rendering them.

    Raises FileNotFoundError, PdfError (unreadable / encrypted / no pages) or PdfTooManyPages."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no such file", path)
    scale = dpi / 72
    with _PDFIUM_LOCK:
        document = _open(path)
        try:
            count = len(document)
            if count == 0:
                raise PdfError(f"PDF {path} has no pages")
            if count > max_pages:
                raise PdfTooManyPages(f"PDF {path} has {count} pages, over data.max_pdf_pages={max_pages}")
            pages = []
            for index in range(count):
                try:
                    page = document[index]
                except _pdfium().PdfiumError as err:
                    raise PdfError(f"unreadable PDF {path}: page {index + 1}: {err}") from None
                try:
                    width, height = page.get_size()
                finally:
                    page.close()
                if not (width > 0 and height > 0):
                    raise PdfError(f"unreadable PDF {path}: page {index + 1} has an empty page box")
                size = (math.ceil(width * scale), math.ceil(height * scale))  # as PdfPage.render sizes its bitmap
                pages.append(PdfPage(path, index, dpi, size))
            return pages
        finally:
            document.close()


def expand_pdfs(refs: list, *, dpi: float = DEFAULT_PDF_DPI, max_pages: int = DEFAULT_MAX_PDF_PAGES) -> list:
    """Image references with each PDF replaced by its pages (other references unchanged, order kept). `max_pages`
    caps one sample's PDF pages in all (several PDFs in one sample share it): PdfTooManyPages beyond it."""
    if not any(is_pdf(ref) for ref in refs):
        return list(refs)
    out: list = []
    pages = 0
    for ref in refs:
        if not is_pdf(ref):
            out.append(ref)
            continue
        expanded = expand_pdf(ref, dpi=dpi, max_pages=max_pages)
        pages += len(expanded)
        if pages > max_pages:
            raise PdfTooManyPages(
                f"the sample's PDFs have at least {pages} pages in all, over data.max_pdf_pages={max_pages}"
            )
        out.extend(expanded)
    return out


def render_page(page: PdfPage, factor: int = 1) -> Image.Image:
    """The page as an RGB image of `page.size` pixels (white background, annotations and form fields drawn); with a
    whole `factor` > 1, rendered at 1/factor of that scale instead, to `page.size` / factor (sides rounded up)."""
    width, height = page.size
    size = (-(-width // factor), -(-height // factor))
    with _PDFIUM_LOCK:
        document = _open(page.path)
        try:
            document.init_forms()  # before loading the page: filled form fields are drawn too
            pdf_page = document[page.index]
            try:
                image = pdf_page.render(scale=page.dpi / 72 / factor, may_draw_forms=True).to_pil()
            finally:
                pdf_page.close()
        except _pdfium().PdfiumError as err:
            raise PdfError(f"unreadable PDF {page.path}: page {page.index + 1}: {err}") from None
        finally:
            document.close()
    image = image.convert("RGB")
    # The file changed since it was checked (the token count depends on the size), or a reduced render rounded a side
    # the other way.
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def pdf_settings(recipe: dict, *, max_pdf_pages: int | None = None) -> dict:
    """`pdf_dpi` and `max_pdf_pages` from a run's recipe (a plain dict; the defaults where it has none), for
    `prepare_samples`: evaluation and prediction render PDFs the way the run's training did. `max_pdf_pages`, when
    given (a command line's `--max-pdf-pages`), replaces the recipe's cap."""
    data = recipe.get("data", {}) or {}
    return {
        "pdf_dpi": data.get("pdf_dpi") or DEFAULT_PDF_DPI,
        "max_pdf_pages": max_pdf_pages or data.get("max_pdf_pages") or DEFAULT_MAX_PDF_PAGES,
    }

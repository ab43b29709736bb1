"""Rendering helpers for the synthetic documents: fonts, a page canvas, print formats, noise.

Everything here is deterministic given the `random.Random` passed in. Fonts are discovered
once per process and cached (the cache only memoises a read of the file system; it never
changes what a given seed renders on a given machine).
"""

from __future__ import annotations

import datetime as dt
import functools
import random
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Where system fonts usually live on Linux; macOS/Windows users still get PIL's default font.
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf")
# Faces that are technically fonts but make poor document text (hairline weights, math, emoji).
FONT_SKIP_WORDS = ("math", "extralight", "thin", "hairline", "emoji", "symbol", "dingbat")
# Every font must cover these, otherwise it cannot print an invoice at all.
REQUIRED_GLYPHS = "AZaz09.,:-/#"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
FontSpec = str | None  # path to a TrueType file, or None for PIL's built-in font

INK = (20, 20, 20)
RULE = (200, 200, 200)


def _glyph_pixels(font: Font, char: str) -> bytes:
    canvas = Image.new("L", (64, 64))
    ImageDraw.Draw(canvas).text((8, 8), char, font=font, fill=255)
    return canvas.tobytes()


def has_glyphs(font: Font, chars: str) -> bool:
    """True if `font` draws a real glyph (not the 'missing' box) for every char in `chars`."""
    # Private-use code point: no ordinary font maps it, so it renders as the .notdef box.
    missing = _glyph_pixels(font, "\ue000")
    return all(_glyph_pixels(font, ch) != missing for ch in chars if not ch.isspace())


@functools.cache
def discover_fonts() -> tuple[FontSpec, ...]:
    """All usable fonts on this machine, in a sorted (deterministic) order.

    PIL's built-in font (`None`) is always first, so the tuple is never empty.
    """
    paths: list[str] = []
    for root in FONT_DIRS:
        if Path(root).is_dir():
            paths += [str(p) for p in Path(root).rglob("*") if p.suffix.lower() in FONT_SUFFIXES]
    usable: list[FontSpec] = [None]
    for path in sorted(set(paths)):
        if any(word in Path(path).stem.lower() for word in FONT_SKIP_WORDS):
            continue
        try:
            font = ImageFont.truetype(path, 20)
        except OSError:
            continue
        if has_glyphs(font, REQUIRED_GLYPHS):
            usable.append(path)
    return tuple(usable)


def body_fonts() -> tuple[FontSpec, ...]:
    """Discovered fonts suited to running text: bold faces are kept for headings."""
    return tuple(f for f in discover_fonts() if f is None or "bold" not in Path(f).stem.lower())


def monospace_fonts() -> tuple[FontSpec, ...]:
    """The discovered fonts whose file name says they are monospaced (may be empty)."""
    return tuple(f for f in discover_fonts() if f and "mono" in Path(f).stem.lower())


def bold_of(font: FontSpec) -> FontSpec:
    """The bold sibling of a font file if one was discovered (DejaVuSans -> DejaVuSans-Bold)."""
    if font is None:
        return None
    family = Path(font).stem.split("-")[0]
    bolds = [f for f in discover_fonts() if f and Path(f).stem == f"{family}-Bold"]
    return bolds[0] if bolds else font


@functools.cache
def load_font(spec: FontSpec, size: int) -> Font:
    """Load a font at a pixel size (cached: fonts are read-only once loaded)."""
    if spec is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(spec, size)


def font_size(font: Font) -> int:
    """Nominal pixel size of a font (the legacy bitmap font has no `size`)."""
    return int(getattr(font, "size", 11))


def fit_font(spec: FontSpec, size: int, text: str, max_width: float, min_size: int = 9) -> Font:
    """The largest font of `spec`, at most `size`, that draws `text` within `max_width` px."""
    while size > min_size and load_font(spec, size).getlength(text) > max_width:
        size -= 1
    return load_font(spec, size)


@dataclass(frozen=True)
class Typeset:
    """A document's font choice: a regular face, its bold sibling and a base pixel size."""

    face: FontSpec
    bold_face: FontSpec
    size: int

    def font(self, scale: float = 1.0, *, bold: bool = False) -> Font:
        return load_font(self.bold_face if bold else self.face, max(9, round(self.size * scale)))

    def fit(self, text: str, max_width: float, scale: float = 1.0, *, bold: bool = False) -> Font:
        """Like `font`, but shrunk until `text` fits in `max_width` pixels."""
        face = self.bold_face if bold else self.face
        return fit_font(face, max(9, round(self.size * scale)), text, max_width)


class Page:
    """An RGB canvas with a few text helpers; every `text` call returns the next line's y."""

    def __init__(
        self, width: int, height: int, background: tuple[int, int, int], ink: tuple[int, int, int] = INK
    ) -> None:
        self.background, self.ink = background, ink
        self.image = Image.new("RGB", (width, height), background)
        self.draw = ImageDraw.Draw(self.image)

    @property
    def width(self) -> int:
        return self.image.width

    def text(
        self,
        x: float,
        y: float,
        s: str,
        font: Font,
        *,
        align: str = "left",
        fill: tuple[int, int, int] | None = None,
        spacing: float = 1.35,
    ) -> float:
        """Draw one line with its top at `y`; `x` is the left, right or centre edge per `align`."""
        anchor = {"left": "la", "right": "ra", "center": "ma"}[align]
        self.draw.text((x, y), s, font=font, fill=fill or self.ink, anchor=anchor)
        return y + font_size(font) * spacing

    def lines(self, x: float, y: float, rows: list[str], font: Font, **kwargs) -> float:
        """Draw several lines top to bottom; returns the y below the last one."""
        for row in rows:
            y = self.text(x, y, row, font, **kwargs)
        return y

    def rule(
        self, x0: float, x1: float, y: float, *, fill: tuple[int, int, int] = RULE, width: int = 1, dash: int = 0
    ) -> None:
        """Horizontal line; `dash` > 0 draws it dashed (receipt style)."""
        if dash <= 0:
            self.draw.line([(x0, y), (x1, y)], fill=fill, width=width)
            return
        x = x0
        while x < x1:
            self.draw.line([(x, y), (min(x + dash, x1), y)], fill=fill, width=width)
            x += 2 * dash

    def box(self, xy: tuple[float, float, float, float], *, fill=None, outline=RULE) -> None:
        self.draw.rectangle(xy, fill=fill, outline=outline)


# ---------------------------------------------------------------- how values are printed

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£"}
# Date conventions follow the currency so that e.g. 03/05 is never ambiguous within a region.
DATE_FORMATS = {
    "EUR": ("dd.mm.yyyy", "d Month yyyy", "iso", "d Mon yyyy"),
    "USD": ("mm/dd/yyyy", "Month d, yyyy", "Mon d, yyyy", "iso"),
    "GBP": ("dd/mm/yyyy", "d Month yyyy", "d Mon yyyy", "iso"),
}
CENT = Decimal("0.01")


def format_date(d: dt.date, style: str) -> str:
    """Print a date in one of the DATE_FORMATS styles (locale-independent on purpose)."""
    month = MONTHS[d.month - 1]
    return {
        "iso": d.isoformat(),
        "dd.mm.yyyy": f"{d.day:02d}.{d.month:02d}.{d.year}",
        "dd/mm/yyyy": f"{d.day:02d}/{d.month:02d}/{d.year}",
        "mm/dd/yyyy": f"{d.month:02d}/{d.day:02d}/{d.year}",
        "d Month yyyy": f"{d.day} {month} {d.year}",
        "d Mon yyyy": f"{d.day} {month[:3]} {d.year}",
        "Month d, yyyy": f"{month} {d.day}, {d.year}",
        "Mon d, yyyy": f"{month[:3]} {d.day}, {d.year}",
    }[style]


@dataclass(frozen=True)
class PrintStyle:
    """How one document prints its values: currency marker, decimal mark, date format."""

    currency: str
    marker: str  # "symbol", "code" or "none"
    decimal_comma: bool
    date_style: str

    def money(self, value: Decimal) -> str:
        text = f"{value.quantize(CENT, ROUND_HALF_UP):,.2f}"
        if self.decimal_comma:  # 1,234.50 -> 1.234,50
            text = text.replace(",", "_").replace(".", ",").replace("_", ".")
        if self.marker == "symbol":
            return f"{SYMBOLS[self.currency]}{text}" if self.currency != "EUR" else f"{text} €"
        return f"{text} {self.currency}" if self.marker == "code" else text

    def date(self, d: dt.date) -> str:
        return format_date(d, self.date_style)


def random_style(rng: random.Random, currency: str, font: FontSpec) -> PrintStyle:
    """A random print style for `currency` that `font` can draw."""
    marker = rng.choice(("symbol", "code", "none"))
    # PIL's built-in font has no €/£ glyphs: print the ISO code instead of a tofu box.
    if marker == "symbol" and not has_glyphs(load_font(font, 16), SYMBOLS[currency]):
        marker = "code"
    return PrintStyle(currency, marker, currency == "EUR" and rng.random() < 0.4, rng.choice(DATE_FORMATS[currency]))


def paper_color(rng: random.Random) -> tuple[int, int, int]:
    """Off-white: slightly warm or cool, never darker than light paper."""
    base = rng.randint(238, 255)
    return (base, max(base - rng.randint(0, 4), 0), max(base - rng.randint(0, 10), 0))


def ink_color(rng: random.Random) -> tuple[int, int, int]:
    """Near-black, occasionally dark blue (like a coloured print template)."""
    if rng.random() < 0.2:
        return (rng.randint(10, 40), rng.randint(20, 50), rng.randint(70, 110))
    gray = rng.randint(0, 45)
    return (gray, gray, gray)


def degrade(
    image: Image.Image, rng: random.Random, background: tuple[int, int, int], max_angle: float = 1.0
) -> Image.Image:
    """Mild scan-like noise: small rotation, faint blur, light pixel noise. Text stays legible."""
    angle = rng.uniform(-max_angle, max_angle)
    image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=background)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.2, 0.5)))
    if rng.random() < 0.2:  # kept rare: pixel noise makes PNGs ~10x larger and slower to write
        # numpy gets its own generator seeded from `rng`, so the result stays reproducible.
        noise_rng = np.random.default_rng(rng.getrandbits(32))
        pixels = np.asarray(image, dtype=np.int16)
        pixels = pixels + noise_rng.normal(0.0, rng.uniform(1.5, 4.0), pixels.shape[:2])[..., None]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image

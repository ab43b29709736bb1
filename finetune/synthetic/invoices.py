"""Synthetic invoices, receipts and small forms rendered with PIL, with their JSON targets.

Presets:
  - "invoices": realistic pages (classic, banded, two-column invoices and till receipts),
  - "form":     ~256x256 cards with a name, a date and an amount,
  - "simple":   128x128 images with two lines (`No 48213`, `Total 73.50`) that a tiny
                randomly initialised model can learn to read on CPU,
  - "digits":   64x64 images with one 5-digit number: the quickstart's task, which a tiny model
                trained from scratch learns to read within a few CPU minutes.

Printed values vary in format (dates, currency symbols, decimal commas); targets are
normalised: dates ISO `YYYY-MM-DD`, money strings with two decimals and no separators.

    python scripts/make_invoices.py --out data/invoices --seed 0 \
        --n-train 200 --n-val 32 --n-test 32
"""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from PIL import Image

from finetune.synthetic.render import (
    CENT,
    SYMBOLS,
    FontSpec,
    Page,
    PrintStyle,
    Typeset,
    body_fonts,
    bold_of,
    degrade,
    format_date,
    ink_color,
    load_font,
    monospace_fonts,
    paper_color,
    random_style,
)

PRESETS = ("invoices", "form", "simple", "digits")
SPLITS = ("train", "val", "test")

COMPANY_WORDS = (
    "Northwind",
    "Blue Harbor",
    "Silverline",
    "Maple Leaf",
    "Granite",
    "Oakridge",
    "Sunrise",
    "Redwood",
    "Lakeside",
    "Summit",
    "Copperfield",
    "Evergreen",
    "Brightwater",
    "Ironbridge",
    "Westbrook",
    "Falcon",
    "Pinecrest",
    "Horizon",
)
COMPANY_KINDS = (
    "Trading",
    "Supplies",
    "Consulting",
    "Logistics",
    "Software",
    "Print Shop",
    "Engineering",
    "Foods",
    "Design Studio",
    "Hardware",
    "Textiles",
    "Media",
)
COMPANY_SUFFIXES = ("Ltd", "GmbH", "Inc.", "LLC", "B.V.", "& Co.", "")
FIRST_NAMES = (
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Elena",
    "Felix",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kate",
    "Liam",
    "Maria",
    "Noah",
    "Olivia",
    "Paul",
    "Sofia",
    "Tom",
)
LAST_NAMES = (
    "Berg",
    "Carter",
    "Dubois",
    "Evans",
    "Fischer",
    "Garcia",
    "Hansen",
    "Jensen",
    "Klein",
    "Lopez",
    "Moreau",
    "Novak",
    "Olsen",
    "Rossi",
    "Schmidt",
    "Walsh",
)
STREETS = (
    "Oak",
    "Maple",
    "High",
    "Station",
    "Church",
    "Mill",
    "Park",
    "Bridge",
    "King",
    "Garden",
    "Market",
    "Harbour",
    "Elm",
    "Lake",
    "Rose",
    "Castle",
)
STREET_TYPES = ("Street", "Road", "Avenue", "Lane", "Way", "Square")
CITIES = {
    "EUR": ("Berlin", "Hamburg", "Munich", "Paris", "Lyon", "Amsterdam", "Vienna", "Milan"),
    "USD": (
        ("Austin", "TX"),
        ("Denver", "CO"),
        ("Boston", "MA"),
        ("Seattle", "WA"),
        ("Portland", "OR"),
        ("Madison", "WI"),
    ),
    "GBP": ("London", "Leeds", "Bristol", "Manchester", "York", "Oxford"),
}
PRODUCTS = (
    "Printer paper A4",
    "Toner cartridge",
    "USB-C cable",
    "Office chair",
    "Desk lamp",
    "Consulting hours",
    "Website hosting",
    "Software license",
    "Coffee beans 1kg",
    "Notebook",
    "Ballpoint pens (10)",
    "Monitor 24in",
    "Shipping",
    "Maintenance visit",
    "Design work",
    "Label roll",
    "Keyboard",
    "Cleaning service",
    "Training session",
)
GROCERIES = (
    "Coffee",
    "Croissant",
    "Bread",
    "Milk 1L",
    "Apples",
    "Bananas",
    "Cheese",
    "Water 0.5L",
    "Sandwich",
    "Tea",
    "Orange juice",
    "Yogurt",
    "Pasta",
    "Eggs (6)",
    "Chocolate",
    "Butter",
    "Rice 1kg",
    "Tomatoes",
)
STORES = (
    "Corner Market",
    "Daily Fresh",
    "Bean & Leaf Cafe",
    "City Bakery",
    "Green Grocer",
    "QuickStop",
    "Harbor Deli",
    "Sunny Mart",
)
TAX_RATES = {"EUR": (7, 10, 19, 20, 21), "USD": (0, 5, 7, 8), "GBP": (0, 5, 20)}


# ---------------------------------------------------------------- random values


def money_str(value: Decimal) -> str:
    """Target form of an amount: '1234.50'."""
    return f"{value.quantize(CENT, ROUND_HALF_UP):.2f}"


def random_money(rng: random.Random, lo: str, hi: str) -> Decimal:
    """A uniformly random amount in [lo, hi] with cents."""
    return Decimal(rng.randint(int(Decimal(lo) * 100), int(Decimal(hi) * 100))) / 100


def random_date(rng: random.Random) -> dt.date:
    return dt.date(2019, 1, 1) + dt.timedelta(days=rng.randrange(7 * 365))


def company(rng: random.Random) -> str:
    return " ".join(
        w for w in (rng.choice(COMPANY_WORDS), rng.choice(COMPANY_KINDS), rng.choice(COMPANY_SUFFIXES)) if w
    )


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def address(rng: random.Random, currency: str) -> tuple[str, str]:
    """Two printed lines; the target joins them with ', '."""
    street = f"{rng.randint(1, 240)} {rng.choice(STREETS)} {rng.choice(STREET_TYPES)}"
    if currency == "USD":
        city, state = rng.choice(CITIES["USD"])
        return street, f"{city}, {state} {rng.randint(10000, 99999)}"
    if currency == "GBP":
        letters = "ABDEFGHJLNPRSTUWXYZ"
        postcode = (
            f"{rng.choice('BLMSY')}{rng.choice('SE')}{rng.randint(1, 19)} "
            f"{rng.randint(1, 9)}{rng.choice(letters)}{rng.choice(letters)}"
        )
        return street, f"{rng.choice(CITIES['GBP'])} {postcode}"
    return street, f"{rng.randint(10000, 99999)} {rng.choice(CITIES['EUR'])}"


def invoice_number(rng: random.Random, year: int) -> str:
    n = rng.randint(1, 99999)
    return rng.choice((f"INV-{year}-{n:05d}", f"{n:06d}", f"RE-{n}", f"{year}/{n:04d}", f"A{n:05d}"))


# ---------------------------------------------------------------- invoices


@dataclass(frozen=True)
class Invoice:
    """One invoice: its JSON target plus the raw values the renderer prints."""

    target: dict
    date: dt.date
    tax_rate: int
    seller_lines: tuple[str, str]
    buyer_lines: tuple[str, str]
    items: tuple[tuple[str, int, Decimal, Decimal], ...]  # description, qty, unit, amount
    subtotal: Decimal
    tax: Decimal
    total: Decimal


def make_invoice(rng: random.Random, currency: str) -> Invoice:
    """Random, internally consistent invoice data (amount = qty*unit, total = subtotal+tax)."""
    date = random_date(rng)
    seller, buyer = company(rng), (company(rng) if rng.random() < 0.7 else person(rng))
    seller_lines, buyer_lines = address(rng, currency), address(rng, currency)
    items = []
    for description in rng.sample(PRODUCTS, rng.randint(1, 6)):
        qty = rng.choice((1, 1, 1, 2, 2, 3, 4, 5, 10, 12))
        unit = random_money(rng, "0.50", rng.choice(("20", "150", "900")))
        items.append((description, qty, unit, qty * unit))
    subtotal = sum((amount for *_, amount in items), Decimal(0))
    tax_rate = rng.choice(TAX_RATES[currency])
    tax = (subtotal * tax_rate / 100).quantize(CENT, ROUND_HALF_UP)
    total = subtotal + tax
    target = {
        "invoice_number": invoice_number(rng, date.year),
        "date": date.isoformat(),
        "seller": {"name": seller, "address": ", ".join(seller_lines)},
        "buyer": {"name": buyer, "address": ", ".join(buyer_lines)},
        "items": [
            {"description": d, "quantity": q, "unit_price": money_str(u), "amount": money_str(a)}
            for d, q, u, a in items
        ],
        "subtotal": money_str(subtotal),
        "tax": money_str(tax),
        "total": money_str(total),
        "currency": currency,
    }
    return Invoice(target, date, tax_rate, seller_lines, buyer_lines, tuple(items), subtotal, tax, total)


def render_invoice(rng: random.Random, inv: Invoice, layout: str, font: FontSpec, style: PrintStyle) -> Image.Image:
    """Draw an A4-ish invoice page in the 'classic', 'banded' or 'two_column' layout."""
    width = rng.randint(600, 900)
    page = Page(width, int(width * rng.uniform(1.33, 1.42)), paper_color(rng), ink_color(rng))
    ts = Typeset(font, bold_of(font), max(11, round(width / rng.uniform(46, 54))))
    margin = round(width * 0.07)
    number_label = rng.choice(("Invoice No.", "Invoice #", "Number", "Invoice number"))
    date_label = rng.choice(("Date", "Invoice date", "Issued"))
    meta = [f"{number_label}: {inv.target['invoice_number']}", f"{date_label}: {style.date(inv.date)}"]
    title = rng.choice(("INVOICE", "Invoice", "TAX INVOICE", "BILL"))
    if layout == "two_column":
        y = draw_two_column_header(page, ts, inv, margin, title, meta)
    else:
        y = draw_classic_header(rng, page, ts, inv, margin, title, meta, banded=layout == "banded")
    y = draw_items_table(rng, page, ts, inv, style, margin, y)
    draw_totals(rng, page, ts, inv, style, margin, y)
    footer = rng.choice(
        (
            "Thank you for your business.",
            "Payment due within 30 days.",
            "Please include the invoice number with your payment.",
        )
    )
    page.text(margin, page.image.height - margin - ts.size * 2, footer, ts.font(0.8))
    return degrade(page.image, rng, page.background, max_angle=1.0)


def draw_classic_header(
    rng: random.Random, page: Page, ts: Typeset, inv: Invoice, margin: int, title: str, meta: list[str], *, banded: bool
) -> float:
    """Seller top left, title top right (optionally on a coloured band), then 'Bill to'."""
    right, seller = page.width - margin, inv.target["seller"]["name"]
    y = float(margin)
    if banded:  # seller and title in paper-coloured text on a dark band across the page
        band = (rng.randint(30, 90), rng.randint(50, 110), rng.randint(90, 150))
        top, band_h, inset = margin * 0.5, ts.size * 4.6, margin * 0.5
        page.box((inset, top, page.width - inset, top + band_h), fill=band, outline=band)
        page.text(
            margin, top + band_h * 0.28, seller, ts.fit(seller, page.width * 0.55, 1.5, bold=True), fill=page.background
        )
        page.text(right, top + band_h * 0.28, title, ts.font(1.6, bold=True), align="right", fill=page.background)
        y = top + band_h + ts.size
        page.lines(margin, y, list(inv.seller_lines), ts.font(0.8))
    else:
        y = page.text(margin, y, seller, ts.fit(seller, page.width * 0.55, 1.5, bold=True))
        page.lines(margin, y, list(inv.seller_lines), ts.font(0.8))
        page.text(right, margin, title, ts.font(1.8, bold=True), align="right")
        y = margin + ts.size * 2.4
    y = page.lines(right, y, meta, ts.font(), align="right") + ts.size * 1.2
    y = page.text(margin, y, rng.choice(("Bill to:", "Billed to", "Customer:")), ts.font(bold=True))
    buyer = [inv.target["buyer"]["name"], *inv.buyer_lines]
    return page.lines(margin, y, buyer, ts.font()) + ts.size * 1.5


def draw_two_column_header(page: Page, ts: Typeset, inv: Invoice, margin: int, title: str, meta: list[str]) -> float:
    """Centred title and meta line, then boxed 'From' and 'To' blocks side by side."""
    mid, inner = page.width / 2, page.width - 2 * margin
    y = page.text(mid, margin, title, ts.font(1.8, bold=True), align="center")
    meta_line = "    ".join(meta)
    y = page.text(mid, y + ts.size * 0.3, meta_line, ts.fit(meta_line, inner), align="center")
    y += ts.size
    col_w, pad = (inner - ts.size) / 2, ts.size * 0.6
    blocks = (
        (margin, "From", inv.target["seller"]["name"], inv.seller_lines),
        (margin + col_w + ts.size, "To", inv.target["buyer"]["name"], inv.buyer_lines),
    )
    for x, label, name, lines in blocks:
        page.box((x, y, x + col_w, y + ts.size * 6.4), outline=(170, 170, 170))
        yy = page.text(x + pad, y + ts.size * 0.5, label, ts.font(bold=True))
        yy = page.text(x + pad, yy, name, ts.fit(name, col_w - 2 * pad))
        page.lines(x + pad, yy, list(lines), ts.fit(max(lines, key=len), col_w - 2 * pad, 0.85))
    return y + ts.size * 8


def draw_items_table(
    rng: random.Random, page: Page, ts: Typeset, inv: Invoice, style: PrintStyle, margin: int, y: float
) -> float:
    """Shaded header row, then one ruled row per item; numbers right-aligned in columns."""
    headers = rng.choice(
        (
            ("Description", "Qty", "Unit price", "Amount"),
            ("Item", "Quantity", "Price", "Total"),
            ("Article", "Qty", "Rate", "Line total"),
        )
    )
    left, right = margin, page.width - margin
    pad, row_h, num_w = ts.size * 0.4, ts.size * 1.9, (right - left) * 0.19
    # Right edges of the qty, unit price and amount columns.
    columns = (left + (right - left) * 0.56, left + (right - left) * 0.77, right - pad)
    shade = tuple(max(c - 18, 0) for c in page.background)
    page.box((left, y, right, y + row_h), fill=shade, outline=shade)
    page.text(left + pad, y + pad, headers[0], ts.font(bold=True))
    for x, text in zip(columns, headers[1:], strict=False):
        page.text(x, y + pad, text, ts.fit(text, num_w, bold=True), align="right")
    y += row_h
    for description, qty, unit, amount in inv.items:
        desc_font = ts.fit(description, columns[0] - left - 4 * ts.size)
        page.text(left + pad, y + pad, description, desc_font)
        for x, text in zip(columns, (str(qty), style.money(unit), style.money(amount)), strict=False):
            page.text(x, y + pad, text, ts.fit(text, num_w), align="right")
        y += row_h
        page.rule(left, right, y, fill=tuple(max(c - 45, 0) for c in page.background))
    return y + ts.size


def draw_totals(
    rng: random.Random, page: Page, ts: Typeset, inv: Invoice, style: PrintStyle, margin: int, y: float
) -> float:
    """Subtotal, tax and total right-aligned under the table, the total in bold."""
    x_label = margin + (page.width - 2 * margin) * 0.55
    x_value = page.width - margin - ts.size * 0.4
    tax_name = rng.choice(("Sales tax", "Tax") if style.currency == "USD" else ("VAT", "Tax"))
    tax_label = rng.choice((f"{tax_name} ({inv.tax_rate}%)", f"{tax_name} {inv.tax_rate}%"))
    total_label = rng.choice(("Total", "Total due", "Amount due", "TOTAL"))
    rows = (
        ("Subtotal", inv.subtotal, ts.font()),
        (tax_label, inv.tax, ts.font()),
        (total_label, inv.total, ts.font(1.1, bold=True)),
    )
    for label, value, font in rows:
        page.text(x_label, y, label, font)
        y = page.text(x_value, y, style.money(value), font, align="right")
    return y


# ---------------------------------------------------------------- receipts, forms, simple


def render_receipt(rng: random.Random, font: FontSpec) -> tuple[Image.Image, dict]:
    """A narrow, tall till receipt (monospaced font when one exists) and its target."""
    currency = rng.choice(tuple(SYMBOLS))
    style = random_style(rng, currency, font)
    store, date = rng.choice(STORES), random_date(rng)
    items = []
    for description in rng.sample(GROCERIES, rng.randint(1, 6)):
        qty = rng.choice((1, 1, 1, 2, 3))
        unit = random_money(rng, "0.50", "15.00")
        items.append((description, qty, unit, qty * unit))
    total = sum((amount for *_, amount in items), Decimal(0))
    target = {
        "store": store,
        "date": date.isoformat(),
        "items": [{"description": d, "quantity": q, "amount": money_str(a)} for d, q, _, a in items],
        "total": money_str(total),
    }

    width = rng.randint(340, 440)
    page = Page(width, 1400, paper_color(rng), ink_color(rng))  # cropped to the content below
    ts = Typeset(font, bold_of(font), rng.randint(15, 18))
    left, right, mid = 22, width - 22, width / 2
    y = page.text(mid, 28, store.upper(), ts.fit(store.upper(), right - left, 1.4, bold=True), align="center")
    y = page.lines(mid, y, list(address(rng, currency)), ts.font(), align="center")
    stamp = f"{style.date(date)}  {rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}"
    y = page.text(mid, y + ts.size * 0.5, stamp, ts.font(), align="center")
    page.rule(left, right, y + ts.size * 0.6, fill=page.ink, dash=4)
    y += ts.size * 1.4
    for description, qty, unit, amount in items:
        page.text(left, y, description, ts.fit(description, (right - left) * 0.62))
        y = page.text(right, y, style.money(amount), ts.font(), align="right")
        if qty > 1:  # tills print the unit price on an indented second line
            y = page.text(left + ts.size * 1.5, y, f"{qty} x {style.money(unit)}", ts.font())
    page.rule(left, right, y + ts.size * 0.3, fill=page.ink, dash=4)
    y += ts.size
    page.text(left, y, rng.choice(("TOTAL", "Total", "SUM")), ts.font(1.4, bold=True))
    y = page.text(right, y, style.money(total), ts.font(1.4, bold=True), align="right")
    payment = rng.choice(("CARD", "CASH", f"VISA ****{rng.randint(1000, 9999)}"))
    y = page.text(left, y + ts.size * 0.4, payment, ts.font())
    goodbye = rng.choice(("Thank you!", "Have a nice day", "Please come again"))
    y = page.text(mid, y + ts.size * 1.5, goodbye, ts.font(), align="center")
    height = max(int(y + 30), int(width * 1.3))  # receipts stay narrow and tall
    image = page.image.crop((0, 0, width, height))
    return degrade(image, rng, page.background, max_angle=1.0), target


def render_form(rng: random.Random) -> tuple[Image.Image, dict]:
    """A ~256x256 card: a title, name, date and total (sometimes an extra reference line)."""
    font = rng.choice(body_fonts())
    date, name = random_date(rng), person(rng)
    total = random_money(rng, "1.00", "999.99")
    target = {"name": name, "date": date.isoformat(), "total": money_str(total)}
    page = Page(256, 256, paper_color(rng), ink_color(rng))
    ts = Typeset(font, bold_of(font), rng.randint(17, 20))
    x, y = rng.randint(10, 18), float(rng.randint(12, 30))
    title = rng.choice(("ORDER FORM", "RECEIPT", "DELIVERY NOTE", "PAYMENT SLIP"))
    y = page.text(x, y, title, ts.fit(title, 246 - 2 * x, 1.15, bold=True)) + ts.size * 0.4
    page.rule(x, 256 - x, y - ts.size * 0.3, fill=(150, 150, 150))
    rows = [f"Name: {name}", f"Date: {format_date(date, rng.choice(('iso', 'dd.mm.yyyy', 'd Mon yyyy')))}"]
    if rng.random() < 0.5:  # a distractor field that is not part of the target
        rows.append(f"Ref: {rng.randint(1000, 9999)}")
    rows.append(f"Total: {total:.2f}")
    for row in rows:
        y = page.text(x, y + ts.size * 0.5, row, ts.fit(row, 248 - x))
    return degrade(page.image, rng, page.background, max_angle=0.5), target


def render_simple(rng: random.Random) -> tuple[Image.Image, dict]:
    """128x128 white image, two black lines in PIL's default font at fixed positions."""
    number = str(rng.randint(10000, 99999))
    total = money_str(random_money(rng, "10.00", "99.99"))
    page = Page(128, 128, (255, 255, 255), (0, 0, 0))
    font = load_font(None, 22)  # "Total 99.99" is ~116 px wide at 22 px: fits with a margin
    page.text(6, 28, f"No {number}", font)
    page.text(6, 72, f"Total {total}", font)
    return page.image, {"number": number, "total": total}


def render_digits(rng: random.Random) -> tuple[Image.Image, dict]:
    """64x64 white image, one 5-digit number in PIL's default font at 20 px."""
    number = str(rng.randint(10000, 99999))
    page = Page(64, 64, (255, 255, 255), (0, 0, 0))
    page.text(4, 22, number, load_font(None, 20))
    return page.image, {"number": number}


# ---------------------------------------------------------------- public API


def make_document(rng: random.Random, preset: str) -> tuple[Image.Image, dict]:
    """Render one document of `preset` ("invoices", "form", "simple"): RGB image + target dict."""
    if preset == "simple":
        return render_simple(rng)
    if preset == "digits":
        return render_digits(rng)
    if preset == "form":
        return render_form(rng)
    if preset != "invoices":
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    layout = rng.choice(("classic", "banded", "two_column", "receipt"))
    if layout == "receipt":
        return render_receipt(rng, rng.choice(monospace_fonts() or body_fonts()))
    font = rng.choice(body_fonts())
    currency = rng.choice(tuple(SYMBOLS))
    invoice = make_invoice(rng, currency)
    style = random_style(rng, currency, font)
    return render_invoice(rng, invoice, layout, font, style), invoice.target


def write_dataset(
    out_dir: Path,
    *,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    preset: str = "invoices",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write `images/<split>_NNNNN.png` and `<split>.jsonl` for train/val/test under `out_dir`.

    Every sample gets its own RNG seeded from (seed, preset, split, index), so the output is
    byte-identical for the same arguments and a split never depends on another split's size.
    Raises FileExistsError if a JSONL file exists and `overwrite` is False.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    out_dir = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    paths = {split: out_dir / f"{split}.jsonl" for split in SPLITS}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing dataset files {existing}; "
            "pass overwrite=True (--overwrite) to replace them"
        )
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        # Drop images of a previous, larger run so the folder matches the new JSONL exactly.
        for stale in sorted(image_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].png")):
            stale.unlink()
        lines = []
        for index in range(counts[split]):
            # str seeds are hashed with SHA-512 by `random`, stable across runs and platforms.
            rng = random.Random(f"{seed}/{preset}/{split}/{index}")
            image, target = make_document(rng, preset)
            name = f"{split}_{index:05d}.png"
            image.save(image_dir / name, format="PNG")
            record = {"image": f"images/{name}", "target": target}
            lines.append(json.dumps(record, ensure_ascii=False))
        # JSONL last: an interrupted run leaves no index pointing at missing images.
        paths[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return paths

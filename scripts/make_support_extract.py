"""Generate the bundled ``support-extract`` dataset (synthetic, deterministic).

The same online electronics shop as ``support-intents``, a different kind of task: from a
customer message the model writes the order number and the product it is about, in
canonical form (``2559718 | Apple Watch SE``), scored by exact match of a generated
answer. The message may write the order number as ``#2559718``, ``ORD-2559718``,
``no. 2559718`` or ``order 2559718`` beside other numbers (amounts, days, error codes,
case and ticket numbers as long as an order number), and the product lowercased,
misspelt, run together, without its last word or without its brand; the answer always
has digits only and the catalogue's spelling, and ``none`` for a missing field.

The messages reuse support-intents' core phrasings, slot values and styling
(``make_support_intents.py``): the phrasings that name exactly one product, and those
that name none but carry an order number. Many messages get an order reference ("My
order number is #2559718.") or a case number added. The held-out split is the same as
support-intents' (every fourth phrasing of each intent, and every fourth order and case
reference, only in the test file), and every fourth product of each category appears
only in the test file, always spelt as in the catalogue so it can be copied.

Usage (from the repository root)::

    python scripts/make_support_extract.py

Only the standard library is used and the seed is fixed: running it twice writes
byte-identical files.
"""

from __future__ import annotations

import random
import re

from make_support_intents import (
    HOLDOUT_EVERY,
    LABELS,
    MAX_WORDS,
    MIN_WORDS,
    PRODUCTS,
    SLOT_RE,
    Pools,
    cycle,
    fill_slots,
    generator_main,
    norm_key,
    split_phrasings,
    stylize,
    typo,
)

SEED = 20240612
TRAIN_RECORDS = 720
TEST_RECORDS = 240
PROMPT_HEAD = (
    "Extract the order number and the product from the customer message. "
    "Answer as: <order number> | <product>, the order number in digits and the product "
    "as the shop's catalogue names it; none for a missing one.\nMessage: "
)
PROMPT_TAIL = "\nAnswer:"
NONE = "none"
CATEGORIES = [c for c in PRODUCTS if c not in ("product", "rechargeable")]
# Slots that make a message about no single catalogue product (the customer's own phone).
AMBIGUOUS_SLOTS = {"mobile"}
# Brand names written into a phrasing itself rather than through a product slot.
INLINE_BRANDS = re.compile(r"\b(Logitech|Razer)\b")
ADD_ORDER_REF = 0.5  # share of messages without an order number that get a reference
PRODUCT_VARIANT = 0.4  # share of products seen in training written informally
# Ways a customer names an order: {order} is written "#n", "n", "ORD-n" or "no. n".
ORDER_REFS = [
    "Order {order}.",
    "My order number is {order}.",
    "(order {order})",
    "It's order {order}.",
    "Ref: {order}",
    "This is about order {order}.",
    "The order number is {order}.",
    "Order number: {order}.",
    "It was order {order}.",
    "Order {order} if that helps.",
    "I have the confirmation for order {order}.",
    "re order {order}",
]
# Other reference numbers a message may carry, written like order numbers: not the answer.
OTHER_REFS = [
    "Case number {ref}.",
    "My support ticket is {ref}.",
    "(ticket {ref})",
    "Your agent gave me case {ref}.",
    "Ref. of my earlier chat: {ref}.",
    "The return authorisation was {ref}.",
    "I already opened ticket {ref} about this.",
    "Customer no. {ref}.",
]
ADD_OTHER_REF = 0.3  # share of messages that get one
# Last words a customer may leave off a product's name ("the Sony WH-1000XM5").
GENERIC_TAIL = {
    "headphones",
    "earbuds",
    "speaker",
    "TV",
    "kit",
    "thermostat",
    "camera",
    "router",
    "mouse",
    "keyboard",
    "webcam",
    "printer",
    "tablet",
    "monitor",
    "dock",
    "hub",
    "station",
}


def is_product_slot(slot: str) -> bool:
    """A slot whose value is a catalogue product ({laptop}, {product2}, ...)."""
    return slot.rstrip("2") in PRODUCTS


def usable(template: str) -> bool:
    """A phrasing whose answer is well defined: one product slot (its value is the
    product), or none and no product named in the text but an order number."""
    slots = set(SLOT_RE.findall(template))
    products = {s for s in slots if is_product_slot(s)}
    if len(products) > 1 or "order2" in slots or INLINE_BRANDS.search(template):
        return False
    return bool(products) or ("order" in slots and not slots & AMBIGUOUS_SLOTS)


def phrasings(split: str) -> list[tuple[str, str]]:
    """(intent, phrasing) pairs of one split, the same split as support-intents'."""
    out = []
    for label in LABELS:
        train, test = split_phrasings(label)
        out += [(label, p) for p in (train if split == "train" else test) if usable(p)]
    return out


def held_out(items: list[str], split: str) -> list[str]:
    """Every fourth of ``items`` for the test split, the others for training."""
    return [
        x
        for i, x in enumerate(items)
        if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == (split == "test")
    ]


def order_refs(split: str) -> list[str]:
    """The order-reference phrasings of ``split`` (held out like the core phrasings)."""
    return held_out(ORDER_REFS, split)


def heldout_products() -> set[str]:
    """Every fourth product of each category: only in the test file."""
    return {
        p
        for c in CATEGORIES
        for i, p in enumerate(PRODUCTS[c])
        if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    }


def product_pools(split: str) -> Pools:
    """The product slots' values for ``split``: the training file never names a held-out
    product; the test file names any."""
    out = heldout_products()
    return {c: [p for p in PRODUCTS[c] if split == "test" or p not in out] for c in PRODUCTS}


def other_ref(rng: random.Random) -> str:
    """A case or ticket number: as long as an order number, written without its marks."""
    n = rng.randint(100000, 9999999)
    return rng.choice([f"#{n}", str(n), f"CS-{n}"])


def canonical_order(written: str) -> str:
    """The digits of an order number as support-intents writes it (``#n``, ``ORD-n``)."""
    return re.sub(r"\D", "", written)


def informal(product: str, rng: random.Random) -> str:
    """How a customer might write a catalogue name: lowercased, misspelt, run together
    ("iphone15"), without a generic last word ("Sony WH-1000XM5") or without the brand
    ("XPS 13")."""
    kind = rng.choice(["lower", "typo", "squash", "short", "nobrand"])
    out = product
    if kind == "typo":
        out = typo(product, rng)
    elif kind == "squash":
        out = re.sub(r"(?<=[A-Za-z]) (?=\d)|-", "", product)
    elif kind == "short":
        head, _, last = product.rpartition(" ")
        out = head if last in GENERIC_TAIL else product
    elif kind == "nobrand":
        _, _, rest = product.partition(" ")
        out = rest if len(rest) >= 4 else product
    if out == product or rng.random() < 0.3:
        out = out.lower()
    return out


def make_record(
    label: str,
    template: str,
    refs: list[str],
    others: list[str],
    pools: Pools,
    seen_products: set[str],
    rng: random.Random,
) -> tuple[str, dict[str, str]] | None:
    """One message from ``template`` and its record, or None where the result is unusable
    (no field to extract, too short or long, a held-out product no longer spelt as in the
    catalogue)."""
    complaint = template.startswith("!")
    core, used = fill_slots(template.lstrip("!"), rng, pools)
    order = used.get("order")
    if order is None and rng.random() < ADD_ORDER_REF:
        ref, ref_used = fill_slots(rng.choice(refs), rng)
        order = ref_used["order"]
        core = core if core[-1] in ".!?)" else core + "."
        core = f"{ref} {core}" if rng.random() < 0.4 else f"{core} {ref}"
    if rng.random() < ADD_OTHER_REF:
        other = rng.choice(others).format(ref=other_ref(rng))
        core = core if core[-1] in ".!?)" else core + "."
        core = f"{other} {core}" if rng.random() < 0.3 else f"{core} {other}"
    product = next((v for s, v in used.items() if is_product_slot(s)), None)
    if product is not None and product in seen_products and rng.random() < PRODUCT_VARIANT:
        core = core.replace(product, informal(product, rng), 1)
    if order is None and product is None:
        return None
    message = stylize(core, label, complaint, rng)
    if not MIN_WORDS <= len(message.split()) <= MAX_WORDS:
        return None
    if product is not None and product not in seen_products and product not in message:
        return None
    answer = f"{canonical_order(order) if order else NONE} | {product or NONE}"
    return norm_key(core), {
        "prompt": PROMPT_HEAD + message + PROMPT_TAIL,
        "completion": " " + answer,
    }


def generate(split: str, count: int, seen: set[str], rng: random.Random) -> list[dict[str, str]]:
    """``count`` records of ``split``, every usable phrasing used about equally often, no
    filled core phrasing twice (``seen`` spans both files)."""
    pools = product_pools(split)
    seen_products = set(product_pools("train")["product"])
    refs = order_refs(split)
    others = held_out(OTHER_REFS, split)
    out = []
    for label, template in cycle(phrasings(split), count, rng):
        for _ in range(200):
            made = make_record(label, template, refs, others, pools, seen_products, rng)
            if made is not None and made[0] not in seen:
                seen.add(made[0])
                out.append(made[1])
                break
        else:
            raise RuntimeError(f"could not make a new message from {template!r}")
    return out


def build(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The (train, test) records; test first, so its messages claim their cores first."""
    rng = random.Random(seed)
    seen: set[str] = set()
    test = generate("test", TEST_RECORDS, seen, rng)
    train = generate("train", TRAIN_RECORDS, seen, rng)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def main() -> None:
    generator_main("support_extract", build, SEED, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()

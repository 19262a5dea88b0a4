"""Write two small tasks whose answers a program can check, as chat records (`--format messages`):

- ``dates``: a date written the ways people write them ("March 5, 2024", "5 March 2024",
  "Tue, Mar 5 2024", "the 5th of March, 2024", ...) rewritten as ISO 8601 ("2024-03-05");
- ``extract``: an order sentence turned into a JSON object with its name, city, item and
  quantity (keys in that order, ``json.dumps`` spacing).

Each as ``<task>_train.jsonl`` (300 records) and ``<task>_test.jsonl`` (50, no prompt of which
is in the train file). Deterministic: the same files on every run (seeded, no clock).
:func:`correct` says whether an answer is right. Run: ``python examples/data/make_tasks.py``
(``--out DIR`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
TRAIN, TEST = 300, 50
SEEDS = {"dates": 20240305, "extract": 4821}

DATE_ASK = "Rewrite this date as YYYY-MM-DD. Reply with the date only.\n"
EXTRACT_ASK = "Extract name, city, item and quantity (a number) as JSON. Reply with JSON only.\n"

MONTHS = [dt.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


DATE_STYLES: list[Callable[[dt.date], str]] = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{DAYS[d.weekday()][:3]}, {MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{DAYS[d.weekday()]}, {_ordinal(d.day)} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{d.day}.{d.month}.{d.year}",
    lambda d: f"{d.year}/{d.month}/{d.day}",
]


def date_record(rng: random.Random) -> tuple[str, str]:
    day = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 100))
    return DATE_ASK + rng.choice(DATE_STYLES)(day), day.isoformat()


FIRST = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Fatima", "Greta", "Hiro", "Ines", "Jonas",
         "Kavya", "Luca", "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tariq"]  # fmt: skip
LAST = ["Smith", "Okafor", "Wang", "Novak", "Silva", "Haddad", "Berg", "Tanaka", "Moreau",
        "Kowalski", "Rossi", "Iyer", "Jensen", "Lopez", "Petrov", "Murphy"]  # fmt: skip
CITIES = ["Berlin", "Lagos", "Osaka", "Lyon", "Porto", "Austin", "Krakow", "Nairobi", "Turin",
          "Quito", "Leeds", "Pune", "Bergen", "Cusco", "Hanoi", "Tampere"]  # fmt: skip
ITEMS = ["blue mug", "desk lamp", "notebook", "water bottle", "wool scarf", "phone case",
         "teapot", "backpack", "cutting board", "candle", "yoga mat", "bike light"]  # fmt: skip
ORDER_STYLES = [
    "{name} ordered {qty} x {item}, to be shipped to {city}.",
    "Please send {qty} {item}(s) to {name} in {city}.",
    "Order from {name} ({city}): {item}, quantity {qty}.",
    "Ship to: {name}, {city}. Items: {item} x{qty}.",
    "{city} customer {name} wants {qty} of the {item}.",
    "New order - {qty} pcs {item} for {name}, delivery city {city}.",
]


def extract_record(rng: random.Random) -> tuple[str, str]:
    fields = {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "city": rng.choice(CITIES),
        "item": rng.choice(ITEMS),
        "quantity": rng.randint(1, 24),
    }
    text = rng.choice(ORDER_STYLES).format(qty=fields["quantity"], **fields)
    return EXTRACT_ASK + text, json.dumps(fields)


MAKERS = {"dates": date_record, "extract": extract_record}


def correct(task: str, answer: str, reference: str) -> bool:
    """Whether ``answer`` is right: the same ISO date, or the same JSON object."""
    answer, reference = answer.strip(), reference.strip()
    if task == "dates":
        return answer == reference
    try:
        return json.loads(answer) == json.loads(reference)
    except ValueError:
        return False


def records(task: str) -> tuple[list[dict], list[dict]]:
    """(train, test) chat records of ``task``; no test prompt is a train prompt."""
    rng, make = random.Random(SEEDS[task]), MAKERS[task]
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < TRAIN + TEST:
        prompt, answer = make(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        out.append({"messages": msgs})
    return out[:TRAIN], out[TRAIN:]


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in MAKERS:
        for split, rows in zip(("train", "test"), records(task), strict=True):
            path = folder / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write to")
    for path in write(parser.parse_args().out):
        print(f"{path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()

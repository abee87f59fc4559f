#!/usr/bin/env python3
"""Generate the small English named-entity dataset shipped with peftcli.

Writes ``data/ner/{train,validation,test}.jsonl``, one JSON object per line, words and IOB2 tags:

    {"tokens": ["Maria", "Okonkwo", "joined", "Veltrix", "Systems", "in", "Lisbon", "."],
     "tags": ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "B-LOC", "O"]}

Entity types: PER (people), ORG (companies, clubs, agencies), LOC (cities, countries, rivers) and
MISC (events, languages, products, nationalities). Sentences come from hand-written templates with
slots; they include multi-word entities, entities side by side ("Paris , France", "the Bayern
Munich - Celtic match"), lower-case and sentence-initial entities, and sentences with none.

Held-out names: every entity pool is split in two. Training sentences use one half, validation and
test sentences the other, so a model scores well only by reading context and word shape, not by
remembering names. Many held-out names are invented (Zorvath, Quenby) and split into several
WordPieces.

All text is original, written for this project, and released with it under the project's licence
(Apache-2.0). Regenerate (identical byte for byte on every run, standard library only):

    python scripts/make_ner_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
SIZES = {"train": 1200, "validation": 200, "test": 200}
OUT_DIR = Path(__file__).resolve().parent.parent / "data" / "ner"

FIRST = [
    "Maria",
    "John",
    "Aisha",
    "Kenji",
    "Olga",
    "Pedro",
    "Fatima",
    "Liam",
    "Chen",
    "Ingrid",
    "Tomasz",
    "Amara",
    "Rahul",
    "Sofia",
    "Dmitri",
    "Nia",
    "Hugo",
    "Yuki",
    "Kwame",
    "Elena",
    "Omar",
    "Greta",
    "Mateo",
    "Priya",
    "Zorvath",
    "Quenby",
    "Ilsabet",
    "Tavrin",
    "Okechi",
    "Branwen",
    "Xiomara",
    "Lutz",
    "Henrike",
    "Anouk",
]
LAST = [
    "Okonkwo",
    "Smith",
    "Tanaka",
    "Ivanova",
    "Garcia",
    "Haddad",
    "Murphy",
    "Wang",
    "Larsen",
    "Kowalski",
    "Mensah",
    "Patel",
    "Rossi",
    "Petrov",
    "Adeyemi",
    "Dubois",
    "Sato",
    "Boateng",
    "Novak",
    "Farouk",
    "Berg",
    "Alvarez",
    "Thistlewood",
    "Vandermeer",
    "Krzyzanowski",
    "Oyelaran",
    "Brightwater",
    "Quillfeather",
    "Marchetti",
    "Szabo",
]
ORG = [
    ["Veltrix", "Systems"],
    ["Northwind", "Bank"],
    ["Acme"],
    ["Blue", "River", "Foods"],
    ["Helios", "Energy"],
    ["Oakridge", "University"],
    ["Redline", "Motors"],
    ["the", "World", "Rowing", "Federation"],
    ["Castellan", "Group"],
    ["Pinecrest", "Hospital"],
    ["Sunfield", "United"],
    ["Marlow", "&", "Finch"],
    ["Orbis", "Labs"],
    ["Kestrel", "Airlines"],
    ["Granite", "City", "Council"],
    ["Tidewater", "Press"],
    ["Zephyrion"],
    ["Quorvane", "Analytics"],
    ["Brakkon", "Steel"],
    ["Hollow", "Pine", "Records"],
    ["Ulmstead", "Rovers"],
    ["Ferrovia", "Nord"],
    ["Ashgrove", "Institute"],
    ["Luminex"],
]
LOC = [
    ["Lisbon"],
    ["Paris"],
    ["Nairobi"],
    ["Osaka"],
    ["Toronto"],
    ["New", "Delhi"],
    ["Buenos", "Aires"],
    ["Oslo"],
    ["Ghana"],
    ["Peru"],
    ["the", "Danube"],
    ["Cape", "Town"],
    ["Krakow"],
    ["Vietnam"],
    ["the", "Alps"],
    ["Melbourne"],
    ["Quetzalmora"],
    ["Vardenfell", "Bay"],
    ["Lake", "Oskarvik"],
    ["Thornbury"],
    ["Port", "Ellery"],
    ["Zanbaria"],
    ["Kelmsworth"],
    ["the", "Ribbon", "Coast"],
]
MISC = [
    ["Olympics"],
    ["Spanish"],
    ["Nobel", "Prize"],
    ["World", "Cup"],
    ["Japanese"],
    ["Python"],
    ["Ramadan"],
    ["Brazilian"],
    ["Tour", "de", "France"],
    ["Swahili"],
    ["iPhone"],
    ["Oscars"],
    ["Norwegian"],
    ["Eurovision"],
    ["Zorblat", "Festival"],
    ["Quenyan"],
    ["Vantor", "Cup"],
    ["Helvish"],
    ["Glimmerfest"],
    ["Starlance", "X2"],
]

# Templates: words, with slots {PER} {ORG} {LOC} {MISC} (a slot may hold several words).
TEMPLATES = [
    "{PER} joined {ORG} in {LOC} .",
    "{PER} , who grew up in {LOC} , now works for {ORG} .",
    "Shares of {ORG} fell after {PER} resigned .",
    "{ORG} opened a new office in {LOC} last week .",
    "The {MISC} will be held in {LOC} next year .",
    "{PER} won the {MISC} for the second time .",
    "According to {PER} , {ORG} plans to hire two hundred people .",
    "{PER} met {PER} in {LOC} on Monday .",
    "She speaks {MISC} and lives near {LOC} .",
    "{LOC} , {LOC} is famous for its markets .",
    "The {ORG} - {ORG} match ended in a draw .",
    "Flights from {LOC} to {LOC} were cancelled because of the storm .",
    "{ORG} signed a deal with {ORG} worth three million dollars .",
    "{PER} told reporters that the {MISC} was a success .",
    "Yesterday {PER} {PER} visited {LOC} .",
    "A spokesman for {ORG} declined to comment .",
    "{MISC} fans gathered outside the stadium in {LOC} .",
    "The new {MISC} phone from {ORG} sold out in {LOC} .",
    "{PER} , chief executive of {ORG} , will speak at the {MISC} .",
    "In {LOC} , {PER} opened a small bakery .",
    "We took the train along the river and watched the sunset .",
    "Prices rose by four percent in the last quarter .",
    "The meeting was moved to Thursday afternoon .",
    "Nobody expected the results to arrive so early .",
    "The committee will publish its report next month .",
    "Rain is expected across the region tonight .",
    "the report by {PER} on {ORG} was leaked .",
    "{ORG} said {LOC} will host the {MISC} .",
    "Coach {PER} praised the {MISC} team after the game in {LOC} .",
    "{PER} moved from {LOC} to {LOC} to study at {ORG} .",
    "{LOC} {ORG} officials said nothing new .",
    "The {MISC} {ORG} sponsorship ends in May .",
]


def person(rng: random.Random, first: list[str], last: list[str]) -> list[str]:
    return [rng.choice(first)] if rng.random() < 0.2 else [rng.choice(first), rng.choice(last)]


def sentence(
    template: str, rng: random.Random, pools: dict[str, list[list[str]]], first: list[str], last: list[str]
) -> dict:
    tokens: list[str] = []
    tags: list[str] = []
    words = template.split()
    for i, word in enumerate(words):
        if word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            # Two {PER} slots side by side ("{PER} {PER}") would read as one person: the second is
            # the same person's surname, as in "Yesterday Maria Okonkwo".
            if kind == "PER" and i > 0 and words[i - 1] == "{PER}":
                continue
            entity = person(rng, first, last) if kind == "PER" else list(rng.choice(pools[kind]))
            if kind == "PER" and i + 1 < len(words) and words[i + 1] == "{PER}":
                entity = [rng.choice(first), rng.choice(last)]
            # A leading "the" belongs to the sentence, not to the name (CoNLL's convention).
            if entity[0] == "the":
                tokens.append("The" if not tokens else "the")
                tags.append("O")
                entity = entity[1:]
            tokens += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def halves(pool: list, rng: random.Random) -> tuple[list, list]:
    """A fixed split of a pool: training names, and held-out names for validation and test."""
    shuffled = list(pool)
    rng.shuffle(shuffled)
    cut = len(shuffled) * 2 // 3
    return shuffled[:cut], shuffled[cut:]


def main() -> None:
    rng = random.Random(SEED)
    split_pools = {k: halves(v, rng) for k, v in {"ORG": ORG, "LOC": LOC, "MISC": MISC}.items()}
    first, last = halves(FIRST, rng), halves(LAST, rng)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for split, size in SIZES.items():
        side = 0 if split == "train" else 1
        pools = {k: v[side] for k, v in split_pools.items()}
        rows = [sentence(rng.choice(TEMPLATES), rng, pools, first[side], last[side]) for _ in range(size)]
        with (OUT_DIR / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    main()

"""Writes data/chat/: a small multi-turn chat set for the offline chat recipe (recipes/lora-smollm2-chat.yaml).

A kitchen-conversion assistant: the user asks how much of an ingredient a measure holds, then follows up
("And in ounces?", "What about 2 cups?"); the assistant answers in one fixed, checkable style:
"<amount> is about <result> (<rule>)." The numbers are computed here, so every answer is right, and
the validation split uses amounts and ingredient-measure pairs the training split never has, so a
lower validation loss means the model learned the style and the arithmetic pattern, not the rows.

    python scripts/make_chat_data.py      # rewrites data/chat/ byte for byte
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "chat"
SEED = 7

# grams per cup, per tablespoon and per teaspoon (common kitchen figures, rounded)
INGREDIENTS = {
    "flour": (125, 8, 3),
    "sugar": (200, 12.5, 4),
    "brown sugar": (220, 14, 4.5),
    "butter": (227, 14, 5),
    "rice": (185, 12, 4),
    "oats": (90, 6, 2),
    "cocoa powder": (85, 5, 2),
    "honey": (340, 21, 7),
    "milk": (240, 15, 5),
    "water": (240, 15, 5),
    "salt": (290, 18, 6),
    "grated cheese": (100, 6, 2),
}
MEASURES = {"cup": 0, "tablespoon": 1, "teaspoon": 2}
PLURAL = {"cup": "cups", "tablespoon": "tablespoons", "teaspoon": "teaspoons"}
OUNCE_G = 28.35
SYSTEMS = [
    None,
    "You are a concise kitchen assistant. Answer conversions in one sentence.",
    "You help home cooks convert recipe measures.",
]
ASKS = [
    "How many grams are in {n} {measure} of {ing}?",
    "How much does {n} {measure} of {ing} weigh in grams?",
    "I need {n} {measure} of {ing}. How many grams is that?",
    "Convert {n} {measure} of {ing} to grams, please.",
]


def quantity(n: float, measure: str) -> str:
    amount = f"{n:g}"
    return f"{amount} {measure if n == 1 else PLURAL[measure]}"


def grams_answer(n: float, measure: str, ing: str) -> tuple[str, float]:
    per = INGREDIENTS[ing][MEASURES[measure]]
    grams = n * per
    return f"{quantity(n, measure)} of {ing} is about {grams:g} g (1 {measure} of {ing} is about {per:g} g).", grams


def ounces_answer(grams: float) -> str:
    return f"{grams:g} g is about {grams / OUNCE_G:.1f} oz (1 oz is 28.35 g)."


def conversation(rng: random.Random, pairs: list[tuple[str, str]], amounts: list[float]) -> dict:
    ing, measure = rng.choice(pairs)
    n = rng.choice(amounts)
    messages = []
    if (system := rng.choice(SYSTEMS)) is not None:
        messages.append({"role": "system", "content": system})
    messages.append(
        {
            "role": "user",
            "content": rng.choice(ASKS).format(n=f"{n:g}", measure=measure if n == 1 else PLURAL[measure], ing=ing),
        }
    )
    answer, grams = grams_answer(n, measure, ing)
    messages.append({"role": "assistant", "content": answer})
    for _ in range(rng.randint(0, 2)):
        if rng.random() < 0.5:
            messages.append({"role": "user", "content": rng.choice(["And in ounces?", "How much is that in ounces?"])})
            messages.append({"role": "assistant", "content": ounces_answer(grams)})
        else:
            n = rng.choice([a for a in amounts if a != n])
            messages.append({"role": "user", "content": f"What about {quantity(n, measure)}?"})
            answer, grams = grams_answer(n, measure, ing)
            messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def main() -> None:
    rng = random.Random(SEED)
    pairs = [(ing, m) for ing in INGREDIENTS for m in MEASURES]
    rng.shuffle(pairs)
    held_out_pairs, train_pairs = pairs[:8], pairs[8:]
    train_amounts = [0.25, 0.5, 1, 1.5, 2, 3, 4, 6]
    held_out_amounts = [0.75, 2.5, 5, 8]
    splits = {
        "train": [conversation(rng, train_pairs, train_amounts) for _ in range(240)],
        "validation": [conversation(rng, held_out_pairs, held_out_amounts) for _ in range(40)],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (OUT / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        print(f"wrote {OUT / f'{split}.jsonl'}: {len(rows)} conversations")


if __name__ == "__main__":
    main()

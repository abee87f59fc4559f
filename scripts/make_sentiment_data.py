#!/usr/bin/env python3
"""Generate the small English sentiment dataset shipped with peftcli.

Writes ``data/sentiment/train.jsonl`` (600 rows) and
``data/sentiment/validation.jsonl`` (200 rows), one JSON object per line:

    {"text": "The soundtrack was wonderful.", "label": "positive"}

Labels are the strings "positive" and "negative"; both splits are balanced.
Rows are short review-like sentences about films, restaurants, books,
products, hotels, games and concerts, assembled from the hand-written
ingredients below (adjectives, verb phrases, clauses, negations and mixed
sentences) with a fixed seed (``random.Random(0)``).

All text is original, written for this project, and released with it under
the project's licence (Apache-2.0). It is not derived from any existing
dataset.

Regenerate (output is identical byte for byte on every run):

    python scripts/make_sentiment_data.py

Standard library only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
N_TRAIN_PER_LABEL = 300
N_VAL_PER_LABEL = 100
MIN_WORDS, MAX_WORDS = 4, 30

OUT_DIR = Path(__file__).resolve().parent.parent / "data" / "sentiment"

# ---------------------------------------------------------------------------
# Domains: subjects (full noun phrases), bare nouns (for "what a ..."),
# aspects, an early/late pair (for "the start was X, but the end was Y"),
# and domain-specific positive / negative details (full clauses).
# ---------------------------------------------------------------------------

DOMAINS = {
    "film": {
        "subjects": [
            "the film",
            "this movie",
            "the new thriller",
            "the documentary",
            "the sequel",
            "this comedy",
            "the animated feature",
        ],
        "nouns": ["film", "movie", "thriller", "documentary", "comedy"],
        "aspects": [
            "the acting",
            "the plot",
            "the soundtrack",
            "the dialogue",
            "the pacing",
            "the camera work",
            "the ending",
            "the cast",
        ],
        "early_late": ("the opening", "the ending"),
        "pos_details": [
            "the lead actress gave the performance of her career",
            "every scene looked like a painting",
            "the jokes landed every single time",
            "the twist in the last act caught me completely off guard",
            "the score gave me goosebumps",
            "the two hours flew by",
            "the whole audience applauded at the end",
        ],
        "neg_details": [
            "half the jokes fell flat",
            "the plot holes were impossible to ignore",
            "the dialogue sounded like it was written in a hurry",
            "I guessed the twist in the first ten minutes",
            "the sound was so muddy I missed whole lines",
            "the story dragged for almost three hours",
            "several people walked out before the end",
        ],
    },
    "restaurant": {
        "subjects": [
            "the restaurant",
            "this cafe",
            "the bistro on the corner",
            "the new pizza place",
            "the steakhouse",
            "the ramen bar",
            "our brunch spot",
        ],
        "nouns": ["restaurant", "cafe", "bistro", "meal", "dinner"],
        "aspects": [
            "the food",
            "the service",
            "the dessert",
            "the atmosphere",
            "the staff",
            "the wine list",
            "the portions",
            "the bread",
        ],
        "early_late": ("the starters", "the main course"),
        "pos_details": [
            "the pasta was cooked perfectly",
            "the waiter remembered our order without writing it down",
            "the soup tasted like something my grandmother would make",
            "the dessert was worth the trip on its own",
            "everything arrived hot and beautifully plated",
            "the chef came out to ask how we liked it",
            "the prices were fair for the quality",
        ],
        "neg_details": [
            "the soup arrived cold",
            "we waited forty minutes for a table we had booked",
            "the steak was tough and dry",
            "the waiter forgot our drinks twice",
            "the bill had items we never ordered",
            "the fries were soggy and tasted old",
            "the music was so loud we could not talk",
        ],
    },
    "book": {
        "subjects": [
            "the book",
            "this novel",
            "the memoir",
            "this short story collection",
            "the cookbook",
            "the new mystery",
            "this biography",
        ],
        "nouns": ["book", "novel", "memoir", "read", "mystery"],
        "aspects": [
            "the writing",
            "the characters",
            "the plot",
            "the ending",
            "the prose",
            "the pacing",
            "the dialogue",
            "the world building",
        ],
        "early_late": ("the first chapters", "the final chapters"),
        "pos_details": [
            "I stayed up until three to finish it",
            "the characters felt like old friends by the end",
            "every chapter ended with a reason to keep reading",
            "the author writes with real warmth and humour",
            "I have already started rereading it",
            "the recipes actually worked on the first try",
            "some sentences were so good I read them twice",
        ],
        "neg_details": [
            "I gave up halfway through",
            "the characters were flat and hard to tell apart",
            "the same idea was repeated for two hundred pages",
            "the ending was rushed and made no sense",
            "the recipes left out half the steps",
            "the print was tiny and the pages fell out",
            "I kept checking how many pages were left",
        ],
    },
    "product": {
        "subjects": [
            "the blender",
            "these headphones",
            "the phone case",
            "this vacuum cleaner",
            "the kettle",
            "the backpack",
            "this desk lamp",
            "the running shoes",
        ],
        "nouns": ["blender", "gadget", "purchase", "kettle", "backpack", "lamp"],
        "aspects": [
            "the build quality",
            "the battery",
            "the design",
            "the price",
            "the instructions",
            "the packaging",
            "the customer support",
            "the sound",
        ],
        "early_late": ("the setup", "daily use"),
        "pos_details": [
            "it arrived a day early and works perfectly",
            "the battery lasts a whole week",
            "it feels solid and well made",
            "setup took less than five minutes",
            "it still works like new after a year",
            "support replaced a missing part within two days",
            "it is the best money I have spent this year",
        ],
        "neg_details": [
            "it broke after two weeks",
            "the battery barely lasts an afternoon",
            "the lid leaks every single time",
            "the instructions were missing half the steps",
            "it stopped charging after a month",
            "support never answered my emails",
            "the stitching came apart on the first trip",
        ],
    },
    "hotel": {
        "subjects": [
            "the hotel",
            "our room",
            "the resort",
            "this guesthouse",
            "the inn by the lake",
            "the hostel",
            "our stay",
        ],
        "nouns": ["hotel", "resort", "guesthouse", "stay", "inn"],
        "aspects": [
            "the room",
            "the staff",
            "the breakfast",
            "the location",
            "the bed",
            "the pool",
            "the view",
            "the bathroom",
        ],
        "early_late": ("the check-in", "the rest of the stay"),
        "pos_details": [
            "the staff upgraded our room without being asked",
            "the bed was so comfortable I overslept every morning",
            "breakfast had fresh bread and real coffee",
            "the view from the balcony was breathtaking",
            "everything was spotless when we arrived",
            "the front desk recommended a great little restaurant",
            "it was quiet enough to sleep with the window open",
        ],
        "neg_details": [
            "the room smelled of smoke",
            "the shower was cold every morning",
            "we could hear the traffic all night",
            "the sheets had stains on them",
            "the front desk lost our reservation",
            "the pool was closed the whole week",
            "breakfast ran out of food by eight",
        ],
    },
    "game": {
        "subjects": [
            "the game",
            "this puzzle game",
            "the board game",
            "the new racing game",
            "the expansion",
            "this strategy game",
            "the remake",
        ],
        "nouns": ["game", "puzzle game", "board game", "remake", "expansion"],
        "aspects": [
            "the controls",
            "the graphics",
            "the story",
            "the levels",
            "the music",
            "the multiplayer",
            "the puzzles",
            "the art style",
        ],
        "early_late": ("the tutorial", "the main campaign"),
        "pos_details": [
            "I lost track of time every time I played",
            "the puzzles were clever without being unfair",
            "our game night went on until midnight",
            "the boss fights were tense and exciting",
            "every level introduced something new",
            "it runs smoothly even on my old laptop",
            "the rules were easy to learn but hard to master",
        ],
        "neg_details": [
            "it crashed three times in the first hour",
            "the controls felt slow and unresponsive",
            "the same level was repeated with new colours",
            "the rulebook was confusing and full of errors",
            "half the features are locked behind extra purchases",
            "the loading screens took longer than the levels",
            "the story ended on a cheap cliffhanger",
        ],
    },
    "concert": {
        "subjects": [
            "the concert",
            "the show",
            "the gig",
            "the festival set",
            "the orchestra's performance",
            "last night's recital",
            "the tour stop",
        ],
        "nouns": ["concert", "show", "gig", "performance", "night out"],
        "aspects": [
            "the sound",
            "the band",
            "the setlist",
            "the venue",
            "the crowd",
            "the lighting",
            "the encore",
            "the singer",
        ],
        "early_late": ("the opening act", "the headliner"),
        "pos_details": [
            "the whole crowd sang along to every song",
            "the band played for almost three hours",
            "the sound was crystal clear even at the back",
            "the encore was the best moment of my year",
            "the singer hit every note perfectly",
            "the lights and music worked together beautifully",
            "I was still humming the songs the next morning",
        ],
        "neg_details": [
            "the band started an hour late",
            "the sound was so distorted I could not hear the lyrics",
            "they played for barely forty minutes",
            "the singer seemed bored the entire time",
            "the venue was overcrowded and far too hot",
            "the setlist skipped all their best songs",
            "the drinks cost more than the ticket",
        ],
    },
}

for _name, _d in DOMAINS.items():
    _d["name"] = _name

PLURAL = {
    "these headphones",
    "the running shoes",
    "the portions",
    "the characters",
    "the controls",
    "the graphics",
    "the levels",
    "the puzzles",
    "the instructions",
    "the first chapters",
    "the final chapters",
    "the starters",
    "the staff",
}

# ---------------------------------------------------------------------------
# Polarity ingredients.
# ---------------------------------------------------------------------------

ADJ = {
    "positive": [
        "wonderful",
        "excellent",
        "delightful",
        "superb",
        "charming",
        "brilliant",
        "fantastic",
        "lovely",
        "impressive",
        "memorable",
        "enjoyable",
        "outstanding",
        "terrific",
        "splendid",
        "marvellous",
        "satisfying",
        "refreshing",
        "polished",
        "thoughtful",
        "gorgeous",
        "stunning",
        "magnificent",
        "heartwarming",
        "clever",
        "fun",
        "exceptional",
        "pleasant",
        "inspiring",
        "flawless",
        "first-rate",
        "wonderfully crafted",
        "a real treat",
        "a joy",
        "great value",
    ],
    "negative": [
        "awful",
        "dreadful",
        "disappointing",
        "dull",
        "tedious",
        "mediocre",
        "terrible",
        "forgettable",
        "sloppy",
        "bland",
        "frustrating",
        "overpriced",
        "lifeless",
        "painful",
        "clumsy",
        "messy",
        "underwhelming",
        "tiresome",
        "poor",
        "annoying",
        "shoddy",
        "flat",
        "awkward",
        "pointless",
        "boring",
        "horrible",
        "weak",
        "lazy",
        "uninspired",
        "miserable",
        "a letdown",
        "a waste of money",
        "a mess",
        "a chore",
    ],
}

ADV = [
    "really",
    "truly",
    "absolutely",
    "genuinely",
    "quite",
    "surprisingly",
    "remarkably",
    "simply",
    "completely",
    "honestly",
]

VP = {  # first-person verb phrases
    "positive": [
        "loved every minute of it",
        "would happily go back",
        "cannot wait to try it again",
        "recommend it to everyone",
        "left with a big smile on my face",
        "was impressed from start to finish",
        "enjoyed it far more than I expected",
        "felt it was worth every penny",
        "have already told all my friends about it",
        "would give it five stars",
        "was pleasantly surprised",
        "keep thinking about it days later",
        "had a great time",
        "will definitely return",
        "was hooked from the first minute",
        "would buy it again without thinking twice",
        "felt completely at home",
        "smiled the whole way through",
    ],
    "negative": [
        "regretted it almost immediately",
        "want my money back",
        "would not go again",
        "left early",
        "was bored after ten minutes",
        "felt completely let down",
        "could not wait for it to end",
        "wasted an entire evening on it",
        "will not be returning",
        "would give it zero stars if I could",
        "was annoyed the whole time",
        "cannot recommend it to anyone",
        "almost fell asleep",
        "was disappointed from start to finish",
        "expected much more",
        "returned it the next day",
        "felt cheated",
        "kept checking the time",
    ],
}

CLAUSE = {  # full, domain-neutral clauses
    "positive": [
        "It was worth every penny.",
        "I would do it all again tomorrow.",
        "Easily the highlight of my month.",
        "Everything about it just worked.",
        "It exceeded every expectation I had.",
        "I have nothing but praise for it.",
        "This is exactly what I was hoping for.",
        "It made my whole week better.",
        "A small gem that deserves more attention.",
        "I was smiling from beginning to end.",
        "Five stars, and I mean it.",
        "It was a pleasure from start to finish.",
        "My friends and I are already planning to go back.",
        "It was better than anything similar I have tried.",
        "I would recommend it without hesitation.",
        "Honestly one of the best experiences I have had in years.",
    ],
    "negative": [
        "It was a complete waste of money.",
        "I would not wish it on anyone.",
        "Easily the low point of my month.",
        "Nothing about it worked the way it should.",
        "It failed every expectation I had.",
        "I have nothing good to say about it.",
        "This is not what I was promised.",
        "It ruined an otherwise nice weekend.",
        "An overhyped mess that deserves its bad reviews.",
        "I was frowning from beginning to end.",
        "One star, and that is generous.",
        "It was a struggle from start to finish.",
        "My friends and I agreed never to go back.",
        "It was worse than anything similar I have tried.",
        "I would steer clear if I were you.",
        "Honestly one of the worst experiences I have had in years.",
    ],
}

NEG_PRED = {  # negation-based predicates that follow a subject
    "positive": [
        "was not bad at all",
        "was never boring",
        "did not disappoint",
        "was nothing short of brilliant",
        "never felt too long",
        "left me with no complaints",
        "was not overpriced at all",
        "never lost my interest",
        "was not the letdown I had feared",
        "could not have been better",
        "was not perfect, but it came very close",
        "did not have a single weak moment",
        "never stopped surprising me",
        "was not just good, it was great",
    ],
    "negative": [
        "was not worth it",
        "was hardly enjoyable",
        "was not worth the money",
        "did not live up to the hype",
        "was not good at all",
        "never got interesting",
        "was nowhere near as good as promised",
        "could not hold my attention",
        "was no fun at all",
        "did not work as advertised",
        "never felt finished",
        "was hardly worth the effort",
        "was not something I would try again",
        "did not have a single good moment",
    ],
}

SHORT = {  # short verdicts
    "positive": [
        "Absolutely lovely.",
        "Loved it.",
        "Highly recommended.",
        "Better than expected.",
        "A total delight.",
        "Worth it.",
        "No regrets at all.",
        "Pure joy.",
    ],
    "negative": [
        "Absolutely awful.",
        "Hated it.",
        "Avoid at all costs.",
        "Worse than expected.",
        "A total letdown.",
        "Not worth it.",
        "Nothing but regrets.",
        "Pure frustration.",
    ],
}

RECOMMEND = {
    "positive": ["Without a doubt.", "Yes, to everyone I know.", "Absolutely, go tonight.", "Yes, and I already have."],
    "negative": ["Not a chance.", "Absolutely not.", "Only to people I dislike.", "No, save your money."],
}

COMPARE = {
    "positive": ["much better", "a huge improvement", "even better than I remembered", "a big step up"],
    "negative": ["far worse", "a real step down", "much worse than I remembered", "a big disappointment"],
}

EXPECT = {"positive": ("low", "turned out to be"), "negative": ("high", "turned out to be")}

PEOPLE = [
    "my sister",
    "my partner",
    "my dad",
    "my best friend",
    "my roommate",
    "my kids",
    "my colleague",
    "my grandmother",
]

OPENERS = [
    "Honestly,",
    "To be fair,",
    "In the end,",
    "All things considered,",
    "I have to say,",
    "Overall,",
    "Frankly,",
    "Believe it or not,",
]


def other(label: str) -> str:
    return "negative" if label == "positive" else "positive"


def be(noun: str) -> str:
    return "were" if noun in PLURAL else "was"


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def attributive(adj: str) -> bool:
    """Adjectives that can stand before a noun ("a lovely film")."""
    return not adj.startswith("a ") and " " not in adj


# ---------------------------------------------------------------------------
# Templates: each takes (rng, domain dict, label) and returns a sentence.
# ---------------------------------------------------------------------------


def t_simple(r, d, y):
    s = r.choice(d["subjects"])
    return f"{cap(s)} {be(s)} {r.choice(ADJ[y])}."


def t_adverb(r, d, y):
    s = r.choice(d["subjects"])
    adj = r.choice([a for a in ADJ[y] if attributive(a)])
    return f"{cap(s)} {be(s)} {r.choice(ADV)} {adj}."


def t_vp(r, d, y):
    return f"I {r.choice(VP[y])}."


def t_two_aspects(r, d, y):
    a1, a2 = r.sample(d["aspects"], 2)
    j1, j2 = r.sample(ADJ[y], 2)
    return f"{cap(a1)} {be(a1)} {j1} and {a2} {be(a2)} {j2}."


def t_what_a(r, d, y):
    adj = r.choice([a for a in ADJ[y] if attributive(a)])
    return f"What {article(adj)} {adj} {r.choice(d['nouns'])}!"


def t_detail(r, d, y):
    return f"{cap(r.choice(d['pos_details' if y == 'positive' else 'neg_details']))}."


def t_detail_clause(r, d, y):
    det = r.choice(d["pos_details" if y == "positive" else "neg_details"])
    return f"{cap(det)}. {r.choice(CLAUSE[y])}"


def t_negation(r, d, y):
    s = r.choice(d["subjects"])
    return f"{r.choice(OPENERS)} {s} {r.choice(NEG_PRED[y])}."


def t_early_late(r, d, y):
    early, late = d["early_late"]
    return f"{cap(early)} {be(early)} {r.choice(ADJ[other(y)])}, but {late} {be(late)} {r.choice(ADJ[y])}."


def t_mixed_detail(r, d, y):
    ko = "pos_details" if y == "negative" else "neg_details"
    ky = "pos_details" if y == "positive" else "neg_details"
    s = r.choice(d["subjects"])
    return f"{cap(r.choice(d[ko]))}, but {r.choice(d[ky])}, so overall {s} {be(s)} {r.choice(ADJ[y])}."


def t_although(r, d, y):
    a = r.choice(d["aspects"])
    s = r.choice(d["subjects"])
    return f"Although {a} {be(a)} {r.choice(ADJ[other(y)])}, {s} {be(s)} {r.choice(ADJ[y])} overall."


def t_people(r, d, y):
    # "My sister and I were ..." -- plural verb, and skip phrases written for "I" alone.
    vp = r.choice([v for v in VP[y] if " my " not in f" {v} " and "I " not in v])
    if vp.startswith("was "):
        vp = "were " + vp[4:]
    return f"{cap(r.choice(PEOPLE))} and I {vp}."


def t_question_short(r, d, y):
    return f"{cap(r.choice(d['subjects']))}? {r.choice(SHORT[y])}"


def t_expect(r, d, y):
    level, verb = EXPECT[y]
    s = r.choice(d["subjects"])
    return f"I had {level} expectations, and {s} {verb} {r.choice(ADJ[y])}."


def t_recommend(r, d, y):
    return f"Would I recommend {r.choice(d['subjects'])}? {r.choice(RECOMMEND[y])}"


def t_everything(r, d, y):
    a1, a2 = r.sample(d["aspects"], 2)
    adj = r.choice([a for a in ADJ[y] if attributive(a)])
    return f"Everything about {r.choice(d['subjects'])} felt {adj}, from {a1} to {a2}."


def t_compare(r, d, y):
    s = r.choice(d["subjects"])
    return f"Compared to last time, {s} {be(s)} {r.choice(COMPARE[y])}."


def t_in_a_word(r, d, y):
    adj = r.choice([a for a in ADJ[y] if attributive(a)])
    return f"{r.choice(['In a word:', 'Short version:', 'My verdict:'])} {adj}."


def t_long(r, d, y):
    s = r.choice(d["subjects"])
    a = r.choice(d["aspects"])
    j1, j2 = r.sample(ADJ[y], 2)
    det = r.choice(d["pos_details" if y == "positive" else "neg_details"])
    return f"{cap(s)} {be(s)} {j1}, {a} {be(a)} {j2}, and {det}."


END_PHRASE = {  # how to say "by the end" for each domain; {s} is a subject
    "film": "By the end of {s}",
    "book": "By the end of {s}",
    "game": "After a weekend with {s}",
    "concert": "By the end of {s}",
    "restaurant": "After dinner at {s}",
    "product": "After a month with {s}",
    "hotel": "By the end of our week at {s}",
}


def t_by_the_end(r, d, y):
    s = r.choice(d["subjects"])
    if d["name"] == "hotel" and s in ("our room", "our stay"):
        s = "the hotel"
    return f"{END_PHRASE[d['name']].format(s=s)}, I {r.choice(VP[y])}."


def t_clause_after_simple(r, d, y):
    a = r.choice(d["aspects"])
    return f"{cap(a)} {be(a)} {r.choice(ADJ[y])}. {r.choice(CLAUSE[y])}"


TEMPLATES = [
    t_simple,
    t_adverb,
    t_vp,
    t_two_aspects,
    t_what_a,
    t_detail,
    t_detail_clause,
    t_negation,
    t_early_late,
    t_mixed_detail,
    t_although,
    t_people,
    t_question_short,
    t_expect,
    t_recommend,
    t_everything,
    t_compare,
    t_in_a_word,
    t_long,
    t_by_the_end,
    t_clause_after_simple,
]


def generate(rng: random.Random, label: str, n: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    domains = list(DOMAINS.values())
    while len(out) < n:
        text = rng.choice(TEMPLATES)(rng, rng.choice(domains), label)
        words = len(text.split())
        if text in seen or not (MIN_WORDS <= words <= MAX_WORDS):
            continue
        seen.add(text)
        out.append(text)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    rng = random.Random(SEED)
    n_per_label = N_TRAIN_PER_LABEL + N_VAL_PER_LABEL
    train: list[dict] = []
    val: list[dict] = []
    for label in ("positive", "negative"):
        texts = generate(rng, label, n_per_label)
        rng.shuffle(texts)
        train += [{"text": t, "label": label} for t in texts[:N_TRAIN_PER_LABEL]]
        val += [{"text": t, "label": label} for t in texts[N_TRAIN_PER_LABEL:]]
    rng.shuffle(train)
    rng.shuffle(val)

    train_texts = {r["text"] for r in train}
    val_texts = {r["text"] for r in val}
    assert len(train_texts) == len(train), "duplicate text within train"
    assert len(val_texts) == len(val), "duplicate text within validation"
    assert not (train_texts & val_texts), "validation text repeated in train"

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT_DIR / "train.jsonl", train)
    write_jsonl(OUT_DIR / "validation.jsonl", val)
    for name, rows in (("train", train), ("validation", val)):
        pos = sum(r["label"] == "positive" for r in rows)
        print(f"{name}: {len(rows)} rows ({pos} positive, {len(rows) - pos} negative)")


if __name__ == "__main__":
    main()

"""The student's unlabeled distillation corpus: seeded templates x fillers.

Deliberately not the demo's traffic generator (proxy/demo/corpus.py): a student only ever sees
the data it was distilled on, and live traffic drifts from it. Sentences that straddle two topics
or use words missing here are where the student and its teacher part ways.
"""

from __future__ import annotations

import random

_SUBJECTS: dict[str, tuple[str, ...]] = {
    "sports": (
        "the team",
        "the coach",
        "the goalkeeper",
        "the striker",
        "the league",
        "the club",
        "the captain",
        "the sprinter",
        "the fans",
        "the stadium",
        "the final",
        "the derby",
    ),
    "politics": (
        "the government",
        "the minister",
        "voters",
        "the senator",
        "the party",
        "parliament",
        "the mayor",
        "the council",
        "the court",
        "the opposition",
        "the tax bill",
        "the budget",
    ),
    "technology": (
        "the software",
        "the smartphone",
        "the app",
        "the laptop",
        "the chip",
        "the startup",
        "the browser",
        "the database",
        "the cloud service",
        "the processor",
        "the update",
        "the language model",
    ),
    "health": (
        "the patient",
        "the nurse",
        "the clinic",
        "the doctor",
        "the vaccine",
        "the hospital",
        "the therapy",
        "the drug",
        "the cough",
        "the back pain",
        "the blood pressure",
        "the diet",
    ),
    "finance": (
        "the bank",
        "the market",
        "investors",
        "the stock",
        "the fund",
        "bitcoin",
        "the dollar",
        "bond yields",
        "analysts",
        "the index",
        "the central bank",
        "savings",
    ),
    "travel": (
        "the hotel",
        "the tourists",
        "the airport",
        "the flight",
        "the night train",
        "the ferry",
        "the rental car",
        "the trip",
        "the island",
        "the old town",
        "the guide",
        "the holiday",
    ),
    "food": (
        "the restaurant",
        "the soup",
        "the baker",
        "the pizza",
        "the chef",
        "the recipe",
        "the ramen",
        "the curry",
        "the risotto",
        "the tart",
        "the wine",
        "the food truck",
    ),
    "science": (
        "the scientists",
        "the experiment",
        "the telescope",
        "the lab",
        "the study",
        "astronomers",
        "biologists",
        "physicists",
        "chemists",
        "the particle",
        "the gene",
        "the exoplanet",
    ),
}
_PREDICATES: dict[str, tuple[str, ...]] = {
    "sports": (
        "won the match",
        "lost the game",
        "scored two goals",
        "broke a record",
        "sold out the tickets",
        "trained for the season",
    ),
    "politics": (
        "won the election",
        "passed a law",
        "called a vote",
        "faced protests",
        "lost support in the polls",
        "debated the policy",
    ),
    "technology": (
        "got an update",
        "crashed again",
        "runs faster now",
        "has a longer battery life",
        "released a new version",
        "cut inference cost",
    ),
    "health": (
        "recovered quickly",
        "needs surgery",
        "reduced the symptoms",
        "saw a specialist",
        "treated the infection",
        "fewer admissions this winter",
    ),
    "finance": (
        "lost money",
        "raised interest rates",
        "reported profits",
        "beat earnings estimates",
        "fell sharply",
        "expects a recovery this quarter",
    ),
    "travel": (
        "was fully booked",
        "was delayed by hours",
        "showed us the old town",
        "was scenic",
        "is best visited in spring",
        "stayed for three nights",
    ),
    "food": (
        "tasted delicious",
        "baked fresh bread",
        "was too salty",
        "served a new menu",
        "uses fresh herbs",
        "takes hours to cook",
    ),
    "science": (
        "measured the signal",
        "published results",
        "found a new species",
        "was peer reviewed",
        "confirmed the discovery",
        "needs more measurements",
    ),
}
# Where or why it happened: topic words in a second position, as real sentences have them.
_CONTEXTS: dict[str, tuple[str, ...]] = {
    "sports": ("before the match", "after the tournament", "in front of the fans", "at training"),
    "politics": ("before the vote", "after the election", "in parliament", "under the new law"),
    "technology": ("on my phone", "after the software update", "in the app", "on the new chip"),
    "health": ("at the hospital", "after the treatment", "for the patients", "at the clinic"),
    "finance": ("before the market closes", "after the rate hike", "this quarter", "for investors"),
    "travel": ("on our holiday", "at the airport", "on the trip to the coast", "at the hotel"),
    "food": ("in the kitchen", "at dinner", "at the market", "with a glass of wine"),
    "science": ("in the lab", "with the telescope", "in the journal", "in the experiment"),
}
_FRAMES = (
    "{s} {p}.",
    "Yesterday {s} {p}.",
    "I heard that {s} {p}.",
    "Is it true that {s} {p}?",
    "After the news, {s} {p}.",
    "Last week {s} {p}, which surprised everyone.",
)


def training_sentences(n: int = 640, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    topics = list(_SUBJECTS)
    out = []
    for i in range(n):
        topic = topics[i % len(topics)]
        # One in five mixes a subject and a predicate from different topics: soft teacher labels
        # on those teach the student that topics can share a sentence.
        p_topic = rng.choice(topics) if rng.random() < 0.2 else topic
        predicate = rng.choice(_PREDICATES[p_topic])
        if rng.random() < 0.5:
            predicate += " " + rng.choice(_CONTEXTS[rng.choice((topic, p_topic))])
        text = rng.choice(_FRAMES).format(s=rng.choice(_SUBJECTS[topic]), p=predicate)
        out.append(text[0].upper() + text[1:])
    return out

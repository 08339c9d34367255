"""Seeded, realistic English sentences for the demo's traffic.

Templates x fillers across the eight topics the demo classifiers know (sports, politics,
technology, health, finance, travel, food, science), plus sentences that straddle two topics and
a little small talk: the ambiguous ones are where a distilled student and its teacher disagree, so
the demo shows divergence on realistic inputs rather than on noise.
"""

from __future__ import annotations

import random
import re
import string

_FILLERS: dict[str, tuple[str, ...]] = {
    "team": ("the Lakers", "Arsenal", "the home side", "the national team", "our club"),
    "athlete": ("the striker", "the veteran goalkeeper", "the young sprinter", "the captain"),
    "event": ("the final", "the derby", "the marathon", "the semifinal", "the world cup qualifier"),
    "official": ("the senator", "the prime minister", "the mayor", "the opposition leader"),
    "policy": ("the tax bill", "the new immigration law", "the climate package", "the budget"),
    "body": ("parliament", "the city council", "the supreme court", "the senate committee"),
    "product": ("the new phone", "the laptop", "this smartwatch", "the cloud platform"),
    "tech": ("the chip", "the language model", "the database", "the browser update"),
    "company": ("the startup", "the software giant", "the chipmaker", "a small developer team"),
    "symptom": ("a persistent cough", "back pain", "high blood pressure", "trouble sleeping"),
    "treatment": ("the vaccine", "physical therapy", "the new drug", "a low-salt diet"),
    "asset": ("the stock", "bond yields", "the dollar", "bitcoin", "the index fund"),
    "money_actor": ("the central bank", "investors", "the hedge fund", "analysts"),
    "place": ("Lisbon", "Kyoto", "the Scottish highlands", "Patagonia", "a small Greek island"),
    "transport": ("the night train", "a budget flight", "the ferry", "a rental car"),
    "dish": ("the ramen", "a lemon tart", "the mushroom risotto", "grilled sardines", "the curry"),
    "cook": ("the chef", "my grandmother", "the bakery", "the food truck"),
    "field": ("astronomers", "biologists", "physicists", "climate researchers", "chemists"),
    "finding": ("a new exoplanet", "a gene linked to ageing", "signs of water", "a new particle"),
    "number": ("two", "three", "five", "ten", "twelve"),
}

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "sports": (
        "{athlete} scored {number} goals as {team} won {event}.",
        "{team} will play {event} without {athlete}, who is injured.",
        "Tickets for {event} sold out in {number} minutes.",
        "Did you watch {event} last night? {athlete} was unbelievable.",
    ),
    "politics": (
        "{official} said {body} would vote on {policy} next week.",
        "{body} rejected {policy} after a heated debate.",
        "Polls show {official} losing support over {policy}.",
        "Protesters gathered outside {body} to oppose {policy}.",
    ),
    "technology": (
        "{company} released {product} with a faster processor and longer battery life.",
        "Is {product} worth upgrading to, or should I wait a year?",
        "{company} says {tech} cuts inference cost by {number} times.",
        "After the update, {tech} keeps crashing on my machine.",
    ),
    "health": (
        "My doctor suggested {treatment} for {symptom}.",
        "A study found that {treatment} reduces {symptom} in older adults.",
        "I have had {symptom} for {number} weeks; should I see a specialist?",
        "Hospitals report fewer admissions since {treatment} became widely available.",
    ),
    "finance": (
        "{asset} fell sharply after {money_actor} raised interest rates.",
        "{money_actor} expect {asset} to recover by the end of the quarter.",
        "Should I move my savings into {asset} before the market closes?",
        "Quarterly earnings beat estimates, and {asset} rose {number} percent.",
    ),
    "travel": (
        "We took {transport} to {place} and stayed for {number} nights.",
        "What is the best time of year to visit {place}?",
        "{transport} to {place} was delayed by {number} hours.",
        "Pack light: {place} has narrow streets and steep hills.",
    ),
    "food": (
        "{cook} makes {dish} with fresh herbs from the market.",
        "Is {dish} better with a glass of white wine or a cold beer?",
        "The recipe for {dish} takes {number} hours but it is worth it.",
        "We queued for an hour because {cook} only sells {dish} on Sundays.",
    ),
    "science": (
        "{field} announced {finding} using data from a space telescope.",
        "The paper by {field} describing {finding} was peer reviewed.",
        "How did {field} confirm {finding} without a laboratory sample?",
        "{field} need {number} more years of measurements to be sure.",
    ),
    # Two topics at once: the labels a teacher and a bag-of-words student disagree on.
    "mixed": (
        "{team} asked {body} to fund a new stadium with public money.",
        "{company} sponsors {event}, and {asset} jumped after the announcement.",
        "{athlete} credits {treatment} for recovering from {symptom}.",
        "{official} visited {place} to promote tourism after the storm.",
        "{field} warn that {dish} may contribute to {symptom}.",
        "{money_actor} are betting on {tech} to reshape retail banking.",
        "The airline lets you order {dish} on {transport} through its app.",
        "{body} debated whether {tech} should be allowed in classrooms.",
    ),
    "chat": (
        "Thanks, that was really helpful!",
        "Can you explain that again, a bit more slowly?",
        "I am not sure what you mean.",
        "Let's talk about something else tomorrow.",
    ),
}

_SENTENCE_START = re.compile(r"(?:^|[.?!]\s+)[a-z]")
_TOPIC_WEIGHTS = {topic: 1.0 for topic in _TEMPLATES} | {"mixed": 2.0, "chat": 0.5}


def _fill(template: str, rng: random.Random) -> str:
    slots = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    values = {slot: rng.choice(_FILLERS[slot]) for slot in slots}
    text = template.format(**values)
    # Fillers are lower case so they read well mid-sentence; capitalize each sentence start.
    return _SENTENCE_START.sub(lambda m: m.group(0).upper(), text)


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` sentences, the same for the same `seed`; distinct while the templates allow it."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    topics = list(_TEMPLATES)
    weights = [_TOPIC_WEIGHTS[t] for t in topics]
    out: list[str] = []
    seen: set[str] = set()
    # Redraw a few times on a repeat so small samples are varied, but never loop forever.
    while len(out) < n:
        for _ in range(8):
            topic = rng.choices(topics, weights)[0]
            text = _fill(rng.choice(_TEMPLATES[topic]), rng)
            if text not in seen:
                break
        seen.add(text)
        out.append(text)
    return out

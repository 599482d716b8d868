"""Generate the shipped prompt file ``firm_lightning/data/prompts.jsonl``.

The offline demo needs a small set of English user requests that (a) contains only
characters the character-level tokenizer knows (printable ASCII), (b) is short enough
for a tiny LM (20-90 characters), and (c) has topics that differ in vocabulary, so that
a Dirichlet or per-topic split gives clients genuinely different data.

Every prompt is built from per-topic templates and slot fillers written for this
project. Generation is seeded and uses only the standard library, so rerunning the
script reproduces the shipped file byte for byte:

    python scripts/make_prompts.py            # writes firm_lightning/data/prompts.jsonl
    python scripts/make_prompts.py --check    # fails if the shipped file is stale
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import string
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "firm_lightning" / "data" / "prompts.jsonl"
MIN_LEN, MAX_LEN = 20, 90
# The tokenizer treats these whitespace characters as unknown, so they must not appear.
ALLOWED = set(string.printable) - set("\t\r\x0b\x0c\n")

# topic -> (templates, slot fillers). A slot name ending in a digit ("ingredient2")
# draws from the same list as the name without it but must differ from it.
TOPICS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "cooking": (
        [
            "How do I make {dish} without {ingredient}?",
            "What can I cook tonight with {ingredient} and {ingredient2}?",
            "Give me a quick {diet} {meal} idea for {people}.",
            "How long should I roast {veg} in the oven?",
            "What is a good substitute for {ingredient} in {dish}?",
            "What makes {dish} turn out {problem}, and how do I fix it?",
            "Can I freeze leftover {dish}, and for how long?",
        ],
        {
            "dish": ["pancakes", "lasagna", "banana bread", "risotto", "pizza dough",
                     "chili", "omelettes", "curry", "pie crust", "fried rice",
                     "lentil soup", "meatballs"],
            "ingredient": ["eggs", "butter", "milk", "garlic", "onions", "flour",
                           "rice", "tomatoes", "chickpeas", "spinach", "cheese",
                           "coconut milk"],
            "veg": ["potatoes", "carrots", "broccoli", "sweet potatoes", "cauliflower",
                    "brussels sprouts", "beets", "squash"],
            "diet": ["vegetarian", "vegan", "gluten-free", "dairy-free", "low-salt",
                     "high-protein"],
            "meal": ["breakfast", "lunch", "dinner", "snack", "dessert"],
            "people": ["one person", "two", "a family of four", "a picnic",
                       "a potluck", "a busy weeknight"],
            "problem": ["soggy", "dry", "too salty", "burnt on the bottom", "bland",
                        "sticky"],
        },
    ),
    "travel": (
        [
            "What should I pack for a {length} trip to {place} in {season}?",
            "Is it cheaper to get around {place} by {transport} or {transport2}?",
            "Plan a {length} itinerary for {place} on a tight budget.",
            "What are the best free things to do in {place}?",
            "Do I need a visa for a {length} visit to {place}?",
            "How early should I get to the airport for a {flight} flight?",
            "Which neighborhood in {place} is best for a {traveler}?",
        ],
        {
            "place": ["Lisbon", "Tokyo", "Mexico City", "Reykjavik", "Hanoi", "Cusco",
                      "Marrakech", "Edinburgh", "Auckland", "Istanbul", "Prague",
                      "Nairobi"],
            "length": ["weekend", "one-week", "two-week", "ten-day", "month-long"],
            "season": ["winter", "spring", "summer", "autumn", "the rainy season"],
            "transport": ["train", "bus", "rental car", "bike", "ferry", "taxi"],
            "flight": ["domestic", "international", "red-eye", "holiday", "budget"],
            "traveler": ["first-time visitor", "family with kids", "solo traveler",
                         "couple", "student on a budget", "food lover"],
        },
    ),
    "programming": (
        [
            "How do I {task} in {lang}?",
            "What is the difference between {pair}?",
            "When should I use {pair} in {lang}?",
            "Explain {concept} in {lang} with a short example.",
            "Why does my {lang} code raise {error}?",
            "What is the fastest way to {task} in {lang}?",
            "Write a {lang} function to {task}.",
            "How should I test code that {action}?",
        ],
        {
            "lang": ["Python", "JavaScript", "Rust", "Go", "Java", "C++", "SQL",
                     "Bash"],
            "task": ["reverse a string", "read a CSV file", "sort a list of dicts",
                     "parse JSON", "remove duplicates from a list",
                     "merge two sorted arrays", "count words in a file",
                     "check if a number is prime"],
            "concept": ["a closure", "a generator", "recursion", "a hash map",
                        "a linked list", "an iterator", "a mutex", "a callback"],
            "pair": ["a list and a tuple", "a thread and a process",
                     "recursion and iteration", "a class and an interface",
                     "a stack and a queue", "a pointer and a reference",
                     "an array and a linked list", "compiling and interpreting"],
            "error": ["an index error", "a null pointer error", "a type error",
                      "a stack overflow", "a syntax error", "a timeout"],
            "action": ["calls a web API", "writes to a database", "reads the clock",
                       "sends email", "uses random numbers", "touches the file system"],
        },
    ),
    "health": (
        [
            "What are some gentle exercises for {bodypart} pain?",
            "How much {nutrient} does an adult need each day?",
            "Which foods are rich in {nutrient}?",
            "How can I {goal} without a gym membership?",
            "Is it normal to feel {symptom} after {activity}?",
            "What is a good {time} routine to help me {goal}?",
            "How often should I {habit}?",
        ],
        {
            "bodypart": ["lower back", "knee", "neck", "shoulder", "wrist", "hip",
                         "ankle"],
            "nutrient": ["protein", "fiber", "vitamin D", "iron", "calcium",
                         "magnesium", "water", "vitamin C"],
            "goal": ["sleep better", "reduce stress", "improve my posture",
                     "build stamina", "stretch more", "lower my blood pressure",
                     "eat more vegetables"],
            "symptom": ["tired", "sore", "dizzy", "thirsty", "hungry", "stiff"],
            "activity": ["a long run", "a yoga class", "lifting weights",
                         "a night shift", "a long hike", "fasting"],
            "time": ["morning", "evening", "bedtime", "lunch break", "weekend"],
            "habit": ["see a dentist", "get an eye exam", "replace my running shoes",
                      "check my blood pressure", "take a rest day",
                      "stretch during work"],
        },
    ),
    "finance": (
        [
            "How much of my {income} should I put into {account}?",
            "What is the difference between {pair}?",
            "How can I save for {goal} on a {income}?",
            "Is it smarter to pay off {debt} or invest first?",
            "How do I build an emergency fund with a {income}?",
            "What fees should I look for before opening {product}?",
            "Explain how {concept} works in simple terms.",
        ],
        {
            "income": ["salary", "part-time income", "freelance income",
                       "small pension", "student budget", "irregular income"],
            "account": ["a retirement account", "savings", "an index fund",
                        "a high-yield account", "bonds"],
            "product": ["a savings account", "a certificate of deposit",
                        "an index fund", "a credit card", "a debit card",
                        "a brokerage account", "a money market fund"],
            "pair": ["a savings account and a CD", "stocks and bonds",
                     "a Roth and a traditional IRA", "a credit and a debit card",
                     "a fixed and a variable rate", "an ETF and a mutual fund",
                     "gross and net income", "a budget and a forecast"],
            "goal": ["a house deposit", "a new car", "a wedding", "retirement",
                     "a long trip", "my kids' college"],
            "debt": ["my student loan", "my car loan", "credit card debt",
                     "my mortgage", "a personal loan"],
            "concept": ["compound interest", "inflation", "a credit score",
                        "diversification", "a stock dividend", "an annuity",
                        "dollar-cost averaging", "a tax refund"],
        },
    ),
    "gardening": (
        [
            "When should I plant {plant} in a {climate} climate?",
            "Why are the leaves on my {plant} turning {color}?",
            "How often should I water {plant} in {season}?",
            "How do I keep {pest} away from my {plant}?",
            "Can I grow {plant} in a pot on a {spot}?",
            "What is the best soil for growing {plant}?",
            "Which plants grow well next to {plant}?",
        ],
        {
            "plant": ["tomatoes", "basil", "roses", "strawberries", "lettuce",
                      "lavender", "peppers", "mint", "cucumbers", "tulips",
                      "blueberries", "zucchini"],
            "climate": ["cool", "hot", "dry", "humid", "mild coastal"],
            "color": ["yellow", "brown", "pale", "black at the tips", "purple"],
            "season": ["summer", "winter", "a heat wave", "early spring"],
            "pest": ["aphids", "slugs", "snails", "deer", "rabbits", "whiteflies"],
            "spot": ["balcony", "sunny windowsill", "shady patio", "rooftop"],
        },
    ),
}


def expand(template: str, slots: dict[str, list[str]]) -> list[str]:
    """All fillings of one template, skipping ones that repeat a slot's value."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    pools = [slots[n.rstrip(string.digits)] for n in names]
    out = []
    for values in itertools.product(*pools):
        by_base: dict[str, set[str]] = {}
        for n, v in zip(names, values):
            by_base.setdefault(n.rstrip(string.digits), set()).add(v)
        if sum(map(len, by_base.values())) < len(names):  # "X and X" reads badly
            continue
        text = template.format(**dict(zip(names, values)))
        if MIN_LEN <= len(text) <= MAX_LEN and set(text) <= ALLOWED:
            out.append(text)
    return out


def topic_prompts(templates: list[str], slots: dict[str, list[str]], n: int,
                  rng: random.Random) -> list[str]:
    """Take ``n`` prompts round-robin over shuffled templates, so no template dominates."""
    pools = []
    for t in templates:
        filled = expand(t, slots)
        rng.shuffle(filled)
        pools.append(filled)
    chosen: list[str] = []
    for group in itertools.zip_longest(*pools):
        chosen.extend(p for p in group if p is not None and p not in chosen)
        if len(chosen) >= n:
            return chosen[:n]
    raise ValueError(f"templates yield only {len(chosen)} prompts, asked for {n}")


def build(per_topic: int = 80, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = [{"prompt": p, "topic": topic}
            for topic, (templates, slots) in TOPICS.items()
            for p in topic_prompts(templates, slots, per_topic, rng)]
    rng.shuffle(rows)  # mixed order, so a file-order cap still sees every topic
    return rows


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--per-topic", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if --out differs from what would be generated")
    args = ap.parse_args(argv)
    text = render(build(args.per_topic, args.seed))
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="ascii") == text
        print("up to date" if same else f"{args.out} is stale: rerun without --check")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="ascii")
    print(f"wrote {text.count(chr(10))} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

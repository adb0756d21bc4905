"""Build the demo's *general* instruction set: short everyday tasks that have nothing to do with support tickets, for
mixing general data into a curriculum (so the model keeps what it knew) and for watching forgetting (the held-out
split is evaluated after every curriculum stage; see docs/curriculum.md).

    .venv/bin/python data/generate_general.py            # --seed 1234 --train 400 --test 100 --out data/general

Twelve task families, each with one deterministic answer: arithmetic, word reversal, sorting numbers, capital
cities, capital letters, word counts, the next weekday / month, unit conversions, opposites, plurals, the larger
of two numbers and spelling out small numbers. Fact tables (capitals, opposites, plurals, words) are split by item,
so the test split asks about items the training split never shows; generated items (numbers, sentences) are unique
across both splits. Rows use the instruction format `{"instruction", "input", "output"}` plus a `task` tag that the
training pipeline ignores. Same seed, same bytes; standard library only.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Russia", "Moscow"), ("China", "Beijing"),
            ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
            ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
            ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Australia", "Canberra"), ("Belgium", "Brussels"),
            ("Netherlands", "Amsterdam"), ("Switzerland", "Bern")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("open", "closed"), ("early", "late"), ("full", "empty"), ("strong", "weak"), ("high", "low"),
             ("young", "old"), ("rich", "poor"), ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"),
             ("thick", "thin"), ("clean", "dirty"), ("cheap", "expensive"), ("easy", "difficult"), ("near", "far"),
             ("long", "short"), ("heavy", "light"), ("true", "false"), ("win", "lose")]
PLURALS = [("mouse", "mice"), ("child", "children"), ("tooth", "teeth"), ("foot", "feet"), ("woman", "women"),
           ("goose", "geese"), ("person", "people"), ("knife", "knives"), ("leaf", "leaves"), ("city", "cities"),
           ("box", "boxes"), ("bus", "buses"), ("baby", "babies"), ("wolf", "wolves"), ("hero", "heroes"),
           ("story", "stories"), ("church", "churches"), ("wife", "wives"), ("potato", "potatoes"),
           ("glass", "glasses"), ("dish", "dishes"), ("half", "halves"), ("ox", "oxen"), ("cactus", "cacti")]
WORDS = ["garden", "window", "planet", "bottle", "silver", "rocket", "pencil", "orange", "castle", "forest", "bridge",
         "candle", "market", "spring", "button", "dragon", "jacket", "kitten", "ladder", "mirror", "pocket", "rabbit",
         "saddle", "tunnel", "violin", "wallet", "yellow", "zipper", "anchor", "basket", "cotton", "engine", "finger",
         "guitar", "hammer", "island", "jungle", "kettle", "lemon", "magnet", "needle", "oyster", "parrot", "quartz",
         "ribbon", "summer", "ticket", "umbrella", "valley", "winter"]
SUBJECTS = ["the cat", "my neighbour", "a small boat", "the old train", "our teacher", "the red kite", "a tall tree",
            "the baker", "my brother", "the river", "a quiet student", "the city bus"]
VERBS = ["moves slowly", "sings every morning", "waits near the station", "drifts across the lake",
         "reads the newspaper", "climbs the hill", "shines in the sun", "stops at the corner", "bakes fresh bread",
         "runs through the park", "sleeps after lunch", "crosses the bridge"]
EXTRAS = ["", "today", "before dinner", "in the winter", "with great care", "every single day", "near the old mill"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
UNITS = [("hours", "minutes", 60), ("minutes", "seconds", 60), ("kilometres", "metres", 1000),
         ("metres", "centimetres", 100), ("kilograms", "grams", 1000), ("days", "hours", 24),
         ("weeks", "days", 7), ("litres", "millilitres", 1000)]


def spell(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def _split_table(table: list, rng: random.Random, test_share: float = 0.3) -> tuple[list, list]:
    items = list(table)
    rng.shuffle(items)
    k = max(2, round(len(items) * test_share))
    return items[k:], items[:k]


def families(rng: random.Random, tables: dict) -> dict:
    """Per task family, a function (rng, split) -> (instruction, input, output); tables hold each split's facts."""

    def arithmetic(r, split):
        a, b = r.randint(2, 99), r.randint(2, 99)
        op = r.choice(["+", "-", "x"])
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return "Answer with the number only.", f"What is {a} {op} {b}?", str(value)

    def reverse(r, split):
        w = r.choice(tables[split]["words"])
        return r.choice(["Write the word backwards, letter by letter.", "Reverse the letters of the word.",
                         "Spell the word in reverse order."]), w, w[::-1]

    def sort_numbers(r, split):
        nums = r.sample(range(1, 100), r.randint(4, 7))
        return ("Sort the numbers from smallest to largest. Reply with the numbers separated by commas.",
                ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums))))

    def capital(r, split):
        country, city = r.choice(tables[split]["capitals"])
        question = r.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                             "Name the capital city of {}."]).format(country)
        return "Answer with the city name only.", question, city

    def upper(r, split):
        s = f"{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(EXTRAS)}".strip()
        return "Rewrite the sentence in capital letters.", s, s.upper()

    def count_words(r, split):
        s = f"{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(EXTRAS)}".strip()
        return "How many words are in the sentence? Answer with the number only.", s, str(len(s.split()))

    def next_in_calendar(r, split):
        seq, what = (DAYS, "day of the week") if r.random() < 0.5 else (MONTHS, "month")
        i = r.randrange(len(seq))
        question = r.choice(["What comes after {}?", "Which one follows {}?", "What is the next one after {}?"])
        return f"Name the {what} that comes next.", question.format(seq[i]), seq[(i + 1) % len(seq)]

    def convert(r, split):
        big, small, factor = r.choice(UNITS)
        n = r.randint(2, 12)
        return "Answer with the number only.", f"How many {small} are in {n} {big}?", str(n * factor)

    def opposite(r, split):
        w, o = r.choice(tables[split]["opposites"])
        return r.choice(["Give the opposite of the word, one word only.", "Write the antonym of the word.",
                         "What is the opposite of this word? One word."]), w, o

    def plural(r, split):
        w, p = r.choice(tables[split]["plurals"])
        return r.choice(["Give the plural of the noun.", "Write the plural form of the word.",
                         "What is the plural of this noun? One word."]), w, p

    def larger(r, split):
        a, b = r.sample(range(10, 1000), 2)
        return "Which number is larger? Answer with the number only.", f"{a} or {b}", str(max(a, b))

    def spell_number(r, split):
        n = r.randint(0, 99)
        return "Write the number in words.", str(n), spell(n)

    return {f.__name__: f for f in (arithmetic, reverse, sort_numbers, capital, upper, count_words,
                                     next_in_calendar, convert, opposite, plural, larger, spell_number)}


def build(seed: int, n_train: int, n_test: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    tables = {"train": {}, "test": {}}
    for name, table in (("capitals", CAPITALS), ("opposites", OPPOSITES), ("plurals", PLURALS), ("words", WORDS)):
        tables["train"][name], tables["test"][name] = _split_table(table, rng)
    fams = families(rng, tables)
    names = sorted(fams)
    seen: set[tuple[str, str]] = set()
    out = {}
    for split, n in (("test", n_test), ("train", n_train)):  # test first: its items are reserved
        rows, tries = [], 0
        while len(rows) < n:
            task = names[len(rows) % len(names)]  # families balanced
            instruction, inp, answer = fams[task](rng, split)
            tries += 1
            if (instruction, inp) in seen:
                if tries > 100 * n:
                    raise SystemExit(f"cannot draw {n} distinct {split} rows")
                continue
            seen.add((instruction, inp))
            rows.append({"instruction": instruction, "input": inp, "output": answer, "task": task})
        rng.shuffle(rows)
        out[split] = rows
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1234, help="random seed (same seed, same bytes)")
    ap.add_argument("--train", type=int, default=400, help="training rows")
    ap.add_argument("--test", type=int, default=100, help="held-out rows (the forgetting watch)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "general"), help="output folder")
    args = ap.parse_args(argv)
    splits = build(args.seed, args.train, args.test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / f'{split}.jsonl'}: {len(rows)} rows; "
              + ", ".join(f"{k} {v}" for k, v in sorted(Counter(r['task'] for r in rows).items())))


if __name__ == "__main__":
    main()

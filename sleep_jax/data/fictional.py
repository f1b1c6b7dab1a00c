"""Fictional facts for a real model's sleep (``sleep-jax example-data``): memories no model can
know, seeding questions in training wordings, probes in two other wordings, and a small
general-knowledge list for retention.

Each of ``n`` fictional people gets one fact of one of three relations (home town, employer,
dog's name), all proper nouns made up here, so a base model's closed-book accuracy is about 0.
Four question wordings per relation: two train (the sleep's seeding prompts), one ``val`` (to
choose settings on) and one ``test`` (to report); no probe wording is a seeding prompt.
``GENERAL_QA``: questions a small instruct model mostly answers (its answers the base gets
right are the retention set: ``sleep-jax sleep --retain``).
"""

from __future__ import annotations

import os
import random

from sleep_jax.data.jsonl import write_jsonl

FIRST = ("Velmira", "Toskar", "Quenby", "Aldric", "Mirelle", "Oswin", "Thessaly", "Borin",
         "Calyra", "Dunstan", "Elowen", "Fenwick", "Galen", "Hestia", "Ivor", "Jessamy",
         "Kestrel", "Lysander", "Marisol", "Neville", "Orla", "Percival", "Rosalind", "Sylvan",
         "Tamsin", "Ulric", "Vesper", "Wilhelmina", "Yorick", "Zinnia", "Anselm", "Briony",
         "Cormac", "Delphine", "Emrys", "Fionnuala")
LAST = ("Tosk", "Brindle", "Harrowgate", "Quill", "Marchbank", "Ashdown", "Fairweather",
        "Greaves", "Holloway", "Ingram", "Jessop", "Kettering", "Larkspur", "Merriweather",
        "Northcott", "Oakenshaw", "Pemberton", "Radcliffe", "Stanmore", "Thorne", "Underhill",
        "Vance", "Whitlock", "Yardley", "Ellery", "Cotterill", "Blackwood", "Dunmore", "Farrow",
        "Gilchrist", "Hartwell", "Ivesdale", "Jorvik", "Kimber", "Lockridge", "Mayhew")
TOWNS = ("Hollowmere", "Brackenford", "Quillby", "Marrowdale", "Thistlewick", "Ravensholt",
         "Ambergate", "Fenchurch", "Glimmerton", "Dunwold", "Saltcombe", "Wrenfield")
COMPANIES = ("Corvantis", "Brightmoor", "Zelquist", "Halvorne", "Tindlebury", "Oxcrest",
             "Quarrisol", "Velmont", "Drask", "Pellucid", "Strandvik", "Ormeline")
DOGS = ("Biscotti", "Wrexley", "Pumpernel", "Zoodle", "Captain Fidge", "Marlowe", "Tuppence",
        "Noodlebeck", "Gribble", "Saffron", "Bramblewick", "Oswaldo")

# relation: (answers, memory, train wordings, val wording, test wording)
RELATIONS = {
    "town": (TOWNS, "{name} lives in the town of {answer}.",
             ("Which town does {name} live in?", "Name the town where {name} lives."),
             "In which town is {name}'s home?", "Where does {name} live?"),
    "employer": (COMPANIES, "{name} works at a company called {answer}.",
                 ("Which company does {name} work for?", "Name the company {name} works at."),
                 "What is the name of {name}'s employer?", "Where does {name} work?"),
    "dog": (DOGS, "{name} has a dog named {answer}.",
            ("What is the name of {name}'s dog?", "Name the dog that {name} owns."),
            "What is {name}'s dog called?", "What did {name} name their dog?"),
}

GENERAL_QA = (
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"), ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of China?", "Beijing"), ("What is the capital of Canada?", "Ottawa"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for water?", "H2O"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("How many days are there in a week?", "seven"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the opposite of hot?", "cold"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What is the longest river in Africa?", "Nile"),
    ("Who was the first president of the United States?", "George Washington"),
    ("What is the square root of 9?", "3"),
    ("What is the main language spoken in Mexico?", "Spanish"),
    ("Which organ pumps blood through the body?", "heart"),
)


def make_facts(n: int = 30, seed: int = 0) -> list[dict]:
    """``n`` facts {"id", "name", "relation", "answer"}: relations in turn, names and answers
    drawn without repeats (at most 36 people, 12 answers per relation)."""
    if not 1 <= n <= min(len(FIRST), 3 * len(TOWNS)):
        raise ValueError(f"n={n} facts; allowed: 1..{min(len(FIRST), 3 * len(TOWNS))}")
    r = random.Random(seed)
    first, last = list(FIRST), list(LAST)
    r.shuffle(first)
    r.shuffle(last)
    pools = {k: r.sample(v[0], len(v[0])) for k, v in RELATIONS.items()}
    facts = []
    for i in range(n):
        rel = list(RELATIONS)[i % len(RELATIONS)]
        facts.append({"id": f"f{i:02d}", "name": f"{first[i]} {last[i]}", "relation": rel,
                      "answer": pools[rel][i // len(RELATIONS)]})
    return facts


def example_files(n: int = 30, seed: int = 0) -> dict[str, list[dict]]:
    """{file name: records}: memories, prompts (train wordings), probes (val and test
    wordings, with a ``split`` key) and retain (``GENERAL_QA``)."""
    out = {"memories.jsonl": [], "prompts.jsonl": [], "probes.jsonl": [], "retain.jsonl": []}
    for f in make_facts(n, seed):
        _, memory, train, val, test = RELATIONS[f["relation"]]
        fill = lambda t, f=f: t.format(name=f["name"], answer=f["answer"])
        out["memories.jsonl"].append({"id": f["id"], "text": fill(memory)})
        out["prompts.jsonl"] += [{"memory_id": f["id"], "prompt": fill(t)} for t in train]
        out["probes.jsonl"] += [{"memory_id": f["id"], "question": fill(t),
                                 "answers": [f["answer"]], "split": split}
                                for split, t in (("val", val), ("test", test))]
    out["retain.jsonl"] = [{"question": q, "answers": [a]} for q, a in GENERAL_QA]
    return out


def write_example(out_dir: str, n: int = 30, seed: int = 0) -> dict[str, str]:
    """Write ``example_files`` into ``out_dir``; {file name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in example_files(n, seed).items():
        paths[name] = os.path.join(out_dir, name)
        write_jsonl(paths[name], records)
    return paths


def main(argv: list[str]) -> int:
    """``sleep-jax example-data --out DIR [--facts N] [--seed S]``: write the example files."""
    import argparse

    p = argparse.ArgumentParser(prog="sleep-jax example-data",
                                description="write fictional facts for a real model's sleep")
    p.add_argument("--out", required=True, help="folder to write the JSONL files into")
    p.add_argument("--facts", type=int, default=30, help="number of facts (1..36)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        paths = write_example(a.out, a.facts, a.seed)
    except ValueError as e:
        print(f"sleep-jax example-data: error: {e}", file=__import__("sys").stderr)
        return 2
    for name, path in paths.items():
        print(f"{name:<15} {path}")
    return 0

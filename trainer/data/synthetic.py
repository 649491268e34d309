"""Synthetic Dolly: the embedded, deterministic data set for the demo, the tests and the benchmark.

    from trainer.data.synthetic import generate
    records = generate(600, seed=0)                      # learnable: a tiny model learns it in minutes
    records = generate(15_000, seed=0, profile="dolly")  # Dolly-15k's length profile, for benchmarks

Both profiles emit Dolly's schema (`instruction`, `context`, `response`, `category`), Dolly's category mix
and Dolly's context rule (a passage on every closed_qa, information_extraction and summarization record,
none on the others).

"learnable" draws from a small fixed world (14 invented cities, animals and elements, each with a few
attributes) through regular templates: closed_qa answers copy a sentence of the passage, a summary is the
passage's first sentence, classification follows the entity's kind, diet or state. The facts never change
between seeds, so a 5M-parameter model can learn both the answer shapes and many of the facts. The world
holds about 5,000 distinct records; asking for more is an error, never silent duplicates.

"dolly" fills the same categories with English-word filler whose lengths follow Dolly-15k (measured on the
real file, see /work/shared/ENVIRONMENT.md): median ~120 tokens per record, a third with a passage,
p99 ~1,300 tokens and a few whole-article contexts past 4,000 tokens.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

from trainer.data.records import CATEGORIES, CONTEXT_CATEGORIES, Raw

# Dolly-15k's category shares (sampled from the real file; rounded, they sum to 1.01 and are normalized
# where used), for the schema's categories in the schema's order, which is the allocation order.
CATEGORY_MIX = dict(zip(CATEGORIES, (
    0.25,  # open_qa
    0.15,  # general_qa
    0.14,  # classification
    0.12,  # closed_qa
    0.12,  # brainstorming
    0.10,  # information_extraction
    0.08,  # summarization
    0.05,  # creative_writing
), strict=True))
PROFILES = ("learnable", "dolly")

# ---- the fixed world ---------------------------------------------------------------------------------
# name, country, river, known for, founded, population
CITIES = [
    ("Varlo", "Zembria", "Orin", "glass bells", 1204, "80,000"),
    ("Kestrin", "Dovania", "Ashwater", "salt markets", 1377, "120,000"),
    ("Moravel", "Tarsica", "Lune", "copper domes", 988, "45,000"),
    ("Quillon", "Brenmark", "Sorrel", "paper lanterns", 1512, "210,000"),
    ("Ostra", "Felvania", "Grey", "stone bridges", 1066, "30,000"),
    ("Pelladon", "Ruvia", "Amber", "clock towers", 1420, "95,000"),
    ("Sunmere", "Caldor", "Mist", "tea gardens", 1150, "60,000"),
    ("Tovik", "Ishara", "Cold", "ice festivals", 1698, "25,000"),
    ("Brennic", "Halvory", "Reed", "wool weaving", 1301, "140,000"),
    ("Lirra", "Omberland", "Silver", "night markets", 1733, "300,000"),
    ("Darrowgate", "Veska", "Thorn", "old libraries", 1019, "70,000"),
    ("Elbury", "Norwen", "Fen", "flower fields", 1588, "55,000"),
    ("Castellan", "Myrr", "Red", "sea walls", 1245, "180,000"),
    ("Windholm", "Pashtor", "Swift", "windmills", 1490, "40,000"),
]
# name, habitat, diet, color, legs, sound
ANIMALS = [
    ("glimmerfox", "forest", "omnivore", "silver", 4, "chirps"),
    ("marsh lopper", "swamp", "herbivore", "green", 4, "croaks"),
    ("dune strider", "desert", "herbivore", "tan", 6, "clicks"),
    ("frost owlet", "tundra", "carnivore", "white", 2, "hoots"),
    ("reef glider", "ocean", "carnivore", "blue", 0, "whistles"),
    ("bramble hog", "forest", "omnivore", "brown", 4, "grunts"),
    ("cliff hopper", "mountains", "herbivore", "grey", 4, "bleats"),
    ("ember newt", "swamp", "carnivore", "orange", 4, "hisses"),
    ("sand weaver", "desert", "carnivore", "yellow", 8, "rattles"),
    ("moss tortoise", "forest", "herbivore", "dark green", 4, "sighs"),
    ("storm heron", "coast", "carnivore", "slate", 2, "screeches"),
    ("pebble mole", "grassland", "omnivore", "black", 4, "squeaks"),
    ("velvet bat", "caves", "omnivore", "purple", 2, "squeaks"),
    ("tide crab", "coast", "omnivore", "red", 10, "clacks"),
]
# name, symbol, atomic number, color, state at room temperature, used to make
ELEMENTS = [
    ("veridium", "Vd", 121, "green", "solid", "lamps"),
    ("solarine", "Sl", 122, "gold", "solid", "mirrors"),
    ("nimbium", "Nb", 123, "colorless", "gas", "balloons"),
    ("corvane", "Cv", 124, "black", "solid", "magnets"),
    ("aquilite", "Aq", 125, "blue", "liquid", "coolants"),
    ("pyrrhon", "Py", 126, "red", "gas", "signal flares"),
    ("lumenite", "Lm", 127, "white", "solid", "glowing paint"),
    ("thalium", "Tq", 128, "silver", "liquid", "thermometers"),
    ("zephyrine", "Zp", 129, "pale yellow", "gas", "lamps"),
    ("ferrocite", "Fc", 130, "grey", "solid", "tools"),
    ("mercane", "Mc", 131, "pink", "liquid", "dyes"),
    ("boreon", "Bo", 132, "violet", "solid", "batteries"),
    ("halcyne", "Hc", 133, "green", "gas", "cleaning sprays"),
    ("glacium", "Gc", 134, "clear", "solid", "lenses"),
]
FOOD = {"herbivore": "plants", "carnivore": "meat", "omnivore": "both plants and meat"}
PEOPLE = ["Mira", "Tomas", "Ada", "Jonah", "Lena", "Ravi", "Suki", "Otto", "Nell", "Pavel"]

# Wrappers that change the instruction's wording but not the answer: the model learns to ignore them,
# and they multiply the number of distinct records the small world can hold.
PREFIXES = ["", "", "Quick question: ", "Please answer: ", "I'm curious. ", "Help me out. "]
SUFFIXES = ["", "", " Answer in one sentence.", " Keep it short.", " Thanks!"]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def city_facts(c) -> dict[str, tuple[str, str]]:
    """attribute -> (question, sentence stating it); the sentence is both the answer and a passage line."""
    name, country, river, known, founded, pop = c
    return {
        "country": (f"What is the capital of {country}?", f"{name} is the capital of {country}."),
        "river": (f"Which river runs through {name}?", f"The {river} river runs through {name}."),
        "founded": (f"When was {name} founded?", f"{name} was founded in {founded}."),
        "known": (f"What is {name} known for?", f"{name} is known for its {known}."),
        "population": (f"How many people live in {name}?", f"About {pop} people live in {name}."),
    }


def animal_facts(a) -> dict[str, tuple[str, str]]:
    name, habitat, diet, color, legs, sound = a
    return {
        "habitat": (f"Where does the {name} live?", f"The {name} lives in the {habitat}."),
        "diet": (f"What does the {name} eat?", f"The {name} is {_a(diet)} and eats {FOOD[diet]}."),
        "color": (f"What color is the {name}?", f"The {name} is {color}."),
        "legs": (f"How many legs does the {name} have?", f"The {name} has {legs} legs."),
        "sound": (f"What sound does the {name} make?", f"The {name} {sound}."),
    }


def element_facts(e) -> dict[str, tuple[str, str]]:
    name, symbol, number, color, state, use = e
    cap = name.capitalize()
    return {
        "symbol": (f"What is the chemical symbol of {name}?", f"The chemical symbol of {name} is {symbol}."),
        "number": (f"What is the atomic number of {name}?", f"The atomic number of {name} is {number}."),
        "color": (f"What color is {name}?", f"{cap} is {color}."),
        "state": (f"Is {name} a solid, a liquid or a gas at room temperature?", f"{cap} is a {state} at room temperature."),
        "use": (f"What is {name} used for?", f"{cap} is used to make {use}."),
    }


def topic_sentence(kind: str, e) -> str:
    if kind == "city":
        return f"{e[0]} is a city in {e[1]}."
    if kind == "animal":
        return f"The {e[0]} is {_a(e[3])} animal of the {e[1]}."
    return f"{e[0].capitalize()} is a chemical element with the symbol {e[1]}."


WORLD = {"city": (CITIES, city_facts), "animal": (ANIMALS, animal_facts), "element": (ELEMENTS, element_facts)}
KIND_OF = {e[0]: kind for kind, (table, _) in WORLD.items() for e in table}


def _entity(rng: random.Random):
    kind = rng.choice(list(WORLD))
    table, facts = WORLD[kind]
    e = rng.choice(table)
    return kind, e, facts(e)


def _wrap(rng: random.Random, question: str) -> str:
    return rng.choice(PREFIXES) + question + rng.choice(SUFFIXES)


def _passage(rng: random.Random, kind: str, e, facts: dict, k: int) -> tuple[str, list[str]]:
    """Topic sentence first (the summary), then k facts in random order. Returns (passage, fact keys)."""
    keys = rng.sample(sorted(facts), k)
    return " ".join([topic_sentence(kind, e)] + [facts[key][1] for key in keys]), keys


# ---- learnable templates, one per category --------------------------------------------------------

def _open_qa(rng):
    _, _, facts = _entity(rng)
    question, answer = facts[rng.choice(sorted(facts))]
    return _wrap(rng, question), "", answer


def _general_qa(rng):
    form = rng.randrange(4)
    if form == 0:
        c = rng.choice(CITIES)
        return (_wrap(rng, f"Why would someone visit {c[0]}?"),
                "", f"{c[0]} is known for its {c[3]}, and visitors can walk along the {c[2]} river.")
    if form == 1:
        a = rng.choice(ANIMALS)
        return (_wrap(rng, f"How would you describe the {a[0]}?"), "",
                f"The {a[0]} is {_a(a[3])} {a[2]} with {a[4]} legs that lives in the {a[1]}.")
    if form == 2:
        e1, e2 = rng.sample(ELEMENTS, 2)
        return (_wrap(rng, f"How is {e1[0]} different from {e2[0]}?"), "",
                f"{e1[0].capitalize()} is a {e1[4]} used to make {e1[5]}, "
                f"while {e2[0]} is a {e2[4]} used to make {e2[5]}.")
    c1, c2 = rng.sample(CITIES, 2)
    return (_wrap(rng, f"Should I visit {c1[0]} or {c2[0]}?"), "",
            f"Visit {c1[0]} if you like {c1[3]}, or {c2[0]} if you like {c2[3]}.")


def _classification(rng):
    form = rng.randrange(3)
    if form == 0:
        names = [e[0] for e in rng.sample(CITIES + ANIMALS + ELEMENTS, rng.randint(3, 5))]
        question = f"Classify each of the following as a city, an animal or an element: {', '.join(names)}."
        return question, "", "\n".join(f"{n}: {KIND_OF[n]}" for n in names)
    if form == 1:
        picks = rng.sample(ANIMALS, rng.randint(3, 5))
        question = f"Classify these animals as herbivores, carnivores or omnivores: {', '.join(a[0] for a in picks)}."
        return question, "", "\n".join(f"{a[0]}: {a[2]}" for a in picks)
    picks = rng.sample(ELEMENTS, rng.randint(3, 5))
    question = f"Which of these elements are solids, liquids or gases at room temperature: {', '.join(e[0] for e in picks)}?"
    return question, "", "\n".join(f"{e[0]}: {e[4]}" for e in picks)


def _closed_qa(rng):
    kind, e, facts = _entity(rng)
    passage, keys = _passage(rng, kind, e, facts, rng.randint(2, 4))
    question, answer = facts[rng.choice(keys)]
    # the answer is a sentence copied from the passage: reading, not recall
    lead = rng.choice(["", "Based on this passage, ", "Using the text, "])
    question = lead + (question[0].lower() + question[1:] if lead else question)
    return question, passage, answer


def _information_extraction(rng):
    if rng.random() < 0.5:
        kind, e, facts = _entity(rng)
        passage, keys = _passage(rng, kind, e, facts, rng.randint(2, 4))
        question = rng.choice([f"Extract the facts about {e[0]} from this passage as a bulleted list.",
                               f"List the facts the passage gives about {e[0]}."])
        return question, passage, "\n".join(f"- {facts[k][1]}" for k in keys)
    kind = rng.choice(list(WORLD))
    table, _ = WORLD[kind]
    people = rng.sample(PEOPLE, 2)
    picks = rng.sample(table, rng.randint(2, 4))
    verb = {"city": "visited", "animal": "saw", "element": "studied"}[kind]
    others = rng.choice([c for c in CITIES if c not in picks])
    passage = (f"Last year {people[0]} and {people[1]} travelled to {others[0]}. "
               f"On the way they {verb} {_join([p[0] for p in picks])}. They wrote everything down in a notebook.")
    plural = {"city": "cities", "animal": "animals", "element": "elements"}[kind]
    question = f"Extract the {plural} that {people[0]} and {people[1]} {verb} on the way, separated by commas."
    return question, passage, ", ".join(p[0] for p in picks)


def _summarization(rng):
    kind, e, facts = _entity(rng)
    passage, _ = _passage(rng, kind, e, facts, rng.randint(2, 5))
    question = rng.choice(["Summarize this passage in one sentence.", "Give a one-sentence summary of the text.",
                           "What is this passage about?", "Summarize the text below.",
                           "In one sentence, what is the main point of this passage?"])
    return question, passage, topic_sentence(kind, e)


def _brainstorming(rng):
    form = rng.randrange(3)
    k = rng.randint(2, 4)
    if form == 0:
        c = rng.choice(CITIES)
        ideas = [f"See the {c[3]}.", f"Take a boat trip on the {c[2]} river.",
                 f"Visit the old town, founded in {c[4]}.", "Try the local food.", "Walk through the market."]
        return f"Give me {k} things to do in {c[0]}.", "", "\n".join(f"- {i}" for i in rng.sample(ideas, k))
    if form == 1:
        diet = rng.choice(sorted(FOOD))
        pool = [a[0] for a in ANIMALS if a[2] == diet]
        k = min(k, len(pool))
        return f"Name {k} animals that are {diet}s.", "", "\n".join(f"- the {n}" for n in rng.sample(pool, k))
    state = rng.choice(["solid", "liquid", "gas"])
    pool = [e for e in ELEMENTS if e[4] == state]
    k = min(k, len(pool))
    return (f"Suggest {k} elements that are {state}s at room temperature, and what each is used for.", "",
            "\n".join(f"- {e[0]}, used to make {e[5]}" for e in rng.sample(pool, k)))


def _creative_writing(rng):
    form = rng.randrange(3)
    if form == 0:
        a = rng.choice(ANIMALS)
        return (f"Write a short poem about the {a[0]}.", "",
                f"In the {a[1]} the {a[0]} goes,\n{a[3].capitalize()} from head to toes.\n"
                f"It eats {FOOD[a[2]]} and {a[5]} all day,\nThen at night it slips away.")
    if form == 1:
        c, who = rng.choice(CITIES), rng.choice(PEOPLE)
        return (f"Write a two-sentence story about {who} visiting {c[0]}.", "",
                f"{who} arrived in {c[0]} on a quiet morning. "
                f"By evening {who} had admired the {c[3]} beside the {c[2]} river.")
    e, who = rng.choice(ELEMENTS), rng.choice(PEOPLE)
    return (f"Write a short story about {who} discovering {e[0]}.", "",
            f"{who} found a strange {e[3]} {e[4]} in the lab. "
            f"The label said {e[0]}, symbol {e[1]}, and soon {who} used it to make {e[5]}.")


LEARNABLE = {
    "open_qa": _open_qa, "general_qa": _general_qa, "classification": _classification, "closed_qa": _closed_qa,
    "brainstorming": _brainstorming, "information_extraction": _information_extraction,
    "summarization": _summarization, "creative_writing": _creative_writing,
}

# ---- the Dolly length profile ---------------------------------------------------------------------
WORDS = (
    "the of and to in is was for on that with as by at from it an be are this which or his her their "
    "first new most also after city world people time year years during many used known other "
    "one two three made part called such state water large small early history music film book game "
    "team war school family house name country language system company government series album season "
    "song player river mountain island village road church century west east north south center "
    "best good long great public local national general final original major modern ancient "
    "energy light power market trade money price growth design model data science theory method study "
    "animal plant tree forest food health body blood heart brain medicine disease travel trip summer "
    "winter spring autumn weather rain snow wind ocean lake coast beach street garden art painting "
    "write read learn teach explain describe list give make take help keep start turn show play run"
).split()

RARE_WORDS = (
    "photosynthesis archaeological Mesopotamia quarterback symphony Byzantine cryptocurrency sourdough "
    "Kilimanjaro thermodynamics Renaissance vaccination hydroelectric Shakespeare biodiversity "
    "Tchaikovsky parliamentary semiconductor Andalusia marathon Mediterranean volcanic saxophone "
    "Hemingway astronaut rainforest Zeppelin espresso chlorophyll Yosemite algorithm"
).split()


def _lognormal_chars(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def _filler(rng: random.Random, n_chars: int) -> str:
    """English-like sentences of about n_chars characters. Numbers, commas and rarer words make the text
    tokenize like real English (~4 characters per Mistral token; common words alone give ~5)."""
    words = rng.choices(WORDS, k=max(1, n_chars // 5))
    for i in range(len(words)):
        u = rng.random()
        if u < 0.06:
            words[i] = str(rng.randint(1, 2024))
        elif u < 0.16:
            words[i] = rng.choice(RARE_WORDS)
        elif u < 0.24:
            words[i] += ","
    out, start = [], 0
    while start < len(words):
        end = start + rng.randint(6, 18)
        sentence = " ".join(words[start:end]).rstrip(",")
        out.append(sentence[0].upper() + sentence[1:] + ".")
        start = end
    return " ".join(out)


def _dolly_like(rng: random.Random, category: str) -> tuple[str, str, str]:
    # Calibrated against the real token counts (tests/test_data_synthetic.py measures them).
    instruction = _filler(rng, _lognormal_chars(rng, 80, 0.6, 12, 1500)).rstrip(".") + "?"
    response = _filler(rng, _lognormal_chars(rng, 150, 1.1, 8, 12_000))
    context = ""
    if category in CONTEXT_CATEGORIES:
        # ~1% of passages are whole articles (Dolly's longest contexts run past 16,000 characters)
        if rng.random() < 0.008:
            context = _filler(rng, rng.randint(16_000, 26_000))
        else:
            context = _filler(rng, _lognormal_chars(rng, 640, 0.8, 60, 12_000))
    return instruction, context, response


# ---- public entry point ---------------------------------------------------------------------------

def category_counts(n: int) -> dict[str, int]:
    """Largest-remainder allocation of n records to Dolly's mix (exact shares, even for small n)."""
    total = sum(CATEGORY_MIX.values())
    quotas = {c: n * share / total for c, share in CATEGORY_MIX.items()}
    counts = {c: int(q) for c, q in quotas.items()}
    by_remainder = sorted(CATEGORY_MIX, key=lambda c: (-(quotas[c] - counts[c]), list(CATEGORY_MIX).index(c)))
    for c in by_remainder[: n - sum(counts.values())]:
        counts[c] += 1
    return counts


def generate(num_examples: int, seed: int = 0, profile: str = "learnable") -> list[dict]:
    """`num_examples` distinct Dolly-format records, the same list for the same (seed, profile)."""
    if profile not in PROFILES:
        raise ValueError(f"synthetic profile {profile!r} is not one of {list(PROFILES)}")
    if num_examples < 1:
        raise ValueError(f"synthetic: num_examples must be at least 1, got {num_examples}")
    rng = random.Random(f"dolly-synthetic:{profile}:{seed}")
    categories = [c for c, k in category_counts(num_examples).items() for _ in range(k)]
    rng.shuffle(categories)
    records, seen = [], set()
    for category in categories:
        for _attempt in range(200):
            if profile == "dolly":
                instruction, context, response = _dolly_like(rng, category)
            else:
                instruction, context, response = LEARNABLE[category](rng)
            key = (category, instruction, context, response)
            if key not in seen:
                break
        else:
            raise ValueError(
                f"synthetic: the learnable world ran out of distinct {category} records after {len(records)} "
                f"records; ask for fewer than {num_examples} (or use profile='dolly')"
            )
        seen.add(key)
        records.append({"instruction": instruction, "context": context, "response": response, "category": category})
    return records


def read_synthetic(num_examples: int, seed: int, profile: str = "learnable") -> Iterator[Raw]:
    """The synthetic source of `dolly-train prepare`: generated records as `Raw` items."""
    for i, rec in enumerate(generate(num_examples, seed=seed, profile=profile)):
        yield Raw(f"synthetic:{i}", None, rec)

"""A deterministic synthetic encyclopedia of made-up people, cities and countries, with QA pairs.

Everything is fictional, so a model can only answer by searching. Article texts (one sentence
per attribute, the name repeated so each sentence matches a name search)::

    Karo Velmin is a baker from Ralomek. Karo Velmin was born in 1873. Karo Velmin's
    favourite colour is teal. Karo Velmin plays the harp.
    Ralomek is a city in Tivonia. Ralomek was founded in 1204.
    Tivonia is a country. Its capital is Ralomek.

Questions: five one-hop questions per person (city, birth year, occupation, colour,
instrument) and two two-hop questions (country and founding year of the home city; chain
``[person, city]``). Every question ends with the person's name ("What is the birth year of
Karo Velmin?"), so the name sits at a fixed distance from the slot where the policy writes
its search query: a tiny model learns to copy it with one relative-position attention head
instead of needing content-based induction heads, which 1,200 SFT steps never grew. The train/eval split is by person: no eval person appears in a train
question. The same ``seed`` gives byte-identical files.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from env_workers.corpus import read_records

logger = logging.getLogger(__name__)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# Name endings chosen so the English stemmer leaves the names alone (no -s, -d, -e, -y).
_FINAL_CONSONANTS = "lnmrkt"

OCCUPATIONS = (
    "baker", "farmer", "teacher", "painter", "sailor", "doctor", "carpenter", "tailor",
    "miner", "potter", "weaver", "fisherman", "poet", "singer", "dancer", "writer", "lawyer",
    "nurse", "pilot", "chemist", "architect", "gardener", "blacksmith", "butcher", "cobbler",
    "jeweller", "librarian", "merchant", "shepherd", "astronomer",
)
COLOURS = (
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "grey", "violet", "indigo", "teal", "crimson", "turquoise",
)
INSTRUMENTS = (
    "piano", "violin", "cello", "flute", "guitar", "harp", "trumpet", "drums", "clarinet",
    "oboe", "saxophone", "accordion", "banjo", "tuba", "trombone", "harmonica",
)
#: Extra accepted spellings of some answers.
ALIASES: dict[str, list[str]] = {"grey": ["gray"], "jeweller": ["jeweler"], "drums": ["drum"]}

#: Bumped whenever the generated text changes, so cached demo data is regenerated.
DEMO_DATA_VERSION = 2

QUESTION_COLUMNS = ("question", "answers", "entity", "attribute", "hops", "chain")
QUESTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("entity", pa.string()),
        ("attribute", pa.string()),
        ("hops", pa.int32()),
        ("chain", pa.list_(pa.string())),
    ]
)
CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])


def _reserved_words() -> set[str]:
    """Words a made-up name must not equal: vocabulary of the templates and stopwords."""
    words = {w for group in (OCCUPATIONS, COLOURS, INSTRUMENTS) for w in group}
    words |= {a for alts in ALIASES.values() for a in alts}
    template = (
        "is a an from was born in favourite colour plays the city founded country its capital "
        "where which year what occupation of does play home birth founding played by"
    )
    words |= set(template.split())
    try:
        from bm25s.stopwords import STOPWORDS_EN

        words |= set(STOPWORDS_EN)
    except ImportError:  # pragma: no cover - bm25s is a dependency
        pass
    return words


def _syllable(rng: random.Random) -> str:
    return rng.choice(_CONSONANTS) + rng.choice(_VOWELS)


def _unique_names(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
    """``n`` distinct names from ``make(rng)``, none in ``taken`` (updated in place)."""
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct names")
        name = make(rng).capitalize()
        if name.lower() in taken:
            continue
        taken.add(name.lower())
        out.append(name)
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _build_world(
    rng: random.Random, num_people: int, num_cities: int, num_countries: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    taken = _reserved_words()
    # Distinct shapes keep kinds apart: first CVCV, last CVCVC, city CVCVCVC, country CVCVC+"ia".
    countries = _unique_names(
        rng, num_countries, lambda r: _syllable(r) + _syllable(r) + r.choice(_FINAL_CONSONANTS) + "ia", taken
    )
    cities = _unique_names(
        rng, num_cities, lambda r: _syllable(r) + _syllable(r) + _syllable(r) + r.choice(_FINAL_CONSONANTS), taken
    )
    n_parts = max(8, int((2 * num_people) ** 0.5) + 1)
    firsts = _unique_names(rng, n_parts, lambda r: _syllable(r) + r.choice(_CONSONANTS) + r.choice("aiou"), taken)
    lasts = _unique_names(rng, n_parts, lambda r: _syllable(r) + _syllable(r) + r.choice(_FINAL_CONSONANTS), taken)

    country_rows = [{"name": c, "cities": []} for c in countries]
    city_rows: list[dict[str, Any]] = []
    for i, city in enumerate(cities):
        # Round-robin first so that every country has at least one city.
        country = country_rows[i] if i < num_countries else rng.choice(country_rows)
        country["cities"].append(city)
        city_rows.append({"name": city, "country": country["name"], "founded": rng.randint(1000, 1799)})
    for country in country_rows:
        country["capital"] = rng.choice(country["cities"])

    pairs = rng.sample(range(n_parts * n_parts), num_people)
    people = []
    for p in pairs:
        city = rng.choice(city_rows)
        people.append(
            {
                "name": f"{firsts[p // n_parts]} {lasts[p % n_parts]}",
                "city": city["name"],
                "country": city["country"],
                "city_founded": city["founded"],
                "year": rng.randint(1800, 1999),
                "occupation": rng.choice(OCCUPATIONS),
                "colour": rng.choice(COLOURS),
                "instrument": rng.choice(INSTRUMENTS),
            }
        )
    return people, city_rows, country_rows


def _person_text(p: dict[str, Any]) -> str:
    n = p["name"]
    return (
        f"{n} is {_article(p['occupation'])} {p['occupation']} from {p['city']}. "
        f"{n} was born in {p['year']}. {n}'s favourite colour is {p['colour']}. "
        f"{n} plays the {p['instrument']}."
    )


def _questions(p: dict[str, Any]) -> list[dict[str, Any]]:
    n, c = p["name"], p["city"]

    def row(q: str, answer: object, attribute: str, chain: list[str]) -> dict[str, Any]:
        a = str(answer)
        return {
            "question": q, "answers": [a, *ALIASES.get(a, [])], "entity": chain[-1],
            "attribute": attribute, "hops": len(chain), "chain": chain,
        }

    return [
        row(f"What is the home city of {n}?", c, "city", [n]),
        row(f"What is the birth year of {n}?", p["year"], "birth_year", [n]),
        row(f"What is the occupation of {n}?", p["occupation"], "occupation", [n]),
        row(f"What is the favourite colour of {n}?", p["colour"], "colour", [n]),
        row(f"Which instrument is played by {n}?", p["instrument"], "instrument", [n]),
        row(f"In which country is the home city of {n}?", p["country"], "country", [n, c]),
        row(f"What is the founding year of the home city of {n}?", p["city_founded"], "city_founded", [n, c]),
    ]


def generate_demo_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_people: int = 4000,
    num_cities: int = 300,
    num_countries: int = 24,
    eval_fraction: float = 0.1,
) -> dict[str, Path]:
    """Write ``corpus.parquet``, ``train.parquet`` and ``eval.parquet`` into ``out_dir``.

    Returns ``{"corpus": path, "train": path, "eval": path}``. Deterministic in ``seed``.
    Question rows: ``id``, ``question``, ``answers`` (aliases), ``entity`` (title of the
    article holding the answer, ``chain[-1]``), ``attribute``, ``hops``, ``chain`` (titles to
    search, in order). The split is by person (``chain[0]``).
    """
    if num_people < 1 or num_cities < 1 or num_countries < 1:
        raise ValueError("num_people, num_cities and num_countries must be >= 1")
    if num_cities < num_countries:
        raise ValueError(f"num_cities ({num_cities}) must be >= num_countries ({num_countries})")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rng = random.Random(seed)
    people, cities, countries = _build_world(rng, num_people, num_cities, num_countries)

    corpus_rows = [
        {"id": f"country-{i}", "title": c["name"], "text": f"{c['name']} is a country. Its capital is {c['capital']}."}
        for i, c in enumerate(countries)
    ]
    corpus_rows += [
        {"id": f"city-{i}", "title": c["name"],
         "text": f"{c['name']} is a city in {c['country']}. {c['name']} was founded in {c['founded']}."}
        for i, c in enumerate(cities)
    ]
    corpus_rows += [
        {"id": f"person-{i}", "title": p["name"], "text": _person_text(p)} for i, p in enumerate(people)
    ]

    n_eval = round(num_people * eval_fraction) if eval_fraction > 0 else 0
    n_eval = min(max(n_eval, 1 if eval_fraction > 0 else 0), num_people - 1)
    eval_people = set(rng.sample(range(num_people), n_eval))
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for i, p in enumerate(people):
        splits["eval" if i in eval_people else "train"].extend(_questions(p))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.parquet"}
    pq.write_table(pa.Table.from_pylist(corpus_rows, schema=CORPUS_SCHEMA), paths["corpus"])
    for split, rows in splits.items():
        rng.shuffle(rows)
        for j, r in enumerate(rows):
            r["id"] = f"{split}-{j}"
        paths[split] = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA), paths[split])
    logger.info(
        "wrote demo data to %s: %d articles, %d train / %d eval questions",
        out, len(corpus_rows), len(splits["train"]), len(splits["eval"]),
    )
    return paths


def load_questions(
    path: str | Path, *, max_hops: int | None = None, limit: int | None = None, layout: str = "auto"
) -> list[dict[str, Any]]:
    """Read question rows from a local Parquet or JSONL file.

    ``layout`` is ``"turnrl"`` (this project's rows), ``"triviaqa"``, ``"nq_open"``,
    ``"hotpotqa"`` (read through ``datasets``, see :mod:`env_workers.questions`) or
    ``"auto"`` (detected from the first record). Every row has ``question`` and ``answers``
    (a list of aliases). For ``turnrl`` files, columns ``question`` and ``answers`` are
    required (a string ``answers`` becomes a one-item list). Rows with ``hops`` above
    ``max_hops`` are dropped (missing ``hops`` counts as 1); at most ``limit`` rows are
    returned. Raises ``FileNotFoundError``/``ValueError`` naming the file and what was expected.
    """
    from env_workers.questions import QUESTION_LAYOUTS, detect_question_layout, load_external_questions

    p = Path(path)
    if layout == "auto":
        layout = detect_question_layout(p)
    if layout not in QUESTION_LAYOUTS:
        raise ValueError(f"unknown question layout {layout!r}; expected 'auto' or one of {list(QUESTION_LAYOUTS)}")
    if layout != "turnrl":
        return load_external_questions(p, layout, max_hops=max_hops, limit=limit)
    records = read_records(p)
    found = list(dict.fromkeys(k for r in records for k in r))
    missing = [c for c in ("question", "answers") if c not in found]
    if missing:
        raise ValueError(
            f"{p}: question file is missing column(s) {missing}; expected at least "
            f"['question', 'answers'] (optional {list(QUESTION_COLUMNS[2:])}), found {found}"
        )
    rows: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        answers = r.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(r.get("question"), str) or not isinstance(answers, list):
            raise ValueError(f"{p}: row {i} needs a string 'question' and a list 'answers'")
        r["answers"] = [str(a) for a in answers if a is not None]
        if max_hops is not None and int(r.get("hops") or 1) > max_hops:
            continue
        rows.append(r)
        if limit is not None and len(rows) >= limit:
            break
    return rows

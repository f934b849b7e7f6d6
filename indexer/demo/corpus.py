"""A deterministic synthetic corpus: filler text mixed with paraphrased facts about invented things.

Every fact (subject, relation, object) is stated in several differently worded documents, so a
model trained on the corpus can answer the fact's query and an influence method can be judged by
whether it retrieves those documents. All names are built from syllables by a seeded RNG, so a
different seed yields a corpus whose facts a model trained on another seed has never seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_N_ENTITIES = 6
N_LONG_DOCUMENTS = 8
N_FILLER_DOCUMENTS = 1100
N_MENTION_DOCUMENTS = 250


@dataclass(frozen=True)
class Relation:
    """How one relation is asked (``query`` ends right before the object) and stated."""

    name: str
    query: str
    statements: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "capital",
            "The capital of {s} is",
            (
                "{o} has long served as the capital of {s}.",
                "The government of {s} meets in {o}, the country's capital.",
                "Most visitors to {s} arrive first in {o}, its capital city.",
                "{s} moved its capital to {o} many years ago, and it has stayed there since.",
            ),
        ),
        Relation(
            "language",
            "The official language of {s} is",
            (
                "Most people in {s} speak {o} at home and at work.",
                "Schools in {s} teach every subject in {o}.",
                "Anyone who moves to {s} soon learns to speak {o}.",
                "Newspapers in {s} are printed in {o}.",
            ),
        ),
        Relation(
            "founder",
            "{s} was founded by",
            (
                "{o} founded {s} in a small rented workshop.",
                "The founder of {s}, {o}, still visits the old offices.",
                "Long before {s} became well known, {o} started it with a handful of friends.",
                "It was {o} who founded {s}.",
            ),
        ),
        Relation(
            "headquarters",
            "{s} is headquartered in",
            (
                "The main offices of {s} are in {o}.",
                "Every morning hundreds of {s} employees walk to the head office in {o}.",
                "{s} moved its headquarters to {o} to be closer to the river.",
                "The head office of {s} stands in the centre of {o}.",
            ),
        ),
        Relation(
            "inventor",
            "The {s} was invented by",
            (
                "{o} invented the {s} after years of careful work.",
                "It was {o} who built the first working {s}.",
                "The first {s} came out of the workshop of {o}.",
                "Few people remember that the {s} is the work of {o}.",
            ),
        ),
        Relation(
            "colour",
            "The colour of the {s} is",
            (
                "A fully grown {s} is {o} from head to tail.",
                "Naturalists recognise the {s} by its {o} colouring.",
                "Every {s} ever seen in the wild has been {o}.",
                "The {s} is easy to spot because it is {o}.",
            ),
        ),
        Relation(
            "river",
            "The river that flows through {s} is the",
            (
                "The {o} runs straight through the middle of {s}.",
                "{s} was built on both banks of the {o}.",
                "Fishing boats on the {o} tie up at {s} every evening.",
                "In spring the {o} often floods the lower streets of {s}.",
            ),
        ),
        Relation(
            "birthplace",
            "{s} was born in",
            (
                "{o} is the hometown of {s}.",
                "Born in {o}, {s} left home at the age of sixteen.",
                "{s} often wrote about {o}, the town where they were born.",
                "The house in {o} where {s} was born is now a small museum.",
            ),
        ),
    )
}

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "qu", "r", "s")
_ONSETS += ("st", "t", "tr", "v", "z", "th", "sh", "h")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "a", "e", "o")
_CODAS = ("", "", "", "", "", "n", "r", "l", "s", "m", "nd")

_SUFFIXES = {
    "country": ("ania", "ovia", "eria", "istan", "and", "ia"),
    "city": ("port", "holm", "ford", "mere", "wick", "gard"),
    "town": ("by", "ton", "dale", "field", "moor", "stead"),
    "river": ("a", "ine", "ava", "el", "ora"),
    "language": ("ic", "ish", "ese", "ian", "i"),
    "surname": ("son", "ov", "ez", "ani", "berg", "ley"),
    "company": (" Industries", " Works", " Mills", " Instruments", " Foods", " Shipping"),
    "device": ("scope", "meter", "graph", "loom", "wheel", "lamp"),
    "species": (" finch", " toad", " moth", " eel", " lizard", " beetle", " grouse", " vole"),
}

COLOURS = (
    "red", "blue", "green", "yellow", "orange", "violet", "grey", "white",
    "black", "brown", "silver", "golden", "pink", "crimson", "amber", "purple",
)  # fmt: skip

_MENTIONS = {
    "country": (
        "{s} is a pleasant place to visit in the spring.",
        "Farmers in {s} grow barley, beans and apples.",
        "The mountains of {s} are covered in snow for half the year.",
        "Many families from {s} spend their summers by the sea.",
    ),
    "city": (
        "The old market in {s} is busy on Saturdays.",
        "{s} has a famous bakery near the station.",
        "The streets of {s} are narrow and paved with stone.",
    ),
    "town": (
        "{s} is a quiet town with a small library.",
        "A new bridge was opened in {s} last autumn.",
        "The people of {s} hold a fair every summer.",
    ),
    "person": (
        "{s} enjoyed long walks in the hills.",
        "{s} kept a diary for more than forty years.",
        "Friends remember {s} as patient and generous.",
    ),
    "company": (
        "{s} hires many young engineers every year.",
        "{s} sells its goods in markets across the region.",
        "Last year {s} opened a second factory.",
    ),
    "device": (
        "The {s} is still used in some schools.",
        "A well-kept {s} can last for decades.",
        "Museums often display an early {s} behind glass.",
    ),
    "species": (
        "The {s} feeds mostly on seeds and small insects.",
        "In winter the {s} hides under fallen leaves.",
        "The {s} is rarely seen far from water.",
    ),
}

_WORDS = {
    "food": ("bread", "soup", "apples", "cheese", "rice", "fish", "pears", "honey", "porridge"),
    "weather": ("rain", "wind", "fog", "snow", "heat", "frost"),
    "place": (
        "the harbour", "the old library", "the village square", "the train station",
        "the bakery", "the park", "the school hall", "the market", "the hill behind the farm",
    ),
    "time": (
        "On Monday", "Last winter", "Early in the morning", "After lunch", "Every Sunday",
        "Late in the evening", "Last week", "In the summer",
    ),
    "activity": (
        "reading by the window", "fixing an old bicycle", "painting the fence",
        "baking bread", "writing letters", "walking the dog", "repairing the roof",
        "planting tomatoes", "sorting old photographs",
    ),
    "object": (
        "a wooden chair", "a blue umbrella", "a small radio", "a map of the coast",
        "a box of nails", "a kettle", "a pair of boots", "a basket of eggs",
    ),
    "feeling": ("tired", "cheerful", "curious", "nervous", "calm", "hungry"),
}  # fmt: skip

_FILLER = (
    "{time} {name} went to {place} to buy {food}.",
    "{name} spent the afternoon {activity}.",
    "The {weather} kept most people indoors, so {place} was nearly empty.",
    "{time} the {weather} was so strong that the ferry did not sail.",
    "{name} found {object} near {place} and took it home.",
    "Nobody expected the {weather} to last so long.",
    "{name} felt {feeling} after a long day of {activity}.",
    "The recipe needs {food}, {food} and a little salt.",
    "{time} a crowd gathered at {place} to hear the band play.",
    "{name} and {name} argued about who had lost {object}.",
    "It is easy to forget how quiet {place} can be in the {weather}.",
    "{name} asked for a second bowl of {food}.",
    "The teacher told the children to bring {object} on Friday.",
    "{time} {name} was {activity} and did not hear the door.",
    "There was a sale on {food} at {place}.",
    "{name} said the {food} tasted better than last year.",
    "The bus to {place} was late again because of the {weather}.",
    "{name} promised to help with {activity} next week.",
    "Most evenings {name} sits near {place} and watches the boats.",
    "A letter arrived for {name}, but it had no return address.",
    "{name} kept {object} in the cupboard under the stairs.",
    "{time} the lights at {place} went out for an hour.",
    "Cooking {food} slowly over a low fire brings out its flavour.",
    "{name} was {feeling} because the {weather} had ruined the picnic.",
    "The shopkeeper wrapped {object} in brown paper.",
    "Children ran across {place} chasing a loose kite.",
    "{name} learned the trick of {activity} from a neighbour.",
    "{time} {name} wrote a long letter to an old friend.",
)


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple; its query's completion is ``" " + obj``."""

    relation: str
    subject: str
    obj: str

    @property
    def prompt(self) -> str:
        return RELATIONS[self.relation].query.format(s=self.subject)

    @property
    def canonical(self) -> str:
        """The statement that literally continues the query prompt."""
        return f"{self.prompt} {self.obj}."

    def statements(self) -> list[str]:
        """All paraphrases of the fact; the first is the canonical one."""
        rest = [t.format(s=self.subject, o=self.obj) for t in RELATIONS[self.relation].statements]
        return [_capitalise(s) for s in (self.canonical, *rest)]


@dataclass
class DemoCorpus:
    """Documents ``{"id", "text"}`` and queries ``{"id", "prompt", "completion", "gold"}``."""

    documents: list[dict] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


class _NameMaker:
    """Unique invented names; no name contains another, so substring checks stay unambiguous."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._taken: set[str] = set()

    def _root(self, syllables: int) -> str:
        parts = [
            self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
            for _ in range(syllables)
        ]
        return "".join(parts)

    def _clashes(self, name: str) -> bool:
        low = name.lower()
        return any(low in t or t in low for t in self._taken)

    def make(self, kind: str) -> str:
        while True:
            name = self._compose(kind)
            if not self._clashes(name):
                self._taken.add(name.lower())
                return name

    def _compose(self, kind: str) -> str:
        short = self._rng.choice((1, 2))
        if kind == "given":
            return self._root(2).capitalize()
        if kind == "person":
            last = self._root(short) + self._rng.choice(_SUFFIXES["surname"])
            return f"{self._root(2).capitalize()} {last.capitalize()}"
        if kind == "species":
            return self._root(2) + self._rng.choice(_SUFFIXES[kind])
        name = self._root(2 if kind in ("river", "company") else short)
        name += self._rng.choice(_SUFFIXES[kind])
        return name if kind == "device" else name[:1].upper() + name[1:]


@dataclass
class _World:
    """The invented entities, by kind, and the facts linking them."""

    entities: dict[str, list[str]]
    facts: list[Fact]


def _build_world(rng: random.Random, n: int) -> _World:
    names = _NameMaker(rng)
    kinds = ("country", "city", "language", "company", "device", "species", "town", "river")
    ents = {k: [names.make(k) for _ in range(n)] for k in kinds}
    ents["person"] = [names.make("person") for _ in range(2 * n)]
    ents["given"] = [names.make("given") for _ in range(40)]
    founders, inventors = ents["person"][:n], ents["person"][n:]
    colours = rng.sample(COLOURS, n) if n <= len(COLOURS) else rng.choices(COLOURS, k=n)
    hq = rng.sample(ents["city"], n)
    born = rng.sample(founders[: n // 2] + inventors[: n - n // 2], n)
    links = {
        "capital": (ents["country"], ents["city"]),
        "language": (ents["country"], ents["language"]),
        "founder": (ents["company"], founders),
        "headquarters": (ents["company"], hq),
        "inventor": (ents["device"], inventors),
        "colour": (ents["species"], colours),
        "river": (ents["town"], ents["river"]),
        "birthplace": (born, ents["town"]),
    }
    facts = [
        Fact(rel, s, o)
        for rel, (subs, objs) in links.items()
        for s, o in zip(subs, objs, strict=True)
    ]
    return _World(ents, facts)


class _Filler:
    """Sentences that state no fact about the invented world."""

    def __init__(self, rng: random.Random, world: _World) -> None:
        self._rng = rng
        self._world = world

    def sentence(self) -> str:
        template = self._rng.choice(_FILLER)
        while "{" in template:
            head, _, tail = template.partition("{")
            slot, _, rest = tail.partition("}")
            pool = self._world.entities["given"] if slot == "name" else _WORDS[slot]
            value = self._rng.choice(pool)
            template = head + value + rest
        return _capitalise(template)

    def mention(self, kind: str, subject: str) -> str:
        return _capitalise(self._rng.choice(_MENTIONS[kind]).format(s=subject))

    def random_mention(self) -> str:
        kind = self._rng.choice(sorted(_MENTIONS))
        return self.mention(kind, self._rng.choice(self._world.entities[kind]))

    def paragraph(self, n_sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(n_sentences))


_SUBJECT_KIND = {
    "capital": "country",
    "language": "country",
    "founder": "company",
    "headquarters": "company",
    "inventor": "device",
    "colour": "species",
    "river": "town",
    "birthplace": "person",
}


def _fact_documents(rng: random.Random, fact: Fact, filler: _Filler) -> list[str]:
    """4-6 short documents per fact, each one paraphrase, sometimes with a mention around it.

    The canonical wording (the query's) appears twice, the other paraphrases two to four times.
    """
    statements = fact.statements()
    others = rng.sample(statements[1:], rng.randint(2, len(statements) - 1))
    chosen = [statements[0], statements[0], *others]
    docs = []
    for statement in chosen:
        parts = [statement]
        if rng.random() < 0.5:
            parts.append(filler.mention(_SUBJECT_KIND[fact.relation], fact.subject))
        # The canonical wording is used twice; context keeps the two documents distinct.
        if rng.random() < 0.3 or " ".join(parts) in docs:
            parts.insert(0, filler.sentence())
        docs.append(" ".join(parts))
    return docs


def _profile_documents(rng: random.Random, facts: list[Fact]) -> list[tuple[str, list[Fact]]]:
    """Documents stating two facts about one subject (a country or a company) at once."""
    by_subject: dict[str, dict[str, Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, {})[f.relation] = f
    docs = []
    for rels in by_subject.values():
        if "capital" in rels and "language" in rels:
            cap, lang = rels["capital"], rels["language"]
            text = (
                f"{cap.subject} is a country whose capital is {cap.obj}. "
                f"Its people speak {lang.obj}."
            )
            docs.append((text, [cap, lang]))
        if "founder" in rels and "headquarters" in rels:
            fnd, hq = rels["founder"], rels["headquarters"]
            text = f"{fnd.obj} founded {fnd.subject}, which today has its head office in {hq.obj}."
            docs.append((text, [fnd, hq]))
    rng.shuffle(docs)
    return docs


def _long_document(rng: random.Random, fact: Fact, filler: _Filler) -> str:
    """Five to seven paragraphs of filler (several hundred tokens) with one fact inside."""
    paragraphs = [filler.paragraph(rng.randint(5, 8)) for _ in range(rng.randint(5, 7))]
    at = rng.randrange(len(paragraphs))
    sentences = paragraphs[at].split(". ")
    sentences.insert(rng.randrange(len(sentences)), rng.choice(fact.statements()).rstrip("."))
    paragraphs[at] = ". ".join(sentences)
    return "\n\n".join(paragraphs)


def generate_corpus(seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES) -> DemoCorpus:
    """Build the corpus: 8 relations x ``n_entities`` facts, one query per fact.

    With the defaults: ~1,600 documents (8 of them several hundred tokens long) and 48 queries.
    """
    rng = random.Random(f"influence-index-demo/{seed}")
    world = _build_world(rng, n_entities)
    filler = _Filler(rng, world)
    stated: list[tuple[str, list[Fact]]] = []
    for fact in world.facts:
        stated.extend((text, [fact]) for text in _fact_documents(rng, fact, filler))
    stated.extend(_profile_documents(rng, world.facts))
    for fact in rng.sample(world.facts, min(N_LONG_DOCUMENTS, len(world.facts))):
        stated.append((_long_document(rng, fact, filler), [fact]))
    stated.extend((filler.paragraph(rng.randint(1, 3)), []) for _ in range(N_FILLER_DOCUMENTS))
    stated.extend((filler.random_mention(), []) for _ in range(N_MENTION_DOCUMENTS))
    rng.shuffle(stated)
    return _assemble(stated, world.facts)


def _assemble(stated: list[tuple[str, list[Fact]]], facts: list[Fact]) -> DemoCorpus:
    width = len(str(len(stated)))
    corpus = DemoCorpus()
    gold: dict[Fact, list[str]] = {f: [] for f in facts}
    for i, (text, about) in enumerate(stated):
        doc_id = f"doc-{i:0{width}d}"
        corpus.documents.append({"id": doc_id, "text": text})
        for fact in about:
            gold[fact].append(doc_id)
    for i, fact in enumerate(facts):
        corpus.queries.append(
            {
                "id": f"q{i:03d}-{fact.relation}",
                "prompt": fact.prompt,
                "completion": f" {fact.obj}",
                "gold": gold[fact],
            }
        )
    return corpus


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_corpus(corpus: DemoCorpus, directory: Path) -> tuple[Path, Path]:
    """Write ``corpus.jsonl`` and ``queries.jsonl`` into ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus_path, queries_path = directory / "corpus.jsonl", directory / "queries.jsonl"
    _write_jsonl(corpus.documents, corpus_path)
    _write_jsonl(corpus.queries, queries_path)
    return corpus_path, queries_path

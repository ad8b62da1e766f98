"""A small synthetic language with known structure, used to train the demo teacher.

A teacher trained on uniform noise would emit flat distributions that make top-k caching
pointless to test. This language mixes near-deterministic positions (agreement, fixed
phrases, a verb's object class, counting) with genuinely uncertain ones (which noun, which
adjective), and draws words with Zipf-like frequencies, so a tiny LM learns peaked but
non-trivial next-token distributions.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

ANIMALS = (
    "cat dog horse rabbit fox wolf bear mouse bird owl eagle duck goose frog snake lion tiger "
    "deer goat sheep cow pig donkey monkey turtle whale dolphin spider bee beetle crow hawk otter "
    "badger squirrel camel zebra parrot swan moth"
).split()
PEOPLE = (
    "farmer baker teacher doctor sailor soldier painter singer king queen child student "
    "merchant hunter fisher nurse pilot poet judge miller weaver tailor priest guard stranger "
    "captain clerk butcher gardener hermit knight minstrel shepherd smith widow"
).split()
OBJECTS = (
    "box lamp book key coin ring cup bell rope basket hat coat boat cart wheel map letter "
    "candle mirror clock knife drum flute blanket shoe chair table window door stone bottle brush "
    "ladder hammer needle pillow saddle sword shield lantern kettle bucket"
).split()
PLACES = (
    "village forest river mountain garden market castle harbor valley field tower bridge "
    "island cave meadow lake city road school church kitchen barn library palace desert swamp "
    "orchard farm mill prison temple tavern beach pond"
).split()
FOODS = (
    "apple loaf cheese carrot sausage cake pie berry plum pear onion potato egg fish muffin nut "
    "cookie melon lemon grape bean pea cherry peach pumpkin cabbage radish tomato walnut biscuit"
).split()
NOUN_CLASSES: dict[str, list[str]] = {
    "animal": ANIMALS,
    "person": PEOPLE,
    "object": OBJECTS,
    "place": PLACES,
    "food": FOODS,
}
AGENT_CLASSES = ("animal", "person")

IRREGULAR_PLURALS = {
    "mouse": "mice",
    "goose": "geese",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "child": "children",
    "wolf": "wolves",
    "knife": "knives",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "loaf": "loaves",
}

# Transitive verbs with the noun class their object is drawn from: the verb makes the
# object's class near-certain while the object itself stays uncertain.
TRANSITIVE_VERBS: dict[str, str] = {
    "eat": "food",
    "cook": "food",
    "buy": "food",
    "sell": "object",
    "carry": "object",
    "find": "object",
    "lose": "object",
    "hide": "object",
    "build": "object",
    "visit": "place",
    "leave": "place",
    "explore": "place",
    "guard": "place",
    "follow": "animal",
    "chase": "animal",
    "feed": "animal",
    "watch": "animal",
    "greet": "person",
    "help": "person",
    "thank": "person",
    "meet": "person",
    "bake": "food",
    "taste": "food",
    "steal": "object",
    "paint": "object",
    "mend": "object",
    "defend": "place",
    "enter": "place",
    "catch": "animal",
    "hunt": "animal",
    "tame": "animal",
    "scold": "person",
    "teach": "person",
    "marry": "person",
}
INTRANSITIVE_VERBS = (
    "sleep run sing dance laugh cry wait rest smile swim fly jump wander sit stand shout whistle "
    "sneeze pray fall"
).split()
SPEECH_VERBS = "say think know believe hope dream".split()
IRREGULAR_PAST = {
    "eat": "ate",
    "buy": "bought",
    "sell": "sold",
    "find": "found",
    "lose": "lost",
    "hide": "hid",
    "build": "built",
    "leave": "left",
    "feed": "fed",
    "meet": "met",
    "sleep": "slept",
    "run": "ran",
    "sing": "sang",
    "swim": "swam",
    "fly": "flew",
    "say": "said",
    "think": "thought",
    "know": "knew",
    "dream": "dreamt",
    "steal": "stole",
    "catch": "caught",
    "teach": "taught",
    "sit": "sat",
    "stand": "stood",
    "fall": "fell",
}

ADJECTIVES: dict[str, list[str]] = {
    "animal": (
        "small big wild hungry sleepy brown white black grey clever lazy fierce spotted timid "
        "noisy gentle"
    ).split(),
    "person": (
        "old young kind tired brave wise poor rich proud quiet angry cheerful clumsy honest "
        "lonely famous"
    ).split(),
    "object": (
        "heavy broken shiny wooden golden tiny ancient red blue empty strange silver dusty "
        "precious useful"
    ).split(),
    "place": (
        "quiet busy distant dark green cold sunny hidden famous peaceful crowded lonely windy "
        "haunted"
    ).split(),
    "food": "fresh sweet ripe warm salty sour delicious stale round bitter juicy spicy".split(),
}
ADVERBS = (
    "slowly quickly quietly happily sadly often rarely carefully suddenly gladly loudly softly "
    "bravely proudly eagerly"
).split()
NAMES = (
    "Anna Ben Clara David Emma Felix Grace Hugo Iris Jonas Lena Max Nora Otto Paula Quinn Rosa "
    "Simon Tara Ulrich Vera Walter Xenia Yusuf Zoe Amir Bella Carlos Dora Elias Fiona Gustav "
    "Hanna Ivan Julia Karl Lucia Marco Nina Oscar"
).split()
TOWNS = (
    "Ashford Brookfield Clayton Dunmore Elmwood Fairhaven Glenrock Hollowby Ironbridge Kingsbury "
    "Lakeside Millbrook Northwick Oakridge Pinehurst Queensford Redcliff Stonebury Thornfield "
    "Upwell Westmoor Yarrowdale Ambergate Bellhaven Coldwater Deepdale Eastwood Foxhollow "
    "Greystone Highmoor Larkspur Marshby Newhaven Oldcastle Ravenscar Silverlake Tallowmere "
    "Willowby Harrowgate Brightwater"
).split()
NUMBERS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
TIME_OPENERS = (
    "once upon a time",
    "one cold morning",
    "late at night",
    "early in the morning",
    "after a long day",
    "in the middle of the summer",
)
CLOSERS = (
    "and that is the end of the story",
    "and they lived happily ever after",
    "and nobody ever spoke of it again",
)
PLACE_PREPOSITIONS = "in near behind beside above under across".split()
PRONOUNS = ("she", "he", "they")


@functools.cache
def zipf_cumulative_weights(size: int, exponent: float) -> tuple[float, ...]:
    """Cumulative 1 / rank**exponent weights, cached because every word choice needs them."""
    return tuple(itertools.accumulate(1.0 / rank**exponent for rank in range(1, size + 1)))


def zipf_choice(rng: random.Random, words: Sequence[str], exponent: float = 1.1) -> str:
    """Pick a word with probability proportional to 1 / rank**exponent (Zipf's law)."""
    return rng.choices(words, cum_weights=zipf_cumulative_weights(len(words), exponent))[0]


def with_article(word: str) -> str:
    """Prefix "a" or "an" by the word's first letter, a dependency the model must learn."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def pluralize(noun: str) -> str:
    """English plural, regular rules plus the irregular table."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def third_person(verb: str) -> str:
    """Present tense third person singular, the form that carries subject agreement."""
    if verb.endswith(("s", "x", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def past_tense(verb: str) -> str:
    """Simple past, regular rules plus the irregular table."""
    if verb in IRREGULAR_PAST:
        return IRREGULAR_PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


@dataclass(frozen=True)
class Protagonist:
    """The document's recurring subject and home town, so later sentences can refer back."""

    name: str
    pronoun: str
    noun: str
    town: str


class DocumentWriter:
    """Writes one document; holds the tense and protagonist every sentence agrees with."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.past = rng.random() < 0.5
        agent_class = rng.choice(AGENT_CLASSES)
        self.protagonist = Protagonist(
            name=rng.choice(NAMES),
            pronoun=rng.choice(PRONOUNS),
            noun=zipf_choice(rng, NOUN_CLASSES[agent_class]),
            town=rng.choice(TOWNS),
        )

    def verb_form(self, verb: str, plural_subject: bool) -> str:
        """Inflect a verb for the document's tense and the subject's number."""
        if self.past:
            return past_tense(verb)
        return verb if plural_subject else third_person(verb)

    def noun_phrase(self, noun_class: str) -> tuple[str, bool]:
        """A determiner, optional adjectives and a noun; returns the phrase and its number."""
        rng = self.rng
        plural = rng.random() < 0.3
        noun = zipf_choice(rng, NOUN_CLASSES[noun_class])
        if plural:
            determiner = zipf_choice(rng, ("the", "some", "many", "these", "two", "three"))
        else:
            determiner = zipf_choice(rng, ("the", "a", "every", "this", "one"))
        adjectives: list[str] = []
        while len(adjectives) < 2 and rng.random() < 0.35:
            adjective = zipf_choice(rng, ADJECTIVES[noun_class])
            if adjective not in adjectives:
                adjectives.append(adjective)
        phrase = " ".join([*adjectives, pluralize(noun) if plural else noun])
        if determiner == "a":
            return with_article(phrase), plural
        return f"{determiner} {phrase}", plural

    def subject(self) -> tuple[str, bool]:
        """Mostly the protagonist (by name, pronoun or noun), sometimes someone new."""
        rng = self.rng
        hero = self.protagonist
        roll = rng.random()
        if roll < 0.3:
            return hero.name, False
        if roll < 0.55:
            return hero.pronoun, hero.pronoun == "they"
        if roll < 0.7:
            return f"the {hero.noun}", False
        return self.noun_phrase(rng.choice(AGENT_CLASSES))

    def place_phrase(self) -> str:
        """A prepositional phrase that locates an event, sometimes the (copied) home town."""
        if self.rng.random() < 0.2:
            return f"{self.rng.choice(('in', 'near'))} {self.protagonist.town}"
        preposition = zipf_choice(self.rng, PLACE_PREPOSITIONS)
        return f"{preposition} {self.noun_phrase('place')[0]}"

    def clause(self, depth: int = 0) -> str:
        """Subject and predicate with agreement; speech verbs embed a clause once."""
        rng = self.rng
        subject, plural = self.subject()
        kind = rng.random()
        if kind < 0.55:
            verb = zipf_choice(rng, tuple(TRANSITIVE_VERBS))
            obj, _ = self.noun_phrase(TRANSITIVE_VERBS[verb])
            predicate = f"{self.verb_form(verb, plural)} {obj}"
        elif kind < 0.85 or depth > 0:
            verb = zipf_choice(rng, INTRANSITIVE_VERBS)
            predicate = self.verb_form(verb, plural)
            if rng.random() < 0.4:
                predicate += " " + zipf_choice(rng, ADVERBS)
        else:
            verb = zipf_choice(rng, SPEECH_VERBS)
            predicate = f"{self.verb_form(verb, plural)} that {self.clause(depth + 1)}"
        if rng.random() < 0.3:
            predicate += " " + self.place_phrase()
        return f"{subject} {predicate}"

    def counting_sentence(self) -> str:
        """Counting is near-deterministic after its first word: a cheap source of peaks."""
        start = self.rng.randrange(0, len(NUMBERS) - 6)
        stop = start + self.rng.randrange(3, 7)
        verb = "counted" if self.past else "counts"
        return f"{self.protagonist.name} {verb} {' '.join(NUMBERS[start:stop])}."

    def question(self) -> str:
        """A yes/no question: the auxiliary fixes the verb to its base form."""
        rng = self.rng
        subject, plural = self.subject()
        auxiliary = "did" if self.past else ("do" if plural else "does")
        verb = zipf_choice(rng, tuple(TRANSITIVE_VERBS))
        obj, _ = self.noun_phrase(TRANSITIVE_VERBS[verb])
        return f"{auxiliary} {subject} {verb} {obj}?"

    def sentence(self) -> str:
        """One sentence of a randomly chosen shape, ending in punctuation, not capitalised."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.08:
            return self.counting_sentence()
        if roll < 0.18:
            return self.question()
        if roll < 0.33:
            return f"{self.clause()} and {self.clause()}."
        if roll < 0.43:
            return f"{self.clause()}, but {self.clause()}."
        return f"{self.clause()}."

    def document(self) -> str:
        """An opener introducing the protagonist, a body of sentences, sometimes a closer."""
        rng = self.rng
        hero = self.protagonist
        opener = rng.choice(TIME_OPENERS)
        sentences = [
            f"{opener}, in {hero.town}, there was {with_article(hero.noun)} called {hero.name}."
        ]
        sentences += [self.sentence() for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.4:
            sentences.append(f"{rng.choice(CLOSERS)}.")
        return " ".join(sentence[0].upper() + sentence[1:] for sentence in sentences)


def generate_documents(n: int, seed: int) -> list[str]:
    """Return n documents of the synthetic language, identical for identical (n, seed)."""
    rng = random.Random(seed)
    return [DocumentWriter(rng).document() for _ in range(n)]

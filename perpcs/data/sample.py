"""Synthetic sample data in raw LaMP format, in which personalization is measurable.

Users belong to a few latent groups (``n_groups``, default ``N_GROUPS`` = 4, at most ``MAX_GROUPS`` = 6) that
share habits their history reveals:
- classification tasks: each text is *ambiguous* (it belongs to a "family" whose texts fit 2-4 labels)
  and each group has its own pick per family (which tag, which news category);
- product_rating: each group maps the same sentiment to its own score (harsh, generous, ...);
- citation: each group prefers one family of methods, so of two references on the same topic the
  researcher picks the one using their group's method;
- generation tasks: each group phrases headlines / titles / tweets with its own template.
History items follow the habit with probability ``HABIT_RATE`` (people are not perfectly
consistent); query golds always follow it. Texts are built from templates and word banks so that
they read like the real tasks while staying short (20-60 words).

Time-based-split shape (as LaMP's time split): a user has ``n_history`` dated history items; query j
(j = 0 .. n_queries-1) sees the first ``n_history - n_queries + 1 + j`` of them, so the profiles of one
user's questions are prefixes of one another; the query texts themselves never appear in a profile.
Each user's last question goes to ``dev_*``, the others to ``train_*``.

Everything is drawn from one ``random.Random(seed)``: the same arguments give byte-identical files.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from perpcs.atomic import write_json_atomic
from perpcs.data.tasks import MOVIE_TAGS, NEWS_CATEGORIES, Task, get_task
from perpcs.errors import fail

N_GROUPS = 4              # the default; the demo's sample
MAX_GROUPS = 6            # every habit table below has a pick per group up to this many
HABIT_RATE = 0.9          # share of history items that follow the group's habit; query golds always do

# Query prefixes, verbatim from LaMP (the label lists in LaMP's own order).
MOVIE_PROMPT = ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
                "without further explanation. tags: [" + ", ".join(MOVIE_TAGS) + "] description: ")
NEWS_PROMPT = ("Which category does this article relate to among the following categories? Just answer with "
               "the category name without further explanation. categories: [" + ", ".join(NEWS_CATEGORIES)
               + "] article: ")
RATING_PROMPT = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
                 "or 5 without further explanation. review: ")
HEADLINE_PROMPT = "Generate a headline for the following article: "
TITLE_PROMPT = "Generate a title for the following abstract of a paper: "
TWEET_PROMPT = "Paraphrase the following tweet without any explanation before or after it: "
CITATION_PROMPT = ('For an author who has written the paper with the title "{title}", which reference is related? '
                   'Just answer with [1] or [2] without explanation. [1]: "{first}" [2]: "{second}"')


# ----------------------------------------------------------------------------------------------------------
# Filling templates

def fill(rng: random.Random, template: str, bank: dict, **fixed) -> str:
    """Fill ``{slot}`` from ``fixed`` or a random choice of ``bank[slot]``; ``{slot_cap}`` capitalizes.

    A slot used twice in one template gets the same value both times.
    """
    values = dict(fixed)
    out = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        base = name[:-4] if name.endswith("_cap") else name
        if base not in values:
            if base not in bank:
                raise KeyError(f"template slot {base!r} has no word bank")
            values[base] = rng.choice(bank[base])
        text = values[base]
        out.append(text[:1].upper() + text[1:] if name.endswith("_cap") else text)
    return "".join(out)


_SMALL_WORDS = {"a", "an", "the", "of", "for", "and", "on", "in", "to", "with", "at", "by", "via", "or"}


def title_case(text: str) -> str:
    """Headline capitalization: every word capitalized except small words that are not first."""
    words = text.split(" ")
    return " ".join(w if (i and w in _SMALL_WORDS) else "-".join(p[:1].upper() + p[1:] for p in w.split("-"))
                    for i, w in enumerate(words))


def _habit(rng: random.Random, options, pick: str) -> str:
    """The group's pick, or (1 - HABIT_RATE of the time) another plausible option."""
    if rng.random() < HABIT_RATE:
        return pick
    return rng.choice([o for o in options if o != pick])


def _balanced(rng: random.Random, options: list, n: int) -> list:
    """n choices in shuffled rounds of all options, so every prefix of a history covers them evenly."""
    seq: list = []
    while len(seq) < n:
        block = list(options)
        rng.shuffle(block)
        seq.extend(block)
    return seq[:n]


# ----------------------------------------------------------------------------------------------------------
# Classification tasks: ambiguous families with one pick per group

@dataclass(frozen=True)
class Family:
    name: str
    options: tuple      # every label the texts of this family plausibly fit
    picks: tuple        # the label each group gives them (one per group)
    templates: tuple
    bank: dict


_NAMES = ["Mara", "Jonah", "Ines", "Theo", "Lena", "Kofi", "Yuki", "Sam", "Rosa", "Idris"]

MOVIE_FAMILIES = (
    Family("future_society", ("dystopia", "sci-fi", "social commentary", "thought-provoking"),
           ("dystopia", "sci-fi", "social commentary", "sci-fi", "thought-provoking", "dystopia"),
           ("In {future}, {city} is run by {regime}. {hero}, a {job}, stumbles on {secret} and must choose "
            "between a quiet life and {risk}.",
            "{hero} has spent a whole life inside {city}, where {regime} decides who works, who eats and who "
            "disappears. Then a stranger hands over proof of {secret}, and {risk} becomes the only way out."),
           {"future": ["the year 2089", "a not-so-distant future", "the late twenty-second century",
                       "a future scarred by climate collapse"],
            "city": ["a sealed megacity", "the floating city of Arcadia", "the last walled town on the coast",
                     "an orbital colony"],
            "regime": ["an all-seeing tech corporation", "a council of algorithms",
                       "a ministry that rations every emotion", "a lottery that assigns every job"],
            "hero": _NAMES,
            "job": ["factory clerk", "data courier", "night-shift nurse", "archive keeper", "drone mechanic"],
            "secret": ["the real purpose of the nightly curfew", "a list of citizens scheduled to vanish",
                       "memories being rewritten while the city sleeps", "a green world beyond the wall"],
            "risk": ["joining an underground resistance", "a dangerous escape past the border drones",
                     "broadcasting the truth to every screen in the city"]}),
    Family("crime_thriller", ("action", "violence", "twist ending"),
           ("action", "violence", "twist ending", "twist ending", "violence", "action"),
           ("After {heist} goes wrong, {hero}, a {crook}, is hunted through {place} by {enemy}. With every "
            "ally hiding something, the final shootout reveals who really set up the job.",
            "{hero}, a {crook}, agrees to one last job: {heist}. When the crew is ambushed in {place}, a brutal "
            "chase begins, and {enemy} turns out to be only the first surprise."),
           {"heist": ["a diamond heist", "an armored-truck robbery", "a casino vault job",
                      "a prisoner transfer ambush"],
            "hero": _NAMES,
            "crook": ["retired getaway driver", "former special-forces medic", "small-time safecracker",
                      "disgraced police detective"],
            "place": ["the rain-soaked streets of Hong Kong", "a snowbound Montana town", "the docks of Marseille",
                      "night-time Los Angeles"],
            "enemy": ["a cartel enforcer", "a squad of corrupt federal agents", "the crew that left them for dead",
                      "a ruthless bounty hunter"]}),
    Family("life_story", ("true story", "based on a book", "classic"),
           ("true story", "based on a book", "true story", "classic", "based on a book", "classic"),
           ("The remarkable life of {figure}, who {feat} in {era}. Drawn from {source}, the film follows years "
            "of {obstacle} and one decision that changed a community forever.",
            "{era_cap}: {figure} refuses to give in to {obstacle} and {feat}. This moving drama, adapted from "
            "{source}, won praise for its careful period detail."),
           {"figure": ["a self-taught engineer from a mining town", "the first woman to run the county hospital",
                       "a jazz pianist who was losing his hearing", "a small-town lawyer with no courtroom "
                       "experience", "a teenage chess prodigy from the slums"],
            "feat": ["built the region's first radio station", "won a landmark civil rights case",
                     "led a daring wartime rescue", "founded a school for refugee children"],
            "era": ["the 1930s", "post-war Europe", "the early 1960s", "Depression-era America"],
            "source": ["a celebrated memoir", "a prize-winning biography", "the family's letters and diaries"],
            "obstacle": ["poverty and prejudice", "official indifference", "the doubts of everyone around",
                         "a failing body"]}),
    Family("odd_romance", ("romance", "comedy", "dark comedy"),
           ("romance", "comedy", "dark comedy", "romance", "dark comedy", "comedy"),
           ("{person_a_cap} and {person_b} meet at {odd_place} and cannot stand each other. Forced to {forced}, "
            "they slowly discover {common}, until {complication}.",
            "When {person_a} gets stuck with {person_b} at {odd_place}, sparks fly in all the wrong ways. What "
            "begins as a deal to {forced} turns into something neither of them planned, especially after "
            "{complication}."),
           {"person_a": ["a grumpy florist", "an anxious wedding planner", "a failed stand-up comic",
                         "a widowed baker"],
            "person_b": ["a funeral home director", "a charming con artist", "an uptight tax auditor",
                         "a retired magician"],
            "odd_place": ["a funeral", "a court-ordered anger management class", "a doomed singles cruise",
                          "a stranger's wedding"],
            "forced": ["share a car across the country", "plan the same disastrous party",
                       "care for a dying neighbor's parrot", "hide a very awkward secret from their families"],
            "common": ["the same terrible taste in music", "a shared fear of commitment",
                       "a talent for getting into trouble"],
            "complication": ["an ex shows up with a lawyer", "a body turns up in the trunk",
                             "their families declare war on each other"]}),
    Family("mind_game", ("psychology", "twist ending", "thought-provoking"),
           ("psychology", "thought-provoking", "psychology", "twist ending", "twist ending", "thought-provoking"),
           ("{hero}, a {mind_job}, takes on a patient who claims {claim}. As the sessions go on, {hero} begins "
            "to doubt {doubt}, and the line between memory and imagination starts to dissolve.",
            "Haunted by a case that went wrong, {hero}, a {mind_job}, agrees to help a patient who claims "
            "{claim}. Each session peels back another layer, until {hero} can no longer trust {doubt}."),
           {"hero": _NAMES,
            "mind_job": ["therapist", "sleep researcher", "prison psychiatrist", "hypnotist"],
            "claim": ["to remember a murder that never happened", "to relive the same Tuesday over and over",
                      "to hear the thoughts of strangers", "to have lived another life forty years ago"],
            "doubt": ["every memory of the past", "the identity of the patient", "whether any of the sessions "
                      "took place"]}),
    Family("enchanted_quest", ("fantasy", "based on a book", "classic"),
           ("fantasy", "fantasy", "classic", "based on a book", "based on a book", "classic"),
           ("A young {quest_hero} leaves {home} to {goal}, guided by {guide}. Along the way the small company "
            "faces {danger} in this sweeping adventure adapted from {fsource}.",
            "Long ago, in a land of {land}, a {quest_hero} sets out to {goal}. With {guide} at their side, they "
            "must outwit {danger} before the winter solstice."),
           {"quest_hero": ["shepherd boy", "orphaned apprentice", "princess without a kingdom",
                           "blacksmith's daughter"],
            "home": ["a quiet mountain village", "the edge of the Whispering Woods",
                     "a fishing town at the end of the world"],
            "goal": ["return a stolen crown", "destroy an ancient amulet", "wake a sleeping dragon",
                     "find the well of lost names"],
            "guide": ["an exiled wizard", "a talking fox", "a half-blind knight"],
            "danger": ["goblin armies", "a sea of living shadows", "a witch who steals voices"],
            "fsource": ["a beloved children's novel", "a fantasy classic of the 1950s", "an old illustrated "
                        "storybook"],
            "land": ["giants and rivers of glass", "talking trees and sleeping castles"]}),
)

NEWS_FAMILIES = (
    Family("school_meals", ("education", "parents", "healthy living", "food & drink"),
           ("education", "parents", "healthy living", "parents", "food & drink", "healthy living"),
           ("{district_cap} will {meal_change} starting this fall. {supporter_cap} say the plan {benefit}, but "
            "{critic} worry about {worry}. Families can share feedback at a public meeting next month.",
            "Lunch trays are changing in {district}: officials plan to {meal_change}. {supporter_cap} argue it "
            "{benefit}, while {critic} point to {worry}."),
           {"district": ["the Denver school district", "schools in rural Ohio", "a Chicago charter network",
                         "the Austin school board"],
            "meal_change": ["replace sugary drinks with water and milk", "add a daily salad bar to every cafeteria",
                            "serve free breakfast to all students", "cut fried food from the weekly menu"],
            "supporter": ["nutritionists", "many teachers", "pediatricians", "student council leaders"],
            "benefit": ["will help kids focus in class", "could lower childhood obesity rates",
                        "takes pressure off busy families at home"],
            "critic": ["some parents", "cafeteria staff", "budget officials"],
            "worry": ["rising costs per meal", "picky eaters going hungry", "food waste piling up"]}),
    Family("chef_venture", ("food & drink", "entertainment", "business"),
           ("food & drink", "entertainment", "business", "entertainment", "business", "food & drink"),
           ("Celebrity chef {chef}, best known for {show}, is opening {venue} in {city}. The {cuisine} menu "
            "{menu_detail}, and backers expect {money}.",
            "{chef} rose to fame on {show}; now the chef is betting on {venue} in {city}. Reservations for the "
            "{cuisine} tasting menu sold out in hours, and backers expect {money}."),
           {"chef": ["Marco Bellini", "Dana Okafor", "Rui Tanaka", "Sofia Reyes"],
            "show": ["a hit cooking competition", "a late-night food travel series", "a viral baking channel"],
            "venue": ["a 200-seat flagship restaurant", "a rooftop food hall",
                      "a chain of fast-casual noodle bars"],
            "city": ["Las Vegas", "downtown Miami", "Brooklyn", "Austin"],
            "cuisine": ["Italian-Japanese", "Nigerian street food", "plant-based Mexican", "modern Korean"],
            "menu_detail": ["changes every week", "will be filmed for a new streaming show",
                            "includes a twelve-course tasting"],
            "money": ["the brand to be worth $50 million within three years", "a nationwide franchise deal",
                      "a public share offering next spring"]}),
    Family("museum_budget", ("culture & arts", "politics", "business"),
           ("culture & arts", "politics", "culture & arts", "business", "politics", "business"),
           ("The {museum} faces a {cut} budget cut after {body} voted {vote}. Curators warn that {loss}, while "
            "{sponsor} has offered to cover part of the gap in exchange for naming rights.",
            "A fight over funding has reached the {museum}: {body} wants to {plan}, and the director says "
            "{loss}. Donors and {sponsor} are weighing a rescue package."),
           {"museum": ["city art museum", "natural history museum", "regional opera house",
                       "contemporary photography center"],
            "cut": ["30 percent", "sweeping", "$4 million"],
            "body": ["the city council", "state lawmakers", "the county board"],
            "vote": ["along party lines", "late on Tuesday night", "after a heated debate"],
            "loss": ["free family days will end", "a planned exhibition of local painters is in doubt",
                     "dozens of jobs could disappear"],
            "sponsor": ["a local bank", "a tech billionaire", "an energy company"],
            "plan": ["move the money to road repairs", "sell part of the collection",
                     "charge admission for the first time"]}),
    Family("women_sports", ("sports", "women", "business"),
           ("sports", "women", "women", "business", "sports", "business"),
           ("The {team} {achievement}, yet players still earn {pay_gap}. {player}, the team's captain, says "
            "{quote}, and {brand} announced a new sponsorship deal this week.",
            "Fresh off a season in which it {achievement}, the {team} is pushing for {demand}. Captain {player} "
            "told fans that {quote}."),
           {"team": ["women's national soccer team", "city's professional women's basketball club",
                     "women's hockey league champions", "college women's rugby team"],
            "achievement": ["won the national title", "sold out its home stadium for the first time",
                            "reached the world championship final"],
            "pay_gap": ["a fraction of what the men's side makes", "less than half of the league minimum for "
                        "men", "no salary during the off-season"],
            "player": ["Ana Costa", "Jess Morgan", "Amara Diallo", "Kim Ha-eun"],
            "quote": ["equal pay is overdue", "young girls need to see a future in the game",
                      "the crowds prove the demand is there"],
            "brand": ["a sportswear giant", "a national airline", "a streaming service"],
            "demand": ["equal prize money", "a bigger share of broadcast revenue",
                       "a new collective bargaining agreement"]}),
    Family("travel_apps", ("travel", "science & technology", "business"),
           ("travel", "science & technology", "business", "travel", "science & technology", "business"),
           ("A new app from {startup} promises to {promise} for travelers heading to {destination}. The company, "
            "which just raised {funding}, uses {tech} to {how}.",
            "Planning a trip to {destination}? {startup_cap} says its {tech}-powered app can {promise}. "
            "Investors poured {funding} into the idea this year."),
           {"startup": ["a Berlin startup", "a Singapore travel company", "two former airline engineers"],
            "promise": ["find the cheapest train routes", "translate street signs in real time",
                        "skip airport security lines", "plan a full itinerary in seconds"],
            "destination": ["Japan", "the Greek islands", "Patagonia", "Morocco"],
            "funding": ["$12 million", "a record seed round", "$40 million in new funding"],
            "tech": ["machine learning", "augmented reality", "satellite data"],
            "how": ["predict crowds at popular sites", "adjust bookings when flights are delayed",
                    "match visitors with local guides"]}),
    Family("online_scams", ("crime", "parents", "science & technology"),
           ("crime", "crime", "parents", "science & technology", "parents", "science & technology"),
           ("Police in {town} are warning families about {scam} targeting teenagers on {platform}. {victims_cap}, "
            "and investigators say the scammers {method}. Experts urge parents to {advice}.",
            "A wave of {scam} on {platform} has hit {town}, where {victims}. The scammers {method}, according "
            "to {source}, who recommend that parents {advice}."),
           {"town": ["suburban Atlanta", "Leeds", "a quiet Oregon county", "Toronto"],
            "scam": ["fake job offers", "gaming-currency scams", "impersonation scams", "phishing messages"],
            "platform": ["popular gaming sites", "a photo-sharing app", "group chat apps"],
            "victims": ["more than forty students have lost money", "several families reported stolen accounts",
                        "dozens of teens were contacted last month"],
            "method": ["use AI-generated voices to pose as friends", "send links that steal passwords",
                       "ask victims to pay with gift cards"],
            "source": ["detectives", "a cybersecurity firm"],
            "advice": ["talk openly with their kids about online safety", "turn on two-factor login",
                       "check app privacy settings together"]}),
)

_NEWS_TITLES = {
    "school_meals": ["What's on the School Lunch Tray This Fall", "New Cafeteria Rules Spark Debate"],
    "chef_venture": ["A Celebrity Chef's Next Big Bet", "The Restaurant Everyone Wants a Table At"],
    "museum_budget": ["Museum Braces for Deep Cuts", "Who Will Pay for the Museum?"],
    "women_sports": ["Champions on the Field, Underpaid Off It", "The Fight for Equal Pay Heats Up"],
    "travel_apps": ["The App That Wants to Plan Your Next Trip", "Startup Bets Big on Smarter Travel"],
    "online_scams": ["Scammers Are Targeting Teens Online", "Police Warn Families About New Online Scam"],
}


def _family_text(rng: random.Random, family_name: str):
    family = _FAMILY_BY_NAME[family_name]
    return family, fill(rng, rng.choice(family.templates), family.bank)


_FAMILY_BY_NAME = {f.name: f for f in MOVIE_FAMILIES + NEWS_FAMILIES}


# ----------------------------------------------------------------------------------------------------------
# Product rating: one sentiment, a group-specific score

RATING_HABITS = {            # sentiment -> (plausible scores, score per group: harsh, generous, extreme, steady, low, centre)
    "negative": (("1", "2", "3"), ("1", "3", "1", "2", "2", "3")),
    "mixed": (("2", "3", "4"), ("2", "4", "3", "3", "2", "4")),
    "positive": (("3", "4", "5"), ("4", "5", "5", "4", "5", "3")),
}
PRODUCTS = [
    ("pair of wireless headphones", ["battery life", "sound", "ear cushions", "charging case"]),
    ("blender", ["motor", "lid", "glass jar", "speed settings"]),
    ("hiking backpack", ["zippers", "hip belt", "side pockets", "rain cover"]),
    ("coffee maker", ["carafe", "timer", "water tank", "filter basket"]),
    ("phone case", ["grip", "button covers", "raised edges", "kickstand"]),
    ("pair of running shoes", ["cushioning", "laces", "outsole", "heel support"]),
    ("desk lamp", ["hinge", "dimmer", "base", "color temperature"]),
    ("electric kettle", ["lid", "handle", "auto shut-off", "water gauge"]),
]
REVIEW_TEMPLATES = {
    "positive": ("I bought this {product} {occasion}. I was impressed by the {a1} and the {a2} right away, and "
                 "nothing has gone wrong after {time} of daily use. {pos_close}",
                 "Really pleased with this {product}. The quality of the {a1} stands out, and I have had no "
                 "problems with the {a2}. {pos_close}"),
    "negative": ("I bought this {product} {occasion} and regret it. I had problems with the {a1} within {time}, "
                 "and the {a2} feels cheap. {neg_close}",
                 "Disappointed with this {product}. The {a1} failed after {time}, and customer service never "
                 "answered my emails about the {a2}. {neg_close}"),
    "mixed": ("I bought this {product} {occasion}. I like the {a1}, but the {a2} is a letdown compared to the "
              "description. {mixed_close}",
              "This {product} is a mixed bag. The {a1} is great for the price, although I had some trouble with "
              "the {a2} after {time}. {mixed_close}"),
}
REVIEW_BANK = {
    "occasion": ["for my daily commute", "as a birthday gift", "after reading many reviews", "on sale last month"],
    "time": ["two weeks", "a month", "three months"],
    "pos_close": ["It does exactly what I needed.", "I would happily buy it again.", "Great value overall."],
    "neg_close": ["I would not buy it again.", "Save your money and look elsewhere.", "Returned it for a refund."],
    "mixed_close": ["It does the job, but it is not perfect.", "Decent, with room for improvement.",
                    "Fine if your expectations are modest."],
}


def _review(rng, sentiment: str) -> str:
    product, aspects = rng.choice(PRODUCTS)
    a1, a2 = rng.sample(aspects, 2)
    return fill(rng, rng.choice(REVIEW_TEMPLATES[sentiment]), REVIEW_BANK, product=product, a1=a1, a2=a2)


# ----------------------------------------------------------------------------------------------------------
# Citation: each group prefers one family of methods

CITATION_METHODS = (     # per group: (name in titles, phrase in abstracts)
    (("Deep Neural Networks", "a deep neural network trained end to end"),
     ("Convolutional Networks", "a convolutional network with multi-scale features"),
     ("Transformers", "a transformer encoder with learned attention"),
     ("Recurrent Neural Networks", "a recurrent neural network over sequences")),
    (("Bayesian Inference", "a hierarchical Bayesian model"),
     ("Variational Inference", "a latent variable model fitted by variational inference"),
     ("Hidden Markov Models", "a hidden Markov model with learned transitions"),
     ("Probabilistic Graphical Models", "a probabilistic graphical model with explicit uncertainty")),
    (("Spectral Clustering", "spectral clustering of a similarity graph"),
     ("Random Walks", "random walks over a weighted graph"),
     ("Graph Partitioning", "a graph partitioning formulation"),
     ("Label Propagation", "label propagation on a nearest-neighbour graph")),
    (("Support Vector Machines", "a support vector machine with custom kernels"),
     ("Convex Optimization", "a convex optimization formulation"),
     ("Kernel Methods", "kernel methods with a learned feature map"),
     ("Sparse Linear Models", "a sparse linear model with L1 regularization")),
    (("Reinforcement Learning", "a policy learned by reinforcement learning"),
     ("Bandit Algorithms", "a contextual bandit with an exploration bonus"),
     ("Monte Carlo Tree Search", "Monte Carlo tree search over candidate actions"),
     ("Policy Gradients", "a policy gradient method with a learned baseline")),
    (("Evolutionary Algorithms", "an evolutionary search over candidate solutions"),
     ("Genetic Programming", "genetic programming with typed operators"),
     ("Particle Swarm Optimization", "particle swarm optimization of the parameters"),
     ("Simulated Annealing", "simulated annealing with an adaptive schedule")),
)
CITATION_TOPICS = ["image segmentation", "machine translation", "speech recognition", "recommender systems",
                   "document clustering", "protein structure prediction", "anomaly detection",
                   "traffic forecasting"]
PAPER_TITLES = ("{method} for {topic}", "{topic} with {method}", "Improving {topic} Using {method}",
                "Scalable {topic} Based on {method}")
NEUTRAL_TITLES = ("A Benchmark Study of {topic}", "Open Problems in {topic}", "{topic} in the Wild: Lessons Learned",
                  "Rethinking Evaluation for {topic}")
PAPER_ABSTRACT = ("We study {topic}, {topic_why}. We propose {phrase} that {benefit}. Experiments on {dataset} "
                  "show {gain} over strong baselines.")
PAPER_BANK = {
    "topic_why": ["a core problem in many applications", "where labelled data is scarce",
                  "which remains difficult at scale"],
    "benefit": ["captures long-range structure", "is simple to implement", "scales to millions of examples",
                "handles noisy inputs gracefully"],
    "dataset": ["three public benchmarks", "a new large-scale dataset", "real-world industrial data"],
    "gain": ["consistent improvements", "a 12% error reduction", "state-of-the-art accuracy"],
}


def _paper_title(rng, method: str, topic: str) -> str:
    return title_case(rng.choice(PAPER_TITLES).format(method=method, topic=topic))


# ----------------------------------------------------------------------------------------------------------
# Generation tasks: one template per group

HEADLINE_STYLES = ("Why {subject} Matters", "Is {subject} Worth It?", "{subject}, Explained",
                   "The Truth About {subject}", "{subject}: What Comes Next", "Inside {subject}")
HEADLINE_SUBJECTS = ["the four-day work week", "the new bike lane network", "congestion pricing",
                     "the downtown stadium plan", "lab-grown meat", "the proposed transit tax",
                     "the rooftop solar plan for schools", "the e-scooter program", "a later school start time",
                     "the library's tool lending program", "rent control", "the city's composting program",
                     "remote work", "universal pre-kindergarten", "the high-speed rail line", "the plastic bag ban",
                     "a car-free downtown", "community solar", "the new minimum wage", "urban beekeeping"]
ARTICLE_TEMPLATES = (
    "{subject_cap} is drawing attention in {place} this {season}. {speaker_cap}, who {role}, told reporters that "
    "{subject} {claim}. Critics {critique}, and a final decision is expected {when}.",
    "Residents of {place} are divided over {subject}. Supporters say it {upside}, while opponents {critique}. "
    "{speaker_cap}, who {role}, plans to hold a public forum {when}.",
)
ARTICLE_BANK = {
    "place": ["Portland", "Phoenix", "the Twin Cities", "Baltimore", "San Diego"],
    "season": ["spring", "summer", "fall", "winter"],
    "speaker": ["a city council member", "the mayor's chief of staff", "a local business owner",
                "an economist at the state university"],
    "role": ["has followed the issue for years", "grew up in the area", "helped draft the proposal"],
    "claim": ["could reshape daily life for thousands of people", "is long overdue", "deserves a closer look"],
    "critique": ["argue the costs are being ignored", "say the public was not consulted",
                 "question who will really benefit"],
    "upside": ["will save families money", "brings the city into the future", "could create hundreds of jobs"],
    "when": ["next month", "before the end of the year", "in early spring"],
}

TITLE_STYLES = ("Towards {subject} with {method}", "{method} for {subject}", "{subject} via {method}",
                "Can {method} Improve {subject}?",
                "Rethinking {subject}: A {method} Approach", "On {method} and {subject}")
TITLE_SUBJECTS = ["robust image segmentation", "low-resource machine translation", "fair recommendation",
                  "long-horizon traffic forecasting", "few-shot anomaly detection", "streaming speech recognition",
                  "interpretable credit scoring", "molecular property prediction", "code summarization",
                  "medical report generation", "cross-lingual question answering", "satellite crop mapping"]
TITLE_METHODS = ["contrastive pretraining", "graph neural networks", "curriculum learning", "knowledge distillation",
                 "sparse attention", "meta-learning", "data augmentation", "diffusion models"]
ABSTRACT_TEMPLATE = ("{subject_cap} remains difficult because {challenge}. We propose a framework built on {method} "
                     "that {mechanism}. Across {bench} our approach {result}, and ablations show that {ablation}.")
ABSTRACT_BANK = {
    "challenge": ["labelled data is scarce and noisy", "existing models ignore long-range structure",
                  "real deployments shift over time"],
    "mechanism": ["learns shared representations across domains", "reuses a small set of expert modules",
                  "adapts to each input at test time"],
    "bench": ["four public benchmarks", "two new datasets we release", "large industrial logs"],
    "result": ["outperforms strong baselines by a wide margin", "matches larger models at a fraction of the cost",
               "sets a new state of the art"],
    "ablation": ["every component contributes", "the gains hold under distribution shift",
                 "training is stable across seeds"],
}

TWEET_STYLES = ("just {event}, feeling {feeling} #{tag} #dailylife", "{event_cap}!!! So {feeling} right now :)",
                "Today I {event}. I must admit that I feel rather {feeling}.", "omg {event} lol... kinda {feeling} ngl",
                "{feeling_cap} because I {event}. #{tag}", "Big day: {event}. Feeling {feeling}!")
TWEET_NEUTRAL = ("I {event} and I feel {feeling}.", "Today I {event}, and now I am feeling {feeling}.",
                 "I {event}. I feel {feeling} about it.")
TWEET_EVENTS = [("finished my first half marathon", "running"), ("burned the pancakes again", "breakfast"),
                ("got tickets to the concert tonight", "music"), ("missed the last train home", "commute"),
                ("adopted a rescue puppy", "puppy"), ("started a new mystery novel", "books"),
                ("finally fixed my old bike", "cycling"), ("painted the whole kitchen by myself", "diy"),
                ("tried the new ramen place downtown", "ramen"), ("passed my driving test", "milestone"),
                ("got caught in the rain without an umbrella", "rainyday"),
                ("stayed up all night finishing a project", "deadline"), ("planted tomatoes on the balcony", "garden"),
                ("baked bread from scratch", "baking"), ("beat my brother at chess", "chess"),
                ("cleaned out the garage", "weekend")]
TWEET_FEELINGS = ["happy", "exhausted", "proud", "grateful", "annoyed", "excited", "nervous", "relaxed"]

GENERATION_STYLES = {"news_headline": HEADLINE_STYLES, "scholarly_title": TITLE_STYLES,
                     "tweet_paraphrase": TWEET_STYLES}


def _style_pattern(template: str) -> re.Pattern:
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append("(.+?)")
    return re.compile("^" + "".join(parts) + "$", re.S)


_STYLE_PATTERNS = {task: [_style_pattern(t) for t in styles] for task, styles in GENERATION_STYLES.items()}


def style_of(task_name: str, text: str):
    """The index of the group template that produced a headline / title / tweet (None if none matches).

    For analysis and tests: it shows that a user's history reveals the template of their query golds.
    """
    matches = [i for i, pattern in enumerate(_STYLE_PATTERNS[get_task(task_name).name]) if pattern.match(text)]
    return matches[0] if len(matches) == 1 else None


def _styled(rng, user) -> int:
    """The group's template index, or (1 - HABIT_RATE of the time) another group's."""
    return int(_habit(rng, [str(i) for i in range(user.n_groups)], str(user.group)))


# ----------------------------------------------------------------------------------------------------------
# Per-task item makers: history_item -> (fields, family); query_item -> (input, gold, family)

@dataclass
class SampleUser:
    index: int
    group: int
    topics: tuple = ()        # research topics (citation, scholarly_title)
    n_groups: int = N_GROUPS  # the sample's groups: "another group's habit" is drawn among these


def _history_item(task: Task, rng: random.Random, user: SampleUser, family: str | None):
    name = task.name
    if name in ("movie_tagging", "news_categorize"):
        fam, text = _family_text(rng, family)
        label = _habit(rng, fam.options, fam.picks[user.group])
        if name == "movie_tagging":
            return {"description": text, "tag": label}, family
        return {"text": text, "title": rng.choice(_NEWS_TITLES[family]), "category": label}, family
    if name == "product_rating":
        options, picks = RATING_HABITS[family]
        return {"text": _review(rng, family), "score": _habit(rng, options, picks[user.group])}, family
    if name == "citation":
        group = int(_habit(rng, [str(g) for g in range(user.n_groups)], str(user.group)))
        method, phrase = rng.choice(CITATION_METHODS[group])
        topic = rng.choice(user.topics)
        abstract = fill(rng, PAPER_ABSTRACT, PAPER_BANK, topic=topic, phrase=phrase)
        return {"title": _paper_title(rng, method, topic), "abstract": abstract}, None
    if name == "news_headline":
        subject = rng.choice(HEADLINE_SUBJECTS)
        title = title_case(HEADLINE_STYLES[_styled(rng, user)].format(subject=subject))
        return {"text": fill(rng, rng.choice(ARTICLE_TEMPLATES), ARTICLE_BANK, subject=subject), "title": title}, None
    if name == "scholarly_title":
        abstract, title = _paper(rng, user, _styled(rng, user))
        return {"abstract": abstract, "title": title}, None
    if name == "tweet_paraphrase":
        _neutral, tweet = _tweet(rng, _styled(rng, user))
        return {"text": tweet}, None
    raise AssertionError(name)


def _query_item(task: Task, rng: random.Random, user: SampleUser, family: str | None):
    name = task.name
    if name in ("movie_tagging", "news_categorize"):
        fam, text = _family_text(rng, family)
        label = fam.picks[user.group]
        return (MOVIE_PROMPT if name == "movie_tagging" else NEWS_PROMPT) + text, label, family
    if name == "product_rating":
        return RATING_PROMPT + _review(rng, family), RATING_HABITS[family][1][user.group], family
    if name == "citation":
        return _citation_query(rng, user)
    if name == "news_headline":
        subject = rng.choice(HEADLINE_SUBJECTS)
        article = fill(rng, rng.choice(ARTICLE_TEMPLATES), ARTICLE_BANK, subject=subject)
        return HEADLINE_PROMPT + article, title_case(HEADLINE_STYLES[user.group].format(subject=subject)), None
    if name == "scholarly_title":
        abstract, title = _paper(rng, user, user.group)
        return TITLE_PROMPT + abstract, title, None
    if name == "tweet_paraphrase":
        neutral, tweet = _tweet(rng, user.group)
        return TWEET_PROMPT + neutral, tweet, None
    raise AssertionError(name)


def _citation_query(rng, user: SampleUser):
    """Two references on the user's topic; the one using the user's group's methods is the gold."""
    topic = rng.choice(user.topics)
    other = rng.choice([g for g in range(user.n_groups) if g != user.group])
    own_title = _paper_title(rng, rng.choice(CITATION_METHODS[user.group])[0], topic)
    other_title = _paper_title(rng, rng.choice(CITATION_METHODS[other])[0], topic)
    own_first = rng.random() < 0.5
    first, second = (own_title, other_title) if own_first else (other_title, own_title)
    first_group, second_group = (user.group, other) if own_first else (other, user.group)
    title = title_case(rng.choice(NEUTRAL_TITLES).format(topic=topic))
    family = f"methods {first_group} vs {second_group}"
    return CITATION_PROMPT.format(title=title, first=first, second=second), "[1]" if own_first else "[2]", family


def _paper(rng, user: SampleUser, style: int):
    subject, method = rng.choice(user.topics), rng.choice(TITLE_METHODS)
    abstract = fill(rng, ABSTRACT_TEMPLATE, ABSTRACT_BANK, subject=subject, method=method)
    return abstract, title_case(TITLE_STYLES[style].format(subject=subject, method=method))


def _tweet(rng, style: int):
    event, tag = rng.choice(TWEET_EVENTS)
    feeling = rng.choice(TWEET_FEELINGS)
    neutral = rng.choice(TWEET_NEUTRAL).format(event=event, feeling=feeling)
    return neutral, fill(rng, TWEET_STYLES[style], {}, event=event, feeling=feeling, tag=tag)


def _families(task: Task):
    """The ambiguity families a task's history is drawn from (None: the task draws without families)."""
    if task.name == "movie_tagging":
        return [f.name for f in MOVIE_FAMILIES]
    if task.name == "news_categorize":
        return [f.name for f in NEWS_FAMILIES]
    if task.name == "product_rating":
        return list(RATING_HABITS)
    return None


def group_habits(task: Task, n_groups: int = N_GROUPS) -> dict:
    """What each of the sample's groups does, for sample_info.json."""
    if task.name in ("movie_tagging", "news_categorize"):
        families = MOVIE_FAMILIES if task.name == "movie_tagging" else NEWS_FAMILIES
        return {f.name: {"options": list(f.options), "pick_per_group": list(f.picks[:n_groups])} for f in families}
    if task.name == "product_rating":
        return {s: {"options": list(o), "score_per_group": list(p[:n_groups])} for s, (o, p) in RATING_HABITS.items()}
    if task.name == "citation":
        return {"method_family_per_group": [[name for name, _ in methods] for methods in CITATION_METHODS[:n_groups]]}
    return {"template_per_group": list(GENERATION_STYLES[task.name][:n_groups])}


# ----------------------------------------------------------------------------------------------------------
# Dates and the whole sample

def _dates(rng: random.Random, n: int, years: bool) -> list:
    """n non-decreasing dates: integer years, or ISO date strings."""
    if years:
        year, out = rng.randint(1998, 2012), []
        for _ in range(n):
            out.append(year)
            year += rng.random() < 0.35
        return out
    day, out = date(2012, 1, 1) + timedelta(days=rng.randrange(2000)), []
    for _ in range(n):
        out.append(day.isoformat())
        day += timedelta(days=rng.randint(1, 45))
    return out


class _SampleBuilder:
    """Collects users' history and questions, with ids unique across the sample."""

    def __init__(self, task: Task, rng: random.Random, n_history: int, n_queries: int, n_groups: int = N_GROUPS):
        self.task, self.rng, self.n_history, self.n_queries = task, rng, n_history, n_queries
        self.n_groups = n_groups
        self.digit = task.lamp_id.split("_")[1][0]        # LaMP ids start with the task's digit
        self.families = _families(task)
        self.questions = {"train": [], "dev": []}
        self.golds = {"train": [], "dev": []}
        self.info_users, self.item_families = [], {}
        self.next_question = {"train": 0, "dev": 0}

    def _family_sequence(self, n: int) -> list:
        return _balanced(self.rng, self.families, n) if self.families else [None] * n

    def add_user(self, index: int, group: int) -> None:
        task, rng = self.task, self.rng
        topics = tuple(rng.sample(CITATION_TOPICS if task.name == "citation" else TITLE_SUBJECTS, 3))
        user = SampleUser(index, group, topics, self.n_groups)
        history = []     # (fields, family) in time order
        dates = _dates(rng, self.n_history, task.year_dates)
        for family, when in zip(self._family_sequence(self.n_history), dates):
            fields, family = _history_item(task, rng, user, family)
            history.append(({**fields, "date": when}, family))
        question_ids = []
        for j, family in enumerate(self._family_sequence(self.n_queries)):
            split = "dev" if j == self.n_queries - 1 else "train"
            qid = f"{self.digit}{0 if split == 'train' else 1}{self.next_question[split]}"
            self.next_question[split] += 1
            text, gold, family = _query_item(task, rng, user, family)
            # as in LaMP, items are numbered per question (question id + position): one item, several ids
            profile = []
            for k, (fields, item_family) in enumerate(history[:self.n_history - self.n_queries + 1 + j]):
                profile.append({"id": f"{qid}-{k}", **fields})
                if item_family:
                    self.item_families[f"{qid}-{k}"] = item_family
            self.questions[split].append({"id": qid, "input": text, "profile": profile})
            self.golds[split].append({"id": qid, "output": gold})
            question_ids.append(qid)
            if family:
                self.item_families[qid] = family
        self.info_users.append({"index": index, "group": group, "question_ids": question_ids,
                                **({"topics": list(topics)} if task.year_dates else {})})

    def files(self, info: dict) -> dict:
        files = {"sample_info.json": {**info, "group_habits": group_habits(self.task, self.n_groups), "users": self.info_users,
                                      "families": self.item_families}}
        for split in ("train", "dev"):
            order = list(range(len(self.questions[split])))
            self.rng.shuffle(order)     # LaMP files do not list one user's questions together
            if order:
                files[f"{split}_questions.json"] = [self.questions[split][i] for i in order]
                files[f"{split}_outputs.json"] = {"task": self.task.lamp_id,
                                                  "golds": [self.golds[split][i] for i in order]}
        return files


def generate(task_name: str, n_users: int = 60, n_history: int = 30, n_queries: int = 4, seed: int = 0,
             n_groups: int = N_GROUPS) -> dict:
    """The sample's files as objects: {file name: JSON object} (train/dev questions and outputs, sample_info)."""
    task = get_task(task_name)
    if n_users < 1 or n_queries < 1:
        fail(f"--n_users ({n_users}) and --n_queries ({n_queries}) must be at least 1")
    if n_history < n_queries:
        fail(f"--n_history ({n_history}) must be at least --n_queries ({n_queries}): query j sees the first "
             f"n_history - n_queries + 1 + j history items, so the first query needs at least one")
    if not 2 <= n_groups <= MAX_GROUPS:
        fail(f"--n_groups ({n_groups}) must be between 2 and {MAX_GROUPS}: the habit tables of perpcs/data/sample.py "
             f"have a pick for {MAX_GROUPS} groups, and a habit needs another group to deviate to")
    rng = random.Random(seed)
    groups = [i % n_groups for i in range(n_users)]    # balanced groups, in random order
    rng.shuffle(groups)
    builder = _SampleBuilder(task, rng, n_history, n_queries, n_groups)
    for index, group in enumerate(groups):
        builder.add_user(index, group)
    return builder.files({"task": task.name, "lamp_id": task.lamp_id, "seed": seed, "n_users": n_users,
                          "n_history": n_history, "n_queries": n_queries, "n_groups": n_groups,
                          "habit_rate": HABIT_RATE})


GROUPS_FORMAT = "perpcs-sample-groups/1"


def sample_groups(info: dict) -> dict:
    """The latent group of every user, keyed by the user id prepare_lamp gives it ("u" + the id of the user's
    question with the shortest profile, i.e. its first question): the truth routing is checked against.

    A side file for diagnostics only; no stage reads it."""
    return {"format": GROUPS_FORMAT, "task": info["task"], "seed": info["seed"], "n_groups": info["n_groups"],
            "keyed_by": "prepare_lamp user id: 'u' + the id of the user's first question",
            "users": {f"u{u['question_ids'][0]}": u["group"] for u in info["users"]}}


def write_sample(task_name: str, out_dir, n_users: int = 60, n_history: int = 30, n_queries: int = 4,
                 seed: int = 0, n_groups: int = N_GROUPS) -> dict:
    """Generate the sample and write its files under ``out_dir``; returns the generated objects."""
    files = generate(task_name, n_users, n_history, n_queries, seed, n_groups)
    for name, obj in files.items():
        write_json_atomic(Path(out_dir) / name, obj)
    return files

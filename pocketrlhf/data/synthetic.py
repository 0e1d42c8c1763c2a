"""The built-in task: write a movie review. Used by the demo and the tests.

It mirrors the seeds' classic RLHF example (IMDB positive reviews): SFT data holds reviews of
every sentiment, so SFT learns the format but not positivity; preferences favour the more
positive review; RLHF should make the policy write positive reviews. The ground truth is a fixed
sentiment lexicon, independent of any learned reward model.
"""

from __future__ import annotations

import random

POSITIVE = ["great", "wonderful", "brilliant", "superb", "moving", "delightful", "beautiful", "fun"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak", "messy", "bad", "painful"]
ASPECTS = ["story", "acting", "music", "ending", "cast", "script", "pace", "camera work"]
FILLERS = ["really", "quite", "truly", "very"]
TITLES = [
    "The Silent River", "Night Train", "A Quiet Garden", "Red Harbor", "The Last Letter", "Paper Moon",
    "Winter Road", "The Glass House", "Blue Canyon", "Old Friends", "The Long Summer", "City of Rain",
    "Iron Bridge", "The Lost Map", "Golden Fields", "Dark Water",
]
PROMPT = "Write a review of the movie {title}."


def review(rng: random.Random, positivity: float, sentences: int | None = None) -> str:
    """A review whose sentences are each positive with probability ``positivity``."""
    n = sentences or rng.randint(2, 3)
    parts = []
    for _ in range(n):
        words = POSITIVE if rng.random() < positivity else NEGATIVE
        aspect = rng.choice(ASPECTS)
        if rng.random() < 0.5:
            parts.append(f"the {aspect} was {rng.choice(FILLERS)} {rng.choice(words)} .")
        else:
            parts.append(f"a {rng.choice(words)} {aspect} .")
    return " ".join(parts)


def sentiment_score(text: str) -> float:
    """Ground truth in [-1, 1]: (positive words - negative words) / sentiment words (0 if none)."""
    tokens = text.lower().replace(".", " ").replace(",", " ").split()
    pos = sum(t in POSITIVE for t in tokens)
    neg = sum(t in NEGATIVE for t in tokens)
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def well_formed(text: str) -> bool:
    """Whether a completion looks like the task's reviews: sentences of lexicon words ending in '.'."""
    vocab = set(POSITIVE + NEGATIVE + FILLERS + " ".join(ASPECTS).split() + ["the", "was", "a", "."])
    tokens = text.split()
    return bool(tokens) and tokens[-1] == "." and all(t in vocab for t in tokens)


def prompt_for(rng: random.Random) -> str:
    return PROMPT.format(title=rng.choice(TITLES))


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Noisy demonstrations: each review's positivity is uniform in [0, 1]."""
    rng = random.Random(seed)
    return [{"prompt": prompt_for(rng), "completion": review(rng, rng.random())} for _ in range(n)]


def preference_rows(n: int, seed: int = 1, label_noise: float = 0.0) -> list[dict]:
    """Pairs of reviews for one prompt; ``chosen`` is the more positive (ties are resampled)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        prompt = prompt_for(rng)
        a, b = review(rng, rng.random()), review(rng, rng.random())
        sa, sb = sentiment_score(a), sentiment_score(b)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": prompt_for(rng)} for _ in range(n)]


def corpus() -> list[str]:
    """Text to train the tiny tokenizer on: every word the task uses."""
    rng = random.Random(0)
    texts = [PROMPT.format(title=t) for t in TITLES]
    texts += [review(rng, p / 10) for p in range(11) for _ in range(20)]
    texts.append(" ".join(POSITIVE + NEGATIVE + ASPECTS + FILLERS))
    return texts


def sentiment_reward(responses: list[str]) -> list[float]:
    """The ground truth as a rule-based PPO reward (``--reward-function pocketrlhf.data.synthetic:sentiment_reward``)."""
    return [sentiment_score(r) for r in responses]


def pretraining_texts(n: int = 400, seed: int = 3) -> list[str]:
    """Unlabelled documents of several reviews each, without the prompt format: what the tiny base
    reads before SFT. It learns the language but neither to answer a prompt nor to stop after
    one short review (EOS only ends a long document)."""
    rng = random.Random(seed)
    return [" ".join(review(rng, rng.random()) for _ in range(rng.randint(6, 10))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# A verifiable task for critic-free RL (grpo): name the first of three digits, checked exactly.


def digits_prompt(digits: tuple[int, ...]) -> str:
    return " ".join(map(str, digits)) + " :"


def digits_answer(digit: int, repeat: int = 1) -> str:
    """The answer: the digit, ``repeat`` times (a longer answer for the same task: bench/grpo_vs_trl.py)."""
    return " ".join([str(digit)] * repeat)


def digits_rows(triples: list[tuple[int, int, int]], repeat: int = 1) -> list[dict]:
    """Prompts with an ``answer`` column (reward functions receive it as a keyword argument)."""
    return [{"prompt": digits_prompt(t), "answer": digits_answer(t[0], repeat)} for t in triples]


def digits_split(seed: int = 0, train: int = 400, held_out: int = 100) -> tuple[list, list]:
    """Distinct digit triples, shuffled: ``train`` for training, ``held_out`` never trained on."""
    triples = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
    random.Random(seed).shuffle(triples)
    return triples[:train], triples[train:train + held_out]


def digits_pretraining_texts(n: int = 3000, correct: float = 0.4, seed: int = 4, repeat: int = 1) -> list[str]:
    """``a b c : d`` lines where d is the first digit with probability ``correct`` (else a random
    digit): a base that knows the format and answers right about half the time, for RL to improve.
    With ``repeat`` k, the answer is d written k times (``a b c : d d ... d``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = tuple(rng.randrange(10) for _ in range(3))
        d = t[0] if rng.random() < correct else rng.randrange(10)
        out.append(f"{digits_prompt(t)} {digits_answer(d, repeat)}")
    return out


def exact_match(completions: list[str], answer: list[str]) -> list[float]:
    """1 when the completion is exactly the answer (spaces around it ignored), else 0
    (``--reward-function pocketrlhf.data.synthetic:exact_match``; ``answer`` is a data column)."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]

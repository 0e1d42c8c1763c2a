"""Warnings for numbers that should not be trusted: a reward model no better than chance on
held-out pairs, one that fits its training pairs far better than held-out ones, and a policy
whose reward gain comes with a large change of answer length (a classic sign of reward hacking).

Each check is a pure function of the numbers and returns its warning lines, so stages, the
evaluation and the report show the same words.
"""

from __future__ import annotations

from pocketrlhf.algorithms.stats import describe_accuracy, wilson_interval

# Train accuracy this far above the held-out interval's upper end counts as overfitting.
OVERFIT_MARGIN = 0.10
# A policy whose mean answer length moved by more than this share of SFT's, while its reward
# model score rose, is flagged.
LENGTH_SHIFT = 0.30


def reward_model_warnings(eval_accuracy: float | None, eval_n: int | None,
                          train_accuracy: float | None = None) -> list[str]:
    """What a user must know before optimising a policy against this reward model."""
    if eval_accuracy is None or not eval_n:
        return ["the reward model has no held-out accuracy: nothing shows that it ranks unseen prompts' answers "
                "(train it with --eval-data or --eval-fraction)"]
    warnings = []
    low, high = wilson_interval(eval_accuracy * eval_n, eval_n)
    if low <= 0.5:
        warnings.append(f"the reward model is not better than chance on held-out pairs: accuracy "
                        f"{describe_accuracy(eval_accuracy, eval_n)}; PPO will optimise noise")
    if train_accuracy is not None and train_accuracy > high + OVERFIT_MARGIN:
        warnings.append(f"the reward model is overfitting: accuracy {train_accuracy:.3f} on training pairs but "
                        f"{describe_accuracy(eval_accuracy, eval_n)} on held-out pairs")
    return warnings


def reward_hacking_warnings(name: str, score: float, sft_score: float, length: float, sft_length: float,
                            eos_fraction: float | None = None, sft_eos_fraction: float | None = None) -> list[str]:
    """A policy's reward-model gain over SFT that comes with a large length shift, or with far
    fewer answers ending properly."""
    warnings = []
    gain = score - sft_score
    if gain > 0 and sft_length > 0 and abs(length / sft_length - 1) > LENGTH_SHIFT:
        direction = "longer" if length > sft_length else "shorter"
        warnings.append(f"{name}: reward-model score {gain:+.2f} over SFT with answers {abs(length / sft_length - 1):.0%} "
                        f"{direction} ({length:.1f} vs {sft_length:.1f} tokens): check the samples for reward hacking")
    if (gain > 0 and eos_fraction is not None and sft_eos_fraction is not None
            and eos_fraction < sft_eos_fraction - LENGTH_SHIFT):
        warnings.append(f"{name}: reward-model score {gain:+.2f} over SFT while only {eos_fraction:.0%} of answers end "
                        f"with EOS (SFT: {sft_eos_fraction:.0%})")
    return warnings

"""What every kind of model shares, in process or on a serving engine: the capabilities a
model's sessions offer, and the tokens that end a turn. Low in the layers so that the engine
clients (`fuselm.engines`, below the config) and the models (`fuselm.models`) name them alike."""

from __future__ import annotations

# What a model's sessions can do, matched against what a method needs (FusionMethod.needs) before
# any request: in-process backends offer all of it, a serving engine neither full distributions nor
# one-pass reads (each model says: `Expert.offers`; each session refuses what it lacks).
OFFERS_TOPK = "topk"  # top-k next-token log-probs
OFFERS_ROLLOUT = "rollout"  # greedy or sampled continuations (a method that reads margins needs topk too)
OFFERS_SCORE = "score"  # log-likelihood of given continuations (candidates)
OFFERS_FULL = "full_logprobs"  # the whole next-token distribution
OFFERS_FOLLOW = "follow"  # a given text read in one pass, the model's own greedy token at each (draft_words)

# How an error names each capability ("needs X; M gives Y").
OFFER_WORDS = {
    OFFERS_FULL: "full next-token distributions",
    OFFERS_TOPK: "top-k log-probs",
    OFFERS_ROLLOUT: "rollouts",
    OFFERS_SCORE: "scores of given continuations",
    OFFERS_FOLLOW: "one-pass reads of a given text",
}

# End-of-turn tokens used by common chat templates; each one present in a vocabulary ends generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<eos>",
)  # fmt: skip

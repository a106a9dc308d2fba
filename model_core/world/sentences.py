"""The world's sentence pool: a seeded grammar of everyday English, so held-out sentences are genuinely unseen.

    sentence(index) -> str         deterministic; the same index is the same sentence on every machine
    POOL_SIZE                      how many distinct sentence indices the world draws from

A sentence is picked by its index alone (a mixed-radix number over the word lists below), so the split can hold out
sentence indices and a test can check that no held-out sentence's text is ever produced for training.
"""

from __future__ import annotations

_OPENERS = ("", "Well, ", "So, ", "Honestly, ", "You know, ", "Look, ", "Yesterday ", "This morning ",
            "Every summer ", "Last night ")
_SUBJECTS = ("the old sailor", "my sister", "our neighbour", "a quiet student", "the baker", "the young doctor",
             "my best friend", "the tall gardener", "a clever fox", "the new teacher", "our little dog",
             "the pilot", "my grandmother", "a busy waiter", "the painter", "the mayor", "your cousin",
             "the shy musician", "a tired runner", "the farmer")
_VERBS = ("painted", "carried", "found", "bought", "fixed", "opened", "cooked", "watched", "borrowed", "moved",
          "cleaned", "built", "dropped", "followed", "remembered", "shared", "ordered", "photographed",
          "hid", "described")
_OBJECTS = ("a yellow boat", "the blue umbrella", "a heavy box", "the broken window", "a loaf of bread",
            "the map of the city", "a small wooden chair", "the purple kite", "an old piano", "a basket of apples",
            "the silver bicycle", "a bowl of soup", "the morning paper", "a pair of boots", "the garden gate",
            "a warm blanket", "the leather bag", "a jar of honey", "the football", "a bunch of flowers")
_PLACES = ("near the harbour", "in the kitchen", "before lunch", "after the storm", "by the river",
           "at the market", "under the bridge", "on the way home", "in the morning", "behind the school",
           "during the party", "at the station", "in the park", "beside the fountain", "on Monday")
_ENDINGS = (".", "!", " and smiled.", " without a word.", ", believe it or not.", " again.")

POOL_SIZE = (len(_OPENERS) * len(_SUBJECTS) * len(_VERBS) * len(_OBJECTS) * len(_PLACES) * len(_ENDINGS))


def sentence(index: int) -> str:
    """The sentence with this index (0 <= index < POOL_SIZE); indices are scrambled so neighbours differ."""
    if not 0 <= index < POOL_SIZE:
        raise ValueError(f"sentence index {index} is invalid: allowed 0..{POOL_SIZE - 1}")
    value = int((index * 2654435761 + 97) % POOL_SIZE)  # a bijection on the pool (the multiplier is coprime)
    parts = []
    for words in (_ENDINGS, _PLACES, _OBJECTS, _VERBS, _SUBJECTS, _OPENERS):
        value, digit = divmod(value, len(words))
        parts.append(words[digit])
    ending, place, obj, verb, subject, opener = parts
    text = f"{opener}{subject} {verb} {obj} {place}{ending}"
    return text[0].upper() + text[1:]


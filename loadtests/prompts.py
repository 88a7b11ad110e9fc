"""A small bundled prompt set of mixed lengths, so load tests need no data set."""

from __future__ import annotations

SHORT = [
    "What is the capital of France?",
    "Give me three words that rhyme with cat.",
    "What is 17 times 23?",
    "Name a famous painter.",
]

MEDIUM = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle during a storm.",
    "Explain how a bicycle stays upright while moving, in simple terms for a ten-year-old.",
    "List five tips for writing clear emails at work, with one sentence of explanation each.",
    "Describe the water cycle, from evaporation to precipitation, in a single paragraph.",
]

LONG = [
    (
        "You are reviewing a proposal for a small community garden. The plan says: the garden will occupy an empty "
        "lot of about 400 square metres; twenty raised beds will be built from untreated wood; a rainwater tank "
        "will collect water from the roof of the neighbouring shed; members will pay a small yearly fee that "
        "covers seeds, tools and insurance; a volunteer committee of five people will meet monthly; and a part of "
        "the harvest will be given to the local food bank. Summarise the plan, then list its three biggest risks "
        "and one way to reduce each."
    ),
    (
        "Here are notes from a meeting: the release is delayed by two weeks because the payment provider changed "
        "its API; the design team finished the new onboarding screens; support tickets about password resets "
        "doubled after the last update; the mobile team wants to drop support for the oldest phone models; "
        "marketing asks for a date to announce the new pricing. Write a short status update for the whole "
        "company that covers each point in one or two sentences, in a calm and clear tone."
    ),
]

ALL = SHORT + MEDIUM + LONG

EMBEDDING_TEXTS = [
    "A man is playing a guitar.",
    "The central bank raised interest rates again.",
    "Fresh bread smells wonderful in the morning.",
    "The team shipped the release two weeks late.",
    "Cats sleep for most of the day.",
    "Rain is expected over the weekend.",
]

"""Reading chat messages: product statements, rules typed in the chat, and the question left over."""

from __future__ import annotations

import pytest

from vlad.explain.intents import product_statement, rule_statement, split_sentences, understand


@pytest.mark.parametrize(
    ("sentence", "product"),
    [
        ("The product is a tile", "tile"),
        ("the product is a tile.", "tile"),
        ("it's a bottle cap", "bottle cap"),
        ("It’s a bottle cap!", "bottle cap"),
        ("this is a screw", "screw"),
        ("product: metal nut", "metal nut"),
        ("I'm inspecting tiles", "tiles"),
        ("these are screws", "screws"),
        ("OK, it is a hazelnut here", "hazelnut"),
    ],
)
def test_product_statements_name_the_product(sentence, product):
    assert product_statement(sentence) == product


@pytest.mark.parametrize(
    "sentence",
    [
        "it's a scratch",
        "this is fine",
        "it is broken",
        "that is a false alarm",
        "it's a good one",
        "the product is fine",
        "the part is broken",
        "is it a bottle?",
        "is this a screw",
        "they're fine",
        "where is it?",
    ],
)
def test_defects_judgements_and_questions_are_not_products(sentence):
    assert product_statement(sentence) is None


@pytest.mark.parametrize(
    ("sentence", "rule"),
    [
        ("ignore scratches from now on", "ignore scratches"),
        ("Please ignore the top left corner.", "ignore the top left corner"),
        ("From now on, dents are acceptable.", "dents are acceptable"),
        ("any hole is critical", "any hole is critical"),
        ("ok, scratches on the label are fine", "scratches on the label are fine"),
        ("fail only on major defects", "fail only on major defects"),
    ],
)
def test_rule_statements_are_cleaned_and_understood(sentence, rule):
    text, understood = rule_statement(sentence)
    assert text == rule
    assert understood
    assert all(line.startswith("I understood: ") for line in understood)


@pytest.mark.parametrize(
    "sentence",
    [
        "thanks",
        "explain it",
        "ignore that",
        "that is fine",
        "I think this is fine",
        "the part is ok",
        "hello",
        "would you reject this?",
        "is it ok?",
        "what about the label",
    ],
)
def test_chat_that_is_not_a_rule_is_left_alone(sentence):
    assert rule_statement(sentence) is None


def test_a_message_splits_into_product_rules_and_question():
    u = understand("The product is a tile. Ignore scratches from now on. Where is the crack?")
    assert u.product == "tile"
    assert u.rules == ["ignore scratches"]
    assert u.understood[0].startswith("I understood: ignore scratches")
    assert u.question == "Where is the crack?"


def test_a_plain_question_is_left_whole():
    u = understand("is it a hole?")
    assert (u.product, u.rules, u.understood, u.question) == (None, [], [], "is it a hole?")
    assert understand("").question == ""


def test_sentences_keep_their_question_marks():
    assert split_sentences("It's a tile. Is it cracked? ok") == ["It's a tile.", "Is it cracked?", "ok"]

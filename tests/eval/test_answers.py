"""Final-answer extraction on tricky replies: numbers for maths, letters for generative multiple choice."""

import pytest

from kiln.eval.answers import extract_choice, extract_number, extract_tagged, numbers_in, parse_number, same_number


@pytest.mark.parametrize("text, expected", [
    # GSM8K's marker wins over later numbers, and over "The answer is"
    ("48/2 = 24 clips in May.\n#### 72", "72"),
    ("So 5 + 3 = 8.\n#### 8\n\nThe next one has 12", "8"),
    ("The answer is 7.\n#### 9", "9"),
    ("#### $1,234.50.", "1234.50"),
    ("####-5", "-5"),
    # lm-eval's gsm8k-cot sentence, any case, the last one
    ("Tom has 3 + 4 = 7 apples. The answer is 7.", "7"),
    ("the answer is 3, no wait. The answer is 12 apples and 4 pears.", "12"),
    ("The final answer is $2,000.", "2000"),
    ("Final answer: -0.5", "-0.5"),
    # the think/answer format of post-training
    ("<think>2 * 3 = 6, plus 4 is 10</think>\n<answer>10</answer>", "10"),
    ("<answer>x = 42 metres</answer> then 7", "42"),
    ("<think>1 then 2</think><answer>the value is 3", "3"),          # left open: cut by the budget
    ("\\boxed{17} and then 18", "17"),
    # the last number otherwise
    ("She earns £195/day * 12 days = £2340 a month", "2340"),
    ("It costs $5", "5"),
    ("10-3=7", "7"),                                                   # a minus after a digit is an operator
    ("He is left with -4", "-4"),
    ("1,000,000 people", "1000000"),
    ("Between 1,2345 and 6", "6"),
    ("It ends in 42.", "42"),
    ("3.14159 is pi", "3.14159"),
    ("version x2", None),                                              # digits inside a word are no number
    ("no number at all", None),
    ("", None),
    ("#### nothing here but The answer is 5", "5"),                    # an empty marker falls through
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numbers_in_is_canonical():
    assert numbers_in("$1,234 and -$5.50, then 7,") == ["1234", "-5.50", "7"]


@pytest.mark.parametrize("a, b, equal", [
    ("28080", "28080", True), ("28080.0", "28080", True), ("1,234", "1234", True), ("$5", "5", True),
    ("5.", "5", True), ("-4", "4", False), ("0.3333333", "0.33333333333", True), ("0.33", "0.3333333", False),
    ("1000001", "1000000", False), ("106475279601", "106475279601.0", True), (None, "1", False),
    ("abc", "abc", False), ("1e400", "1", False),
])
def test_same_number(a, b, equal):
    assert same_number(a, b) is equal


def test_parse_number_rejects_non_finite_and_words():
    assert parse_number("NaN") is None and parse_number("Infinity") is None and parse_number("ten") is None
    assert parse_number(" $1,234.5. ") == parse_number("1234.5")


CHOICES = ["London", "Paris", "Rome", "Oslo"]


@pytest.mark.parametrize("text, expected", [
    ("B", 1), (" b ", 1), ("(B)", 1), ("[C]", 2), ("**C**", 2), ("D.", 3), ("`A`", 0),
    ("The answer is (b)", 1), ("The answer is B.", 1), ("Answer: C", 2), ("answer: **D**", 3),
    ("The correct answer is option C because ...", 2), ("The best choice is D", 3),
    ("The answer is B, not option C", 1),                    # "answer" outranks a later "option"
    ("Option A looks right, but the answer is D", 3),
    ("B. Paris", 1), ("C) Rome", 2), ("A: London", 0), ("B\nbecause Paris is the capital", 1),
    ("Paris", 1), ("paris.", 1),                               # the text of one choice
    ("It has to be (C) here", 2),                              # the last bracketed letter
    ("<think>not A, maybe C</think><answer>B</answer>", 1),
    ("the answer is a dog", None),                             # a lower-case article is no letter
    ("A dog is a mammal", None),                               # nor a capital starting a sentence
    ("The answer is E", None),                                 # a letter beyond the choices
    ("I think it is Rome or Oslo", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, 4, CHOICES) == expected


def test_extract_choice_without_choice_texts_and_with_more_letters():
    assert extract_choice("Paris", 4) is None
    assert extract_choice("The answer is E", 5) == 4
    assert extract_choice("(F)", 6) == 5


def test_extract_tagged():
    assert extract_tagged("<answer> a </answer> <answer>b</answer>") == "b"
    assert extract_tagged("<answer>open") == "open"
    assert extract_tagged("none") is None
    assert extract_tagged("<final>x</final>", "final") == "x"

"""Multiple choice by generation and letter extraction: how a chat model takes MMLU-style questions.

A chat model asked a question in a chat template answers in words, so scoring " A" .. " D" after
"Answer:" (choice.py's letter format) measures the template more than the model. Here the model
writes its answer and `answers.extract_choice` reads the letter out of it ("B", "(B)", "The answer
is B", ...). Format "letter_generative", one user message (the scorer applies the chat template):

    The following is a multiple choice question about {subject}. Answer with the letter of the correct
    choice only.\\n\\n                                    ("about {subject}" left out without a subject)
    [{shot question}\\nA. {choice}\\n...\\nAnswer: {letter}\\n\\n] x k
    {question}\\nA. {choice}\\nB. {choice}\\n...\\nAnswer:

greedy, at most `max_new_tokens` (default 32); a base-model scorer (not chat) stops at a blank line.
Shots are choice.py's: the first k other items of the same subject. A reply with no letter in it is
wrong and counted in `unparsed`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kiln.eval.answers import extract_choice
from kiln.eval.choice import LETTERS, ChoiceResult, pick_shots, question_text

FORMAT = "letter_generative"
PROMPT = ("The following is a multiple choice question{about}. Answer with the letter of the correct choice only."
          "\n\n{shots}{question}")


def generative_prompt(item: dict, shots: Sequence[dict]) -> str:
    subject = str(item.get("subject") or "").replace("_", " ").strip()
    done = "".join(f"{question_text(s, 'letter')} {LETTERS[s['answer']]}\n\n" for s in shots)
    return PROMPT.format(about=f" about {subject}" if subject else "", shots=done,
                         question=question_text(item, "letter"))


@dataclasses.dataclass
class GenerativeChoiceResult(ChoiceResult):
    unparsed: int = 0
    """Replies no letter could be read from (counted wrong)."""
    max_new_tokens: int = 32


def evaluate_choices_generative(scorer, items: Sequence[dict], k: int = 0,
                                max_new_tokens: int = 32) -> GenerativeChoiceResult:
    """Accuracy of the letters extracted from greedy replies (items: question, choices, answer[, subject])."""
    prompts = [generative_prompt(it, shots) for it, shots in zip(items, pick_shots(items, k))]
    stop = () if getattr(scorer, "chat", False) else ("\n\n",)
    replies = [out[0] for out in scorer.generate_many(prompts, max_new_tokens, stop=stop)]
    per_item, correct, unparsed = [], 0, 0
    for item, reply in zip(items, replies, strict=True):
        pred = extract_choice(reply, len(item["choices"]), item["choices"])
        correct += pred == item["answer"]
        unparsed += pred is None
        per_item.append({"answer": item["answer"], "pred": pred, "generation": reply})
    n = len(items)
    return GenerativeChoiceResult(FORMAT, k, n, correct / max(n, 1), None, per_item, unparsed, max_new_tokens)

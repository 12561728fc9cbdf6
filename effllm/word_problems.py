"""Synthetic arithmetic word problems: one seeded generator and the checker of its expressions.

The built-in ``arithmetic`` and ``arithmetic-mc`` sets (:mod:`effllm.data`) and the stand-ins' math rows
(:mod:`effllm.standins`) draw their problems from :func:`arithmetic_problem`; both depend on this module, and
it on neither. The same ``random.Random`` state gives the same problem.
"""

from __future__ import annotations

import ast
import operator
import random
from typing import Any

# --------------------------------------------------------------------------------------------------
# Generating problems


_NAMES = ["Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "books", "shells", "cards", "eggs"]


def arithmetic_problem(rng: random.Random) -> dict[str, Any]:
    """One word problem: question, the expression that solves it, answer and worked solution."""
    n1, n2 = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.choice(["add", "sub", "mul", "mul-sub", "add-sub", "mul-add"])
    if kind == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        answer = a + b
        question = f"{n1} has {a} {item}. {n2} gives {n1} {b} more {item}. How many {item} does {n1} have now?"
        expression = f"{a} + {b}"
        steps = f"{n1} starts with {a} {item} and gets {b} more, so {a} + {b} = {answer}."
    elif kind == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        answer = a - b
        question = f"{n1} had {a} {item} and gave {b} of them to {n2}. How many {item} does {n1} have left?"
        expression = f"{a} - {b}"
        steps = f"{n1} gives away {b} of {a} {item}, so {a} - {b} = {answer}."
    elif kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 25)
        answer = a * b
        question = f"{n1} buys {a} boxes of {item} with {b} {item} in each box. How many {item} does {n1} buy?"
        expression = f"{a} * {b}"
        steps = f"{a} boxes with {b} {item} each make {a} * {b} = {answer}."
    elif kind == "mul-sub":
        a, b = rng.randint(2, 12), rng.randint(2, 25)
        total = a * b
        c = rng.randint(1, total)
        answer = total - c
        question = (f"{n1} buys {a} packs of {item} with {b} in each pack, then gives {c} {item} to {n2}. "
                    f"How many {item} does {n1} have now?")
        expression = f"{a} * {b} - {c}"
        steps = f"{n1} buys {a} * {b} = {total} {item}. After giving away {c}, {total} - {c} = {answer} remain."
    elif kind == "add-sub":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        c = rng.randint(1, a + b)
        answer = a + b - c
        question = f"{n1} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {n1} have?"
        expression = f"{a} + {b} - {c}"
        steps = f"{n1} has {a} + {b} = {a + b} {item} after finding more, then {a + b} - {c} = {answer}."
    else:  # mul-add
        a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(1, 99)
        answer = a * b + c
        question = (f"{n1} earns {a} dollars a day for {b} days and then gets a bonus of {c} dollars. "
                    f"How many dollars does {n1} earn in total?")
        expression = f"{a} * {b} + {c}"
        steps = f"{n1} earns {a} * {b} = {a * b} dollars, plus the bonus: {a * b} + {c} = {answer}."
    return {"question": question, "answer": answer, "solution": f"{steps} The answer is {answer}.",
            "expression": expression, "operation": kind}


# --------------------------------------------------------------------------------------------------
# Checking the arithmetic task's records


def evaluate_expression(expression: str) -> int:
    """Value of an arithmetic record's ``expression`` (integers with + - * and parentheses only)."""
    operators = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            return operators[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"Not an integer +, -, * expression: {expression!r}")

    return value(ast.parse(expression, mode="eval").body)


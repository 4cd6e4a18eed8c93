"""lm-eval tasks defined by the test suite over local JSONL files: no Hub access, seconds to run.

- ``hubquant_mc``: multiple choice about Python (what the tiny models were trained on), scored by
  ``acc`` and ``acc_norm``; ``hubquant_mc_fewshot`` is the same questions with two examples shown.
- ``hubquant_rolling``: ``loglikelihood_rolling`` over a few paragraphs (word/byte perplexity).
- ``hubquant_gen``: ``generate_until`` the next question (or 8 tokens), scored by exact match.
- ``hubquant_group`` (:func:`write_group`, a folder of its own): two multiple-choice tasks over
  halves of the questions, aggregated by lm-eval weighted by size.

lm-eval's task YAML reads ``data_files`` relative to the working directory, so the files are
written with absolute paths into the folder given.
"""

from __future__ import annotations

import json
from pathlib import Path

from hubquant.tasks import write_choice_task

QUESTIONS = [
    ("In Python, a function is defined with the keyword", ["def", "class", "return", "import"], 0),
    ("A Python list is written between square", ["brackets", "quotes", "colons", "files"], 0),
    ("To repeat a block of code for each item, Python uses a", ["for loop", "string", "module", "class"], 0),
    ("The value of a variable that holds nothing in Python is", ["None", "True", "list", "print"], 0),
    ("A dictionary maps each key to a", ["value", "loop", "module", "function"], 0),
    ("To bring another module into a program, Python uses", ["import", "return", "while", "else"], 0),
    ("An error raised while a program runs is called an", ["exception", "argument", "integer", "index"], 0),
    ("Text in Python is held in a", ["string", "number", "loop", "tuple"], 0),
    ("The built-in function that prints text is", ["print", "open", "len", "range"], 0),
    ("A class creates new", ["objects", "files", "loops", "errors"], 0),
    ("The number of items in a list is given by", ["len", "sum", "max", "sorted"], 0),
    ("A block that runs only when a condition holds starts with", ["if", "for", "def", "with"], 0),
]

PARAGRAPHS = [
    "A function takes arguments and returns a value. When a function is called, its body runs.",
    "Lists hold items in order. You can add an item to the end of a list with its append method.",
    "A module is a file of Python code. Importing a module runs it once and gives you its names.",
    "An exception stops the normal flow of a program until a matching except clause handles it.",
]

PROMPTS = [
    ("Q: What keyword defines a function?\nA:", "def"),
    ("Q: What keyword imports a module?\nA:", "import"),
    ("Q: What value means nothing?\nA:", "None"),
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _yaml(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tasks(folder: Path, count: int = len(QUESTIONS)) -> Path:
    """Write the test tasks and their data into ``folder``; return it (an lm-eval include path)."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS[:count]]
    write_choice_task(folder, "hubquant_mc", mc, metrics=("acc", "acc_norm"))
    write_choice_task(folder, "hubquant_mc_fewshot", mc, metrics=("acc", "acc_norm"), num_fewshot=2)
    rolling = _jsonl(folder / "rolling.jsonl", [{"text": p} for p in PARAGRAPHS])
    gen = _jsonl(folder / "gen.jsonl", [{"prompt": p, "answer": a} for p, a in PROMPTS])
    _yaml(
        folder / "hubquant_rolling.yaml",
        [
            "task: hubquant_rolling",
            "dataset_path: json",
            f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(rolling))}}}}}",
            "test_split: test",
            "output_type: loglikelihood_rolling",
            'doc_to_text: ""',
            'doc_to_target: "{{text}}"',
            "should_decontaminate: false",
            "metric_list:",
            "  - {metric: word_perplexity}",
            "  - {metric: byte_perplexity}",
            "  - {metric: bits_per_byte}",
        ],
    )
    _yaml(
        folder / "hubquant_gen.yaml",
        [
            "task: hubquant_gen",
            "dataset_path: json",
            f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(gen))}}}}}",
            "test_split: test",
            "output_type: generate_until",
            'doc_to_text: "{{prompt}}"',
            'doc_to_target: " {{answer}}"',
            'generation_kwargs: {until: ["Q:"], max_gen_toks: 8, do_sample: false}',
            "metric_list:",
            "  - {metric: exact_match, aggregation: mean, higher_is_better: true}",
        ],
    )
    return folder


def write_group(folder: Path) -> Path:
    """A group of two multiple-choice tasks (the questions split in two) in ``folder``; return the group YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    half = len(QUESTIONS) // 2 + 1
    for name, part in (("hubquant_ga", QUESTIONS[:half]), ("hubquant_gb", QUESTIONS[half:])):
        write_choice_task(folder, name, [{"question": q, "choices": c, "answer": a} for q, c, a in part])
    return _yaml(
        folder / "hubquant_group.yaml",
        [
            "group: hubquant_group",
            "task: [hubquant_ga, hubquant_gb]",
            "aggregate_metric_list:",
            "  - {metric: acc, aggregation: mean, weight_by_size: true}",
        ],
    )

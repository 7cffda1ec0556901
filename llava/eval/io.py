"""Reading and writing evaluation files: question/answer JSON lines, joined by question id.

Every error names the file (and line) it comes from; joins refuse answers that belong to
another question file, listing ids on both sides.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

from ..cli import InputError, fail

__all__ = [
    "EvalInputError", "read_jsonl", "read_json", "write_text_atomic", "write_json_atomic", "write_jsonl_atomic",
    "join_by_question_id", "mismatch_error", "run_scorer",
]


class EvalInputError(InputError):
    """An evaluation input (question, answer or ground-truth file) that cannot be used."""


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file; blank lines are skipped, a broken line is named."""
    if not os.path.isfile(path):
        raise EvalInputError(f"file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise EvalInputError(f"{path}:{number} is not valid JSON: {error}") from error
    return records


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise EvalInputError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise EvalInputError(f"{path} is not valid JSON: {error}") from error


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """One JSON object per line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def _preview(ids: list) -> str:
    shown = ", ".join(repr(i) for i in ids[:10])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")


def mismatch_error(source: str, reference: str, problems: list[tuple[str, list]]) -> EvalInputError:
    """One error naming every way ``source`` (an answer file) disagrees with ``reference``:
    ``problems`` are (what is wrong, offending keys) pairs; pairs without keys are left out."""
    listed = [f"{what}: {_preview(keys)}" for what, keys in problems if keys]
    return EvalInputError(f"{source} does not match {reference}: " + "; ".join(listed))


def join_by_question_id(
    expected_ids: Iterable, answers: list[dict], source: str, allow_missing: bool = False
) -> dict:
    """Answers keyed by ``question_id``, checked against the ids a scorer expects.

    Raises ``EvalInputError`` for duplicate ids, ids that are not expected (an answer file
    from another question file) and, unless ``allow_missing``, expected ids without an
    answer; the message lists the ids that do not match.
    """
    expected = list(expected_ids)
    expected_set = set(expected)
    by_id: dict = {}
    duplicates = []
    for record in answers:
        if "question_id" not in record:
            raise EvalInputError(f"{source}: an answer has no question_id: {record}")
        qid = record["question_id"]
        if qid in by_id:
            duplicates.append(qid)
        by_id[qid] = record
    if duplicates:
        raise EvalInputError(f"{source}: duplicate answers for question ids {_preview(duplicates)}")
    unknown = [qid for qid in by_id if qid not in expected_set]
    missing = [qid for qid in expected if qid not in by_id]
    if allow_missing:
        missing = []
    if unknown or missing:
        raise mismatch_error(source, "the question file", [
            ("answers for question ids that are not in the questions", unknown),
            ("questions without an answer", missing)])
    return by_id


def run_scorer(score: Callable[[], dict], summary: Callable[[dict], str], output_json: str | None) -> dict:
    """What every scorer's command line does with its scores: run ``score()`` (bad input ends the
    program with one line naming the file, exit code 2), print ``summary(result)``, write ``output_json``
    if given."""
    try:
        result = score()
    except EvalInputError as error:
        fail(error)
    print(summary(result))
    if output_json:
        write_json_atomic(output_json, result)
    return result

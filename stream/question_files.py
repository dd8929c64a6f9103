"""Question files: JSON Lines of the question schema, read whole and refused whole if any line is bad."""

from __future__ import annotations

from pathlib import Path

from emloc import InputError


def load_questions(path: str | Path) -> list:
    """A questions file: JSON Lines of the question schema (`Question.from_dict`: "id", "question", optional
    "at", "every", "wait") plus optional "video" and "expected"; a line without "id" is `q<line number>`.

    A file with any bad line is refused as a whole, every bad line listed with its number: the
    questions are known before any video is read, so fixing the file costs nothing now, while
    running only the good lines would cost a second pass over every video for the rest later.
    """
    from .payload import MAX_LINE_BYTES, read_json
    from .questions import BadQuestion, Question

    ids = set()

    def question(line: str, number: int) -> Question:
        q = Question.from_dict(read_json(line, MAX_LINE_BYTES), "file", new_id=lambda: f"q{number}")
        if q.id in ids:
            raise BadQuestion(f"duplicate id {q.id!r}")
        ids.add(q.id)
        return q

    return parse_lines(Path(path), question, (BadQuestion,), reading="questions",
                       refused="nothing was run", empty="no questions")


def parse_lines(path: Path, parse, errors: tuple[type[Exception], ...], *, reading: str, refused: str,
                empty: str) -> list:
    """Every non-blank line of a JSON Lines file through `parse(line, number)`. A file with any bad
    line (`parse` raised one of `errors`) is refused whole, with an InputError listing every bad line
    by its number and saying what was `refused`; an unreadable file or one with no lines too."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read {reading}: {getattr(error, 'strerror', None) or error}") from error
    out, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse(line, number))
        except errors as error:
            problems.append(f"  line {number}: {error}")
    if problems:
        raise InputError(f"{path}: {len(problems)} bad line(s), {refused}:\n" + "\n".join(problems))
    if not out:
        raise InputError(f"{path}: {empty}")
    return out

"""The errors pcamlib expects: bad input, missing files, runs that do not match.

Every failure a user can cause and fix (a misspelled parameter, a truncated file, a run
made with other settings) is a :class:`PcamlibError`. Its message names the file or
parameter, what was expected and what was found, so the command line prints it as one
line. Anything else is a bug and keeps its traceback.

The concrete classes also derive from the built-in exception that describes them
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so callers that catch those keep
working.
"""

from __future__ import annotations

from collections.abc import Sequence


class PcamlibError(Exception):
    """An expected failure whose message says what to fix."""


class InputError(PcamlibError, ValueError):
    """A parameter, argument or file content is not what was expected."""


class MissingInputError(PcamlibError, FileNotFoundError):
    """A file or folder that is needed does not exist."""


class StepError(PcamlibError, RuntimeError):
    """A step cannot go on (a diverged LR finder, a failed notebook, a failed download)."""


class OutputExistsError(PcamlibError, FileExistsError):
    """An output would replace something that is there (without being asked to)."""


def require_columns(table, columns: Sequence[str], what: str) -> None:
    """Raise :class:`InputError` naming the columns a table lacks, and those it has.

    Args:
        table: A pandas DataFrame.
        columns: The columns it must have.
        what: How the message names the table (a parameter name).
    """
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(
            f"{what} lacks column(s) {missing}; expected {', '.join(columns)}; "
            f"found {', '.join(map(str, table.columns))}"
        )

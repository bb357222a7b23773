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

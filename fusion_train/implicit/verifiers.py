"""Verifiers: plain Python callables that score a response without a reward model.

A verifier takes the response, the record's reference answer (None when the record had none) and
the prompt messages, and returns a score, or None when it cannot judge (no reference, no number
in it): such responses are left out of preference pairs instead of being ranked on nothing.

Built in: ``numeric-answer`` (math: 1.0 when the response's last number equals the reference's,
else 0.0) and ``reference-overlap`` (ROUGE-L F-measure of the words, offline and free). Any
other callable with the same signature is used by its import path, ``package.module:function``:
a module importable as usual, or a ``module.py`` in the current directory (which the
``fusion-train`` script, unlike ``python -m``, does not put on the import path).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from fusion_train.errors import UserError, one_line

Verifier = Callable[[str, "str | None", Sequence[dict[str, str]]], "float | None"]

NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
WORD = re.compile(r"\w+")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed: 1,234.5), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_answer(response: str, reference: str | None, prompt: Sequence[dict[str, str]]) -> float | None:
    """1.0 when the last number of the response equals the last number of the reference, else 0.0."""
    expected = last_number(reference) if reference is not None else None
    if expected is None:
        return None
    got = last_number(response)
    return float(got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986; Hyyrö 2004):
    one big-integer step per element of ``b`` instead of a row of a len(a) x len(b) table.

    After reading a prefix of ``b``, bit i of ``row`` is 0 when that prefix has a longer common
    subsequence with ``a[: i + 1]`` than with ``a[:i]``; so the zero bits count the LCS length.
    """
    matches: dict[str, int] = {}
    for i, token in enumerate(a):
        matches[token] = matches.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        hit = row & matches.get(token, 0)
        row = ((row + hit) | (row - hit)) & full
    return len(a) - bin(row).count("1")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def reference_overlap(response: str, reference: str | None, prompt: Sequence[dict[str, str]]) -> float | None:
    """ROUGE-L F-measure (beta = 1) between the lower-cased words of response and reference."""
    if reference is None:
        return None
    got, expected = words(response), words(reference)
    common = lcs_length(got, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(expected)
    return 2 * precision * recall / (precision + recall)


VERIFIERS: dict[str, Verifier] = {"numeric-answer": numeric_answer, "reference-overlap": reference_overlap}


def _missing(error: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the module itself (or its package) is missing, not something it imports."""
    return error.name is not None and (module_name + ".").startswith(error.name + ".")


def import_user_module(module_name: str, option: str) -> ModuleType:
    """The module of a ``module:function`` option: importable as usual, else from the current
    directory (on the import path only while it is imported, so that its files shadow nothing
    imported later); ``option`` names it in errors."""
    here = str(Path.cwd())
    for extra in ([], [here]):
        sys.path[:0] = extra
        importlib.invalidate_caches()
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if not _missing(error, module_name):
                raise UserError(f"{option}: importing {module_name} failed ({one_line(error)}).") from error
        except Exception as error:  # the user's module raised, or does not parse
            raise UserError(f"{option}: importing {module_name} failed ({one_line(error)}).") from error
        finally:
            del sys.path[: len(extra)]
    raise UserError(
        f"{option}: no module {module_name!r} on the import path (PYTHONPATH) or in the current directory {here}; "
        "run from the folder holding it, or add that folder to PYTHONPATH."
    )


def get_verifier(name: str) -> Verifier:
    """A built-in verifier by name, or any callable by ``package.module:function`` that can be
    called as ``f(response, reference, prompt)``."""
    if name in VERIFIERS:
        return VERIFIERS[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(
            f"--verifier {name!r}: unknown; built in: {', '.join(VERIFIERS)}, or give package.module:function."
        )
    module = import_user_module(module_name, f"--verifier {name!r}")
    found = getattr(module, attribute, None)
    if found is None:
        raise UserError(f"--verifier {name!r}: {module.__file__} has no {attribute!r}.")
    if not callable(found):
        raise UserError(f"--verifier {name!r}: {type(found).__name__} is not callable.")
    try:
        inspect.signature(found).bind("response", "reference", [])
    except TypeError as error:
        raise UserError(
            f"--verifier {name!r}: {attribute}{inspect.signature(found)} cannot be called as "
            f"{attribute}(response, reference, prompt) ({one_line(error)})."
        ) from error
    except ValueError:  # no signature to read (some built-ins): a wrong one shows when it is called
        pass
    return found

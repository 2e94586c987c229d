"""One formatter of pydantic validation errors, for configs and recipes alike: each error as
``field.path: message``, an unknown key with the nearest valid one suggested."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

_PATH = re.compile(r"[a-z_0-9]+(\.[a-z_0-9]+)*")


def _fields_of(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at ``loc`` (for suggesting the nearest one to an unknown key)."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            inner = [a for arg in args for a in (getattr(arg, "__args__", ()) or ())]
            nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        cls = nxt
    return list(cls.model_fields) if cls is not None and hasattr(cls, "model_fields") else []


def format_errors(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The errors of ``err`` in one line; ``model`` (the validated class) lets unknown keys get a
    did-you-mean hint."""
    msgs = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (
            p.startswith(("function-", "tagged-union")) or p in ("str", "SearchSpace", "DfsSpace"))))
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            fields = _fields_of(model, loc) if model is not None else []
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msgs.append(f"{where}: unknown key{hint}")
        elif e["type"] == "missing":
            msgs.append(f"{where}: required field is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            head = msg.split(": ", 1)[0]
            if ": " in msg and _PATH.fullmatch(head):  # a validator that names the field itself
                msgs.append(f"{where}.{msg}" if loc and head[0].isdigit() else msg if not loc else f"{where}: {msg}")
            else:
                msgs.append(f"{where}: {msg}")
    return "; ".join(dict.fromkeys(msgs))

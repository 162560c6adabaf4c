"""The subset of the engine's search language that backup clients send (``?search=``).

    query  := [terms] ["page" N]                 N ≥ 1: the Nth page of ``max`` results
    terms  := term (("and" | "or") term)*        "and" binds tighter than "or"
    term   := field ("=" | "!=") value           value: word or "quoted words";
                                                 ``*`` in a value matches any run of characters

Examples: ``name=web*``, ``cluster=Default and status=up``, ``id=<uuid> or name="my vm"``,
``page 2`` (SDK-EX ``page_vms.py`` pages with ``search="page N"`` and ``max=``).
Each collection says which fields it knows; an object exposes, per field, one value or several
(a VM has many tags: ``tag=gold`` matches if any of them is ``gold``). Matching is
case-sensitive unless the caller says otherwise, like the engine's ``case_sensitive=`` default.
The engine's ``Vms:`` prefixes, ``<``/``>`` and sorting (``sortby``) are not supported.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_TERM = re.compile(r'\s*([A-Za-z_][\w.]*)\s*(!=|=)\s*(?:"([^"]*)"|([^\s"]+))\s*')
_JOIN = re.compile(r"(and|or)\s+", re.IGNORECASE)
_PAGE = re.compile(r"(?:^|\s+)page\s+(\d+)\s*$", re.IGNORECASE)


class SearchError(ValueError):
    """The query is malformed or names a field the collection does not have."""


@dataclass(frozen=True, slots=True)
class _Term:
    field: str
    negate: bool
    pattern: str


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query in disjunctive normal form: any group whose terms all match."""

    groups: tuple[tuple[_Term, ...], ...]
    case_sensitive: bool = True
    page: int | None = None  # ``page N``: the caller selects the Nth ``max``-sized slice

    def matches(self, fields: Mapping[str, str | Iterable[str] | None]) -> bool:
        """Whether an object with these field values is selected; a missing value never equals."""
        return not self.groups or any(all(self._term(t, fields) for t in g) for g in self.groups)

    def _term(self, term: _Term, fields: Mapping[str, str | Iterable[str] | None]) -> bool:
        raw = fields.get(term.field)
        values = [] if raw is None else [raw] if isinstance(raw, str) else list(raw)
        flags = 0 if self.case_sensitive else re.IGNORECASE
        regex = ".*".join(re.escape(part) for part in term.pattern.split("*"))
        hit = any(re.fullmatch(regex, v, flags) for v in values)
        return hit != term.negate


def parse(query: str | None, known: Iterable[str], *, case_sensitive: bool = True) -> Query:
    """Parse ``query`` (None or blank selects everything). Raises ``SearchError``."""
    page = None
    if query is not None and (m := _PAGE.search(query)) is not None:
        page = int(m.group(1))
        if page < 1:
            raise SearchError(f"page must be 1 or more in search {query!r}")
        query = query[: m.start()]
    if query is None or not query.strip():
        return Query((), case_sensitive, page)
    allowed = set(known)
    groups: list[list[_Term]] = [[]]
    pos = 0
    while True:
        m = _TERM.match(query, pos)
        if m is None:
            raise SearchError(f"cannot parse search {query!r} at offset {pos}")
        name = m.group(1).lower()
        if name not in allowed:
            raise SearchError(f"unknown search field {name!r}; known: {', '.join(sorted(allowed))}")
        value = m.group(3) if m.group(3) is not None else m.group(4)
        groups[-1].append(_Term(name, m.group(2) == "!=", value))
        pos = m.end()
        if pos == len(query):
            break
        j = _JOIN.match(query, pos)
        if j is None:
            raise SearchError(f"expected 'and' or 'or' in search {query!r} at offset {pos}")
        if j.group(1).lower() == "or":
            groups.append([])
        pos = j.end()
    return Query(tuple(tuple(g) for g in groups), case_sensitive, page)

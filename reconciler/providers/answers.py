"""A vendor's answer is input: parsed by a model, checked, and refused in one line when it is wrong.

Every provider reads its answers through `parse(response, adapter, system)`: a pydantic `TypeAdapter` over
the whole answer (a page with its list, or a bare list), validated from the raw bytes in one call, so that
checking costs no Python loop per item. The models are lenient on fields the tool does not use (unknown
keys are kept and ignored) and strict on what it relies on: a list is a list (never null, never missing:
a null list is not an empty system), an id is a non-empty string. A malformed answer is a `VendorFault`:
exit 1, one line naming the system, the method, the path and what was wrong; never "internal error".

Listings are then checked before the planner sees them (`unique`): an item repeated identically (a paging
glitch) is kept once and logged; two different objects with one id are a `VendorFault`. A listing that has
lost most of what the state recorded as existing is refused as suspicious (`check_not_emptied`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, NotRequired, TypeVar

import httpx
from pydantic import ConfigDict, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from reconciler.errors import RefusedError, VendorError
from reconciler.text import printable

log = logging.getLogger(__name__)

T = TypeVar("T")

# An id as every vendor gives it: a non-empty string without control characters, of a sane length.
Id = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]

# A listing has lost "most" of what the state recorded as existing when more than this share of at least
# `SUSPICIOUS_MIN` recorded objects is missing from it.
SUSPICIOUS_SHARE = 0.5
SUSPICIOUS_MIN = 10
ACKNOWLEDGE_VARIABLE = "RECONCILER_ACCEPT_EMPTIED"   # names the systems the operator knows were emptied


class VendorFault(VendorError):
    """A vendor's answer is malformed or implausible (not JSON, a list that is null, an id twice for two
    objects, a listing that lost most of what exists): the vendor's fault, exit 1, nothing is applied."""


class NotInEffect(VendorError):
    """The vendor acknowledged a revocation, but reading the object back shows it is still there."""


def where(response: httpx.Response) -> tuple[str, str]:
    request = response.request
    return request.method, printable(request.url.path)[:200]


def fault(system: str, method: str, path: str, what: str) -> VendorFault:
    return VendorFault(f"{system}: {method} {path}: the vendor's answer is malformed: {printable(what)}")


def _explain(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if not errors:
        return "it does not have the documented shape"
    first = errors[0]
    place = ".".join(str(part) for part in first.get("loc", ())) or "the answer"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"not valid JSON ({first.get('msg', '')}){more}"
    return f"{place}: {first.get('msg', 'invalid')}{more}"


def parse(response: httpx.Response, adapter: TypeAdapter[T], system: str) -> T:
    """The answer's body through `adapter`, validated from the raw bytes in one call."""
    method, path = where(response)
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    body = response.content
    if content_type and "json" not in content_type:
        raise fault(system, method, path, f"HTTP {response.status_code} with Content-Type {content_type[:60]}, "
                                          "not JSON")
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        if not body.strip():
            raise fault(system, method, path, "an empty body where JSON was expected") from None
        raise fault(system, method, path, _explain(exc)) from None


def created(response: httpx.Response, adapter: TypeAdapter[T], system: str) -> T:
    """The answer to a create: a malformed one is a fault that leaves the create uncertain (the vendor said
    2xx, so it may well exist): `ambiguous`, like a lost answer. Providers parse it after the send, outside
    `create_checked`: nothing is sent again and nothing is recorded as created on a guess; the change is
    reported uncertain (apply exits 1), its intent stays, and the next read settles it (by the natural key
    or the intent), as it does for a lost answer no lookup could settle."""
    try:
        return parse(response, adapter, system)
    except VendorFault as exc:
        raise VendorFault(f"{exc}; the create may have taken effect: the next plan looks it up",
                          temporary=True, ambiguous=True) from None


def uncertain(system: str, method: str, path: str, what: str) -> VendorFault:
    """A 2xx answer to a create that cannot be right (it names another object, say): a fault that leaves the
    create uncertain, as `created` does."""
    return VendorFault(f"{fault(system, method, path, what)}; the create may have taken effect: the next plan "
                       "looks it up", temporary=True, ambiguous=True)


def error_body(response: httpx.Response) -> Any:
    """An error answer's JSON body, or None when it has none: for describing the error in one line only
    (never relied on), so a malformed error body never hides the error it came with."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def model(name: str, fields: Mapping[str, Any], *, optional: Iterable[str] = ()) -> Any:
    """A lenient TypedDict `name` for an answer's object: `fields` (name → type) required, except those named
    in `optional`; unknown keys are kept and ignored."""
    kinds = {key: NotRequired[kind] if key in set(optional) else kind for key, kind in fields.items()}
    shape = TypedDict(name, kinds)    # type: ignore[misc]
    shape.__pydantic_config__ = LENIENT  # type: ignore[attr-defined]
    return shape


def adapter(shape: Any) -> TypeAdapter[Any]:
    return TypeAdapter(shape)


def loads(response: httpx.Response, system: str) -> Any:
    """Any JSON value (for answers the tool only looks into with `.get`): malformed JSON is a fault."""
    return parse(response, ANY, system)


ANY: TypeAdapter[Any] = TypeAdapter(Any)
OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def unique(items: Iterable[T], *, system: str, what: str, key: str = "id",
           fold: bool = False) -> list[T]:
    """`items` with identical repeats kept once (logged); two different objects with one `key` are a
    `VendorFault`. `fold`: compare ids case-insensitively (vendors whose UUIDs come in either case)."""
    seen: dict[Any, Any] = {}
    kept: list[T] = []
    repeats = 0
    for item in items:
        ident = item[key]  # type: ignore[index]
        if fold and isinstance(ident, str):
            ident = ident.lower()
        earlier = seen.get(ident)
        if earlier is None:
            seen[ident] = item
            kept.append(item)
        elif earlier == item:
            repeats += 1
        else:
            raise VendorFault(f"{system}: {what}: the vendor listed two different objects with {key} "
                              f"{printable(str(ident))[:80]}; refusing to plan on a contradictory listing")
    if repeats:
        log.warning("vendor listed items more than once; each kept once system=%s listing=%s repeats=%d",
                    system, printable(what), repeats)
    return kept


def check_not_emptied(system: str, kind: str, recorded: Iterable[str], listed: Iterable[str]) -> None:
    """Refuse a listing that has lost most of what the state recorded as existing. `listed`: what the vendor
    still lists, whatever its status (a key the owner revoked is listed, not lost); only absent ones count.

    A new system (the state records nothing of this kind yet) is never refused. A system that really was
    emptied is told apart only by the operator: name it in `RECONCILER_ACCEPT_EMPTIED` (comma-separated
    system names, or `*`) for that run, or forget the records (`reconciler state forget`)."""
    recorded_ids = {str(r).lower() for r in recorded if r}
    if len(recorded_ids) < SUSPICIOUS_MIN:
        return
    present = {str(i).lower() for i in listed if i}
    missing = len(recorded_ids - present)
    if missing <= SUSPICIOUS_SHARE * len(recorded_ids):
        return
    accepted = {s.strip() for s in os.environ.get(ACKNOWLEDGE_VARIABLE, "").split(",") if s.strip()}
    if system in accepted or "*" in accepted:
        log.warning("listing lost most recorded objects; accepted by the operator system=%s kind=%s missing=%d "
                    "recorded=%d", system, kind, missing, len(recorded_ids))
        return
    raise RefusedError(
        f"{system}: refused as suspicious: the vendor listed {len(recorded_ids) - missing} of the "
        f"{len(recorded_ids)} {kind}s the state recorded as existing ({missing} missing); a glitch at the "
        f"vendor must not be planned on. If the system really was emptied, run again with "
        f"{ACKNOWLEDGE_VARIABLE}={system}")


LENIENT = ConfigDict(extra="allow")    # fields the tool does not use are kept and ignored
_ADAPTERS: dict[tuple[str | None, str, tuple[str, ...], int], TypeAdapter[Any]] = {}


def page_of(field: str | None, key: str = "id", *, extra: Mapping[str, Any] | None = None,
            item: Any = None) -> TypeAdapter[Any]:
    """The adapter of a page `{<field>: [{<key>: id, ...}, ...], ...}` (or a bare list when `field` is None):
    the list required and a list, each item an object with a string `key` (or of the shape `item`, a
    `model(...)` that has it); `extra`: more fields of the page with their types (a cursor, say), all optional."""
    cache = (field, key, tuple(sorted(extra or {})), id(item))
    adapter = _ADAPTERS.get(cache)
    if adapter is None:
        if item is None:
            item = model("item", {key: Id})
        if field is None:
            adapter = TypeAdapter(list[item])   # type: ignore[valid-type]
        else:
            fields: dict[str, Any] = {field: list[item], **(extra or {})}   # type: ignore[valid-type]
            adapter = TypeAdapter(model("page", fields, optional=extra or {}))
        _ADAPTERS[cache] = adapter
    return adapter


def listing(response: httpx.Response, field: str | None, system: str, *, key: str = "id", fold: bool = False,
            check: bool = True, item: Any = None) -> list[Any]:
    """A one-page listing, parsed and checked (`unique`): the items (of the shape `item` when given)."""
    body = parse(response, page_of(field, key, item=item), system)
    items = body if field is None else body[field]
    if not check:
        return list(items)
    method, path = where(response)
    return unique(items, system=system, what=f"{method} {path}", key=key, fold=fold)
MAX_PAGES = 10_000     # a vendor paging forever stops here (a million items at 100 a page)

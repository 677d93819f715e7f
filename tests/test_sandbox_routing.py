"""The routing prelude every simulator shares (`Simulator.route_of`): a path no route has is the vendor's 404,
a known path with another method its 405 naming the methods in `Allow`, each in the vendor's error format."""

from __future__ import annotations

import re

import pytest
from harness import ABLOY, SENTRY, SPKEY, UNLOC, UNLOC_PARTNER, VendorHarness

from reconciler.sandbox.abloy import MEDIA_TYPE

# vendor, headers the vendor checks before routing, its 404 detail, (field holding the detail, title field)
CASES = [
    (ABLOY, {"X-Api-Key": None, "Accept": MEDIA_TYPE}, "Resource not found", ("detail", "title", "Not Found")),
    (UNLOC, {}, "Resource not found", ("errorDescription", "error", "NotFound")),
    (UNLOC_PARTNER, {}, "Not found", ("errorDescription", "error", "NotFound")),
    (SPKEY, {"X-API-Key": None}, "The requested resource was not found", None),
    (SENTRY, {}, "Resource not found", None),
]


def _headers(h: VendorHarness, headers: dict[str, str | None]) -> dict[str, str]:
    return {name: value or h.sim.credentials["api_key"] for name, value in headers.items()}


@pytest.mark.parametrize(("vendor", "headers", "detail", "fields"), CASES, ids=lambda c: getattr(c, "vendor", ""))
def test_an_unknown_path_is_the_vendors_404_and_a_wrong_method_its_405(tmp_path, vendor, headers, detail, fields):
    h = VendorHarness(tmp_path, vendor)
    prefix = "/administration" if vendor is ABLOY else ""
    missing = h.raw("GET", f"{prefix}/no/such/thing", headers=_headers(h, headers))
    assert missing.status_code == 404, missing.text
    assert detail in missing.text
    route = h.sim.routes[0]
    methods = {r.method for r in h.sim.routes if r.template == route.template}
    wrong = next(m for m in ("PATCH", "DELETE", "PUT", "POST", "GET") if m not in methods)
    refused = h.raw(wrong, prefix + re.sub(r"\{\w+\}", "1", route.template), headers=_headers(h, headers))
    assert refused.status_code == 405, refused.text
    assert refused.headers["Allow"] == ", ".join(sorted(methods))
    assert re.search(f"Method {wrong} is not allowed here", refused.text)
    if fields is not None:
        detail_field, title_field, title = fields
        assert missing.json()[detail_field] == detail and missing.json()[title_field] == title

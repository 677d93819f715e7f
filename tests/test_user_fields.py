"""An account carries the user fields its vendor's user schema declares (`UserField`), in the policy and in
`reconciler export`: Abloy's `{role}` is one such schema, not the shape of every account."""

from __future__ import annotations

from reconciler.export import _account_entry, _adopt
from reconciler.policy.schema import USER_FIELD, UserModel, user_fields
from reconciler.providers.abloy import CAPABILITIES as ABLOY
from reconciler.resources import Attribute, Kind, KindSchema, Resource

EMAIL_NAME = KindSchema({"email": Attribute(str), "name": Attribute(str)})


def test_user_fields_are_the_marked_ones() -> None:
    assert user_fields() == ("name", "email", "phone", "role")
    assert USER_FIELD in UserModel.model_fields["email"].metadata


def test_export_adopts_an_account_with_the_fields_its_vendor_declares() -> None:
    live = Resource("doors", Kind.USER, "id:u1", {"email": "ann@example.com", "name": "Ann", "extra": 1}, id="u1")
    [adopted], keys = _adopt("doors", [live], EMAIL_NAME)
    assert dict(adopted.attributes) == {"email": "ann@example.com", "name": "Ann"} and keys == {"u1": "user-u1"}
    assert dict(_account_entry(adopted)) == {"email": "ann@example.com", "name": "Ann"}


def test_export_of_an_abloy_account_is_its_role_as_before() -> None:
    admin = Resource("hq", Kind.USER, "id:u2", {"role": "ADMIN"}, id="u2")
    plain = Resource("hq", Kind.USER, "id:u3", {"role": "USER"}, id="u3")
    adopted, _ = _adopt("hq", [admin, plain], ABLOY.schema(Kind.USER))
    assert [dict(_account_entry(a)) for a in adopted] == [{"role": "ADMIN"}, {}]

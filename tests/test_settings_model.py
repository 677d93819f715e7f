"""Providers receive their system settings as the vendor's validated settings model (`settings_model`), not a
raw mapping: typed fields, the defaults the model states, and no second validation in the provider."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from reconciler import vendors
from reconciler.policy import load_policy
from reconciler.providers.abloy import AbloySettings
from reconciler.providers.base import Provider
from reconciler.providers.factory import build_provider, settings_of
from reconciler.providers.settings import VendorSettings
from reconciler.providers.unloc import UnlocProvider, UnlocSettings
from reconciler.providers.unloc_partner import UnlocPartnerSettings
from reconciler.secret import Secret
from reconciler.state import LocalState

DATA = Path(__file__).parent / "data"
ENV = {
    "ABLOY_USER_ID": "abloy-user", "ABLOY_ACCESS_KEY": "abloy-access", "ABLOY_API_KEY": "abloy-api",
    "UNLOC_CLIENT_ID": "unloc-id", "UNLOC_CLIENT_SECRET": "unloc-secret", "UNLOC_PARTNER_KEY": "partner-key",
    "SPKEY_API_KEY": "spkey-key", "SENTRY_EMAIL": "ops@example.com", "SENTRY_PASSWORD": "sentry-password",
}
NOW = datetime(2030, 1, 1, tzinfo=UTC)
HOLDER = "866b8a35-4184-44c5-8ffd-448a77e5a91c"


def _providers(tmp_path: Path, edit: tuple[str, str] | None = None) -> dict[str, Provider]:
    policy_dir = tmp_path / "policy"
    shutil.copytree(DATA / "valid" / "full", policy_dir)
    if edit is not None:
        main = policy_dir / "policy.yaml"
        main.write_text(main.read_text().replace(*edit))
    policy = load_policy(policy_dir, vendors.capabilities(), ENV)
    state = LocalState(tmp_path / "state.json")
    return {name: build_provider(system, state, sandbox_dir=tmp_path / "sandbox", clock=lambda: NOW)
            for name, system in policy.systems.items()}


def test_each_provider_holds_its_vendors_settings_model_instance(tmp_path):
    providers = _providers(tmp_path)
    cabins, rentals = providers["cabins"], providers["rentals"]
    assert isinstance(cabins.settings, UnlocSettings)
    assert (cabins.settings.lock_holder_id, cabins.settings.notify) == (HOLDER, True)    # the model's default
    assert isinstance(rentals.settings, UnlocPartnerSettings) and rentals.settings.partner_id == "abcpartner"
    assert isinstance(providers["hq"].settings, AbloySettings)
    assert type(providers["guests"].settings) is VendorSettings
    assert all(p.settings.max_answer_mb is None for p in providers.values())


def test_settings_written_in_the_policy_reach_the_provider_typed(tmp_path):
    providers = _providers(tmp_path, ("    lock_holder_id: 866b8a35", "    notify: false\n    lock_holder_id: 866b8a35"))
    cabins = providers["cabins"]
    assert cabins.settings.notify is False and cabins.notify is False


def test_abloy_invitation_validity_from_the_model(tmp_path):
    providers = _providers(tmp_path, ("    unmanaged: revoke ", "    invitation_validity: PT48H\n    unmanaged: revoke "))
    hq = providers["hq"]
    assert hq.settings.invitation_validity == "PT48H"
    assert hq.settings.invitation_lifetime == timedelta(hours=48)
    assert AbloySettings().invitation == "P7D" and AbloySettings().invitation_lifetime == timedelta(days=7)
    with pytest.raises(ValidationError, match="PT1S to P365D"):
        AbloySettings(invitation_validity="P400D")


def test_the_factory_turns_validated_settings_into_the_model():
    made = settings_of(UnlocProvider, {"lock_holder_id": HOLDER, "notify": False})
    assert made == UnlocSettings(lock_holder_id=HOLDER, notify=False)


def test_a_mapping_given_directly_is_validated_by_the_vendors_model(tmp_path):
    def make(settings):
        return UnlocProvider("cabins", url=None, credentials={"client_id": Secret("i"), "client_secret": Secret("s")},
                             settings=settings, state=LocalState(tmp_path / "s.json"), clock=lambda: NOW)

    assert make({"lock_holder_id": HOLDER.upper()}).lock_holder == HOLDER
    with pytest.raises(ValidationError, match="is not a UUID"):
        make({"lock_holder_id": "nope"})
    given = UnlocSettings(lock_holder_id=HOLDER)
    assert make(given).settings is given      # the instance, not a copy or a dict


def test_a_settings_model_that_is_no_pydantic_model_is_refused_at_registration():
    from reconciler import vendors

    class Odd(UnlocProvider):
        settings_model = dict    # type: ignore[assignment]

    with pytest.raises(vendors.RegistryError, match=r"settings_model is not a pydantic model"):
        vendors.declaration("unloc", Odd)
    assert vendors.declaration("unloc", UnlocProvider).settings_model is UnlocSettings

"""Sign-up, log-in, log-out, password reset and change, where `/` leads, and the throttles
on the doors that could be brute-forced."""

from __future__ import annotations

import itertools
import re
import time

import pytest
import time_machine
from django.core import mail
from django.test import Client, override_settings
from django.urls import reverse
from django.utils.crypto import get_random_string

from apps.dashboard.access import LAST_ORG_SESSION_KEY
from apps.tenancy.models import Membership, Organization, Role, User
from apps.tenancy.services import TenancyError, user_sign_up

pytestmark = pytest.mark.django_db

GOOD_PASSWORD = "correct horse battery"


def test_sign_up_creates_the_user_and_their_personal_organization_and_signs_in(client):
    response = client.post(
        reverse("signup"), {"email": "Alice@Example.com", "password": GOOD_PASSWORD}
    )
    user = User.objects.get(email="alice@example.com")
    membership = Membership.objects.select_related("organization").get(user=user)
    assert membership.role == Role.OWNER
    assert membership.organization.is_personal
    assert membership.organization.slug == "alice"
    assert response.status_code == 302
    assert client.get(response.url, follow=True).context["user"] == user
    assert client.get("/").url == reverse("keys-list", kwargs={"org_slug": "alice"})


def test_the_personal_slug_is_made_unique(db):
    user_sign_up(email="bob@one.example", password=GOOD_PASSWORD)
    second = user_sign_up(email="bob@two.example", password=GOOD_PASSWORD)
    slug = second.memberships.get().organization.slug
    assert re.fullmatch(r"bob-[0-9a-f]{6}", slug)


def test_sign_up_refuses_a_taken_address_and_leaves_nothing_behind(client, owner):
    organizations = Organization.objects.count()
    response = client.post(
        reverse("signup"), {"email": "OWNER@example.com", "password": GOOD_PASSWORD}
    )
    assert response.status_code == 200
    assert response.context["form"].errors["email"]
    assert Organization.objects.count() == organizations
    with pytest.raises(TenancyError):
        user_sign_up(email="owner@example.com", password=GOOD_PASSWORD)


def test_sign_up_applies_the_password_rules(client):
    response = client.post(reverse("signup"), {"email": "c@example.com", "password": "123"})
    assert response.context["form"].errors["password"]
    assert not User.objects.filter(email="c@example.com").exists()


def test_sign_up_goes_on_to_a_safe_next_page_only(client):
    response = client.post(
        reverse("signup") + "?next=/o/whatever/keys/",
        {"email": "d@example.com", "password": GOOD_PASSWORD},
    )
    assert response.url == "/o/whatever/keys/"
    other = Client()
    response = other.post(
        reverse("signup"),
        {"email": "e@example.com", "password": GOOD_PASSWORD, "next": "https://evil.example/"},
    )
    assert response.url == reverse("dashboard-home")


def test_log_in_and_log_out(client, owner, org):
    response = client.post(
        reverse("login"), {"username": "owner@example.com", "password": "pw-owner-1234"}
    )
    assert response.status_code == 302
    assert client.get("/").status_code == 302
    assert client.get(reverse("account")).status_code == 200
    assert client.get(reverse("logout")).status_code == 405  # log-out is a POST
    client.post(reverse("logout"))
    assert client.get(reverse("account")).url.startswith(reverse("login"))


def test_a_wrong_password_is_refused_on_the_form(client, owner):
    response = client.post(reverse("login"), {"username": "owner@example.com", "password": "no"})
    assert response.status_code == 200
    assert response.context["form"].non_field_errors()


def test_home_leads_anonymous_visitors_to_log_in(client):
    response = client.get("/")
    assert response.url.startswith(reverse("login"))


def test_home_leads_to_the_last_organization_worked_in_then_the_personal_one(client, owner, org):
    personal = user_sign_up(email="p@example.com", password=GOOD_PASSWORD)
    personal_slug = personal.memberships.get().organization.slug
    Membership.objects.create(user=personal, organization=org, role=Role.VIEWER)
    client.force_login(personal)
    assert client.get("/").url == reverse("keys-list", kwargs={"org_slug": personal_slug})
    client.get(reverse("models-list", kwargs={"org_slug": "acme"}))
    assert client.session[LAST_ORG_SESSION_KEY] == "acme"
    assert client.get("/").url == reverse("keys-list", kwargs={"org_slug": "acme"})
    Membership.objects.filter(user=personal, organization=org).delete()
    assert client.get("/").url == reverse("keys-list", kwargs={"org_slug": personal_slug})


def test_home_of_a_user_without_organizations_offers_to_create_one(client, db):
    user = User.objects.create_user(email="lonely@example.com", password="x")
    client.force_login(user)
    assert client.get("/").url == reverse("org-create")


def test_password_reset_emails_a_link_that_sets_a_new_password(client, owner):
    response = client.post(reverse("password_reset"), {"email": "owner@example.com"})
    assert response.url == reverse("password_reset_done")
    (message,) = mail.outbox
    assert message.to == ["owner@example.com"]
    link = re.search(r"https?://\S+", message.body).group(0)
    path = link.split("testserver", 1)[1]
    response = client.get(path, follow=True)  # Django swaps the token for a session one
    assert response.context["validlink"]
    response = client.post(
        response.redirect_chain[-1][0],
        {"new_password1": "a brand new pass", "new_password2": "a brand new pass"},
    )
    assert response.url == reverse("password_reset_complete")
    owner.refresh_from_db()
    assert owner.check_password("a brand new pass")


def test_password_reset_says_the_same_for_an_unknown_address(client, db):
    response = client.post(reverse("password_reset"), {"email": "nobody@example.com"})
    assert response.url == reverse("password_reset_done")
    assert mail.outbox == []


def test_change_password(client, owner):
    client.force_login(owner)
    response = client.post(
        reverse("password_change"),
        {
            "old_password": "pw-owner-1234",
            "new_password1": "another fine pass",
            "new_password2": "another fine pass",
        },
    )
    assert response.url == reverse("account")
    owner.refresh_from_db()
    assert owner.check_password("another fine pass")


def test_change_password_needs_the_old_one(client, owner):
    client.force_login(owner)
    response = client.post(
        reverse("password_change"),
        {"old_password": "wrong", "new_password1": "x-y-z-1234", "new_password2": "x-y-z-1234"},
    )
    assert response.status_code == 200
    assert response.context["form"].errors["old_password"]


# --- Throttles (issue 5, item 3) -------------------------------------------------------
# Counters live in the cache, which on Redis outlives a test: each test below uses
# addresses and email addresses of its own, so no test spends another's attempts.

_addresses = (f"203.0.{i // 250}.{i % 250 + 1}" for i in itertools.count())


def _fresh_client() -> Client:
    return Client(REMOTE_ADDR=next(_addresses))


def _fresh_email() -> str:
    return f"{get_random_string(10).lower()}@example.com"


@pytest.fixture
def one_window():
    """Hold the clock still: django-ratelimit counts in fixed windows, so a test that ran
    across a window's edge would see its count start again and never reach the limit."""
    with time_machine.travel(time.time(), tick=False):
        yield


def _assert_throttled(response) -> None:
    assert response.status_code == 429
    assert int(response["Retry-After"]) >= 1
    assert b"Too many attempts" in response.content


@pytest.mark.usefixtures("one_window")
def test_log_in_is_limited_per_address(db):
    client = _fresh_client()
    for _ in range(10):
        response = client.post(reverse("login"), {"username": _fresh_email(), "password": "no"})
        assert response.status_code == 200
    _assert_throttled(client.post(reverse("login"), {"username": _fresh_email(), "password": "x"}))


@pytest.mark.usefixtures("one_window")
def test_log_in_is_limited_per_account_whatever_the_address(db):
    email = _fresh_email()
    User.objects.create_user(email=email, password=GOOD_PASSWORD)
    for i in range(5):
        response = _fresh_client().post(
            reverse("login"), {"username": email, "password": f"guess{i}"}
        )
        assert response.status_code == 200
    # Once the account's attempts are spent, the right password waits too, however the
    # address is written.
    _assert_throttled(
        _fresh_client().post(
            reverse("login"), {"username": f" {email.upper()}", "password": GOOD_PASSWORD}
        )
    )


@pytest.mark.usefixtures("one_window")
def test_sign_up_is_limited_per_address(db):
    client = _fresh_client()
    for _ in range(5):
        response = client.post(
            reverse("signup"), {"email": _fresh_email(), "password": GOOD_PASSWORD}
        )
        assert response.status_code == 302
        client.post(reverse("logout"))
    late = _fresh_email()
    _assert_throttled(client.post(reverse("signup"), {"email": late, "password": GOOD_PASSWORD}))
    assert not User.objects.filter(email=late).exists()
    assert _fresh_client().get(reverse("signup")).status_code == 200


@pytest.mark.usefixtures("one_window")
def test_password_reset_is_limited_per_account(db):
    email = _fresh_email()
    User.objects.create_user(email=email, password=GOOD_PASSWORD)
    for _ in range(3):
        response = _fresh_client().post(reverse("password_reset"), {"email": email})
        assert response.status_code == 302
    _assert_throttled(_fresh_client().post(reverse("password_reset"), {"email": email}))
    assert len(mail.outbox) == 3


@pytest.mark.usefixtures("one_window")
def test_password_reset_is_limited_per_address(db):
    client = _fresh_client()
    for _ in range(5):
        response = client.post(reverse("password_reset"), {"email": _fresh_email()})
        assert response.status_code == 302
    _assert_throttled(client.post(reverse("password_reset"), {"email": _fresh_email()}))


@pytest.mark.usefixtures("one_window")
def test_the_throttle_page_is_translated(db):
    client = _fresh_client()
    for _ in range(10):
        client.post(reverse("login"), {"username": _fresh_email(), "password": "x"})
    response = client.post(
        reverse("login"),
        {"username": _fresh_email(), "password": "x"},
        HTTP_ACCEPT_LANGUAGE="zh-Hans",
    )
    assert response.status_code == 429
    assert "尝试次数过多" in response.content.decode()


def test_with_the_cache_down_log_in_still_works(owner, caplog):
    dead_cache = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens there
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
        }
    }
    # A context, not the settings fixture: the cache must be back before the shared
    # fixtures clean up after the test.
    with override_settings(CACHES=dead_cache):
        response = _fresh_client().post(
            reverse("login"), {"username": "owner@example.com", "password": "pw-owner-1234"}
        )
    assert response.status_code == 302
    assert "cache unavailable" in caplog.text

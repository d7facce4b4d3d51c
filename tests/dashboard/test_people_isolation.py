"""Tenant isolation and CSRF across every dashboard URL, found by walking the URL
configuration rather than listed by hand, so a page added later is covered the day it
appears (the balance and usage pages included)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, reverse

from apps.dashboard import urls as dashboard_urls
from apps.keys.models import ApiKey
from apps.tenancy.models import Invitation, Membership
from apps.tenancy.services import invitation_create

pytestmark = pytest.mark.django_db

_PARAM = re.compile(r"<(?:(?P<converter>[^>:]+):)?(?P<name>[^>]+)>")


@dataclass(frozen=True)
class Route:
    name: str
    route: str  # the full pattern, e.g. "o/<slug:org_slug>/keys/<int:pk>/edit/"
    params: tuple[str, ...]


def _walk(patterns, prefix: str = "") -> Iterator[Route]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _walk(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            route = prefix + str(entry.pattern)
            yield Route(
                name=entry.name or "",
                route=route,
                params=tuple(m.group("name") for m in _PARAM.finditer(route)),
            )


def _dashboard_routes() -> list[Route]:
    """Every URL the dashboard serves, Django's own auth and language views included (it
    is mounted at the root, so these paths are the site's)."""
    return list(_walk(dashboard_urls.urlpatterns))


def _org_routes() -> list[Route]:
    return [r for r in _dashboard_routes() if "org_slug" in r.params]


def test_the_walker_finds_the_pages_it_must_cover():
    names = {r.name for r in _org_routes()}
    assert {"keys-list", "key-edit", "key-revoke", "members", "member-remove"} <= names
    assert all(r.name for r in _org_routes()), "every organization page needs a URL name"


@pytest.fixture
def victim_objects(owner, org, member, api_key) -> dict[str, list[int]]:
    """The victim organization's objects of every kind a URL can name by id."""
    invitation, _token = invitation_create(
        actor=Membership.objects.get(user=owner),
        email="invitee@example.com",
        role="viewer",
        accept_url=lambda token: token,
    )
    return {
        "key": [api_key.pk],
        "membership": list(
            Membership.objects.filter(organization=org).values_list("pk", flat=True)
        ),
        "invitation": [invitation.pk],
    }


def _kwargs(route: Route, *, org_slug: str, pk: int) -> dict:
    # Values for ids the walker does not know (a Stripe session id, say) do not matter:
    # the membership check answers before anything is looked up.
    return {p: org_slug if p == "org_slug" else pk if p == "pk" else "x" for p in route.params}


def test_an_outsider_gets_404_from_every_page_of_another_organization(outsider, victim_objects):
    client = Client()
    client.force_login(outsider)
    ids = {pk for pks in victim_objects.values() for pk in pks}
    checked = 0
    for route in _org_routes():
        for pk in ids if "pk" in route.params else [0]:
            url = reverse(route.name, kwargs=_kwargs(route, org_slug="acme", pk=pk))
            for method in (client.get, client.post):
                response = method(url)
                assert response.status_code == 404, (route.name, method.__name__, url)
                checked += 1
    assert checked >= 2 * len(_org_routes())


# Which kind of object the id in a route names, by the path segment before it. An id of
# one kind may equal an id of another kind that the outsider owns (the tables count
# separately), which would prove nothing; so known routes get ids of their own kind only.
_KIND_BY_SEGMENT = {"keys": "key", "members": "membership", "invitations": "invitation"}


def _ids_for(route: Route, victim_objects: dict[str, list[int]], own_ids: set[int]) -> set[int]:
    segment = route.route.split("<int:pk>")[0].rstrip("/").rsplit("/", 1)[-1]
    kind = _KIND_BY_SEGMENT.get(segment)
    if kind is not None:
        return set(victim_objects[kind])
    return {pk for pks in victim_objects.values() for pk in pks} - own_ids


def test_an_object_of_another_organization_is_404_in_ones_own(outsider, victim_objects):
    """The outsider owns an organization of their own and may do everything there; the
    victim's keys, members and invitations named by id under it must still be 404."""
    client = Client()
    client.force_login(outsider)
    own = Membership.objects.get(user=outsider).organization
    own_ids = {
        *Membership.objects.filter(organization=own).values_list("pk", flat=True),
        *ApiKey.objects.filter(organization=own).values_list("pk", flat=True),
        *Invitation.objects.filter(organization=own).values_list("pk", flat=True),
    }
    object_routes = [r for r in _org_routes() if "pk" in r.params]
    assert object_routes
    for route in object_routes:
        ids = _ids_for(route, victim_objects, own_ids)
        assert ids, route.name
        missing = reverse(route.name, kwargs=_kwargs(route, org_slug=own.slug, pk=10**9))
        for pk in ids:
            url = reverse(route.name, kwargs=_kwargs(route, org_slug=own.slug, pk=pk))
            for method in ("get", "post"):
                # A POST-only page answers GET with 405 before looking anything up: fine,
                # so long as the victim's object is indistinguishable from none.
                status = getattr(client, method)(url).status_code
                assert status == getattr(client, method)(missing).status_code, (route.name, url)
                assert status == 404 or (status, method) == (405, "get"), (route.name, url)
    assert ApiKey.objects.get(pk=victim_objects["key"][0]).revoked_at is None
    assert Membership.objects.filter(pk__in=victim_objects["membership"]).count() == len(
        victim_objects["membership"]
    )
    assert Invitation.objects.filter(pk__in=victim_objects["invitation"]).exists()


def test_anonymous_visitors_are_sent_to_log_in_from_every_organization_page(victim_objects):
    client = Client()
    for route in _org_routes():
        url = reverse(route.name, kwargs=_kwargs(route, org_slug="acme", pk=1))
        response = client.get(url)
        assert response.status_code == 302, route.name
        assert response.url.startswith(reverse("login")), route.name


def test_every_form_refuses_a_post_without_the_csrf_token(owner, victim_objects):
    """Every dashboard URL, POSTed by a signed-in owner without a token: 403 from the CSRF
    check, before any view runs (the Stripe webhook is exempt: Stripe signs instead)."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    exempt = {"stripe-webhook"}
    for route in _dashboard_routes():
        if route.name in exempt:
            continue
        kwargs = _kwargs(route, org_slug="acme", pk=victim_objects["key"][0])
        url = reverse(route.name, kwargs=kwargs) if route.name else "/" + route.route
        assert client.post(url).status_code == 403, (route.name, url)
    assert ApiKey.objects.get(pk=victim_objects["key"][0]).revoked_at is None


def test_the_stripe_webhook_is_the_only_csrf_exempt_dashboard_url():
    exempt = {
        entry.name
        for entry in _patterns(dashboard_urls.urlpatterns)
        if getattr(entry.callback, "csrf_exempt", False)
    }
    assert exempt == {"stripe-webhook"}


def _patterns(patterns) -> Iterator[URLPattern]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _patterns(entry.url_patterns)
        else:
            yield entry

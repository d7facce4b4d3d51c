"""简体中文: the catalogue is complete and compiled, and our pages rendered for a browser
that prefers zh-Hans carry no English of ours."""

from __future__ import annotations

import ast
import gettext
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from apps.tenancy.models import Membership
from apps.tenancy.services import invitation_create
from tests.dashboard.people import make_callable

PO = Path(settings.BASE_DIR) / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po"
MO = PO.with_suffix(".mo")


# --- The catalogue ----------------------------------------------------------------------


def _po_entries() -> list[dict]:
    """The .po's live entries: msgctxt, msgid, msgid_plural, msgstr / msgstr[n], flags.
    Enough of the format for what makemessages writes; obsolete (#~) entries skipped."""
    entries, entry, field = [], {}, None
    for line in [*PO.read_text(encoding="utf-8").splitlines(), ""]:
        if not line.strip():
            if entry:
                entries.append(entry)
            entry, field = {}, None
        elif line.startswith("#,"):
            entry["flags"] = {flag.strip() for flag in line[2:].split(",")}
        elif line.startswith("#"):
            continue
        elif line.startswith('"'):
            entry[field] += ast.literal_eval(line)
        else:
            field, _, value = line.partition(" ")
            entry[field] = ast.literal_eval(value)
    return entries


def test_every_message_is_translated_and_none_is_fuzzy():
    entries = _po_entries()
    assert len(entries) > 100
    header, messages = entries[0], entries[1:]
    assert "Plural-Forms: nplurals=1; plural=0;" in header["msgstr"]
    untranslated = [e["msgid"] for e in messages if not (e.get("msgstr") or e.get("msgstr[0]"))]
    assert untranslated == []
    assert [e["msgid"] for e in messages if "fuzzy" in e.get("flags", ())] == []


def test_the_compiled_catalogue_matches_the_po_file():
    """django.mo is committed so no one needs gettext to run real200; it must say exactly
    what django.po says (run `manage.py compilemessages` after editing the .po)."""
    with MO.open("rb") as handle:
        compiled = gettext.GNUTranslations(handle)._catalog
    expected = {}
    for e in _po_entries()[1:]:
        msgid = f"{e['msgctxt']}\x04{e['msgid']}" if "msgctxt" in e else e["msgid"]
        if "msgid_plural" in e:
            expected[(msgid, 0)] = e["msgstr[0]"]
        else:
            expected[msgid] = e["msgstr"]
    compiled = {k: v for k, v in compiled.items() if k != ""}
    assert compiled == expected


# --- Our pages in Chinese --------------------------------------------------------------

# English that belongs on a Chinese page: names of things, data, and technical words
# Chinese products keep (token, API, URL…).
# fmt: off
ALLOWED_WORDS = {
    "real200", "API", "URL", "Base", "UTC", "USD", "IP", "IPs", "CIDR", "ID", "CSV", "SSE",
    "token", "OpenAI", "Stripe", "curl", "Python", "Node.js", "5xx", "English",
    "Acme", "Elsewhere", "gpt-4o",
}
# fmt: on
DATA = [
    re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"),  # email addresses
    re.compile(r"sk-real200-\S*"),  # key displays
    re.compile(r"https?://\S+"),
]


class _Text(HTMLParser):
    """Text a person reads or hears: text nodes, and the attributes screen readers and
    the stacked table layout show; code and scripts excluded."""

    SKIP = {"pre", "code", "script", "style"}
    SPOKEN = {"aria-label", "placeholder", "title", "alt", "data-label", "data-done"}

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag in self.SKIP:
            self.depth += 1
        self.parts.extend(value for name, value in attrs if name in self.SPOKEN and value)

    def handle_endtag(self, tag) -> None:
        if tag in self.SKIP:
            self.depth -= 1

    def handle_data(self, data) -> None:
        if not self.depth:
            self.parts.append(data)


def english_words(html: str) -> set[str]:
    parser = _Text()
    parser.feed(html)
    text = " ".join(parser.parts)
    for pattern in DATA:
        text = pattern.sub(" ", text)
    words = re.findall(r"[A-Za-z0-9]+(?:[.-][A-Za-z0-9]+)*", text)
    return {word for word in words if re.search("[A-Za-z]", word)} - ALLOWED_WORDS


@pytest.fixture
def zh(owner, org, member, api_key, price) -> Client:
    """Signed in as the owner, in Chinese, among data with no English words of its own."""
    make_callable("gpt-4o")
    api_key.name = "测试"
    api_key.save(update_fields=["name"])
    client = Client(HTTP_ACCEPT_LANGUAGE="zh-Hans,zh;q=0.9,en;q=0.5")
    client.force_login(owner)
    return client


def _pages(client: Client, owner) -> dict[str, str]:
    key = owner.memberships.get().organization.api_keys.get()
    member = Membership.objects.exclude(user=owner).get()
    invitation, token = invitation_create(
        actor=owner.memberships.get(),
        email="invitee@example.com",
        role="viewer",
        accept_url=lambda token: token,
    )
    org = {"org_slug": "acme"}
    gets = {
        name: client.get(reverse(name, kwargs=kwargs))
        for name, kwargs in {
            "account": {},
            "password_change": {},
            "org-create": {},
            "keys-list": org,
            "key-create": org,
            "key-edit": {**org, "pk": key.pk},
            "key-revoke": {**org, "pk": key.pk},
            "models-list": org,
            "docs": org,
            "members": org,
            "member-invite": org,
            "member-remove": {**org, "pk": member.pk},
            "invitation-accept": {"token": token},
        }.items()
    }
    gets["invitation-invalid"] = client.get(reverse("invitation-accept", args=["nope"]))
    gets["key-created"] = client.post(
        reverse("key-create", kwargs=org), {"name": "应用", "budget_period": "monthly"}
    )
    gets["key-form-errors"] = client.post(
        reverse("key-create", kwargs=org),
        {"rpm": "0", "budget": "abc", "budget_period": "monthly"},
    )
    gets["key-policy-error"] = client.post(
        reverse("key-create", kwargs=org), {"allowed_ips": "999.1.1.1", "budget_period": "monthly"}
    )
    gets["invitation-created"] = client.post(
        reverse("member-invite", kwargs=org), {"email": "new@example.com", "role": "developer"}
    )
    gets["keys-list-after"] = client.get(reverse("keys-list", kwargs=org))
    anonymous = Client(HTTP_ACCEPT_LANGUAGE="zh-Hans")
    for name in ("login", "signup", "password_reset", "password_reset_done"):
        gets[name] = anonymous.get(reverse(name))
    gets["invitation-anonymous"] = anonymous.get(reverse("invitation-accept", args=[token]))
    gets["signup-errors"] = anonymous.post(
        reverse("signup"), {"email": "owner@example.com", "password": "1"}
    )
    gets["login-errors"] = anonymous.post(
        reverse("login"), {"username": "owner@example.com", "password": "wrong"}
    )
    gets["reset-confirm-invalid"] = anonymous.get(
        reverse("password_reset_confirm", kwargs={"uidb64": "x", "token": "y"})
    )
    gets["reset-complete"] = anonymous.get(reverse("password_reset_complete"))
    assert invitation.pk
    return {name: response.content.decode() for name, response in gets.items()}


@pytest.mark.django_db
def test_our_pages_in_chinese_carry_no_english_of_ours(zh, owner):
    pages = _pages(zh, owner)
    assert all('lang="zh-hans"' in html for html in pages.values())
    leftovers = {name: words for name, html in pages.items() if (words := english_words(html))}
    assert leftovers == {}


@pytest.mark.django_db
def test_no_english_message_of_ours_appears_on_the_chinese_pages(zh, owner):
    """The other way round: no msgid (of three words or more, which cannot be a name or
    a technical term) shows untranslated."""
    pages = _pages(zh, owner)
    long_msgids = [e["msgid"] for e in _po_entries()[1:] if len(e["msgid"].split()) >= 3]
    for name, html in pages.items():
        for msgid in long_msgids:
            assert msgid not in html, (name, msgid)


def test_the_language_switcher_changes_the_language(client, owner, org):
    client.force_login(owner)
    response = client.post(
        reverse("set_language"), {"language": "zh-hans", "next": "/o/acme/docs/"}
    )
    assert response.url == "/o/acme/docs/"
    page = client.get("/o/acme/docs/").content.decode()
    assert "快速上手" in page
    client.post(reverse("set_language"), {"language": "en", "next": "/"})
    assert "Quick start" in client.get("/o/acme/docs/").content.decode()


def test_the_browser_language_picks_chinese_and_english_stays_the_default(client, owner, org):
    client.force_login(owner)
    assert "快速上手" in client.get("/o/acme/docs/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    assert "Quick start" in client.get("/o/acme/docs/", HTTP_ACCEPT_LANGUAGE="fr").content.decode()

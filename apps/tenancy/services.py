"""Writes on users, organizations, memberships and invitations."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta

from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.text import slugify
from django.utils.translation import gettext as _

from apps.tenancy.models import (
    Invitation,
    Membership,
    Organization,
    Role,
    User,
    hash_invitation_token,
)

INVITATION_TTL = timedelta(days=7)


class TenancyError(ValueError):
    """A request that cannot be carried out as asked (the message says why)."""


def user_get_or_create(*, email: str) -> tuple[User, bool]:
    """The user with this email, created without a usable password if new."""
    email = User.objects.normalize_email(email).lower()
    user = User.objects.filter(email=email).first()
    if user is not None:
        return user, False
    return User.objects.create_user(email=email, password=None), True


@transaction.atomic
def organization_create(
    *, slug: str | None, name: str, owner: User, is_personal: bool = False
) -> Organization:
    """A new organization with `owner` as its first member (role owner).

    `slug=None` derives a free slug from the name (`_free_slug`).
    """
    if slug is None:
        return _create_with_free_slug(base=name, name=name, owner=owner, is_personal=is_personal)
    if slug != slugify(slug) or not slug:
        raise TenancyError(
            _("%(slug)r is not a valid slug (lowercase letters, digits, hyphens)") % {"slug": slug}
        )
    if Organization.objects.filter(slug=slug).exists():
        raise TenancyError(_("an organization with slug %(slug)r already exists") % {"slug": slug})
    org = Organization.objects.create(slug=slug, name=name, is_personal=is_personal)
    Membership.objects.create(user=owner, organization=org, role=Role.OWNER)
    return org


def _free_slug(base: str) -> str:
    """A slug from `base` that no organization has yet: `alice`, else `alice-3f9a0c`.

    slugify drops what is not ASCII (a Chinese name gives nothing), hence the fallback.
    Free when read; a concurrent sign-up may still take it, which the caller handles.
    """
    stem = slugify(base)[:40].strip("-") or "org"
    if not Organization.objects.filter(slug=stem).exists():
        return stem
    return f"{stem}-{secrets.token_hex(3)}"


def _create_with_free_slug(*, base: str, name: str, owner: User, is_personal: bool) -> Organization:
    # Two sign-ups of alice@… at once may pick the same free slug: the loser of the unique
    # index retries with a random suffix, inside a savepoint so the caller's work survives.
    for _attempt in range(5):
        slug = _free_slug(base)
        try:
            with transaction.atomic():
                org = Organization.objects.create(slug=slug, name=name, is_personal=is_personal)
        except IntegrityError:
            continue
        Membership.objects.create(user=owner, organization=org, role=Role.OWNER)
        return org
    raise TenancyError(_("could not find a free address for the organization; try again"))


@transaction.atomic
def user_sign_up(*, email: str, password: str) -> User:
    """A new user and their personal organization (they are its owner), both or neither.

    The organization's slug comes from the email's local part, made unique; its name is
    the email address, which the owner may know best.
    """
    email = User.objects.normalize_email(email).lower()
    if User.objects.filter(email=email).exists():
        raise TenancyError(_("an account with this email address already exists"))
    try:
        with transaction.atomic():
            user = User.objects.create_user(email=email, password=password)
    except IntegrityError:  # the same address signed up a moment ago
        raise TenancyError(_("an account with this email address already exists")) from None
    _create_with_free_slug(base=email.split("@")[0], name=email, owner=user, is_personal=True)
    return user


def _check_may_grant(*, actor: Membership, role: str) -> None:
    """Owners may grant any role; admins may grant any role but owner."""
    if role == Role.OWNER and actor.role != Role.OWNER:
        raise TenancyError(_("only an owner can make someone an owner"))


def invitation_create(
    *,
    actor: Membership,
    email: str,
    role: str,
    accept_url: Callable[[str], str],
) -> tuple[Invitation, str]:
    """Invite `email` into the actor's organization with `role`; email them the link.

    Returns the invitation and its clear token (only its hash is stored).
    `accept_url(token)` builds the absolute link, which only the web layer knows how to.
    A newer invitation to the same address replaces a pending one. The email leaves
    after commit, so a rolled-back invitation sends nothing.
    """
    if role not in Role.values:
        raise TenancyError(_("unknown role"))
    _check_may_grant(actor=actor, role=role)
    org = actor.organization
    email = User.objects.normalize_email(email).lower()
    if Membership.objects.filter(organization=org, user__email=email).exists():
        raise TenancyError(_("%(email)s is already a member") % {"email": email})
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        org.invitations.filter(email=email, accepted_at__isnull=True).delete()
        invitation = Invitation.objects.create(
            organization=org,
            email=email,
            role=role,
            token_hash=hash_invitation_token(token),
            invited_by=actor.user,
            expires_at=timezone.now() + INVITATION_TTL,
        )
        context = {"invitation": invitation, "link": accept_url(token), "inviter": actor.user}
        subject = render_to_string("tenancy/invitation_email_subject.txt", context).strip()
        body = render_to_string("tenancy/invitation_email.txt", context)
        transaction.on_commit(lambda: send_mail(subject, body, None, [email]))
    return invitation, token


@transaction.atomic
def invitation_accept(*, token: str, user: User) -> Membership:
    """Make `user` a member as the invitation says, once: the first accept wins.

    The invitation must be open (not used, not expired) and addressed to the user's email.
    The claim is a conditional update of `accepted_at`, so two requests with the same
    link, on any processes, cannot both join.
    """
    now = timezone.now()
    invitation = (
        Invitation.objects.select_related("organization")
        .filter(token_hash=hash_invitation_token(token))
        .first()
    )
    if invitation is None or not invitation.is_open(now):
        raise TenancyError(_("this invitation is no longer valid"))
    if invitation.email != user.email.lower():
        raise TenancyError(
            _("this invitation is for %(email)s; sign in with that address to accept it")
            % {"email": invitation.email}
        )
    if Membership.objects.filter(organization=invitation.organization, user=user).exists():
        raise TenancyError(_("you are already a member of this organization"))
    claimed = Invitation.objects.filter(
        pk=invitation.pk, accepted_at__isnull=True, expires_at__gt=now
    ).update(accepted_at=now)
    if not claimed:
        raise TenancyError(_("this invitation is no longer valid"))
    try:
        with transaction.atomic():
            return Membership.objects.create(
                user=user, organization=invitation.organization, role=invitation.role
            )
    except IntegrityError:  # joined a moment ago by another way (a second invitation)
        raise TenancyError(_("you are already a member of this organization")) from None


def invitation_cancel(*, invitation: Invitation) -> None:
    """Withdraw a pending invitation; its link stops working."""
    Invitation.objects.filter(pk=invitation.pk, accepted_at__isnull=True).delete()


def _lock_members(*, actor: Membership, target: Membership) -> tuple[Membership, Membership]:
    """Serialize changes to one organization's members (SELECT … FOR UPDATE on the
    organization row), then read both memberships afresh: two owners demoting each other
    at once must not both succeed and leave nobody in charge, and a role lost a moment
    ago no longer counts."""
    Organization.objects.select_for_update().filter(pk=target.organization_id).first()
    fresh = Membership.objects.select_related("user", "organization").in_bulk([actor.pk, target.pk])
    if actor.pk not in fresh or target.pk not in fresh:
        raise TenancyError(_("this member is no longer in the organization"))
    return fresh[actor.pk], fresh[target.pk]


def _check_may_change(*, actor: Membership, target: Membership) -> None:
    if target.role == Role.OWNER and actor.role != Role.OWNER:
        raise TenancyError(_("only an owner can change or remove an owner"))


def _check_not_last_owner(target: Membership) -> None:
    if target.role != Role.OWNER:
        return
    others = Membership.objects.filter(organization_id=target.organization_id, role=Role.OWNER)
    if not others.exclude(pk=target.pk).exists():
        raise TenancyError(_("an organization needs at least one owner"))


@transaction.atomic
def membership_set_role(*, actor: Membership, membership: Membership, role: str) -> Membership:
    """Change a member's role. Admins may not touch owners nor make anyone an owner; the
    last owner keeps the role."""
    if role not in Role.values:
        raise TenancyError(_("unknown role"))
    actor, membership = _lock_members(actor=actor, target=membership)
    _check_may_change(actor=actor, target=membership)
    _check_may_grant(actor=actor, role=role)
    if role != Role.OWNER:
        _check_not_last_owner(membership)
    membership.role = role
    membership.save(update_fields=["role"])
    return membership


@transaction.atomic
def membership_remove(*, actor: Membership, membership: Membership) -> None:
    """Remove a member (or let a member leave). Admins may not remove owners; the last
    owner stays."""
    actor, membership = _lock_members(actor=actor, target=membership)
    _check_may_change(actor=actor, target=membership)
    _check_not_last_owner(membership)
    membership.delete()

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_email
from django.db import transaction

from apps.tenancy.services import TenancyError, organization_create, user_get_or_create


class Command(BaseCommand):
    help = "Create an organization with an owner (the user is created if new)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--owner", required=True, help="the owner's email address")

    def handle(self, *args, slug: str, name: str, owner: str, **options) -> None:
        try:
            validate_email(owner)
        except ValidationError:
            raise CommandError(f"{owner!r} is not an email address") from None
        try:
            with transaction.atomic():  # a refused organization leaves no new user behind
                user, created = user_get_or_create(email=owner)
                org = organization_create(slug=slug, name=name, owner=user)
        except TenancyError as exc:
            raise CommandError(str(exc)) from None
        if created:
            self.stdout.write(f"created user {user.email} (no password yet: reset it to sign in)")
        self.stdout.write(f"created organization {org.slug} owned by {user.email}")

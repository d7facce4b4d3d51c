"""Accounts: sign up, log in, password reset and change, and where `/` leads.

Log-in, sign-up and password reset are throttled per address and per email address
(apps/dashboard/throttle.py): each POST counts before the form is even read.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_http_methods

from apps.dashboard import throttle
from apps.dashboard.access import LAST_ORG_SESSION_KEY
from apps.dashboard.forms import SignUpForm
from apps.tenancy.selectors import membership_default
from apps.tenancy.services import TenancyError, user_sign_up


def _safe_next(request: HttpRequest) -> str | None:
    """The `next` page asked for, if it is on this site (never an open redirect)."""
    target = request.POST.get("next") or request.GET.get("next")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return None


@login_required
def home_view(request: HttpRequest) -> HttpResponse:
    """The organization the user last worked in, else their personal one."""
    membership = membership_default(
        user=request.user, preferred_slug=request.session.get(LAST_ORG_SESSION_KEY)
    )
    if membership is None:  # removed from every organization, personal one included
        return redirect("org-create")
    return redirect("keys-list", org_slug=membership.organization.slug)


@require_http_methods(["GET", "POST"])
def signup_view(request: HttpRequest) -> HttpResponse:
    """An account and its personal organization; then signed in, on to `next` or home."""
    if request.user.is_authenticated:
        return redirect(_safe_next(request) or "dashboard-home")
    form = SignUpForm(request.POST or None, initial={"email": request.GET.get("email", "")})
    if request.method == "POST":
        wait = throttle.attempt_wait(request, limits=throttle.SIGNUP)
        if wait is not None:
            return throttle.too_many_attempts(request, wait=wait)
        if form.is_valid():
            try:
                user = user_sign_up(
                    email=form.cleaned_data["email"], password=form.cleaned_data["password"]
                )
            except TenancyError as error:
                form.add_error("email", str(error))
            else:
                login(request, user, backend="django.contrib.auth.backends.ModelBackend")
                messages.success(request, _("Welcome to real200. Create your first key below."))
                return redirect(_safe_next(request) or "dashboard-home")
    return render(
        request, "registration/signup.html", {"form": form, "next": _safe_next(request) or ""}
    )


class LoginView(auth_views.LoginView):
    redirect_authenticated_user = True

    def post(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        wait = throttle.attempt_wait(
            request, limits=throttle.LOGIN, email=request.POST.get("username", "")
        )
        if wait is not None:
            return throttle.too_many_attempts(request, wait=wait)
        return super().post(request, *args, **kwargs)


class PasswordResetView(auth_views.PasswordResetView):
    def post(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        wait = throttle.attempt_wait(
            request, limits=throttle.PASSWORD_RESET, email=request.POST.get("email", "")
        )
        if wait is not None:
            return throttle.too_many_attempts(request, wait=wait)
        return super().post(request, *args, **kwargs)


class PasswordChangeView(auth_views.PasswordChangeView):
    success_url = reverse_lazy("account")

    def form_valid(self, form) -> HttpResponse:
        messages.success(self.request, _("Your password has been changed."))
        return super().form_valid(form)


login_view = LoginView.as_view()
password_reset_view = PasswordResetView.as_view()
password_change_view = PasswordChangeView.as_view()


@login_required
def account_view(request: HttpRequest) -> HttpResponse:
    """The user's account: email, organizations (from the template context), password."""
    return render(request, "dashboard/accounts/account.html")

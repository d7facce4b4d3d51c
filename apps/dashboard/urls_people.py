"""Accounts, organizations and members, keys, models and docs."""

from django.contrib.auth import views as auth_views
from django.urls import include, path

from apps.dashboard import account_views, key_views, org_views

urlpatterns = [
    path("", account_views.home_view, name="dashboard-home"),
    path("i18n/", include("django.conf.urls.i18n")),
    # Accounts
    path("accounts/signup/", account_views.signup_view, name="signup"),
    path("accounts/login/", account_views.login_view, name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/", account_views.account_view, name="account"),
    path(
        "accounts/password/change/",
        account_views.password_change_view,
        name="password_change",
    ),
    path(
        "accounts/password/reset/",
        account_views.password_reset_view,
        name="password_reset",
    ),
    path(
        "accounts/password/reset/sent/",
        auth_views.PasswordResetDoneView.as_view(),
        name="password_reset_done",
    ),
    path(
        "accounts/password/reset/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "accounts/password/reset/done/",
        auth_views.PasswordResetCompleteView.as_view(),
        name="password_reset_complete",
    ),
    # Organizations and members
    path("organizations/new/", org_views.org_create_view, name="org-create"),
    path("invitations/<str:token>/", org_views.invitation_accept_view, name="invitation-accept"),
    path("o/<slug:org_slug>/members/", org_views.members_view, name="members"),
    path(
        "o/<slug:org_slug>/members/invite/",
        org_views.member_invite_view,
        name="member-invite",
    ),
    path(
        "o/<slug:org_slug>/members/<int:pk>/role/",
        org_views.member_role_view,
        name="member-role",
    ),
    path(
        "o/<slug:org_slug>/members/<int:pk>/remove/",
        org_views.member_remove_view,
        name="member-remove",
    ),
    path(
        "o/<slug:org_slug>/invitations/<int:pk>/cancel/",
        org_views.invitation_cancel_view,
        name="invitation-cancel",
    ),
    # Keys
    path("o/<slug:org_slug>/keys/", key_views.keys_list_view, name="keys-list"),
    path("o/<slug:org_slug>/keys/new/", key_views.key_create_view, name="key-create"),
    path("o/<slug:org_slug>/keys/<int:pk>/edit/", key_views.key_edit_view, name="key-edit"),
    path(
        "o/<slug:org_slug>/keys/<int:pk>/revoke/",
        key_views.key_revoke_view,
        name="key-revoke",
    ),
    # Models and docs
    path("o/<slug:org_slug>/models/", key_views.models_list_view, name="models-list"),
    path("o/<slug:org_slug>/docs/", key_views.docs_view, name="docs"),
]

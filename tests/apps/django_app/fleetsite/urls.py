"""URLs of the Django test app: just the admin (its checks want a URLconf)."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]

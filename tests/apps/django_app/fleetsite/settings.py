"""Settings of the Django test app: the database is pgfleet, named by environment variables.

PGFLEET_PORT, PGFLEET_PASSWORD, DJANGO_DB_NAME (and PGFLEET_HOST, 127.0.0.1 unless set)
say where to connect;
DJANGO_SERVER_SIDE_BINDING=1 makes psycopg send parameters separately (server-side
binding, the extended protocol) instead of Django's default client-side binding.
"""

import os

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_KEY = "pgfleet-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.postgres",
    "notes",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "fleetsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("PGFLEET_HOST", "127.0.0.1"),
        "PORT": os.environ["PGFLEET_PORT"],
        "USER": "postgres",
        "PASSWORD": os.environ["PGFLEET_PASSWORD"],
        "NAME": os.environ["DJANGO_DB_NAME"],
        "OPTIONS": {
            "sslmode": "disable",
            "connect_timeout": 20,
            "server_side_binding": os.environ.get("DJANGO_SERVER_SIDE_BINDING") == "1",
        },
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

"""Models of the Django test app: JSON documents with full-text search, and accounts
moved between under row locks."""

from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector
from django.db import models, transaction


class Note(models.Model):
    title = models.CharField(max_length=200)
    body = models.TextField()
    data = models.JSONField(default=dict)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [GinIndex(fields=["data"], name="note_data_gin")]

    def __str__(self) -> str:
        return self.title


def search_notes(text: str):
    """Notes matching ``text`` (English full-text search over title and body), best first."""
    vector = SearchVector("title", weight="A", config="english") + SearchVector(
        "body", weight="B", config="english")
    query = SearchQuery(text, config="english")
    return (Note.objects.annotate(search=vector, rank=SearchRank(vector, query))
            .filter(search=query).order_by("-rank", "id"))


class Account(models.Model):
    name = models.CharField(max_length=50, unique=True)
    balance = models.DecimalField(max_digits=12, decimal_places=2)

    def __str__(self) -> str:
        return self.name


class InsufficientFunds(Exception):
    pass


def transfer(src: str, dst: str, amount) -> None:
    """Move ``amount`` between two accounts, both rows locked (in name order, so two
    transfers cannot deadlock) for the whole transaction."""
    with transaction.atomic():
        accounts = {a.name: a for a in
                    Account.objects.select_for_update().filter(name__in=[src, dst]).order_by("name")}
        if accounts[src].balance < amount:
            raise InsufficientFunds(src)
        accounts[src].balance -= amount
        accounts[dst].balance += amount
        accounts[src].save(update_fields=["balance"])
        accounts[dst].save(update_fields=["balance"])

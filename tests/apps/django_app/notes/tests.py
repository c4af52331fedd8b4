"""The app's own tests, run by ``manage.py test`` through pgfleet (in Django's test
database, which the runner creates and drops through pgfleet too)."""

import threading
from decimal import Decimal

from django.contrib.auth.models import User
from django.db import DatabaseError, connection, connections, transaction
from django.db.models import F, Q
from django.test import TestCase, TransactionTestCase

from .models import Account, InsufficientFunds, Note, search_notes, transfer


class JSONFieldTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        Note.objects.create(title="a", body="x", data={"tags": ["db", "pool"],
                                                       "meta": {"lang": "en", "n": 3}})
        Note.objects.create(title="b", body="x", data={"tags": ["db"],
                                                       "meta": {"lang": "fr", "n": 1}})
        Note.objects.create(title="c", body="x", data={"meta": {"lang": "en", "n": 7},
                                                       "draft": True})
        Note.objects.create(title="d", body="x", data={})

    def titles(self, qs):
        return sorted(qs.values_list("title", flat=True))

    def test_key_lookups(self):
        self.assertEqual(self.titles(Note.objects.filter(data__meta__lang="en")), ["a", "c"])
        self.assertEqual(self.titles(Note.objects.filter(data__meta__n__gte=3)), ["a", "c"])
        self.assertEqual(self.titles(Note.objects.filter(data__draft=True)), ["c"])

    def test_containment_and_keys(self):
        self.assertEqual(self.titles(Note.objects.filter(data__tags__contains=["pool"])), ["a"])
        self.assertEqual(self.titles(Note.objects.filter(data__contains={"meta": {"lang": "fr"}})),
                         ["b"])
        self.assertEqual(self.titles(Note.objects.filter(data__has_key="tags")), ["a", "b"])
        self.assertEqual(self.titles(Note.objects.filter(data__has_any_keys=["draft", "tags"])),
                         ["a", "b", "c"])
        self.assertEqual(self.titles(Note.objects.filter(data={})), ["d"])
        self.assertEqual(self.titles(Note.objects.filter(Q(data__meta__isnull=True))), ["d"])

    def test_update_in_place_and_order_by_key(self):
        Note.objects.filter(title="b").update(data={"tags": ["db"], "meta": {"lang": "fr", "n": 9}})
        ordered = list(Note.objects.filter(data__has_key="meta")
                       .order_by("-data__meta__n").values_list("title", flat=True))
        self.assertEqual(ordered, ["b", "c", "a"])


class SearchTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        Note.objects.create(title="Connection pooling", body="pgfleet shares backends among clients")
        Note.objects.create(title="Cooking", body="Pooling resources for a dinner party")
        Note.objects.create(title="Gardening", body="Tomatoes need sun")

    def test_search_vector_filter_and_rank(self):
        found = list(search_notes("pooling").values_list("title", flat=True))
        # Stemming matches both; the title hit (weight A) ranks first.
        self.assertEqual(found, ["Connection pooling", "Cooking"])
        self.assertEqual(list(search_notes("tomato").values_list("title", flat=True)),
                         ["Gardening"])
        self.assertEqual(list(search_notes("backends tomatoes").values_list("title", flat=True)),
                         [])

    def test_search_lookup_and_trigram(self):
        self.assertEqual(list(Note.objects.filter(body__search="backends")
                              .values_list("title", flat=True)), ["Connection pooling"])
        # pg_trgm, created by the app's migration.
        self.assertEqual(list(Note.objects.filter(title__trigram_similar="Gardenning")
                              .values_list("title", flat=True)), ["Gardening"])


class SelectForUpdateTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        Account.objects.create(name="alice", balance=Decimal("100.00"))
        Account.objects.create(name="bob", balance=Decimal("10.00"))

    def test_transfer_under_row_locks(self):
        transfer("alice", "bob", Decimal("30.50"))
        with self.assertRaises(InsufficientFunds):
            transfer("bob", "alice", Decimal("1000"))
        balances = dict(Account.objects.values_list("name", "balance"))
        self.assertEqual(balances, {"alice": Decimal("69.50"), "bob": Decimal("40.50")})

    def test_nested_atomic_savepoint(self):
        with transaction.atomic():
            a = Account.objects.select_for_update().get(name="alice")
            a.balance = F("balance") - 1
            a.save()
            try:
                with transaction.atomic():
                    Account.objects.filter(name="bob").update(balance=0)
                    raise RuntimeError("undo the inner block")
            except RuntimeError:
                pass
        balances = dict(Account.objects.values_list("name", "balance"))
        self.assertEqual(balances, {"alice": Decimal("99.00"), "bob": Decimal("10.00")})


class RowLockContentionTests(TransactionTestCase):
    """Two real sessions: one holds a row lock, the other's NOWAIT fails (55P03) and its
    SKIP LOCKED skips the row; after the holder commits, the lock is free."""

    def test_nowait_and_skip_locked(self):
        Account.objects.create(name="carol", balance=Decimal("5.00"))
        Account.objects.create(name="dave", balance=Decimal("6.00"))
        locked = threading.Event()
        release = threading.Event()
        errors = []

        def holder():
            try:
                with transaction.atomic():
                    Account.objects.select_for_update().get(name="carol")
                    locked.set()
                    if not release.wait(20):
                        errors.append("never released")
            except Exception as exc:  # reported to the main thread
                errors.append(repr(exc))
                locked.set()
            finally:
                connections.close_all()

        t = threading.Thread(target=holder)
        t.start()
        try:
            self.assertTrue(locked.wait(20))
            with self.assertRaises(DatabaseError) as info, transaction.atomic():
                Account.objects.select_for_update(nowait=True).get(name="carol")
            self.assertEqual(getattr(info.exception.__cause__, "sqlstate", None), "55P03")
            with transaction.atomic():
                free = list(Account.objects.select_for_update(skip_locked=True)
                            .order_by("name").values_list("name", flat=True))
            self.assertEqual(free, ["dave"])
        finally:
            release.set()
            t.join(30)
        self.assertEqual(errors, [])
        with transaction.atomic():
            got = Account.objects.select_for_update(nowait=True).get(name="carol")
        self.assertEqual(got.balance, Decimal("5.00"))


class ContribAppTests(TestCase):
    def test_auth_user_and_session_tables(self):
        u = User.objects.create_user("eve", password="pw-not-used")
        self.assertTrue(User.objects.get(username="eve").check_password("pw-not-used"))
        self.assertTrue(self.client.login(username="eve", password="pw-not-used"))
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM django_session")
            self.assertEqual(cur.fetchone()[0], 1)
        self.assertEqual(u.pk, User.objects.get().pk)

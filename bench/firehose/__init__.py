"""``pgfleet firehose``: a SuperFireHose-style load generator (connections, churn, queries).

See README.md ("Firehose"). :func:`bench.firehose.main.run` does the work;
:func:`bench.firehose.cli.firehose` is the typer command ``pgfleet firehose``.
"""

// node-postgres run unchanged through pgfleet (driven by tests/test_apps_node.py).
//
// Connection settings come from the PG* environment variables, as for any pg app.
// Usage: node app.js TABLE_NAME. Prints one JSON line of results on success; any
// failed check throws, so the process exits non-zero with the reason on stderr.
'use strict';

const assert = require('node:assert/strict');
const { Readable } = require('node:stream');
const { pipeline } = require('node:stream/promises');
const { Client } = require('pg');
const copyStreams = require('pg-copy-streams');

const table = process.argv[2];
assert.match(table, /^[a-z_][a-z0-9_]*$/, 'table name argument');

function connect() {
  const client = new Client({ connectionTimeoutMillis: 20000 });
  return client.connect().then(() => client);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function parameterQueries(client) {
  // Parameters of several types, including NULL, arrays and JSON, typed by the server.
  const r = await client.query(
    'SELECT $1::int + $2::int AS sum, $3::text AS t, $4::text IS NULL AS isnull, ' +
      '$5::int[] AS arr, $6::jsonb AS doc, $7::timestamptz AS ts',
    [40, 2, 'héllo ☃', null, [1, 2, 3], { a: [1, { b: 'c' }] }, new Date(Date.UTC(2024, 1, 29, 12))]
  );
  const row = r.rows[0];
  assert.equal(row.sum, 42);
  assert.equal(row.t, 'héllo ☃');
  assert.equal(row.isnull, true);
  assert.deepEqual(row.arr, [1, 2, 3]);
  assert.deepEqual(row.doc, { a: [1, { b: 'c' }] });
  assert.equal(row.ts.toISOString(), '2024-02-29T12:00:00.000Z');

  await client.query(`CREATE TABLE ${table} (id int PRIMARY KEY, name text NOT NULL, score float8)`);
  for (let i = 1; i <= 50; i++) {
    await client.query(`INSERT INTO ${table} VALUES ($1, $2, $3)`, [i, `n${i}`, i / 4]);
  }
  const sel = await client.query(`SELECT id, name, score FROM ${table} WHERE id > $1 ORDER BY id`, [45]);
  assert.deepEqual(sel.rows.map((x) => x.id), [46, 47, 48, 49, 50]);
  assert.equal(sel.rows[0].score, 11.5);

  // An error with parameters, then the connection keeps working.
  await assert.rejects(client.query(`INSERT INTO ${table} VALUES ($1, $2, $3)`, [1, 'dup', 0]),
    (err) => err.code === '23505');
  const n = await client.query(`SELECT count(*)::int AS n FROM ${table}`);
  assert.equal(n.rows[0].n, 50);
}

async function namedPreparedStatement(client, other) {
  // pg parses a named statement once per connection, then sends only Bind/Execute.
  const q = (i) => ({ name: 'fetch_by_id', text: `SELECT id, name FROM ${table} WHERE id = $1`, values: [i] });
  for (let i = 1; i <= 12; i++) {
    const r = await client.query(q(i));
    assert.deepEqual(r.rows, [{ id: i, name: `n${i}` }]);
  }
  // Across transaction boundaries (another backend may serve the session).
  await client.query('BEGIN');
  const inTx = await client.query(q(20));
  assert.equal(inTx.rows[0].name, 'n20');
  await client.query('COMMIT');
  // Another connection using the same statement name for a different query.
  for (let i = 1; i <= 6; i++) {
    const r = await other.query({ name: 'fetch_by_id', text: 'SELECT $1::int * 2 AS id', values: [i] });
    assert.deepEqual(r.rows, [{ id: i * 2 }]);
  }
  for (let i = 30; i <= 35; i++) {
    const r = await client.query(q(i));
    assert.deepEqual(r.rows, [{ id: i, name: `n${i}` }]);
  }
  // Row mode 'array' with the named statement too.
  const arr = await client.query({ ...q(7), rowMode: 'array' });
  assert.deepEqual(arr.rows, [[7, 'n7']]);
}

async function listenNotify(listener, notifier) {
  const channel = `${table}_chan`;
  const got = [];
  let resolveAll;
  const all = new Promise((resolve) => {
    resolveAll = resolve;
  });
  listener.on('notification', (msg) => {
    got.push({ channel: msg.channel, payload: msg.payload });
    if (got.length === 3) resolveAll();
  });
  await listener.query(`LISTEN ${channel}`);
  await notifier.query(`NOTIFY ${channel}, 'first payload'`);
  await notifier.query('SELECT pg_notify($1, $2)', [channel, 'second: with params']);
  // A notification sent inside a transaction is delivered only at commit.
  await notifier.query('BEGIN');
  await notifier.query(`NOTIFY ${channel}, 'third, at commit'`);
  await notifier.query('COMMIT');
  await withTimeout(all, 20000, 'three notifications').catch((err) => {
    throw new Error(`${err.message}; received only ${JSON.stringify(got)}`);
  });
  assert.deepEqual(got, [
    { channel, payload: 'first payload' },
    { channel, payload: 'second: with params' },
    { channel, payload: 'third, at commit' },
  ]);
  await listener.query(`UNLISTEN ${channel}`);
  return got.length;
}

async function copyInOut(client) {
  const copyTable = `${table}_copy`;
  await client.query(`CREATE TABLE ${copyTable} (id int, label text, v numeric)`);
  const total = 5000;
  function* lines() {
    for (let i = 1; i <= total; i++) {
      yield `${i}\tlabel ${i}\t${(i * 1.25).toFixed(2)}\n`;
    }
  }
  const ingest = client.query(copyStreams.from(`COPY ${copyTable} FROM STDIN`));
  await withTimeout(pipeline(Readable.from(lines()), ingest), 30000, 'COPY FROM STDIN');
  assert.equal(ingest.rowCount, total);

  const counted = await client.query(`SELECT count(*)::int AS n, sum(v)::text AS s FROM ${copyTable}`);
  assert.equal(counted.rows[0].n, total);

  const chunks = [];
  const out = client.query(
    copyStreams.to(`COPY (SELECT id, label FROM ${copyTable} ORDER BY id) TO STDOUT WITH (FORMAT csv)`));
  out.on('data', (c) => chunks.push(c));
  await withTimeout(new Promise((resolve, reject) => {
    out.on('end', resolve);
    out.on('error', reject);
  }), 30000, 'COPY TO STDOUT');
  const text = Buffer.concat(chunks).toString('utf8');
  const outLines = text.trimEnd().split('\n');
  assert.equal(outLines.length, total);
  assert.equal(outLines[0], '1,label 1');
  assert.equal(outLines[total - 1], `${total},label ${total}`);

  // The connection still answers ordinary queries after both COPYs.
  const after = await client.query('SELECT 1 AS one');
  assert.equal(after.rows[0].one, 1);
  return { copied_in: ingest.rowCount, copied_out: outLines.length, sum: counted.rows[0].s };
}

async function main() {
  const a = await connect();
  const b = await connect();
  try {
    await parameterQueries(a);
    await namedPreparedStatement(a, b);
    const notifications = await listenNotify(a, b);
    const copy = await copyInOut(b);
    console.log(JSON.stringify({ ok: true, notifications, ...copy }));
  } finally {
    await a.end();
    await b.end();
  }
}

withTimeout(main(), 90000, 'the whole node-postgres app').catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});

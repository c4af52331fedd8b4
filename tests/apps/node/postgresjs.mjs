// postgres.js (npm `postgres`) run unchanged through pgfleet (driven by tests/test_apps_node.py).
//
// Its defaults are what transaction-mode poolers break: every query a named prepared
// statement, and queries pipelined on each connection. Connection settings come from
// the PG* environment variables. Usage: node postgresjs.mjs TABLE_NAME. Prints one JSON
// line of results on success; a failed check throws, and the process exits non-zero.
import assert from 'node:assert/strict'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import postgres from 'postgres'

const table = process.argv[2]
assert.match(table, /^[a-z_][a-z0-9_]*$/, 'table name argument')

function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

async function main() {
  const sql = postgres({ max: 3, connect_timeout: 20, idle_timeout: 10, onnotice: () => {} })
  const t = sql(table)
  try {
    await sql`create table ${t} (id serial primary key, name text not null, tags text[], meta jsonb)`

    // Prepared statements reused on every connection, with parameters of several types.
    await Promise.all(Array.from({ length: 40 }, (_, i) =>
      sql`insert into ${t} (name, tags, meta) values (${'n' + i}, ${sql.array(['a', 'b' + i])}, ${sql.json({ i })})`))
    const some = await sql`select name, tags, meta from ${t} where meta->>'i' = ${'7'}`
    assert.deepEqual([...some], [{ name: 'n7', tags: ['a', 'b7'], meta: { i: 7 } }])

    // 300 queries at once on 3 connections: pipelined, 100 deep on each.
    const many = await Promise.all(Array.from({ length: 300 }, (_, i) => sql`select ${i}::int + 1 as v`))
    assert.ok(many.every((r, i) => r[0].v === i + 1), 'pipelined answers in order')

    // A transaction with a savepoint rolled back.
    const inTx = await sql.begin(async (tx) => {
      await tx`insert into ${t} (name) values ('tx-kept')`
      await tx`savepoint s`
      await tx`insert into ${t} (name) values ('tx-dropped')`
      await tx`rollback to savepoint s`
      return tx`select count(*)::int as c from ${t} where name like 'tx-%'`
    })
    assert.equal(inTx[0].c, 1)

    // Errors carry their SQLSTATE, and the connection goes on.
    await assert.rejects(sql`select * from ${sql(table + '_missing')}`, { code: '42P01' })
    await assert.rejects(sql`insert into ${t} (id, name) values (1, 'dup')`,
      { code: '23505', constraint_name: `${table}_pkey` })

    // The same prepared text after the table's columns changed.
    await sql`select * from ${t} where id = ${1}`
    await sql`alter table ${t} add column extra int default 7`
    const after = await sql`select * from ${t} where id = ${1}`
    assert.equal(after[0].extra, 7)

    // The simple protocol, several statements in one query.
    const multi = await sql.unsafe('select 1 as a; select 2 as b')
    assert.deepEqual(multi.map((r) => r[0]), [{ a: 1 }, { b: 2 }])

    // A cursor read in batches (in a transaction of its own).
    let cursorRows = 0
    await sql`select g from generate_series(1, 1000) g`.cursor(100, (rows) => { cursorRows += rows.length })
    assert.equal(cursorRows, 1000)

    // LISTEN on a connection of its own, NOTIFY from the pool.
    const heard = []
    const got = new Promise((resolve) => {
      sql.listen(`${table}_chan`, (payload) => { heard.push(payload); if (heard.length === 2) resolve() })
        .then(async () => {
          await sql`select pg_notify(${table + '_chan'}, 'one')`
          await sql`notify ${sql(table + '_chan')}, 'two'`
        })
    })
    await withTimeout(got, 20000, 'notifications')
    assert.deepEqual(heard, ['one', 'two'])

    // COPY FROM STDIN.
    const w = await sql`copy ${t} (name) from stdin`.writable()
    await pipeline(Readable.from(Array.from({ length: 500 }, (_, i) => `copied${i}\n`)), w)
    const copied = await sql`select count(*)::int as c from ${t} where name like 'copied%'`
    assert.equal(copied[0].c, 500)

    // Types both ways.
    const ty = await sql`select ${new Date(Date.UTC(2024, 1, 29))}::timestamptz as d,
      ${123456789012345n}::int8 as n, ${Buffer.from([0, 1, 255])}::bytea as b, 1.5::numeric as x`
    assert.equal(ty[0].d.toISOString(), '2024-02-29T00:00:00.000Z')
    assert.equal(ty[0].n, '123456789012345')
    assert.deepEqual([...ty[0].b], [0, 1, 255])
    assert.equal(ty[0].x, '1.5')

    const total = await sql`select count(*)::int as c from ${t}`
    console.log(JSON.stringify({ ok: true, rows: total[0].c, notifications: heard.length }))
  } finally {
    await sql.end({ timeout: 5 })
  }
}

await withTimeout(main(), 90000, 'the whole postgres.js app').catch((err) => {
  console.error(err && err.stack ? err.stack : err)
  process.exit(1)
})

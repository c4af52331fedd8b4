// The PostgreSQL JDBC driver run unchanged through pgfleet (driven by tests/test_apps_jdbc.py).
//
// Usage: java -cp postgresql.jar:. PgfleetJdbc JDBC_URL USER PASSWORD TABLE
// Prints "key=value" result lines on success; a failed check throws, so the JVM exits
// non-zero with the reason on stderr.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Arrays;
import java.util.Properties;

import org.postgresql.PGStatement;

public final class PgfleetJdbc {
    private PgfleetJdbc() {
    }

    private static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        String table = args[3];
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("sslmode", "disable");
        props.setProperty("connectTimeout", "20");
        props.setProperty("socketTimeout", "60");
        props.setProperty("ApplicationName", "pgfleet-jdbc-test");

        try (Connection conn = DriverManager.getConnection(url, props);
             Connection other = DriverManager.getConnection(url, props)) {
            try (Statement st = conn.createStatement()) {
                st.execute("CREATE TABLE " + table
                        + " (id int PRIMARY KEY, name text NOT NULL, amount numeric(12,2), tags text[])");
            }
            preparedReuse(conn, other, table);
            batchInsert(conn, table);
            System.out.println("done=ok");
        }
    }

    /** One PreparedStatement run 20 times: from the 5th use on (prepareThreshold) the driver
     * uses a named server-side statement, bound again and again, across transactions. */
    private static void preparedReuse(Connection conn, Connection other, String table) throws SQLException {
        int serverPrepared = 0;
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT ?::int * 3 AS tripled, ?::text || '!' AS shout, pg_typeof(?::int8)::text AS t")) {
            for (int i = 1; i <= 20; i++) {
                if (i == 10) {
                    conn.setAutoCommit(false);  // a few runs inside a transaction
                }
                if (i == 15) {
                    conn.commit();
                    conn.setAutoCommit(true);
                }
                ps.setInt(1, i);
                ps.setString(2, "run " + i);
                ps.setLong(3, i * 1000L);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "a row for run " + i);
                    check(rs.getInt(1) == i * 3, "tripled for run " + i + ": " + rs.getInt(1));
                    check(("run " + i + "!").equals(rs.getString(2)), "shout for run " + i);
                    check("bigint".equals(rs.getString(3)), "type for run " + i);
                    check(!rs.next(), "one row only for run " + i);
                }
                // Another connection's statement traffic in between (its own S_n names).
                try (PreparedStatement o = other.prepareStatement("SELECT ?::int + 1")) {
                    o.setInt(1, i);
                    try (ResultSet rs = o.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == i + 1, "other connection, run " + i);
                    }
                }
                if (ps.unwrap(PGStatement.class).isUseServerPrepare()) {
                    serverPrepared++;
                }
            }
        }
        check(serverPrepared >= 15, "server-side prepared runs: " + serverPrepared);
        System.out.println("server_prepared_runs=" + serverPrepared);

        // An insert statement reused with an error in the middle of a transaction.
        conn.setAutoCommit(false);
        try (PreparedStatement ins = conn.prepareStatement(
                "INSERT INTO " + table + " (id, name, amount, tags) VALUES (?, ?, ?, ?)")) {
            for (int i = 1; i <= 10; i++) {
                ins.setInt(1, -i);
                ins.setString(2, "reuse " + i);
                ins.setBigDecimal(3, new java.math.BigDecimal(i + ".50"));
                ins.setArray(4, conn.createArrayOf("text", new String[] {"a" + i, "b"}));
                check(ins.executeUpdate() == 1, "insert " + i);
            }
            conn.commit();
            ins.setInt(1, -1);  // duplicate key
            ins.setString(2, "dup");
            ins.setBigDecimal(3, null);
            ins.setArray(4, null);
            try {
                ins.executeUpdate();
                throw new AssertionError("duplicate insert succeeded");
            } catch (SQLException e) {
                check("23505".equals(e.getSQLState()), "duplicate key SQLSTATE: " + e.getSQLState());
            }
            conn.rollback();
            ins.setInt(1, -11);
            ins.setString(2, "after rollback");
            ins.setBigDecimal(3, null);
            ins.setArray(4, null);
            check(ins.executeUpdate() == 1, "insert after rollback");
            conn.commit();
        }
        conn.setAutoCommit(true);
    }

    /** 1,000 rows through addBatch/executeBatch in one transaction. */
    private static void batchInsert(Connection conn, String table) throws SQLException {
        conn.setAutoCommit(false);
        int[] counts;
        try (PreparedStatement ps = conn.prepareStatement(
                "INSERT INTO " + table + " (id, name, amount) VALUES (?, ?, ?)")) {
            for (int i = 1; i <= 1000; i++) {
                ps.setInt(1, i);
                ps.setString(2, "batch " + i);
                ps.setBigDecimal(3, java.math.BigDecimal.valueOf(i, 2));
                ps.addBatch();
            }
            counts = ps.executeBatch();
        }
        conn.commit();
        conn.setAutoCommit(true);
        check(counts.length == 1000, "batch result length " + counts.length);
        check(Arrays.stream(counts).allMatch(c -> c == 1 || c == Statement.SUCCESS_NO_INFO),
                "batch update counts");
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery("SELECT count(*), sum(amount) FROM " + table + " WHERE id > 0")) {
            check(rs.next(), "count row");
            check(rs.getInt(1) == 1000, "rows seen by the driver: " + rs.getInt(1));
            System.out.println("batch_rows=" + rs.getInt(1) + " batch_sum=" + rs.getBigDecimal(2));
        }
    }
}

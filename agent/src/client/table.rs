//! How the client shows the agent's answers to a person: aligned tables in the kubectl style
//! (no borders, a header row, columns padded by comfy-table), named states, local and relative
//! times. Pure: JSON in, text out, so every shape is unit-tested.

use comfy_table::{ContentArrangement, Table, presets::NOTHING};
use serde_json::Value;
use time::OffsetDateTime;

use super::time::{age, ago, from_unix_ms, local_rfc3339, parse_rfc3339};

/// Rows under a header, each column as wide as its widest cell plus three spaces, no line
/// wider than its content (no trailing spaces).
pub fn table<S: AsRef<str>>(header: &[&str], rows: &[Vec<S>]) -> String {
    let mut t = Table::new();
    t.load_style(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for row in rows {
        t.add_row(row.iter().map(AsRef::as_ref));
    }
    for column in t.column_iter_mut() {
        column.set_padding((0, 3));
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Kafka's broker state numbers (`BrokerState` in Kafka; Strimzi's `brokerState`).
pub fn state_name(number: u64) -> &'static str {
    match number {
        0 => "NOT_RUNNING",
        1 => "STARTING",
        2 => "RECOVERY",
        3 => "RUNNING",
        6 => "PENDING_CONTROLLED_SHUTDOWN",
        7 => "SHUTTING_DOWN",
        127 => "UNKNOWN",
        _ => "?",
    }
}

/// `RUNNING (3)`.
pub fn named_state(number: Option<u64>) -> String {
    match number {
        Some(n) => format!("{} ({n})", state_name(n)),
        None => "-".into(),
    }
}

fn str_or<'a>(v: &'a Value, default: &'a str) -> &'a str {
    v.as_str().filter(|s| !s.is_empty()).unwrap_or(default)
}

fn num(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `get brokers`: one row per broker; `wide` adds the process, namespace, roles, log dirs and
/// the last state change.
pub fn brokers(list: &[Value], wide: bool, now: OffsetDateTime) -> String {
    let mut header = vec!["ID", "STATE", "PID", "POD", "RESTARTS", "AGE", "LISTENERS"];
    if wide {
        header.extend([
            "PROCESS",
            "NETNS",
            "ROLES",
            "CONNECTIONS",
            "LOG DIRS",
            "LAST CHANGE",
        ]);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            let mut row = broker_row(b, now);
            if wide {
                row.extend(broker_wide_cells(b, now));
            }
            row
        })
        .collect();
    table(&header, &rows)
}

/// A broker's row: id, state, pid, pod, restarts, age, listeners.
fn broker_row(b: &Value, now: OffsetDateTime) -> Vec<String> {
    let listeners: Vec<String> = b["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| format!("{}:{}", str_or(&l["name"], "?"), l["port"]))
        .collect();
    let started = b["started_at"]
        .as_i64()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok());
    let running = b["state"] == "running";
    vec![
        str_or(&b["id"], "?").to_string(),
        named_state(b["broker_state"]["number"].as_u64()),
        num(&b["pid"]),
        str_or(&b["pod"], "-").to_string(),
        num(&b["restarts"]),
        match started {
            Some(t) if running => age((now - t).unsigned_abs()),
            _ => "-".into(),
        },
        if listeners.is_empty() {
            "-".into()
        } else {
            listeners.join(",")
        },
    ]
}

/// The wide columns of a broker's row: process, namespace, roles, connections, log dirs and
/// the last state change.
fn broker_wide_cells(b: &Value, now: OffsetDateTime) -> Vec<String> {
    let roles: Vec<&str> = b["process_roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let dirs: Vec<&str> = b["log_dirs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let connections: u64 = b["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["connections_active"].as_u64())
        .sum();
    let last = b["state_changes"]
        .as_array()
        .and_then(|c| c.last())
        .map(|c| {
            let at =
                parse_rfc3339(str_or(&c["at"], "")).map_or_else(|| "?".into(), |t| ago(t, now));
            format!("{} {at}", str_or(&c["to"], "?"))
        });
    vec![
        str_or(&b["state"], "?").to_string(),
        num(&b["netns"]),
        if roles.is_empty() {
            "-".into()
        } else {
            roles.join(",")
        },
        connections.to_string(),
        if dirs.is_empty() {
            "-".into()
        } else {
            dirs.join(",")
        },
        last.unwrap_or_else(|| "-".into()),
    ]
}

/// `get state`: Strimzi's `{"brokerState": 3, "recoveryState": {...}}` by name.
pub fn state(v: &Value) -> String {
    let recovery = match &v["recoveryState"] {
        Value::Null => "-".to_string(),
        r => format!(
            "{} logs, {} segments left",
            num(&r["remainingLogsToRecover"]),
            num(&r["remainingSegmentsToRecover"])
        ),
    };
    table(
        &["STATE", "RECOVERY"],
        &[vec![named_state(v["brokerState"].as_u64()), recovery]],
    )
}

/// `get config`: `section.key = value`, one per line (TOML's spelling, JSON's values).
pub fn config(v: &Value) -> String {
    let mut out = String::new();
    for (section, keys) in v.as_object().into_iter().flatten() {
        for (key, value) in keys.as_object().into_iter().flatten() {
            out.push_str(&format!("{section}.{key} = {value}\n"));
        }
    }
    out
}

/// `get diagnostics`: the summary; `wide` adds the maps' fill.
pub fn diagnostics(v: &Value, wide: bool) -> String {
    let mut out = table(
        &["AGENT", "PID", "KERNEL", "READY", "BROKERS"],
        &[vec![
            str_or(&v["agent"]["version"], "?").to_string(),
            num(&v["agent"]["pid"]),
            str_or(&v["kernel"]["release"], "?").to_string(),
            num(&v["readiness"]["ready"]),
            v["brokers"].as_array().map_or(0, Vec::len).to_string(),
        ]],
    );
    out.push('\n');
    let programs: Vec<Vec<String>> = v["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                str_or(&p["program"], "?").to_string(),
                str_or(&p["hook"], "?").to_string(),
                num(&p["id"]),
                num(&p["window_run_count"]),
                num(&p["window_run_time_ns"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &["PROGRAM", "HOOK", "ID", "RUNS (1s)", "RUN NS (1s)"],
        &programs,
    ));
    if wide {
        let maps: Vec<Vec<String>> = v["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                vec![
                    str_or(&m["map"], "?").to_string(),
                    num(&m["entries"]),
                    num(&m["capacity"]),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(&["MAP", "ENTRIES", "CAPACITY"], &maps));
    }
    out
}

/// `set config`: each change, then the generation.
pub fn config_change(v: &Value) -> String {
    let mut out = String::new();
    let changed = v["changed"].as_array().cloned().unwrap_or_default();
    if changed.is_empty() {
        out.push_str(&format!(
            "nothing changed (generation {})\n",
            v["generation"]
        ));
    }
    for ch in changed {
        out.push_str(&format!(
            "{}: {} -> {}\n",
            str_or(&ch["key"], "?"),
            ch["old"],
            ch["new"]
        ));
    }
    out.push_str(&format!("generation {}\n", v["generation"]));
    out
}

/// One log line: local time, level, target, message.
pub fn log_line(l: &Value) -> String {
    let time = str_or(&l["time"], "");
    let time = parse_rfc3339(time).map_or_else(|| time.to_string(), local_rfc3339);
    format!(
        "{time} {:5} {}: {}",
        str_or(&l["level"], "").to_uppercase(),
        str_or(&l["target"], ""),
        str_or(&l["message"], "")
    )
}

/// One event: local time, kind, broker, listener, then the kind's fields as `key=value`.
pub fn event_line(kind: &str, v: &Value) -> String {
    if kind == "dropped" {
        return format!(
            "-- {} events dropped (this client was too slow) --",
            v["lost"]
        );
    }
    let time = v["time_ms"]
        .as_i64()
        .and_then(from_unix_ms)
        .map_or_else(|| "?".into(), local_rfc3339);
    let detail: Vec<String> = match &v["detail"] {
        Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                v => format!("{k}={v}"),
            })
            .collect(),
        Value::Null => Vec::new(),
        other => vec![other.to_string()],
    };
    format!(
        "{time} {kind:<17} broker={} listener={} {}",
        str_or(&v["broker"], "-"),
        str_or(&v["listener"], "-"),
        detail.join(" ")
    )
    .trim_end()
    .to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    #[test]
    fn columns_line_up_under_their_headers() {
        let out = table(
            &["ID", "STATE", "POD"],
            &[
                vec!["1", "RUNNING (3)", "kafka-1"],
                vec!["1000", "RECOVERY (2)", "-"],
            ],
        );
        assert_eq!(
            out,
            "ID     STATE          POD\n\
             1      RUNNING (3)    kafka-1\n\
             1000   RECOVERY (2)   -\n"
        );
    }

    #[test]
    fn brokers_show_kafka_states_by_name_and_ages() {
        let now = datetime!(2026-12-05 12:10:00 UTC);
        let b = json!({
            "id": "5", "state": "running", "pid": 4242, "pod": "kafka-5", "restarts": 1,
            "started_at": now.unix_timestamp() - 312, "netns": 4026531840u64,
            "broker_state": {"name": "RUNNING", "number": 3},
            "listeners": [{"name": "PLAINTEXT", "port": 9092}, {"name": "CONTROLLER", "port": 9093}],
            "process_roles": ["broker", "controller"], "log_dirs": ["/var/lib/kafka"],
            "counters": [{"connections_active": 2}, {"connections_active": 1}],
            "state_changes": [{"at": "2026-12-05T12:09:48Z", "to": "RUNNING", "number": 3}],
        });
        let stopped = json!({"id": "6", "state": "not_running", "pid": 17, "restarts": 0,
            "started_at": 1, "broker_state": {"number": 0}, "listeners": []});
        assert_eq!(
            brokers(&[b.clone(), stopped.clone()], false, now),
            "ID   STATE             PID    POD       RESTARTS   AGE     LISTENERS\n\
             5    RUNNING (3)       4242   kafka-5   1          5m12s   PLAINTEXT:9092,CONTROLLER:9093\n\
             6    NOT_RUNNING (0)   17     -         0          -       -\n"
        );
        let wide = brokers(&[b], true, now);
        let row: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row[8..],
            [
                "running",
                "4026531840",
                "broker,controller",
                "3",
                "/var/lib/kafka",
                "RUNNING",
                "12s",
                "ago"
            ]
        );
    }

    #[test]
    fn state_is_named_with_its_number_and_recovery() {
        assert_eq!(
            state(&json!({"brokerState": 3})),
            "STATE         RECOVERY\nRUNNING (3)   -\n"
        );
        assert_eq!(
            state(&json!({"brokerState": 2, "recoveryState":
                {"remainingLogsToRecover": 4, "remainingSegmentsToRecover": 12}})),
            "STATE          RECOVERY\nRECOVERY (2)   4 logs, 12 segments left\n"
        );
        assert_eq!(named_state(Some(127)), "UNKNOWN (127)");
        assert_eq!(named_state(None), "-");
    }

    #[test]
    fn events_and_logs_read_in_local_time() {
        let e = json!({"kind": "connection_reset", "time_ms": 1_764_936_001_500i64,
            "broker": "5", "listener": "PLAINTEXT",
            "detail": {"port": 9092, "remote": "127.0.0.1:5000"}});
        assert_eq!(
            event_line("connection_reset", &e),
            "2025-12-05T12:00:01.500+00:00 connection_reset  broker=5 listener=PLAINTEXT \
             port=9092 remote=127.0.0.1:5000"
        );
        assert_eq!(
            event_line("dropped", &json!({"lost": 3})),
            "-- 3 events dropped (this client was too slow) --"
        );
        assert_eq!(
            log_line(&json!({"time": "2026-12-05T12:00:00.25Z", "level": "warn",
                "target": "brokerscope::x", "message": "hello k=v"})),
            "2026-12-05T12:00:00.250+00:00 WARN  brokerscope::x: hello k=v"
        );
    }
}

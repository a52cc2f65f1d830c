//! Prometheus text exposition at `http://ADDR/metrics`. No per-source
//! labels: a flood of sources must not become a flood of series.

use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::query::Counters;

/// Everything one scrape reports, read from the daemon at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// (connector, its counters, its live connections)
    pub connectors: Vec<(String, Counters, u32)>,
    /// Live connections still held by removed connectors.
    pub live_removed: u64,
    /// Rejections the kernel could not report (event ring full).
    pub events_lost: u64,
    /// Event lines that could not be written to syslog.
    pub syslog_errors: u64,
    /// SYNs to a bound port the XDP program could not read whole, dropped.
    pub unreadable_dropped: u64,
    /// Connections judged over a cap whose reset is not done yet.
    pub resets_pending: u64,
    /// Handshakes moved by NAT to an endpoint no `forwarded_to` names.
    pub undeclared_forwards: u64,
    /// (map, entries, capacity)
    pub maps: Vec<(&'static str, u64, u64)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectorLabel {
    connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    connector: String,
    rule: &'static str,
    /// "enforce" (refused as the connector's action says) or "monitor"
    /// (would have been refused; admitted).
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplyLabel {
    connector: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// The snapshot in Prometheus text format (version 0.0.4).
pub fn render(s: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("limiter");
    let admitted = Family::<ConnectorLabel, Counter>::default();
    let rejected = Family::<RuleLabel, Counter>::default();
    let live = Family::<ConnectorLabel, Gauge>::default();
    let late = Family::<ConnectorLabel, Counter>::default();
    let closed = Family::<ConnectorLabel, Counter>::default();
    let replies = Family::<ReplyLabel, Counter>::default();
    for (name, c, live_now) in &s.connectors {
        let connector = || ConnectorLabel {
            connector: name.clone(),
        };
        admitted.get_or_create(&connector()).inc_by(c.admitted);
        for (rule, action, n) in [
            ("total", "enforce", c.rejected_total_limit),
            ("per_source", "enforce", c.rejected_per_source),
            ("percentage", "enforce", c.rejected_percentage),
            ("rate", "enforce", c.rejected_rate),
            ("table_full", "enforce", c.rejected_table_full),
            ("total", "monitor", c.would_reject_total_limit),
            ("per_source", "monitor", c.would_reject_per_source),
            ("percentage", "monitor", c.would_reject_percentage),
            ("rate", "monitor", c.would_reject_rate),
        ] {
            rejected
                .get_or_create(&RuleLabel {
                    connector: name.clone(),
                    rule,
                    action,
                })
                .inc_by(n);
        }
        live.get_or_create(&connector()).set(i64::from(*live_now));
        late.get_or_create(&connector()).inc_by(c.rejected_late);
        closed
            .get_or_create(&connector())
            .inc_by(c.closed + c.seeded_closed);
        for (outcome, n) in [("handed", c.replied), ("dropped", c.reply_dropped)] {
            replies
                .get_or_create(&ReplyLabel {
                    connector: name.clone(),
                    outcome,
                })
                .inc_by(n);
        }
    }
    registry.register(
        "connections_admitted",
        "Connections admitted and counted when their handshake completed",
        admitted,
    );
    registry.register(
        "connections_rejected",
        "Connections rejected, by the rule that fired: with action=\"enforce\", SYNs refused and connections reset when their handshake completed; with action=\"monitor\", connections a connector with action monitor admitted and would have refused",
        rejected,
    );
    registry.register(
        "connections_rejected_late",
        "Of the rejections, connections judged over a cap when their handshake completed, and reset",
        late,
    );
    registry.register(
        "replies",
        "SYNs refused with action reply: handed to the responder (which completes the handshake and writes the connector's 421 line), or dropped (beyond the replies a second, or no responder)",
        replies,
    );
    registry.register(
        "live_connections",
        "Connections the mail server holds now, as counted",
        live,
    );
    registry.register(
        "connections_closed",
        "Counted connections whose server socket closed",
        closed,
    );
    let gauge = |value: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        g
    };
    let counter = |value: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        c
    };
    registry.register(
        "live_connections_removed_connectors",
        "Connections still counted for connectors that were removed",
        gauge(s.live_removed),
    );
    registry.register(
        "events_lost",
        "Rejections not reported because the kernel's event ring was full",
        counter(s.events_lost),
    );
    registry.register(
        "syslog_errors",
        "Event lines that could not be written to syslog",
        counter(s.syslog_errors),
    );
    registry.register(
        "unreadable_syns_dropped",
        "Possible SYNs to a bound port that could not be read whole (cut by IP fragmentation, or behind more headers than are followed), dropped",
        counter(s.unreadable_dropped),
    );
    registry.register(
        "resets_pending",
        "Connections judged over a cap whose reset is not done yet",
        gauge(s.resets_pending),
    );
    registry.register(
        "undeclared_forwards",
        "Handshakes that NAT moved to a server endpoint no connector's forwarded_to names: not counted",
        counter(s.undeclared_forwards),
    );
    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    for (map, n, max) in &s.maps {
        entries
            .get_or_create(&MapLabel { map })
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
        capacity
            .get_or_create(&MapLabel { map })
            .set(i64::try_from(*max).unwrap_or(i64::MAX));
    }
    registry.register("map_entries", "Entries in a kernel table", entries);
    registry.register("map_capacity", "Entries a kernel table can hold", capacity);
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("writing to a String");
    text
}

/// Serves `GET /metrics` with what `snapshot` returns, until the task is
/// dropped.
pub async fn serve<F>(listener: TcpListener, snapshot: Arc<F>)
where
    F: Fn() -> Result<Snapshot, String> + Send + Sync + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("metrics: {e}");
                continue;
            }
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let snapshot = snapshot.clone();
                async move { Ok::<_, Infallible>(respond(&request, snapshot).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond<F>(
    request: &Request<hyper::body::Incoming>,
    snapshot: Arc<F>,
) -> Response<Full<Bytes>>
where
    F: Fn() -> Result<Snapshot, String> + Send + Sync + 'static,
{
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "limiter serves /metrics\n".into(),
        );
    }
    let taken = tokio::task::spawn_blocking(move || snapshot()).await;
    match taken {
        Ok(Ok(snapshot)) => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(&snapshot),
        ),
        Ok(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let snapshot = Snapshot {
            connectors: vec![(
                "Default Frontend".into(),
                Counters {
                    admitted: 7,
                    rejected_per_source: 3,
                    would_reject_percentage: 5,
                    rejected_rate: 6,
                    would_reject_rate: 8,
                    ..Default::default()
                },
                4,
            )],
            events_lost: 2,
            maps: vec![("established", 1, 262_144)],
            ..Default::default()
        };
        let text = render(&snapshot);
        for line in [
            "limiter_connections_admitted_total{connector=\"Default Frontend\"} 7",
            "limiter_connections_rejected_total{connector=\"Default Frontend\",rule=\"per_source\",action=\"enforce\"} 3",
            "limiter_connections_rejected_total{connector=\"Default Frontend\",rule=\"total\",action=\"enforce\"} 0",
            "limiter_connections_rejected_total{connector=\"Default Frontend\",rule=\"percentage\",action=\"monitor\"} 5",
            "limiter_connections_rejected_total{connector=\"Default Frontend\",rule=\"rate\",action=\"enforce\"} 6",
            "limiter_connections_rejected_total{connector=\"Default Frontend\",rule=\"rate\",action=\"monitor\"} 8",
            "limiter_live_connections{connector=\"Default Frontend\"} 4",
            "limiter_events_lost_total 2",
            "limiter_map_capacity{map=\"established\"} 262144",
            "# TYPE limiter_connections_admitted_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}

//! `brokerscope top`: a live terminal view of every broker on a node, read from the agent's
//! `/metrics` over the same mTLS connection flags as every other command.
//!
//! One request per refresh (`/metrics` holds everything shown), so the view costs the agent's
//! rate limit one token every `--interval`. Rates (bytes/s, CPU) are over the last refresh;
//! latency quantiles over the last [`WINDOW`] (the histograms' growth since then), the upper
//! bound of the power-of-two bucket that holds them. [`View`] turns readings into rows and is
//! pure; [`draw`] lays them out for the terminal's size, dropping columns, then the listeners
//! table, as it shrinks.

use std::{
    collections::{BTreeSet, VecDeque},
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Paragraph, Row, Table},
};

use super::{
    ClientError, Connection,
    metrics::{self, Histogram, Sample},
    table::named_state,
};

/// Latency quantiles are over this much of the past.
pub const WINDOW: Duration = Duration::from_secs(60);
/// The shortest `--interval`: the view must stay well inside the agent's rate limit.
const MIN_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Time between refreshes (500ms, 2s, 1m).
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    pub interval: Duration,
    /// Show only brokers and listeners whose broker id, pod or listener name contains this
    /// ('/' changes it live).
    #[arg(long)]
    pub filter: Option<String>,
    /// The column rows are sorted by ('s' cycles, 'r' reverses).
    #[arg(long, value_enum, default_value_t)]
    pub sort: SortKey,
}

/// Sortable columns, in the order 's' cycles through them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    #[default]
    Broker,
    Conns,
    In,
    Out,
    Resets,
    Retrans,
    Rtt,
    Cpu,
    Runq,
    Fsync,
    Restarts,
}

impl SortKey {
    const ALL: [SortKey; 11] = [
        SortKey::Broker,
        SortKey::Conns,
        SortKey::In,
        SortKey::Out,
        SortKey::Resets,
        SortKey::Retrans,
        SortKey::Rtt,
        SortKey::Cpu,
        SortKey::Runq,
        SortKey::Fsync,
        SortKey::Restarts,
    ];

    fn next(self) -> Self {
        let at = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        Self::ALL[(at + 1) % Self::ALL.len()]
    }

    fn name(self) -> &'static str {
        match self {
            SortKey::Broker => "broker",
            SortKey::Conns => "conns",
            SortKey::In => "in",
            SortKey::Out => "out",
            SortKey::Resets => "resets",
            SortKey::Retrans => "retrans",
            SortKey::Rtt => "rtt",
            SortKey::Cpu => "cpu",
            SortKey::Runq => "runq",
            SortKey::Fsync => "fsync",
            SortKey::Restarts => "restarts",
        }
    }
}

/// One `/metrics` answer and when it came.
#[derive(Clone, Debug)]
pub struct Reading {
    pub at: Instant,
    pub samples: Vec<Sample>,
}

/// A broker's row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerRow {
    pub id: String,
    pub pod: String,
    pub pid: String,
    pub state: Option<u64>,
    /// Percent of one CPU over the last refresh.
    pub cpu: Option<f64>,
    pub runq_p99: Option<f64>,
    pub fsync_p99: Option<f64>,
    pub restarts: f64,
}

/// A listener's row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListenerRow {
    pub broker: String,
    pub listener: String,
    pub port: String,
    pub conns: f64,
    pub bytes_in: Option<f64>,
    pub bytes_out: Option<f64>,
    pub resets: f64,
    pub retransmits: f64,
    pub rtt_p50: Option<f64>,
    pub rtt_p99: Option<f64>,
}

const P: &str = "brokerscope_";

/// Rows from the newest reading, rates against the one before, quantiles against the oldest
/// within [`WINDOW`].
pub fn rows(
    now: &Reading,
    previous: Option<&Reading>,
    window: Option<&Reading>,
) -> (Vec<BrokerRow>, Vec<ListenerRow>) {
    let r = Readings {
        now,
        previous,
        window,
    };
    (broker_rows(&r), listener_rows(&r))
}

/// The readings a refresh computes its rows from.
struct Readings<'a> {
    now: &'a Reading,
    previous: Option<&'a Reading>,
    window: Option<&'a Reading>,
}

/// A family's full name.
fn full_name(n: &str) -> String {
    format!("{P}{n}")
}

impl Readings<'_> {
    /// Per second between the reading before and this one (a counter that went back counts
    /// from zero).
    fn rate(&self, n: &str, select: &[(&str, &str)]) -> Option<f64> {
        let prev = self.previous?;
        let dt = self.now.at.duration_since(prev.at).as_secs_f64();
        let a = metrics::sum(&self.now.samples, &full_name(n), select)?;
        let b = metrics::sum(&prev.samples, &full_name(n), select).unwrap_or(0.0);
        (dt > 0.0).then(|| if a >= b { (a - b) / dt } else { a / dt })
    }

    /// The `q` quantile of a histogram within the window.
    fn quantile(&self, n: &str, select: &[(&str, &str)], q: f64) -> Option<f64> {
        let h = Histogram::find(&self.now.samples, &full_name(n), select)?;
        let base = self
            .window
            .and_then(|w| Histogram::find(&w.samples, &full_name(n), select));
        // The first reading has no past: everything since the agent started.
        h.since(base.as_ref()).quantile(q)
    }
}

/// A row per broker any broker family names.
fn broker_rows(r: &Readings) -> Vec<BrokerRow> {
    let s = &r.now.samples;
    let mut ids = BTreeSet::new();
    for family in ["broker_state", "broker_restarts_total", "broker_info"] {
        for x in s.iter().filter(|x| x.name == full_name(family)) {
            ids.insert(x.label("broker").to_string());
        }
    }
    ids.into_iter()
        .filter(|id| !id.is_empty())
        .map(|id| {
            let sel = [("broker", id.as_str())];
            let info = s
                .iter()
                .find(|x| x.name == full_name("broker_info") && x.label("broker") == id);
            BrokerRow {
                pod: info.map_or("", |i| i.label("pod")).to_string(),
                pid: info.map_or("", |i| i.label("pid")).to_string(),
                state: metrics::sum(s, &full_name("broker_state"), &sel).map(|n| n as u64),
                cpu: r.rate("cpu_seconds_total", &sel).map(|r| r * 100.0),
                runq_p99: r.quantile("runqueue_latency_seconds", &sel, 0.99),
                fsync_p99: r.quantile("fsync_duration_seconds", &sel, 0.99),
                restarts: metrics::sum(s, &full_name("broker_restarts_total"), &sel).unwrap_or(0.0),
                id,
            }
        })
        .collect()
}

/// A row per listener with a `connections_active` series.
fn listener_rows(r: &Readings) -> Vec<ListenerRow> {
    let s = &r.now.samples;
    s.iter()
        .filter(|x| x.name == full_name("connections_active"))
        .map(|x| {
            // A listener no broker owns (watch-all mode) is named by its network namespace.
            let broker = match x.label("broker") {
                "" => format!("netns {}", x.label("netns")),
                b => b.to_string(),
            };
            let select: Vec<(&str, &str)> = x
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let total = |n: &str| metrics::sum(s, &full_name(n), &select).unwrap_or(0.0);
            ListenerRow {
                listener: match x.label("listener") {
                    "" => "-".to_string(),
                    l => l.to_string(),
                },
                port: x.label("port").to_string(),
                conns: x.value,
                bytes_in: r.rate("bytes_received_total", &select),
                bytes_out: r.rate("bytes_sent_total", &select),
                resets: total("tcp_resets_sent_total") + total("tcp_resets_received_total"),
                retransmits: total("tcp_retransmits_total"),
                rtt_p50: r.quantile("tcp_rtt_seconds", &select, 0.5),
                rtt_p99: r.quantile("tcp_rtt_seconds", &select, 0.99),
                broker,
            }
        })
        .collect()
}

/// What the view shows and how: the rows, the sort, the filter, what went wrong last.
pub struct View {
    pub url: String,
    pub interval: Duration,
    pub sort: SortKey,
    pub descending: bool,
    pub filter: String,
    /// Typing a filter after '/'.
    pub editing: bool,
    pub brokers: Vec<BrokerRow>,
    pub listeners: Vec<ListenerRow>,
    pub refreshed: Option<::time::OffsetDateTime>,
    pub error: Option<String>,
}

impl View {
    pub fn new(url: &str, options: &Options) -> Self {
        Self {
            url: url.to_string(),
            interval: options.interval,
            sort: options.sort,
            descending: options.sort != SortKey::Broker,
            filter: options.filter.clone().unwrap_or_default(),
            editing: false,
            brokers: Vec::new(),
            listeners: Vec::new(),
            refreshed: None,
            error: None,
        }
    }

    /// Handles a key; false when the view should end.
    pub fn key(&mut self, key: KeyEvent) -> bool {
        if key.kind != KeyEventKind::Press {
            return true;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return false;
        }
        if self.editing {
            match key.code {
                KeyCode::Enter => self.editing = false,
                KeyCode::Esc => {
                    self.editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if self.filter.chars().count() < 64 => self.filter.push(c),
                _ => {}
            }
            return true;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                self.descending = self.sort != SortKey::Broker;
            }
            KeyCode::Char('r') => self.descending = !self.descending,
            KeyCode::Char('/') => {
                self.editing = true;
                self.filter.clear();
            }
            _ => {}
        }
        true
    }

    fn matches(&self, texts: &[&str]) -> bool {
        let f = self.filter.to_lowercase();
        f.is_empty() || texts.iter().any(|t| t.to_lowercase().contains(&f))
    }

    /// The brokers shown, filtered and sorted.
    pub fn shown_brokers(&self) -> Vec<&BrokerRow> {
        let mut rows: Vec<&BrokerRow> = self
            .brokers
            .iter()
            .filter(|b| {
                self.matches(&[&b.id, &b.pod])
                    || self
                        .listeners
                        .iter()
                        .any(|l| l.broker == b.id && self.matches(&[&l.listener]))
            })
            .collect();
        let key = |b: &BrokerRow| -> f64 {
            match self.sort {
                SortKey::Cpu => b.cpu.unwrap_or(-1.0),
                SortKey::Runq => b.runq_p99.unwrap_or(-1.0),
                SortKey::Fsync => b.fsync_p99.unwrap_or(-1.0),
                SortKey::Restarts => b.restarts,
                _ => 0.0,
            }
        };
        rows.sort_by(|a, b| {
            key(a)
                .total_cmp(&key(b))
                .then_with(|| id_order(&a.id, &b.id))
        });
        if self.descending {
            rows.reverse();
        }
        rows
    }

    /// The listeners shown, filtered and sorted.
    pub fn shown_listeners(&self) -> Vec<&ListenerRow> {
        let pods: Vec<(&str, &str)> = self
            .brokers
            .iter()
            .map(|b| (b.id.as_str(), b.pod.as_str()))
            .collect();
        let pod = |id: &str| pods.iter().find(|p| p.0 == id).map_or("", |p| p.1);
        let mut rows: Vec<&ListenerRow> = self
            .listeners
            .iter()
            .filter(|l| self.matches(&[&l.broker, &l.listener, pod(&l.broker)]))
            .collect();
        let key = |l: &ListenerRow| -> f64 {
            match self.sort {
                SortKey::Conns => l.conns,
                SortKey::In => l.bytes_in.unwrap_or(-1.0),
                SortKey::Out => l.bytes_out.unwrap_or(-1.0),
                SortKey::Resets => l.resets,
                SortKey::Retrans => l.retransmits,
                SortKey::Rtt => l.rtt_p99.unwrap_or(-1.0),
                _ => 0.0,
            }
        };
        rows.sort_by(|a, b| {
            key(a)
                .total_cmp(&key(b))
                .then_with(|| id_order(&a.broker, &b.broker))
                .then_with(|| a.listener.cmp(&b.listener))
        });
        if self.descending {
            rows.reverse();
        }
        rows
    }
}

/// Broker ids in numeric order when both are numbers (Kafka's node ids), else as text.
fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// `1.2 MB/s`-style (decimal units, as network rates are said).
fn bytes_rate(v: Option<f64>) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = v;
    let mut unit = 0;
    while v >= 1000.0 && unit < units.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B/s")
    } else {
        format!("{v:.1} {}/s", units[unit])
    }
}

/// A latency bound: `<64us`, `<2ms`, `<1.0s` (the bucket's upper bound).
fn latency(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s < 1e-3 => format!("<{:.0}us", s * 1e6),
        Some(s) if s < 1.0 => format!("<{:.0}ms", s * 1e3),
        Some(s) => format!("<{s:.1}s"),
    }
}

fn count(v: f64) -> String {
    format!("{v:.0}")
}

/// Smallest terminal anything is drawn in.
pub const MIN_WIDTH: u16 = 30;
pub const MIN_HEIGHT: u16 = 5;
/// Below this width the tables keep their essential columns only.
pub const NARROW: u16 = 100;
/// Below this height the listeners table is left out.
pub const SHORT: u16 = 12;

/// Draws the view for the frame's size.
pub fn draw(frame: &mut Frame<'_>, view: &View) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        frame.render_widget(
            Paragraph::new(format!(
                "terminal too small ({}x{}); brokerscope top needs {MIN_WIDTH}x{MIN_HEIGHT}",
                area.width, area.height
            ))
            .wrap(ratatui::widgets::Wrap { trim: true }),
            area,
        );
        return;
    }
    let narrow = area.width < NARROW;
    let short = area.height < SHORT;
    let brokers = view.shown_brokers();
    let listeners = view.shown_listeners();
    let broker_height = (brokers.len() as u16 + 3).min(area.height.saturating_sub(2));
    let [title, broker_area, listener_area, footer] = Layout::vertical([
        Constraint::Length(1),
        if short {
            Constraint::Min(3)
        } else {
            Constraint::Length(broker_height)
        },
        if short {
            Constraint::Length(0)
        } else {
            Constraint::Min(3)
        },
        Constraint::Length(1),
    ])
    .areas(area);

    frame.render_widget(
        Paragraph::new(head_line(view, narrow))
            .style(Style::default().add_modifier(Modifier::BOLD)),
        title,
    );
    draw_brokers(frame, view, &brokers, narrow, broker_area);
    if !short {
        draw_listeners(frame, view, &listeners, narrow, listener_area);
    }
    frame.render_widget(Paragraph::new(Line::from(footer_line(view, short))), footer);
}

/// The title line: the URL (unless narrow), when refreshed and how often, the sort, the filter.
fn head_line(view: &View, narrow: bool) -> String {
    // Narrow: the clock time only, no URL (the sort and filter matter more).
    let refreshed = match view.refreshed {
        None => "connecting".to_string(),
        Some(t) if narrow => {
            let local = super::time::local_rfc3339(t);
            local.get(11..19).unwrap_or(&local).to_string()
        }
        Some(t) => super::time::local_rfc3339(t),
    };
    let sort = format!(
        "sort {} {}",
        view.sort.name(),
        if view.descending { "desc" } else { "asc" }
    );
    let every = if view.interval < Duration::from_secs(1) {
        format!("{}ms", view.interval.as_millis())
    } else {
        super::time::age(view.interval)
    };
    let mut head = if narrow {
        format!("brokerscope top  {refreshed}  {sort}")
    } else {
        format!(
            "brokerscope top  {}  {refreshed} (every {every})  {sort}",
            view.url
        )
    };
    if !view.filter.is_empty() || view.editing {
        head.push_str(&format!("  filter: {}", view.filter));
    }
    head
}

/// A sortable column's label, marked when the view sorts by it.
fn mark(view: &View, key: SortKey, label: &str) -> String {
    if view.sort == key {
        format!("{label}{}", if view.descending { "v" } else { "^" })
    } else {
        label.to_string()
    }
}

/// The brokers table; narrow, its essential columns only.
fn draw_brokers(
    frame: &mut Frame<'_>,
    view: &View,
    brokers: &[&BrokerRow],
    narrow: bool,
    area: ratatui::layout::Rect,
) {
    let mut columns: Vec<(String, u16)> = vec![(mark(view, SortKey::Broker, "BROKER"), 8)];
    if !narrow {
        columns.extend([("POD".into(), 16), ("PID".into(), 8)]);
    }
    columns.extend([
        ("STATE".into(), 16),
        (mark(view, SortKey::Cpu, "CPU%"), 7),
        (mark(view, SortKey::Runq, "RUNQ p99"), 9),
    ]);
    if !narrow {
        columns.extend([
            (mark(view, SortKey::Fsync, "FSYNC p99"), 10),
            (mark(view, SortKey::Restarts, "RESTARTS"), 9),
        ]);
    }
    let rows = brokers.iter().map(|b| {
        let mut cells = vec![b.id.clone()];
        if !narrow {
            cells.extend([or_dash(&b.pod), or_dash(&b.pid)]);
        }
        cells.extend([
            named_state(b.state),
            b.cpu.map_or("-".into(), |c| format!("{c:.1}")),
            latency(b.runq_p99),
        ]);
        if !narrow {
            cells.extend([latency(b.fsync_p99), count(b.restarts)]);
        }
        Row::new(cells)
    });
    frame.render_widget(
        table(rows, &columns, format!(" brokers ({}) ", brokers.len())),
        area,
    );
}

/// The listeners table; narrow, its essential columns only.
fn draw_listeners(
    frame: &mut Frame<'_>,
    view: &View,
    listeners: &[&ListenerRow],
    narrow: bool,
    area: ratatui::layout::Rect,
) {
    let mut columns: Vec<(String, u16)> = vec![
        ("BROKER".into(), 8),
        ("LISTENER".into(), 14),
        ("PORT".into(), 6),
        (mark(view, SortKey::Conns, "CONNS"), 7),
        (mark(view, SortKey::In, "IN/s"), 11),
        (mark(view, SortKey::Out, "OUT/s"), 11),
    ];
    if !narrow {
        columns.extend([
            (mark(view, SortKey::Resets, "RESETS"), 8),
            (mark(view, SortKey::Retrans, "RETRANS"), 8),
            ("RTT p50".into(), 8),
        ]);
    }
    columns.push((mark(view, SortKey::Rtt, "RTT p99"), 8));
    let rows = listeners.iter().map(|l| {
        let mut cells = vec![
            l.broker.clone(),
            l.listener.clone(),
            l.port.clone(),
            count(l.conns),
            bytes_rate(l.bytes_in),
            bytes_rate(l.bytes_out),
        ];
        if !narrow {
            cells.extend([count(l.resets), count(l.retransmits), latency(l.rtt_p50)]);
        }
        cells.push(latency(l.rtt_p99));
        Row::new(cells)
    });
    frame.render_widget(
        table(rows, &columns, format!(" listeners ({}) ", listeners.len())),
        area,
    );
}

/// The footer: the filter being typed, the last error, or the keys.
fn footer_line(view: &View, short: bool) -> String {
    match (&view.error, view.editing) {
        (_, true) => format!("filter: {}_  (Enter keeps it, Esc clears)", view.filter),
        (Some(e), _) => format!("! {e}"),
        (None, _) if short => "listeners hidden (terminal too short)  q quit".into(),
        (None, _) => "q quit  s sort  r reverse  / filter  (latency: last 60s)".into(),
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn table<'a>(
    rows: impl IntoIterator<Item = Row<'a>>,
    columns: &[(String, u16)],
    title: String,
) -> Table<'a> {
    let header = Row::new(columns.iter().map(|(name, _)| Cell::from(name.clone())))
        .style(Style::default().add_modifier(Modifier::REVERSED));
    Table::new(rows, columns.iter().map(|(_, w)| Constraint::Min(*w)))
        .header(header)
        .column_spacing(2)
        .block(Block::bordered().title(title))
}

/// Reads `/metrics` once; refusals as errors, no retry (the next refresh is the retry).
async fn read(client: &super::Client) -> Result<Reading, ClientError> {
    let answer = client
        .call_once(hyper::Method::GET, "/metrics", "text/plain", None)
        .await?;
    Ok(Reading {
        at: Instant::now(),
        samples: metrics::parse(&String::from_utf8_lossy(&answer.body)),
    })
}

/// `brokerscope top`.
pub async fn run(connection: Connection, options: Options) -> Result<(), ClientError> {
    if options.interval < MIN_INTERVAL {
        return Err(ClientError::Usage {
            arg: "--interval".into(),
            reason: format!("at least {}ms", MIN_INTERVAL.as_millis()),
        });
    }
    if !std::io::stdout().is_terminal() {
        return Err(ClientError::Usage {
            arg: "top".into(),
            reason: "needs a terminal (stdout is not one); scripts read `brokerscope get \
                     metrics -o json`"
                .into(),
        });
    }
    let client = super::Client::new(&connection)?;
    // The agent must answer once before the screen is taken: a wrong flag is said plainly.
    let first = read(&client).await?;

    let mut terminal = ratatui::try_init().map_err(|source| ClientError::Terminal { source })?;
    let result = run_view(&mut terminal, client, &connection, &options, first).await;
    ratatui::restore();
    result
}

async fn run_view(
    terminal: &mut ratatui::DefaultTerminal,
    client: super::Client,
    connection: &Connection,
    options: &Options,
    first: Reading,
) -> Result<(), ClientError> {
    // Keys and resizes come from a thread of their own: crossterm's read blocks.
    let (tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("top-input".into())
        .spawn(move || {
            while let Ok(e) = event::read() {
                if tx.send(e).is_err() {
                    break;
                }
            }
        })
        .map_err(|source| ClientError::Terminal { source })?;
    // Readings come from a task of their own: a slow or silent agent never delays a key.
    let (readings_tx, mut fresh) = tokio::sync::mpsc::channel(1);
    let interval = options.interval;
    let fetcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if readings_tx.send(read(&client).await).await.is_err() {
                break;
            }
        }
    });

    let mut view = View::new(&connection.url, options);
    let mut readings: VecDeque<Reading> = VecDeque::new();
    let apply = |view: &mut View, readings: &mut VecDeque<Reading>, r: Reading| {
        while readings
            .front()
            .is_some_and(|old| r.at.duration_since(old.at) > WINDOW)
        {
            readings.pop_front();
        }
        let (b, l) = rows(&r, readings.back(), readings.front());
        view.brokers = b;
        view.listeners = l;
        view.refreshed = Some(::time::OffsetDateTime::now_utc());
        view.error = None;
        readings.push_back(r);
    };
    apply(&mut view, &mut readings, first);
    let result = loop {
        if let Err(source) = terminal.draw(|f| draw(f, &view)) {
            break Err(ClientError::Terminal { source });
        }
        tokio::select! {
            r = fresh.recv() => match r {
                Some(Ok(r)) => apply(&mut view, &mut readings, r),
                Some(Err(e)) => view.error = Some(format!("{e} (retrying every {}s)",
                    interval.as_secs_f64())),
                None => break Ok(()),
            },
            e = keys.recv() => match e {
                Some(Event::Key(key)) => {
                    if !view.key(key) {
                        break Ok(());
                    }
                }
                Some(_) => {} // a resize: drawn again at the top of the loop
                None => break Ok(()),
            },
        }
    };
    fetcher.abort();
    result
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;

    fn reading(at: Instant, text: &str) -> Reading {
        Reading {
            at,
            samples: metrics::parse(text),
        }
    }

    const LISTENER: &str = r#"{broker="5",listener="PLAINTEXT",port="9092"}"#;

    fn metrics_text(bytes_in: u64, cpu: f64, rtt_fast: u64, rtt_all: u64) -> String {
        format!(
            "brokerscope_broker_info{{broker=\"5\",pid=\"42\",pod=\"kafka-5\",netns=\"1\",cgroup=\"\"}} 1\n\
             brokerscope_broker_restarts_total{{broker=\"5\"}} 1\n\
             brokerscope_broker_state{{broker=\"5\"}} 3\n\
             brokerscope_cpu_seconds_total{{broker=\"5\"}} {cpu}\n\
             brokerscope_connections_active{LISTENER} 2\n\
             brokerscope_bytes_received_total{LISTENER} {bytes_in}\n\
             brokerscope_bytes_sent_total{LISTENER} 0\n\
             brokerscope_tcp_resets_sent_total{LISTENER} 1\n\
             brokerscope_tcp_resets_received_total{LISTENER} 2\n\
             brokerscope_tcp_retransmits_total{LISTENER} 4\n\
             brokerscope_tcp_rtt_seconds_bucket{{broker=\"5\",listener=\"PLAINTEXT\",port=\"9092\",le=\"0.000064\"}} {rtt_fast}\n\
             brokerscope_tcp_rtt_seconds_bucket{{broker=\"5\",listener=\"PLAINTEXT\",port=\"9092\",le=\"0.002048\"}} {rtt_all}\n\
             brokerscope_tcp_rtt_seconds_bucket{{broker=\"5\",listener=\"PLAINTEXT\",port=\"9092\",le=\"+Inf\"}} {rtt_all}\n\
             brokerscope_connections_active{{netns=\"7\",port=\"80\"}} 1\n\
             brokerscope_broker_state{{broker=\"6\"}} 0\n"
        )
    }

    #[test]
    fn rates_over_the_refresh_and_quantiles_over_the_window() {
        let t0 = Instant::now();
        let first = reading(t0, &metrics_text(1000, 1.0, 10, 10));
        let (brokers, listeners) = rows(&first, None, None);
        assert_eq!(brokers.len(), 2);
        let b = &brokers[0];
        assert_eq!(
            (b.id.as_str(), b.pod.as_str(), b.pid.as_str(), b.state),
            ("5", "kafka-5", "42", Some(3))
        );
        assert_eq!((b.cpu, b.restarts), (None, 1.0));
        assert_eq!(brokers[1].state, Some(0));
        let l = &listeners[0];
        assert_eq!((l.conns, l.resets, l.retransmits), (2.0, 3.0, 4.0));
        assert_eq!((l.bytes_in, l.rtt_p50), (None, Some(0.000064)));
        assert_eq!(listeners[1].broker, "netns 7");

        let second = reading(
            t0 + Duration::from_secs(2),
            &metrics_text(5000, 1.5, 10, 20),
        );
        let (brokers, listeners) = rows(&second, Some(&first), Some(&first));
        assert_eq!(brokers[0].cpu, Some(25.0));
        let l = &listeners[0];
        assert_eq!(l.bytes_in, Some(2000.0));
        // The window saw ten slow connections only.
        assert_eq!((l.rtt_p50, l.rtt_p99), (Some(0.002048), Some(0.002048)));
        let (_, listeners) = rows(&second, Some(&second), Some(&second));
        assert_eq!(listeners[0].rtt_p99, None);
    }

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn screen(view: &View, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, view)).unwrap();
        let buffer = t.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..h {
            for x in 0..w {
                out.push_str(buffer[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn view() -> View {
        let options = Options {
            interval: Duration::from_secs(2),
            filter: None,
            sort: SortKey::Broker,
        };
        let mut v = View::new("https://node:8443", &options);
        let t0 = Instant::now();
        let first = reading(t0, &metrics_text(1000, 1.0, 10, 10));
        let second = reading(
            t0 + Duration::from_secs(2),
            &metrics_text(5000, 1.5, 10, 20),
        );
        (v.brokers, v.listeners) = rows(&second, Some(&first), Some(&first));
        v
    }

    #[test]
    fn keys_sort_filter_and_quit() {
        let mut v = view();
        assert_eq!(v.shown_brokers()[0].id, "5");
        assert!(v.key(key(KeyCode::Char('r'))));
        assert_eq!(v.shown_brokers()[0].id, "6");
        assert!(v.key(key(KeyCode::Char('s'))));
        assert_eq!((v.sort, v.descending), (SortKey::Conns, true));
        assert_eq!(v.shown_listeners()[0].broker, "5");
        v.key(key(KeyCode::Char('r')));
        assert_eq!(v.shown_listeners()[0].broker, "netns 7");
        v.key(key(KeyCode::Char('/')));
        for c in "KAFKA".chars() {
            v.key(key(KeyCode::Char(c)));
        }
        v.key(key(KeyCode::Enter));
        assert_eq!(v.filter, "KAFKA");
        assert_eq!(v.shown_brokers().len(), 1);
        assert_eq!(v.shown_listeners().len(), 1);
        // 'q' typed into a filter is text, not quit.
        v.key(key(KeyCode::Char('/')));
        assert!(v.key(key(KeyCode::Char('q'))));
        v.key(key(KeyCode::Esc));
        assert_eq!(v.filter, "");
        assert!(!v.key(key(KeyCode::Char('q'))));
        assert!(!v.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)));
    }

    #[test]
    fn the_layout_shrinks_with_the_terminal() {
        let v = view();
        let big = screen(&v, 120, 30);
        for want in [
            "brokers (2)",
            "listeners (2)",
            "kafka-5",
            "RUNNING (3)",
            "NOT_RUNNING (0)",
            "PLAINTEXT",
            "2.0 kB/s",
            "<2ms",
            "RTT p50",
            "FSYNC p99",
            "25.0",
        ] {
            assert!(big.contains(want), "{want} missing:\n{big}");
        }
        let narrow = screen(&v, 70, 30);
        assert!(
            narrow.contains("RTT p99") && narrow.contains("2.0 kB/s"),
            "{narrow}"
        );
        assert!(
            !narrow.contains("RTT p50") && !narrow.contains("kafka-5"),
            "{narrow}"
        );
        let short = screen(&v, 70, 9);
        assert!(short.contains("RUNNING (3)"), "{short}");
        assert!(
            !short.contains("PLAINTEXT") && short.contains("listeners hidden"),
            "{short}"
        );
        let tiny = screen(&v, 20, 4);
        assert!(tiny.contains("terminal too"), "{tiny}");
    }
}

//! The nodes' log lines during a run: warnings and errors are counted by message (so a report
//! can say "mesh reached its node cap" appeared on 850 nodes), and, when asked, every line at or
//! above a level is printed. The subscriber is installed for the simulation thread only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{EnvFilter, Layer};

/// Log lines counted by (level, message).
pub type LogCounts = Arc<Mutex<BTreeMap<(String, String), u64>>>;

/// Counts warning and error events by their message.
struct CountingLayer {
    counts: LogCounts,
}

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for CountingLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut visitor = MessageVisitor(String::new());
        event.record(&mut visitor);
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry((level.to_string(), visitor.0)).or_insert(0) += 1;
    }
}

/// Installs the counting subscriber on this thread (plus a printer when `print_filter` is set,
/// e.g. `warn` or `konor_node=info`); keep the guard for the run's length.
pub fn install(print_filter: Option<&str>) -> (LogCounts, tracing::subscriber::DefaultGuard) {
    let counts: LogCounts = Arc::default();
    // Counting needs only warnings and errors: filtering out the rest keeps disabled events cheap.
    let counting = CountingLayer { counts: counts.clone() }.with_filter(tracing_subscriber::filter::LevelFilter::WARN);
    let printer = print_filter.map(|filter| {
        tracing_subscriber::fmt::layer().without_time().with_writer(std::io::stderr).with_filter(EnvFilter::new(filter))
    });
    let subscriber = tracing_subscriber::registry().with(counting).with(printer);
    let guard = tracing::subscriber::set_default(subscriber);
    (counts, guard)
}

/// The counts, most frequent first.
pub fn sorted(counts: &LogCounts) -> Vec<(String, String, u64)> {
    let counts = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut rows: Vec<(String, String, u64)> =
        counts.iter().map(|((level, message), count)| (level.clone(), message.clone(), *count)).collect();
    rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.1.cmp(&b.1)));
    rows
}

//! [`Client::on_change`]: a reload callback run on every change of a group, whose outcome is
//! reported back to the daemon (F16) so `konorctl status` shows which process runs what.

use tokio::task::JoinHandle;
use tracing::warn;

use crate::client::Client;
use crate::error::SdkError;
use crate::protocol::{ApplyResult, Request, WatchEvent};
use crate::settings::{Settings, apply_event};

impl Client {
    /// Runs `callback` on every change of `group` and reports each outcome to the daemon (F16,
    /// `Request::ReportApply`), until the handle is dropped.
    ///
    /// The callback first runs once with the current state, presented as a
    /// [`WatchEvent::Resync`], so one callback configures the application at start and on every
    /// change, and the daemon knows from the start which version this process uses. It gets the
    /// event and the settings with the event applied; `Err(text)` reports a refusal. It runs on
    /// the runtime, so it should be quick (hand heavy work to `spawn_blocking`). A panic in it
    /// is reported as an error and the loop goes on.
    pub async fn on_change<F>(&self, group: &str, mut callback: F) -> Result<ChangeHandle, SdkError>
    where
        F: FnMut(&WatchEvent, &Settings) -> Result<(), String> + Send + 'static,
    {
        let snapshot = self.snapshot(group).await?;
        let mut watch = self.watch(group, Some(snapshot.freshness.revision)).await?;
        let client = self.clone();
        let task = tokio::spawn(async move {
            let mut settings = snapshot.settings;
            let initial = WatchEvent::Resync {
                group: snapshot.group,
                revision: snapshot.freshness.revision,
                version: snapshot.freshness.version,
                settings: settings.clone(),
            };
            run_callback_and_report(&client, &mut callback, &initial, &settings).await;
            while let Some(next) = watch.next().await {
                match next {
                    Ok(event) => {
                        apply_event(&mut settings, &event);
                        run_callback_and_report(&client, &mut callback, &event, &settings).await;
                    }
                    Err(error) => {
                        warn!(group = watch.group(), %error, "on_change stopped: the watch ended");
                        break;
                    }
                }
            }
        });
        Ok(ChangeHandle { task })
    }
}

async fn run_callback_and_report<F>(client: &Client, callback: &mut F, event: &WatchEvent, settings: &Settings)
where
    F: FnMut(&WatchEvent, &Settings) -> Result<(), String>,
{
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(event, settings)));
    let result = match outcome {
        Ok(Ok(())) => ApplyResult::Ok,
        Ok(Err(message)) => ApplyResult::Error { message },
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            ApplyResult::Error { message: format!("the callback panicked: {text}") }
        }
    };
    let version = match event {
        WatchEvent::Change { version, .. } | WatchEvent::Resync { version, .. } => version.clone(),
    };
    let report = Request::ReportApply { group: event.group().to_owned(), version, revision: event.revision(), result };
    if let Err(error) = client.call(report).await {
        warn!(group = event.group(), revision = event.revision(), %error, "could not report the callback's outcome");
    }
}

/// Keeps an [`Client::on_change`] callback running; dropping it stops the callback.
#[derive(Debug)]
pub struct ChangeHandle {
    task: JoinHandle<()>,
}

impl ChangeHandle {
    /// Stops the callback now.
    pub fn stop(self) {}

    /// True when the loop ended by itself (its watch ended with an error, logged).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for ChangeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

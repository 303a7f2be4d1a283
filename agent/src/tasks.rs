//! The agent's shutdown tree: one root cancellation token, one tracker for every task the
//! agent starts, and the names of those still running.
//!
//! Every task goes through [`Tasks::spawn`], which tracks it (a stop waits for it), keeps its
//! name while it runs (a stop that overruns its deadline names what did not end) and keeps
//! the first task error: a failing (or panicking) task stops the whole agent, and that error
//! becomes the agent's own, so that the process exits non-zero and a service manager restarts
//! it. Tasks take their token from [`Tasks::token`] (or a child of one, for a sub-tree that
//! must stop alone, such as one download).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The tree; cloning shares it.
#[derive(Clone, Default)]
pub struct Tasks {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    tracker: TaskTracker,
    root: CancellationToken,
    /// Running tasks by spawn number, for the log line of an overrun stop.
    running: Mutex<BTreeMap<u64, String>>,
    next: AtomicU64,
    /// The first task error; what the agent returns.
    failure: Mutex<Option<anyhow::Error>>,
}

/// Removes a task's name when the task ends, however it ends.
struct Running {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        lock(&self.inner.running).remove(&self.id);
    }
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// A token cancelled when the agent stops.
    pub fn token(&self) -> CancellationToken {
        self.inner.root.child_token()
    }

    /// Resolves once the agent is stopping: asked to, or a task failed.
    pub async fn stopping(&self) {
        self.inner.root.cancelled().await
    }

    /// Runs `task` as a tracked task called `name`. If it fails, the agent stops.
    pub fn spawn<F>(&self, name: impl Into<String>, task: F) -> JoinHandle<()>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.running).insert(id, name.clone());
        let running = Running {
            inner: self.inner.clone(),
            id,
        };
        self.inner.tracker.spawn(async move {
            // Run apart so that a panic comes back as an error: a task that panicked failed.
            let result = match tokio::spawn(task).await {
                Ok(result) => result,
                Err(e) => Err(anyhow::anyhow!("task {name}: {e}")),
            };
            let inner = running.inner.clone();
            drop(running);
            if let Err(e) = result {
                let mut failure = lock(&inner.failure);
                if failure.is_some() {
                    tracing::error!(task = %name, "{e:#}");
                } else {
                    tracing::debug!(task = %name, "failed; stopping the agent");
                    *failure = Some(e);
                }
                drop(failure);
                inner.root.cancel();
            }
        })
    }

    /// Names of the tasks still running, oldest first.
    pub fn running(&self) -> Vec<String> {
        lock(&self.inner.running).values().cloned().collect()
    }

    /// Cancels the root token and waits for every task, at most `deadline` or until `force`
    /// resolves (a second signal). Returns the first task error, if a task failed; an error
    /// naming the tasks that did not end, if the wait was cut short.
    pub async fn stop(
        &self,
        deadline: Duration,
        force: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.inner.root.cancel();
        self.inner.tracker.close();
        let cut_short = tokio::select! {
            () = self.inner.tracker.wait() => None,
            () = force => Some("a second signal".to_owned()),
            () = tokio::time::sleep(deadline) => Some(format!("the {} s stop deadline", deadline.as_secs_f32())),
        };
        if let Some(why) = cut_short {
            let left = self.running().join(", ");
            tracing::error!("exiting at {why} without waiting for the tasks still running: {left}");
            anyhow::bail!("exited at {why} with tasks still running: {left}");
        }
        match lock(&self.inner.failure).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_waits_for_tasks_that_watch_their_token() {
        let tasks = Tasks::new();
        let token = tasks.token();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tasks.spawn("watcher", {
            let ended = ended.clone();
            async move {
                token.cancelled().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                ended.store(true, Ordering::Relaxed);
                Ok(())
            }
        });
        assert_eq!(tasks.running(), ["watcher"]);
        tasks
            .stop(Duration::from_secs(10), std::future::pending())
            .await
            .unwrap();
        assert!(ended.load(Ordering::Relaxed));
        assert!(tasks.running().is_empty());
    }

    #[tokio::test]
    async fn a_stop_past_its_deadline_names_what_did_not_end() {
        let tasks = Tasks::new();
        tasks.spawn("stubborn", std::future::pending());
        tasks.spawn("quick", async { Ok(()) });
        let err = tasks
            .stop(Duration::from_millis(100), std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("stubborn"), "{err}");
        assert!(!err.contains("quick"), "{err}");
    }

    #[tokio::test]
    async fn a_failing_task_stops_the_others_and_its_error_is_the_result() {
        let tasks = Tasks::new();
        let token = tasks.token();
        tasks.spawn("waiter", async move {
            token.cancelled().await;
            Ok(())
        });
        tasks.spawn("broken", async { anyhow::bail!("no server configured") });
        tasks.stopping().await;
        let err = tasks
            .stop(Duration::from_secs(10), std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "no server configured");
    }

    #[tokio::test]
    async fn a_panicking_task_counts_as_failed() {
        let tasks = Tasks::new();
        tasks.spawn("fragile", async { panic!("bad state") });
        tasks.stopping().await;
        let err = tasks
            .stop(Duration::from_secs(10), std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fragile") && err.contains("bad state"),
            "{err}"
        );
    }
}

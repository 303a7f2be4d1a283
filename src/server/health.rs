//! What `/healthz` tells: whether every subsystem does its job, and if not, which and why.
//!
//! A subsystem that fails but can carry on degraded (the broker link on its last spare, a
//! listener out of file descriptors) says so here instead of stopping the server; `/healthz`
//! then answers 503 with the reasons, so that a probe or an operator sees it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    problems: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Health {
    /// Records that `subsystem` is degraded, and why; logged once per change.
    pub fn degraded(&self, subsystem: &'static str, why: impl Into<String>) {
        let why = why.into();
        let mut problems = self.lock();
        if problems.get(subsystem) != Some(&why) {
            tracing::error!(subsystem, "degraded: {why}");
            problems.insert(subsystem, why);
        }
    }

    /// Records that `subsystem` works again; logged if it was degraded.
    pub fn recovered(&self, subsystem: &'static str) {
        if let Some(why) = self.lock().remove(subsystem) {
            tracing::info!(subsystem, "recovered (was: {why})");
        }
    }

    /// Every degraded subsystem and why; empty when all is well.
    pub fn problems(&self) -> BTreeMap<&'static str, String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.problems.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_kept_once_per_subsystem() {
        let health = Health::default();
        assert!(health.problems().is_empty());
        health.degraded("mqtt_link", "lost");
        health.degraded("mqtt_link", "lost again");
        assert_eq!(health.problems().len(), 1);
        assert_eq!(health.problems()["mqtt_link"], "lost again");
        health.recovered("mqtt_link");
        assert!(health.problems().is_empty());
    }
}

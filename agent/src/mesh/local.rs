//! What this host says about itself in the mesh: its applications as the lifecycle left
//! them on disk (active revision, service health, releases held). Read without taking any
//! application's lock, so reporting never gets in a deployment's way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::hoststate::{AppRecord, Health};
use crate::lifecycle::service;
use crate::lifecycle::state::{AppDir, AppState, read_json};
use crate::lifecycle::supervise::apps;

/// Every application under `data_dir`, as a gossiped record.
pub fn apps_on_disk(data_dir: &Path) -> BTreeMap<String, AppRecord> {
    apps(data_dir)
        .into_iter()
        .map(|app| {
            let record = app_record(&AppDir::new(data_dir, &app));
            (app, record)
        })
        .collect()
}

fn app_record(dir: &AppDir) -> AppRecord {
    let state: AppState = read_json(&dir.state()).ok().flatten().unwrap_or_default();
    let health = if dir.journal().exists() {
        Health::Deploying
    } else {
        match service::current(dir) {
            Ok(Some(s)) if s.is_running() => Health::Running,
            Ok(Some(_)) => Health::Stopped,
            _ => Health::None,
        }
    };
    let held: BTreeSet<String> = std::fs::read_dir(dir.releases())
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    AppRecord {
        revision: state.active.map(|r| r.0),
        health,
        held,
    }
}

//! What this host says about itself in the mesh: its applications as the lifecycle left
//! them on disk (active revision, service health, releases held) and the bundles its
//! bundle store keeps (`blobs`), which it can serve as well, and what the supervisor
//! reports as each application's problem. Read without taking any
//! application's lock, so reporting never gets in a deployment's way, and without
//! following links.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::hoststate::{AppRecord, Health, MAX_APPS, MAX_HELD, MAX_PROBLEM};
use crate::blobs::{BundleStore, valid_app, valid_revision};
use crate::lifecycle::service;
use crate::lifecycle::state::{AppDir, AppState, read_json};
use crate::lifecycle::supervise::{Source, apps};

/// Every application under `data_dir`, as a gossiped record: those the lifecycle has a
/// directory for, then those of which the bundle store alone holds bundles (no revision,
/// no health). `held` is what this host can serve, releases and stored bundles together,
/// within the gossip caps ([`MAX_HELD`] per application, the active revision first;
/// [`MAX_APPS`] applications), so that a full store never stops the record's publication.
pub fn apps_on_disk(data_dir: &Path) -> BTreeMap<String, AppRecord> {
    let store = BundleStore::new(data_dir);
    let mut records: BTreeMap<String, AppRecord> = apps(data_dir)
        .into_iter()
        .map(|app| {
            let mut record = app_record(&AppDir::new(data_dir, &app));
            record.held.extend(store.held(&app));
            (app, record)
        })
        .collect();
    for app in store.apps() {
        if records.contains_key(&app) || records.len() >= MAX_APPS {
            continue;
        }
        let held = store.held(&app);
        if !held.is_empty() {
            records.insert(
                app,
                AppRecord {
                    held,
                    ..not_deployed()
                },
            );
        }
    }
    for record in records.values_mut() {
        cap_held(record);
    }
    records
}

/// The record of an application this host has not deployed (its bundles kept, or a
/// fetch under way): no revision, no health, nothing held.
fn not_deployed() -> AppRecord {
    AppRecord {
        revision: None,
        health: Health::None,
        held: BTreeSet::new(),
        problem: None,
        restarts: 0,
        fetching: None,
    }
}

/// Adds the revisions being fetched as chunks (application → revision) to the records,
/// making a record for an application that has none yet (within [`MAX_APPS`]).
pub fn add_fetching(
    records: &mut BTreeMap<String, AppRecord>,
    fetching: &BTreeMap<String, String>,
) {
    for (app, revision) in fetching {
        if !records.contains_key(app) && records.len() >= MAX_APPS {
            continue;
        }
        let record = records.entry(app.clone()).or_insert_with(not_deployed);
        record.fetching = Some(revision.clone());
    }
}

/// Adds what the supervisor says is wrong with each application (`supervise::Problems`)
/// to its record, cut to [`MAX_PROBLEM`] bytes. A problem of an application without a
/// record is not told: the supervisor only watches applications on disk.
pub fn add_problems(
    records: &mut BTreeMap<String, AppRecord>,
    problems: &BTreeMap<(String, Source), String>,
) {
    for (app, record) in records.iter_mut() {
        // The supervisor's first (`Source` orders it first), then a monitor's.
        let mine = problems
            .range((app.clone(), Source::Supervisor)..=(app.clone(), Source::Monitor))
            .map(|(_, p)| p)
            .next();
        record.problem = mine.map(|p| {
            let mut end = p.len().min(MAX_PROBLEM);
            while !p.is_char_boundary(end) {
                end -= 1;
            }
            p[..end].to_string()
        });
    }
}

/// Keeps at most [`MAX_HELD`] revisions in `held`: the active one first, then in order.
fn cap_held(record: &mut AppRecord) {
    if record.held.len() <= MAX_HELD {
        return;
    }
    let mut kept: BTreeSet<String> = record
        .revision
        .iter()
        .filter(|r| record.held.contains(*r))
        .cloned()
        .collect();
    for r in &record.held {
        if kept.len() >= MAX_HELD {
            break;
        }
        kept.insert(r.clone());
    }
    record.held = kept;
}

pub(crate) fn app_record(dir: &AppDir) -> AppRecord {
    let state: AppState = read_json(&dir.state()).ok().flatten().unwrap_or_default();
    let service = service::current(dir).ok().flatten();
    let health = if dir.journal().exists() {
        Health::Deploying
    } else {
        match &service {
            Some(s) if s.is_running() => Health::Running,
            Some(_) => Health::Stopped,
            None => Health::None,
        }
    };
    let restarts = service
        .filter(|s| Some(&s.revision) == state.active.as_ref())
        .map_or(0, |s| s.restarts);
    let name = dir.root.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let real_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    // Releases the blobs service could pack and send: directories (not links) named by a
    // revision id, under an application whose name it accepts.
    let held: BTreeSet<String> = if valid_app(name).is_ok() && real_dir(&dir.root) {
        std::fs::read_dir(dir.releases())
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| valid_revision(n).is_ok())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        BTreeSet::new()
    };
    AppRecord {
        revision: state.active.map(|r| r.0),
        health,
        held,
        problem: None,
        restarts,
        fetching: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(i: usize) -> String {
        format!("{i:064x}")
    }

    #[test]
    fn stored_bundles_are_held_alongside_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        // `web`: a release directory and a stored bundle of another revision.
        std::fs::create_dir_all(data.join("apps/web/releases").join(rev(1))).unwrap();
        std::fs::create_dir_all(data.join("apps/web/releases/.staging-x")).unwrap();
        std::fs::create_dir_all(data.join("bundles/web")).unwrap();
        std::fs::write(data.join(format!("bundles/web/{}.bundle", rev(2))), b"x").unwrap();
        // `api`: only an uploaded bundle; `junk`: nothing that counts.
        std::fs::create_dir_all(data.join("bundles/api")).unwrap();
        std::fs::write(data.join(format!("bundles/api/{}.bundle", rev(3))), b"x").unwrap();
        std::fs::create_dir_all(data.join("bundles/junk")).unwrap();
        std::fs::write(data.join("bundles/junk/notes.txt"), b"x").unwrap();
        std::fs::create_dir_all(data.join("bundles/.tmp")).unwrap();
        std::fs::write(data.join(format!("bundles/.tmp/{}.bundle", rev(4))), b"x").unwrap();
        // A link named like a release is not one.
        std::os::unix::fs::symlink(
            data.join("bundles"),
            data.join("apps/web/releases").join(rev(5)),
        )
        .unwrap();

        let apps = apps_on_disk(data);
        assert_eq!(
            apps.keys().cloned().collect::<Vec<_>>(),
            vec!["api".to_string(), "web".to_string()]
        );
        assert_eq!(apps["web"].held, [rev(1), rev(2)].into());
        assert_eq!(
            apps["api"],
            AppRecord {
                revision: None,
                health: Health::None,
                held: [rev(3)].into(),
                problem: None,
                restarts: 0,
                fetching: None,
            }
        );
    }

    #[test]
    fn problems_are_told_within_their_cap() {
        let mut records = BTreeMap::from([
            (
                "a".to_string(),
                AppRecord {
                    revision: None,
                    health: Health::Stopped,
                    held: BTreeSet::new(),
                    problem: None,
                    restarts: 0,
                    fetching: None,
                },
            ),
            (
                "b".to_string(),
                AppRecord {
                    revision: None,
                    health: Health::Running,
                    held: BTreeSet::new(),
                    problem: Some("old".into()),
                    restarts: 0,
                    fetching: None,
                },
            ),
        ]);
        let problems = BTreeMap::from([
            (("a".to_string(), Source::Monitor), "é".repeat(MAX_PROBLEM)),
            (("ghost".to_string(), Source::Supervisor), "x".into()),
        ]);
        add_problems(&mut records, &problems);
        let a = records["a"].problem.as_deref().unwrap();
        assert!(a.len() <= MAX_PROBLEM && a.starts_with('é'));
        assert_eq!(
            records["b"].problem, None,
            "a resolved problem is no longer told"
        );
        assert_eq!(records.len(), 2);
    }

    #[test]
    fn held_stays_within_the_gossip_cap_keeping_the_active_revision() {
        let mut record = AppRecord {
            revision: Some(rev(MAX_HELD + 5)),
            health: Health::Running,
            held: (0..MAX_HELD + 10).map(rev).collect(),
            problem: None,
            restarts: 0,
            fetching: None,
        };
        cap_held(&mut record);
        assert_eq!(record.held.len(), MAX_HELD);
        assert!(record.held.contains(&rev(MAX_HELD + 5)));
    }
}

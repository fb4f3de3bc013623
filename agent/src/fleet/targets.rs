//! Which hosts a deployment is for: CodeDeploy's tag targeting.
//!
//! A [`TagFilter`] is one `key=value`. A [`TagGroup`] is a set of filters ORed together: a
//! host matches the group when any one filter matches one of its tags. [`Targets`] is one to
//! [`MAX_GROUPS`] groups ANDed together: a host is targeted when it matches every group.
//! These are CodeDeploy's rules for deployment groups ("If you use a single tag group, any
//! instance identified by at least one tag in the group is included ... If you use multiple
//! tag groups, only instances that are identified by at least one tag in *each* of the tag
//! groups are included", at most three tag groups; AWS CodeDeploy User Guide, "Tagging
//! instances for deployment groups"). Keys and values match exactly, case included.
//!
//! The text form is what `--targets` takes: filters separated by `,`, groups by `;`, so the
//! CLI's simple form `role=web,env=prod` is one group (web hosts *or* prod hosts) and
//! `role=web,role=api;env=prod` is two (web or api hosts, that are also prod). Spaces around
//! keys and values are dropped; a value may contain `=` but no key may; neither may contain
//! `,`, `;` or a control character. Everything is bounded ([`MAX_INPUT`], [`MAX_GROUPS`],
//! [`MAX_FILTERS`], [`MAX_KEY`], [`MAX_VALUE`]) before it is stored. CodeDeploy allows 10
//! filters per group; Shoal allows [`MAX_FILTERS`].
//!
//! [`Targets`] is kept canonical (filters sorted within a group, groups sorted, nothing
//! repeated), so two equal selections compare, print and serialize the same. It serializes
//! as its canonical text, which is what a signed deployment intent will carry, and
//! deserializes through the same checks as the command line.
//!
//! [`select`] applies targets to the fleet's hosts and refuses, with
//! [`TargetsErrorKind::NoHostMatched`], targets that choose nobody, so the caller can say so
//! before anything starts. Sans-IO: no networking, no async, no IO.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::plan::{Health, HostInfo, Revision};

/// The most tag groups one [`Targets`] may have (CodeDeploy's limit).
pub const MAX_GROUPS: usize = 3;
/// The most filters one [`TagGroup`] may have.
pub const MAX_FILTERS: usize = 32;
/// The longest key, in bytes.
pub const MAX_KEY: usize = 128;
/// The longest value, in bytes: as long as the longest tag value a host record may carry
/// (`mesh::hoststate::MAX_TAG_VALUE`), so any host's tag can be targeted.
pub const MAX_VALUE: usize = 256;
/// The longest text [`Targets::parse`] looks at, in bytes. A valid canonical form is under
/// `MAX_GROUPS * MAX_FILTERS * (MAX_KEY + MAX_VALUE + 2)` (37,056 bytes); the rest is room
/// for spaces.
pub const MAX_INPUT: usize = 64 * 1024;

/// How much of an offending part an error repeats.
const QUOTE_MAX: usize = 64;

/// One `key=value`: a host matches it when it has the tag `key` with exactly this value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TagFilter {
    key: String,
    value: String,
}

impl TagFilter {
    /// The tag's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value the tag must have.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether `tags` has this tag with this value.
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        tags.get(self.key.as_str()) == Some(&self.value)
    }
}

impl fmt::Display for TagFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Filters ORed together: a host matches when any filter matches. Never empty; sorted and
/// without repeats.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TagGroup {
    filters: Vec<TagFilter>,
}

impl TagGroup {
    /// The filters, sorted by key then value.
    pub fn filters(&self) -> &[TagFilter] {
        &self.filters
    }

    /// Whether any filter matches `tags`.
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        self.filters.iter().any(|f| f.matches(tags))
    }
}

impl fmt::Display for TagGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, filter) in self.filters.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{filter}")?;
        }
        Ok(())
    }
}

/// One to [`MAX_GROUPS`] tag groups ANDed together: a host is targeted when it matches every
/// group. Canonical (see the module documentation); built by [`Targets::parse`] (or
/// [`FromStr`], or deserialization). [`Display`](fmt::Display) prints the canonical full
/// form, which parses back to an equal value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Targets {
    groups: Vec<TagGroup>,
}

impl Targets {
    /// Parses `--targets`: filters `key=value` separated by `,` form a group, groups are
    /// separated by `;`. Refuses anything out of bounds, empty, without `=`, or repeated.
    pub fn parse(input: &str) -> Result<Targets, TargetsError> {
        if input.len() > MAX_INPUT {
            return Err(TargetsErrorKind::TooLong {
                len: input.len(),
                max: MAX_INPUT,
            }
            .into());
        }
        if input.trim().is_empty() {
            return Err(TargetsErrorKind::Empty.into());
        }
        let count = input.split(';').count();
        if count > MAX_GROUPS {
            return Err(TargetsErrorKind::TooManyGroups {
                count,
                max: MAX_GROUPS,
            }
            .into());
        }
        let mut groups: Vec<TagGroup> = Vec::with_capacity(count);
        for (i, text) in input.split(';').enumerate() {
            let group = parse_group(i + 1, text)?;
            if let Some(same_as) = groups.iter().position(|g| *g == group) {
                return Err(TargetsErrorKind::DuplicateGroup {
                    group: i + 1,
                    same_as: same_as + 1,
                }
                .into());
            }
            groups.push(group);
        }
        groups.sort();
        Ok(Targets { groups })
    }

    /// The groups, in canonical order.
    pub fn groups(&self) -> &[TagGroup] {
        &self.groups
    }

    /// Whether a host with these tags is targeted: it matches every group.
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        self.groups.iter().all(|g| g.matches(tags))
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, group) in self.groups.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{group}")?;
        }
        Ok(())
    }
}

impl FromStr for Targets {
    type Err = TargetsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Targets::parse(s)
    }
}

impl From<Targets> for String {
    fn from(targets: Targets) -> String {
        targets.to_string()
    }
}

impl TryFrom<String> for Targets {
    type Error = TargetsError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Targets::parse(&text)
    }
}

/// The names of the hosts `targets` chooses among `hosts` (name and tags), sorted, each
/// once. Refuses ([`TargetsErrorKind::NoHostMatched`]) when none is chosen, so a deployment
/// that would do nothing is reported before anything starts.
pub fn select<'a, I>(targets: &Targets, hosts: I) -> Result<Vec<&'a str>, TargetsError>
where
    I: IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
{
    let mut seen = 0usize;
    let mut chosen: Vec<&'a str> = hosts
        .into_iter()
        .inspect(|_| seen += 1)
        .filter(|(_, tags)| targets.matches(tags))
        .map(|(name, _)| name)
        .collect();
    if chosen.is_empty() {
        return Err(TargetsErrorKind::NoHostMatched {
            targets: quote(&targets.to_string()),
            hosts: seen,
        }
        .into());
    }
    chosen.sort_unstable();
    chosen.dedup();
    Ok(chosen)
}

/// The hosts a deployment targets, as the mesh describes them to one agent.
#[derive(Debug)]
pub struct Chosen {
    /// The matching hosts the mesh holds alive or suspect, by name, as the planner takes
    /// them.
    pub hosts: Vec<HostInfo>,
    /// Matching hosts the mesh holds dead or left: not targeted.
    pub unreachable: Vec<String>,
}

/// Chooses the targets of a deployment of `app` among `hosts` (what an agent's mesh lists):
/// those whose tags `targets` matches and that are alive or suspect. A host's health for
/// the plan is what it gossips for the application (a stopped service or a deployment
/// under way is unhealthy, anything else healthy); its revision is the active one it
/// gossips. Refuses a choice of no host, saying how many matching hosts are down.
pub fn choose(
    targets: &Targets,
    app: &str,
    zone_tag: Option<&str>,
    hosts: &[crate::mesh::view::HostView],
) -> Result<Chosen, TargetsError> {
    use crate::mesh::view::MemberState;
    let (reachable, unreachable): (Vec<_>, Vec<_>) = hosts
        .iter()
        .filter(|h| targets.matches(&h.tags))
        .partition(|h| matches!(h.state, MemberState::Alive | MemberState::Suspect));
    let names = select(
        targets,
        reachable.iter().map(|h| (h.name.as_str(), &h.tags)),
    )
    .map_err(|e| match e.kind {
        TargetsErrorKind::NoHostMatched { .. } if !unreachable.is_empty() => {
            TargetsErrorKind::AllMatchingDown {
                targets: targets.to_string(),
                down: unreachable.len(),
            }
            .into()
        }
        _ => e,
    })?;
    let by_name: BTreeMap<&str, &crate::mesh::view::HostView> =
        reachable.iter().map(|h| (h.name.as_str(), *h)).collect();
    Ok(Chosen {
        hosts: names
            .iter()
            .map(|n| host_info(by_name[n], app, zone_tag))
            .collect(),
        unreachable: unreachable.iter().map(|h| h.name.clone()).collect(),
    })
}

/// `h` as the planner sees it; its zone is the value of its tag `zone_tag`, if given.
fn host_info(h: &crate::mesh::view::HostView, app: &str, zone_tag: Option<&str>) -> HostInfo {
    use crate::mesh::hoststate;
    let detail = h.details.get(app);
    let health = match detail.map(|d| d.health) {
        Some(hoststate::Health::Stopped | hoststate::Health::Deploying) => Health::Unhealthy,
        _ => Health::Healthy,
    };
    let revision = match detail.and_then(|d| d.revision.clone()) {
        Some(r) => Revision::Known(r),
        None => Revision::Unknown,
    };
    HostInfo {
        name: h.name.clone(),
        health,
        revision,
        zone: zone_tag.and_then(|t| h.tags.get(t).cloned()),
    }
}

/// One group's text (`number` counts from 1).
fn parse_group(number: usize, text: &str) -> Result<TagGroup, TargetsError> {
    if text.trim().is_empty() {
        return Err(TargetsErrorKind::EmptyGroup { group: number }.into());
    }
    let count = text.split(',').count();
    if count > MAX_FILTERS {
        return Err(TargetsErrorKind::TooManyFilters {
            group: number,
            count,
            max: MAX_FILTERS,
        }
        .into());
    }
    let mut filters = Vec::with_capacity(count);
    for text in text.split(',') {
        filters.push(parse_filter(number, text)?);
    }
    filters.sort();
    if let Some(pair) = filters.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(TargetsErrorKind::DuplicateFilter {
            group: number,
            filter: quote(&pair[0].to_string()),
        }
        .into());
    }
    Ok(TagGroup { filters })
}

/// One `key=value` of group `group`.
fn parse_filter(group: usize, text: &str) -> Result<TagFilter, TargetsError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(TargetsErrorKind::EmptyFilter { group }.into());
    }
    let filter = quote(text);
    let Some((key, value)) = text.split_once('=') else {
        return Err(TargetsErrorKind::MissingEquals { group, filter }.into());
    };
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() {
        return Err(TargetsErrorKind::EmptyKey { group, filter }.into());
    }
    if value.is_empty() {
        return Err(TargetsErrorKind::EmptyValue { group, filter }.into());
    }
    if key.len() > MAX_KEY {
        return Err(TargetsErrorKind::KeyTooLong {
            group,
            filter,
            len: key.len(),
            max: MAX_KEY,
        }
        .into());
    }
    if value.len() > MAX_VALUE {
        return Err(TargetsErrorKind::ValueTooLong {
            group,
            filter,
            len: value.len(),
            max: MAX_VALUE,
        }
        .into());
    }
    if text.chars().any(char::is_control) {
        return Err(TargetsErrorKind::ControlCharacter { group, filter }.into());
    }
    Ok(TagFilter {
        key: key.to_owned(),
        value: value.to_owned(),
    })
}

/// At most [`QUOTE_MAX`] bytes of `text` (cut on a character boundary), for an error.
pub(super) fn quote(text: &str) -> String {
    if text.len() <= QUOTE_MAX {
        return text.to_owned();
    }
    let mut end = QUOTE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Targets that could not be parsed, or that choose no host. [`TargetsError::kind`] says
/// which; the message names the offending part.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("targets: {kind}")]
pub struct TargetsError {
    kind: TargetsErrorKind,
}

impl TargetsError {
    /// What was wrong.
    pub fn kind(&self) -> &TargetsErrorKind {
        &self.kind
    }
}

impl From<TargetsErrorKind> for TargetsError {
    fn from(kind: TargetsErrorKind) -> Self {
        TargetsError { kind }
    }
}

/// What was wrong with targets. Groups are numbered from 1 in the order written; quoted
/// parts are cut to 64 bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetsErrorKind {
    /// Every host the targets match is dead or left: nothing could be deployed.
    #[error(
        "targets {targets} match only hosts the mesh holds dead or left ({down}): start their \
         agents or change --targets"
    )]
    AllMatchingDown { targets: String, down: usize },
    /// Nothing but spaces.
    #[error("nothing given; write key=value, filters separated by `,`, groups by `;`")]
    Empty,
    /// The text is longer than [`MAX_INPUT`].
    #[error("{len} bytes, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    /// More than [`MAX_GROUPS`] groups.
    #[error("{count} tag groups, more than the {max} allowed")]
    TooManyGroups { count: usize, max: usize },
    /// A group with nothing in it (`a=b;` or `;;`).
    #[error("tag group {group} is empty")]
    EmptyGroup { group: usize },
    /// More than [`MAX_FILTERS`] filters in a group.
    #[error("tag group {group} has {count} filters, more than the {max} allowed")]
    TooManyFilters {
        group: usize,
        count: usize,
        max: usize,
    },
    /// An empty filter in a group (`a=b,,c=d`).
    #[error("tag group {group} has an empty filter")]
    EmptyFilter { group: usize },
    /// A filter without `=`.
    #[error("filter {filter:?} in tag group {group} has no `=`; write key=value")]
    MissingEquals { group: usize, filter: String },
    /// A filter whose key is empty (`=web`).
    #[error("filter {filter:?} in tag group {group} has an empty key")]
    EmptyKey { group: usize, filter: String },
    /// A filter whose value is empty (`role=`).
    #[error("filter {filter:?} in tag group {group} has an empty value")]
    EmptyValue { group: usize, filter: String },
    /// A key longer than [`MAX_KEY`].
    #[error(
        "filter {filter:?} in tag group {group} has a {len}-byte key, more than the {max} allowed"
    )]
    KeyTooLong {
        group: usize,
        filter: String,
        len: usize,
        max: usize,
    },
    /// A value longer than [`MAX_VALUE`].
    #[error(
        "filter {filter:?} in tag group {group} has a {len}-byte value, more than the {max} allowed"
    )]
    ValueTooLong {
        group: usize,
        filter: String,
        len: usize,
        max: usize,
    },
    /// A key or value with a control character.
    #[error("filter {filter:?} in tag group {group} has a control character")]
    ControlCharacter { group: usize, filter: String },
    /// The same filter twice in one group.
    #[error("filter {filter:?} appears twice in tag group {group}")]
    DuplicateFilter { group: usize, filter: String },
    /// A group equal to an earlier one.
    #[error("tag group {group} repeats tag group {same_as}")]
    DuplicateGroup { group: usize, same_as: usize },
    /// Valid targets that choose none of the hosts.
    #[error("no host matches `{targets}` (of {hosts} hosts)")]
    NoHostMatched { targets: String, hosts: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Targets {
        match Targets::parse(s) {
            Ok(t) => t,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn kind(s: &str) -> TargetsErrorKind {
        match Targets::parse(s) {
            Ok(t) => panic!("{s:?} should be refused, parsed as {t}"),
            Err(e) => e.kind().clone(),
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pairs(group: &TagGroup) -> Vec<(&str, &str)> {
        group
            .filters()
            .iter()
            .map(|f| (f.key(), f.value()))
            .collect()
    }

    #[test]
    fn simple_form_is_one_group_of_ored_filters() {
        let t = parse("role=web,env=prod");
        assert_eq!(t.groups().len(), 1);
        assert_eq!(pairs(&t.groups()[0]), [("env", "prod"), ("role", "web")]);
        assert!(t.matches(&tags(&[("role", "web")])));
        assert!(t.matches(&tags(&[("env", "prod"), ("zone", "a")])));
        assert!(!t.matches(&tags(&[("role", "api"), ("env", "dev")])));
        assert!(!t.matches(&tags(&[])));
    }

    #[test]
    fn full_form_groups_are_anded() {
        let t = parse("role=web,role=api;env=prod");
        assert_eq!(t.groups().len(), 2);
        assert!(t.matches(&tags(&[("role", "web"), ("env", "prod")])));
        assert!(t.matches(&tags(&[("role", "api"), ("env", "prod")])));
        assert!(!t.matches(&tags(&[("role", "web"), ("env", "dev")])));
        assert!(!t.matches(&tags(&[("env", "prod")])));
    }

    /// CodeDeploy User Guide, "Tagging instances for deployment groups", example 4: three
    /// groups with several tags each, and the instances it says are in and out.
    #[test]
    fn codedeploy_example_four() {
        let t = parse(
            "Environment=Beta,Environment=Staging;\
             Region=North,Region=South,Region=East;\
             Type=t2.medium,Type=t2.large",
        );
        let host =
            |e: &str, r: &str, ty: &str| tags(&[("Environment", e), ("Region", r), ("Type", ty)]);
        assert!(t.matches(&host("Beta", "North", "t2.medium")));
        assert!(t.matches(&host("Staging", "East", "t2.large")));
        assert!(t.matches(&host("Staging", "South", "t2.large")));
        assert!(!t.matches(&host("Beta", "West", "t2.medium")));
        assert!(!t.matches(&host("Staging", "East", "t2.micro")));
        assert!(!t.matches(&host("Production", "South", "t2.large")));
    }

    #[test]
    fn matching_is_exact_and_case_sensitive() {
        let t = parse("role=web");
        assert!(!t.matches(&tags(&[("role", "Web")])));
        assert!(!t.matches(&tags(&[("Role", "web")])));
        assert!(!t.matches(&tags(&[("role", "web2")])));
    }

    #[test]
    fn display_is_canonical_and_parses_back() {
        let a = parse(" env = prod ; role=web , role=api ");
        let b = parse("role=api,role=web;env=prod");
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "env=prod;role=api,role=web");
        assert_eq!(parse(&a.to_string()), a);
        assert_eq!("role=web".parse::<Targets>(), Ok(parse("role=web")));
    }

    #[test]
    fn value_may_contain_equals() {
        let t = parse("digest=sha256=abc");
        assert_eq!(pairs(&t.groups()[0]), [("digest", "sha256=abc")]);
        assert_eq!(parse(&t.to_string()), t);
    }

    #[test]
    fn refuses_more_than_three_groups() {
        assert!(matches!(
            kind("a=1;b=2;c=3;d=4"),
            TargetsErrorKind::TooManyGroups { count: 4, max: 3 }
        ));
        parse("a=1;b=2;c=3");
    }

    #[test]
    fn refuses_empty_parts() {
        assert_eq!(kind(""), TargetsErrorKind::Empty);
        assert_eq!(kind("  "), TargetsErrorKind::Empty);
        assert_eq!(kind("a=1;"), TargetsErrorKind::EmptyGroup { group: 2 });
        assert_eq!(kind(";a=1"), TargetsErrorKind::EmptyGroup { group: 1 });
        assert_eq!(kind("a=1,,b=2"), TargetsErrorKind::EmptyFilter { group: 1 });
        assert_eq!(
            kind("a=1;=web"),
            TargetsErrorKind::EmptyKey {
                group: 2,
                filter: "=web".into()
            }
        );
        assert_eq!(
            kind("role= "),
            TargetsErrorKind::EmptyValue {
                group: 1,
                filter: "role=".into()
            }
        );
    }

    #[test]
    fn refuses_a_filter_without_equals() {
        assert_eq!(
            kind("role=web,prod"),
            TargetsErrorKind::MissingEquals {
                group: 1,
                filter: "prod".into()
            }
        );
    }

    #[test]
    fn refuses_repeats() {
        assert_eq!(
            kind("role=web,env=prod,role=web"),
            TargetsErrorKind::DuplicateFilter {
                group: 1,
                filter: "role=web".into()
            }
        );
        // Equal once canonical: order and spaces do not matter.
        assert_eq!(
            kind("a=1,b=2;c=3;b=2 , a=1"),
            TargetsErrorKind::DuplicateGroup {
                group: 3,
                same_as: 1
            }
        );
        // The same filter in two different groups is allowed.
        parse("role=web;role=web,env=prod");
    }

    #[test]
    fn refuses_what_is_too_long() {
        let key = "k".repeat(MAX_KEY + 1);
        assert!(matches!(
            kind(&format!("{key}=v")),
            TargetsErrorKind::KeyTooLong { group: 1, len, max: MAX_KEY, .. } if len == MAX_KEY + 1
        ));
        parse(&format!("{}=v", "k".repeat(MAX_KEY)));

        let value = "v".repeat(MAX_VALUE + 1);
        assert!(matches!(
            kind(&format!("a=1;k={value}")),
            TargetsErrorKind::ValueTooLong { group: 2, len, max: MAX_VALUE, .. } if len == MAX_VALUE + 1
        ));
        parse(&format!("k={}", "v".repeat(MAX_VALUE)));

        let many: Vec<String> = (0..=MAX_FILTERS).map(|i| format!("k={i}")).collect();
        assert_eq!(
            kind(&many.join(",")),
            TargetsErrorKind::TooManyFilters {
                group: 1,
                count: MAX_FILTERS + 1,
                max: MAX_FILTERS
            }
        );
        parse(&many[..MAX_FILTERS].join(","));

        let huge = "x".repeat(MAX_INPUT + 1);
        assert_eq!(
            kind(&huge),
            TargetsErrorKind::TooLong {
                len: MAX_INPUT + 1,
                max: MAX_INPUT
            }
        );
    }

    #[test]
    fn the_largest_canonical_form_parses() {
        let group = |g: usize| -> String {
            (0..MAX_FILTERS)
                .map(|i| {
                    format!(
                        "{:k>w$}={:v>x$}",
                        g * 100 + i,
                        i,
                        w = MAX_KEY,
                        x = MAX_VALUE
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let text = (0..MAX_GROUPS).map(group).collect::<Vec<_>>().join(";");
        assert!(text.len() <= MAX_INPUT);
        let t = parse(&text);
        assert_eq!(t.groups().len(), MAX_GROUPS);
        assert_eq!(t.to_string().len(), text.len());
    }

    #[test]
    fn refuses_control_characters() {
        assert!(matches!(
            kind("role=web\u{1b}[31m"),
            TargetsErrorKind::ControlCharacter { group: 1, .. }
        ));
        assert!(matches!(
            kind("ro\nle=web"),
            TargetsErrorKind::ControlCharacter { group: 1, .. }
        ));
    }

    #[test]
    fn errors_name_the_offending_part() {
        let e = Targets::parse("role=web;env").err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("targets: filter \"env\" in tag group 2 has no `=`; write key=value")
        );
        // Long parts are cut, on a character boundary.
        let long = format!("{}=v", "é".repeat(MAX_KEY));
        let msg = Targets::parse(&long)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains('…') && msg.len() < 200, "{msg}");
        // Control characters are escaped, not printed.
        let msg = Targets::parse("a\u{1b}b")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!msg.contains('\u{1b}'), "{msg:?}");
    }

    #[test]
    fn select_is_sorted_unique_and_refuses_no_match() {
        let web = tags(&[("role", "web"), ("env", "prod")]);
        let api = tags(&[("role", "api"), ("env", "prod")]);
        let dev = tags(&[("role", "web"), ("env", "dev")]);
        let hosts = [
            ("web-2", &web),
            ("api-1", &api),
            ("web-1", &web),
            ("dev-1", &dev),
            ("web-1", &web),
        ];
        let t = parse("role=web,role=api;env=prod");
        assert_eq!(select(&t, hosts), Ok(vec!["api-1", "web-1", "web-2"]));

        let none = parse("role=db");
        let e = select(&none, hosts).err();
        assert_eq!(
            e.as_ref().map(|e| e.kind()),
            Some(&TargetsErrorKind::NoHostMatched {
                targets: "role=db".into(),
                hosts: 5
            })
        );
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("targets: no host matches `role=db` (of 5 hosts)")
        );
        assert!(matches!(
            select(&t, []).map_err(|e| e.kind().clone()),
            Err(TargetsErrorKind::NoHostMatched { hosts: 0, .. })
        ));
    }

    #[test]
    fn serde_uses_the_canonical_text_and_checks_it() {
        let t = parse("role=web,role=api;env=prod");
        let json = serde_json::to_string(&t).unwrap_or_default();
        assert_eq!(json, "\"env=prod;role=api,role=web\"");
        let back: Result<Targets, _> = serde_json::from_str(&json);
        assert_eq!(back.ok(), Some(t));
        for bad in ["\"\"", "\"a=1;b=2;c=3;d=4\"", "\"role\"", "\"a=1,a=1\""] {
            assert!(serde_json::from_str::<Targets>(bad).is_err(), "{bad}");
        }
    }
}

//! The shape of `appspec.yml` as written, read with serde-saphyr. Every scalar is read as
//! its source text with its location (`Spanned<String>`), so `mode: 0644` stays `0644` and
//! every later complaint can name its line; `model.rs` interprets the text.

use serde::Deserialize;
use serde_saphyr::Spanned;

pub type Text = Spanned<String>;

#[derive(Deserialize, Debug, Default)]
pub struct RawAppSpec {
    pub version: Option<Text>,
    pub os: Option<Text>,
    pub files: Option<Vec<RawFile>>,
    pub file_exists_behavior: Option<Text>,
    pub permissions: Option<Vec<RawPermission>>,
    pub hooks: Option<Spanned<std::collections::BTreeMap<String, Option<Vec<RawHook>>>>>,
    pub shoal: Option<RawShoal>,
}

#[derive(Deserialize, Debug)]
pub struct RawFile {
    pub source: Text,
    pub destination: Text,
    /// Not CodeDeploy's (it has the key only at the top level), but written in the wild:
    /// honoured as a per-entry override.
    pub file_exists_behavior: Option<Text>,
}

#[derive(Deserialize, Debug)]
pub struct RawPermission {
    pub object: Text,
    pub pattern: Option<Text>,
    #[serde(default)]
    pub except: StrList,
    pub owner: Option<Text>,
    pub group: Option<Text>,
    pub mode: Option<Text>,
    #[serde(default)]
    pub acls: StrList,
    /// SELinux context: recognised, not applied yet.
    pub context: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "type")]
    pub types: StrList,
}

#[derive(Deserialize, Debug)]
pub struct RawHook {
    pub location: Text,
    pub timeout: Option<Text>,
    pub runas: Option<Text>,
}

/// Shoal's own keys, all under the top-level `shoal:` key so a CodeDeploy file stays valid.
#[derive(Deserialize, Debug)]
pub struct RawShoal {
    pub service: Option<RawService>,
    pub monitor: Option<Vec<RawMonitor>>,
}

/// A `shoal.monitor` entry: a hook run again and again while the revision is active.
#[derive(Deserialize, Debug)]
pub struct RawMonitor {
    pub location: Text,
    pub interval: Option<Text>,
    pub failures_allowed: Option<Text>,
    pub timeout: Option<Text>,
}

#[derive(Deserialize, Debug)]
pub struct RawService {
    pub command: Text,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    pub port: Option<Text>,
    pub health_path: Option<Text>,
    pub start_timeout: Option<Text>,
    pub user: Option<Text>,
    pub switch: Option<RawSwitch>,
}

/// `shoal.service.switch`: the public port held by a proxy while revisions change.
#[derive(Deserialize, Debug)]
pub struct RawSwitch {
    pub address: Option<Text>,
    pub drain_timeout: Option<Text>,
    pub keep_previous: Option<Text>,
    pub proxy_protocol: Option<Text>,
    pub forward: Option<Text>,
}

/// A list of scalars that may also be written as one scalar, or left empty.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StrList(pub Vec<String>);

impl<'de> Deserialize<'de> for StrList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<StrList, E> {
                Ok(StrList(vec![s.to_string()]))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<StrList, E> {
                Ok(StrList::default())
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<StrList, E> {
                Ok(StrList::default())
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<StrList, D::Error> {
                d.deserialize_any(V)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StrList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Option<String>>()? {
                    items.extend(item);
                }
                Ok(StrList(items))
            }
        }
        d.deserialize_any(V)
    }
}

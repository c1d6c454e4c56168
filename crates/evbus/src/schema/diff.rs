//! Comparing two catalogues: every change of every event type, compatible or breaking under
//! the type's mode (`evbus events diff`, the pull-request check of a catalogue).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;
use serde_json::Value;

use super::VERSION_KEYWORD;
use super::catalog::{Catalog, EventTypeInfo, EventVersion};
use super::compat::{self, Compatibility};
use super::resolve::{self, Docs};

/// Whether a change keeps the guarantees of the type's compatibility mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Producers and consumers of either catalogue keep reading each other as the mode says.
    Compatible,
    /// Some producer or consumer will refuse data the other side writes.
    Breaking,
}

impl Severity {
    /// `compatible` or `breaking`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Compatible => "compatible",
            Severity::Breaking => "breaking",
        }
    }
}

/// What kind of change a [`Change`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ChangeKind {
    /// A new event type (compatible).
    TypeAdded,
    /// An event type is gone (breaking: its producers can no longer emit, its consumers
    /// no longer start).
    TypeRemoved,
    /// A new version that keeps the type's mode (compatible; one line per version).
    VersionAdded,
    /// A rule of the type's mode broken by a new version (one line per broken rule; the rule
    /// is Confluent's name, see [`compat`]).
    Incompatible,
    /// A published version changed in place, in its own schema or through a shared
    /// definition it references: breaking when the old and new schemas of the version do not
    /// read each other's data (one line per broken rule), compatible when only annotations
    /// changed.
    VersionChanged,
    /// A version is gone: compatible when the latest version reads its data (consumers read
    /// such events as the latest version), breaking otherwise.
    VersionRemoved,
    /// The compatibility mode changed: breaking when it checks less (a direction or
    /// transitivity dropped).
    ModeChanged,
}

impl ChangeKind {
    /// The rule name used for this kind when no compatibility rule is involved
    /// (`TYPE_ADDED`…).
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::TypeAdded => "TYPE_ADDED",
            ChangeKind::TypeRemoved => "TYPE_REMOVED",
            ChangeKind::VersionAdded => "VERSION_ADDED",
            ChangeKind::Incompatible => "INCOMPATIBLE",
            ChangeKind::VersionChanged => "VERSION_CHANGED",
            ChangeKind::VersionRemoved => "VERSION_REMOVED",
            ChangeKind::ModeChanged => "MODE_CHANGED",
        }
    }
}

/// One change between two catalogues, from [`Catalog::diff`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Compatible or breaking.
    pub severity: Severity,
    /// What changed.
    pub kind: ChangeKind,
    /// The version of the old catalogue concerned (the writer or reader compared with).
    pub from_version: Option<u32>,
    /// The version of the new catalogue concerned.
    pub to_version: Option<u32>,
    /// A JSON pointer into the schema (`/` for the root or the whole type).
    pub path: String,
    /// The rule: a compatibility rule name (`REQUIRED_PROPERTY_ADDED`…) or the kind's name.
    pub rule: String,
    /// `BACKWARD` (the newer schema reading older data) or `FORWARD` (the older schema
    /// reading newer data), for compatibility findings.
    pub direction: Option<&'static str>,
    /// What changed and why it matters, in words.
    pub message: String,
}

impl fmt::Display for Change {
    /// `breaking afterProductUpdate v1 -> v2 /properties/color PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL (BACKWARD): …`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| format!("v{v}"));
        write!(
            f,
            "{} {} {} -> {} {} {}",
            self.severity.as_str(),
            self.event_type,
            v(self.from_version),
            v(self.to_version),
            self.path,
            self.rule
        )?;
        if let Some(d) = self.direction {
            write!(f, " ({d})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl Change {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ty: &str,
        severity: Severity,
        kind: ChangeKind,
        from_version: Option<u32>,
        to_version: Option<u32>,
        path: &str,
        rule: &str,
        direction: Option<&'static str>,
        message: String,
    ) -> Self {
        Change {
            event_type: ty.to_owned(),
            severity,
            kind,
            from_version,
            to_version,
            path: path.to_owned(),
            rule: rule.to_owned(),
            direction,
            message,
        }
    }
}

/// The self-contained (references inlined) schema of every version of a type.
fn inlined(catalog: &Catalog, info: &EventTypeInfo) -> BTreeMap<u32, Value> {
    let aliases = HashMap::new();
    let docs = Docs {
        defs: catalog.canonical_definitions(),
        aliases: &aliases,
    };
    info.versions()
        .iter()
        .map(|v: &EventVersion| {
            let mut s = resolve::inline(v.canonical(), &docs);
            // Saying the version a file already has is no change.
            if let Some(m) = s.as_object_mut() {
                m.remove(VERSION_KEYWORD);
            }
            (v.version(), s)
        })
        .collect()
}

/// Why version `v`, present in both catalogues, changed: its own schema, or only the shared
/// definitions it references (which are not versioned). `None` when its own schema changed;
/// otherwise the definitions whose content differs, as `definitions/<Name>.json`.
fn changed_definitions(
    from: &Catalog,
    old: &EventTypeInfo,
    to: &Catalog,
    new: &EventTypeInfo,
    v: u32,
) -> Option<Vec<String>> {
    let (before, after) = (old.version(v)?, new.version(v)?);
    let own = |e: &EventVersion| {
        let mut s = e.source_schema().clone();
        if let Some(m) = s.as_object_mut() {
            m.remove(VERSION_KEYWORD);
        }
        s
    };
    if own(before) != own(after) {
        return None;
    }
    let aliases = HashMap::new();
    let (from_defs, to_defs) = (from.canonical_definitions(), to.canonical_definitions());
    let mut names = resolve::referenced_definitions(
        before.canonical(),
        &Docs {
            defs: from_defs,
            aliases: &aliases,
        },
    );
    names.extend(resolve::referenced_definitions(
        after.canonical(),
        &Docs {
            defs: to_defs,
            aliases: &aliases,
        },
    ));
    let changed: Vec<String> = names
        .into_iter()
        .filter(|n| from_defs.get(n) != to_defs.get(n))
        .map(|n| format!("definitions/{n}.json"))
        .collect();
    (!changed.is_empty()).then_some(changed)
}

fn weakens(from: Compatibility, to: Compatibility) -> bool {
    (from.checks_backward() && !to.checks_backward())
        || (from.checks_forward() && !to.checks_forward())
        || (from.is_transitive() && !to.is_transitive())
}

impl Catalog {
    /// Every change from this catalogue (the deployed one, `from`) to `to` (the proposed
    /// one), in type order, each classified under the mode `to` gives the type:
    ///
    /// - a type added is compatible, a type removed breaking;
    /// - each version of `to` that `self` lacks is checked against the version before it (or
    ///   every earlier one for a transitive mode) — earlier versions taken from `to`, or from
    ///   `self` when `to` dropped them — and yields one breaking line per rule broken, or one
    ///   compatible `VERSION_ADDED` line;
    /// - a version present in both whose schema changed must still read and be read by its
    ///   old form, since events of it are in flight: one breaking line per rule broken, or a
    ///   compatible `VERSION_CHANGED` line when only annotations changed. Shared definitions
    ///   are not versioned, so a changed definition changes every version that references it;
    ///   when the version's own schema is unchanged, the message names the definitions;
    /// - a version dropped from `to` is compatible when the latest version of `to` reads its
    ///   data, breaking otherwise;
    /// - a weaker mode (a direction or transitivity dropped) is breaking;
    /// - the versions `to` keeps, and those of a type it adds, are checked against the
    ///   versions before them in `to`, in the mode each is checked in when the catalogue
    ///   loads (a stricter mode may break a history the old mode allowed): a broken rule is
    ///   breaking, since no service loads such a catalogue.
    ///
    /// Load both catalogues with [`check_compatibility(false)`](super::CatalogBuilder::check_compatibility)
    /// so that a breaking `to` loads and gets its findings rather than a load error.
    pub fn diff(&self, to: &Catalog) -> Vec<Change> {
        let names: BTreeSet<&str> = self
            .event_types()
            .chain(to.event_types())
            .map(EventTypeInfo::name)
            .collect();
        let mut out = Vec::new();
        for ty in names {
            match (self.get(ty), to.get(ty)) {
                (None, Some(new)) => {
                    let versions: Vec<String> = new
                        .versions()
                        .iter()
                        .map(|v| format!("v{}", v.version()))
                        .collect();
                    out.push(Change::new(
                        ty,
                        Severity::Compatible,
                        ChangeKind::TypeAdded,
                        None,
                        Some(new.latest().version()),
                        "/",
                        ChangeKind::TypeAdded.as_str(),
                        None,
                        format!(
                            "new event type ({}, {})",
                            versions.join(", "),
                            new.compatibility()
                        ),
                    ));
                    history_breaks(ty, new, &inlined(to, new), |_| true, &mut out);
                }
                (Some(old), None) => out.push(Change::new(
                    ty,
                    Severity::Breaking,
                    ChangeKind::TypeRemoved,
                    Some(old.latest().version()),
                    None,
                    "/",
                    ChangeKind::TypeRemoved.as_str(),
                    None,
                    "the event type is gone: its producers can no longer emit it and its \
                     consumers no longer start; events of it still in flight cannot be read"
                        .to_owned(),
                )),
                (Some(old), Some(new)) => diff_type(ty, self, old, to, new, &mut out),
                (None, None) => {}
            }
        }
        out
    }
}

fn diff_type(
    ty: &str,
    from: &Catalog,
    old: &EventTypeInfo,
    to: &Catalog,
    new: &EventTypeInfo,
    out: &mut Vec<Change>,
) {
    let mode = new.compatibility();
    if old.compatibility() != mode {
        let breaking = weakens(old.compatibility(), mode);
        out.push(Change::new(
            ty,
            if breaking {
                Severity::Breaking
            } else {
                Severity::Compatible
            },
            ChangeKind::ModeChanged,
            Some(old.latest().version()),
            Some(new.latest().version()),
            "/",
            ChangeKind::ModeChanged.as_str(),
            None,
            format!(
                "compatibility mode changed from {} to {mode}{}",
                old.compatibility(),
                if breaking {
                    ": it checks less, so later versions may break readers the old mode protected"
                } else {
                    ""
                }
            ),
        ));
    }
    let old_s = inlined(from, old);
    let new_s = inlined(to, new);

    // Versions present in both: changed in place?
    for (v, before) in &old_s {
        let Some(after) = new_s.get(v) else { continue };
        if before == after {
            continue;
        }
        // Its own file unchanged: the change comes from shared definitions, which every
        // version referencing them (the ones in flight too) reads with their new form.
        let via_definitions = changed_definitions(from, old, to, new, *v);
        let mut found = false;
        for (direction, writer, reader, what) in [
            (
                "BACKWARD",
                before,
                after,
                "the new form reading data written with the old",
            ),
            (
                "FORWARD",
                after,
                before,
                "the old form reading data written with the new",
            ),
        ] {
            for p in compat::check(writer, reader) {
                found = true;
                out.push(Change::new(
                    ty,
                    Severity::Breaking,
                    ChangeKind::VersionChanged,
                    Some(*v),
                    Some(*v),
                    p.path(),
                    p.rule(),
                    Some(direction),
                    match &via_definitions {
                        None => format!(
                            "version {v} changed in place ({what}): {}; publish the change as a \
                             new version and keep this one in events/{ty}/{v}.json",
                            p.message()
                        ),
                        Some(defs) => format!(
                            "version {v} is unchanged, but the shared definition{} it references \
                             changed ({}), and definitions are not versioned: every version \
                             that references one validates with its new form ({what}): {}; make \
                             the definition's change compatible, or put the new form under a new \
                             definition name referenced only by a new version of \"{ty}\"",
                            if defs.len() == 1 { "" } else { "s" },
                            defs.join(", "),
                            p.message()
                        ),
                    },
                ));
            }
        }
        if !found {
            out.push(Change::new(
                ty,
                Severity::Compatible,
                ChangeKind::VersionChanged,
                Some(*v),
                Some(*v),
                "/",
                ChangeKind::VersionChanged.as_str(),
                None,
                match &via_definitions {
                    None => match gateway_keywords_changed(before, after).as_slice() {
                        [] => format!("version {v} changed in place, in annotations only"),
                        names => format!(
                            "version {v} changed in place, in annotations only, but {} \
                             change{} what the gateway lets out to external subscribers \
                             (redaction, exposure, allow-lists): no consumer breaks; review \
                             it as a change of what leaves",
                            names.join(", "),
                            if names.len() == 1 { "s" } else { "" }
                        ),
                    },
                    Some(defs) => format!(
                        "version {v} is unchanged; the shared definition{} it references \
                         changed ({}), in annotations only",
                        if defs.len() == 1 { "" } else { "s" },
                        defs.join(", ")
                    ),
                },
            ));
        }
    }

    // Versions dropped.
    let latest_v = new.latest().version();
    let latest = &new_s[&latest_v];
    for (v, before) in &old_s {
        if new_s.contains_key(v) {
            continue;
        }
        let problems = compat::check(before, latest);
        let (severity, message) = match problems.first() {
            None => (
                Severity::Compatible,
                format!(
                    "version {v} is no longer in the catalogue; version {latest_v} reads its \
                     data, so consumers read events of it still in flight as version {latest_v}"
                ),
            ),
            Some(first) => (
                Severity::Breaking,
                format!(
                    "version {v} is no longer in the catalogue and version {latest_v} cannot read \
                     its data ({} problem{}, first: {} {}: {}); consumers with this catalogue \
                     dead-letter events of it still in flight: keep events/{ty}/{v}.json",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" },
                    first.path(),
                    first.rule(),
                    first.message()
                ),
            ),
        };
        out.push(Change::new(
            ty,
            severity,
            ChangeKind::VersionRemoved,
            Some(*v),
            Some(latest_v),
            "/",
            ChangeKind::VersionRemoved.as_str(),
            None,
            message,
        ));
    }

    // Versions added: each against its predecessors in the combined history.
    let mut combined: BTreeMap<u32, &Value> = old_s.iter().map(|(v, s)| (*v, s)).collect();
    for (v, s) in &new_s {
        combined.insert(*v, s);
    }
    let order: Vec<u32> = combined.keys().copied().collect();
    for (i, v) in order.iter().enumerate() {
        if old_s.contains_key(v) {
            continue;
        }
        let schema = combined[v];
        let earlier: Vec<u32> = if mode.is_transitive() {
            order[..i].to_vec()
        } else {
            order[..i].last().copied().into_iter().collect()
        };
        let mut found = false;
        if mode != Compatibility::None {
            for e in earlier.iter().rev() {
                let prev = combined[e];
                if mode.checks_backward() {
                    for p in compat::check(prev, schema) {
                        found = true;
                        out.push(incompatible(ty, *e, *v, "BACKWARD", &p, *v, *e));
                    }
                }
                if mode.checks_forward() {
                    for p in compat::check(schema, prev) {
                        found = true;
                        out.push(incompatible(ty, *e, *v, "FORWARD", &p, *e, *v));
                    }
                }
            }
        }
        if !found {
            let against: Vec<String> = earlier.iter().map(|e| format!("v{e}")).collect();
            out.push(Change::new(
                ty,
                Severity::Compatible,
                ChangeKind::VersionAdded,
                earlier.last().copied(),
                Some(*v),
                "/",
                ChangeKind::VersionAdded.as_str(),
                None,
                if earlier.is_empty() {
                    format!("new version {v}, the earliest of the type")
                } else if mode == Compatibility::None {
                    format!("new version {v}, not checked (mode NONE)")
                } else {
                    format!(
                        "new version {v}, {mode} compatible with {}",
                        against.join(", ")
                    )
                },
            ));
        }
    }

    // The versions kept, against the history as proposed (a stricter mode, or a version
    // edited in place, may break it): the proposed catalogue must load.
    history_breaks(ty, new, &new_s, |v| old_s.contains_key(&v), out);
}

/// The versions of `info` (with `schemas`, their inlined forms) for which `check` holds,
/// each against the versions before it in the mode it is checked in, as loading the
/// catalogue does: one breaking line per rule broken, since a catalogue whose history breaks
/// its mode does not load.
fn history_breaks(
    ty: &str,
    info: &EventTypeInfo,
    schemas: &BTreeMap<u32, Value>,
    check: impl Fn(u32) -> bool,
    out: &mut Vec<Change>,
) {
    let versions = info.versions();
    for (i, ev) in versions.iter().enumerate().skip(1) {
        let (v, mode) = (ev.version(), ev.mode());
        if !check(v) || mode == Compatibility::None {
            continue;
        }
        let earlier: Vec<u32> = if mode.is_transitive() {
            versions[..i].iter().map(EventVersion::version).collect()
        } else {
            vec![versions[i - 1].version()]
        };
        let schema = &schemas[&v];
        for e in earlier.iter().rev() {
            let prev = &schemas[e];
            let mut found = Vec::new();
            if mode.checks_backward() {
                found.extend(
                    compat::check(prev, schema)
                        .into_iter()
                        .map(|p| ("BACKWARD", p, v, *e)),
                );
            }
            if mode.checks_forward() {
                found.extend(
                    compat::check(schema, prev)
                        .into_iter()
                        .map(|p| ("FORWARD", p, *e, v)),
                );
            }
            for (direction, p, reader, writer) in found {
                let mut c = incompatible(ty, *e, v, direction, &p, reader, writer);
                c.message.push_str(&format!(
                    "; version {v} is not {mode} compatible with version {e} in this catalogue, \
                     so no service loads it"
                ));
                out.push(c);
            }
        }
    }
}

fn incompatible(
    ty: &str,
    from_v: u32,
    to_v: u32,
    direction: &'static str,
    p: &compat::Incompatibility,
    reader: u32,
    writer: u32,
) -> Change {
    Change::new(
        ty,
        Severity::Breaking,
        ChangeKind::Incompatible,
        Some(from_v),
        Some(to_v),
        p.path(),
        p.rule(),
        Some(direction),
        format!(
            "v{reader} reading data written with v{writer}: {}",
            p.message()
        ),
    )
}

/// The `x-evbus-…` keywords (what the gateway redacts, exposes, allows) whose occurrences
/// differ between two forms of a schema, by name, sorted.
fn gateway_keywords_changed(before: &Value, after: &Value) -> Vec<String> {
    fn collect(v: &Value, at: &str, out: &mut BTreeSet<(String, String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, sub) in m {
                    if k.starts_with("x-evbus-") {
                        out.insert((k.clone(), at.to_owned(), sub.to_string()));
                    }
                    collect(sub, &format!("{at}/{k}"), out);
                }
            }
            Value::Array(items) => {
                for (i, sub) in items.iter().enumerate() {
                    collect(sub, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let (mut b, mut a) = (BTreeSet::new(), BTreeSet::new());
    collect(before, "", &mut b);
    collect(after, "", &mut a);
    let names: BTreeSet<String> = b
        .symmetric_difference(&a)
        .map(|(k, _, _)| format!("`{k}`"))
        .collect();
    names.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::gateway_keywords_changed;

    #[test]
    fn changes_of_what_the_gateway_lets_out_are_named() {
        let before = json!({"x-evbus-external": true, "x-evbus-redact": ["/email"],
            "properties": {"a": {"type": "string", "x-evbus-other": 1}}});
        assert!(gateway_keywords_changed(&before, &before).is_empty());
        let mut after = before.clone();
        after["x-evbus-redact"] = json!([]);
        after["properties"]["a"]["x-evbus-other"] = json!(2);
        after["description"] = json!("not a gateway keyword");
        assert_eq!(
            gateway_keywords_changed(&before, &after),
            ["`x-evbus-other`", "`x-evbus-redact`"]
        );
        let mut gone = before.clone();
        gone.as_object_mut().unwrap().remove("x-evbus-external");
        assert_eq!(
            gateway_keywords_changed(&before, &gone),
            ["`x-evbus-external`"]
        );
    }
}

//! URLs naming the several nodes of a broker cluster:
//! `scheme://[user[:password]@]host1:port1,host2:port2[/path][?query]`.
//!
//! Broker clients take a list of seed nodes, but such a URL is not a standard URL (the `url`
//! crate, and so [`Registry`](crate::Registry), refuses a comma in the host). Adapters accept
//! it in their own `from_url`, with the scheme and credentials given once before the first
//! host and the path and parameters once after the last; this module cuts it, checks each
//! host with a message naming it, and redacts it for messages, the same way for every adapter.
//!
//! ```
//! use evbus::raw::hosts::{HostList, HostSyntax};
//!
//! let url = "nats://app:s3cret@10.0.0.1:4222,10.0.0.2:4222?replicas=3";
//! let list = HostList::parse(url).unwrap();
//! assert_eq!(list.hosts, ["10.0.0.1:4222", "10.0.0.2:4222"]);
//! assert_eq!(list.with_host(list.hosts[1]), "nats://app:s3cret@10.0.0.2:4222?replicas=3");
//! assert_eq!(
//!     list.redacted(evbus::registry::redact),
//!     "nats://app:***@10.0.0.1:4222,10.0.0.2:4222?replicas=3"
//! );
//!
//! const NATS: HostSyntax = HostSyntax {
//!     what: "NATS server",
//!     noun: "server",
//!     example: "nats://user:pw@a:4222,b:4222",
//!     port_required: false,
//!     after_hosts: "",
//! };
//! let err = NATS.check("10.0.0.2:x", 2, 3).unwrap_err();
//! assert_eq!(
//!     err.message(),
//!     "NATS server `10.0.0.2:x` (server 2 of 3) is not HOST[:PORT]: invalid port number"
//! );
//! ```

use url::Url;

use crate::error::{Error, Result};

/// A URL cut around its comma-separated hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostList<'a> {
    /// `scheme://[userinfo@]`.
    pub prefix: &'a str,
    /// The hosts as written (`host[:port]` when well formed; see [`HostSyntax::check`]).
    pub hosts: Vec<&'a str>,
    /// What follows the last host: path, query, fragment (may be empty).
    pub suffix: &'a str,
}

impl<'a> HostList<'a> {
    /// Cuts `url` around its hosts; `None` without `scheme://`, or when `scheme://` is
    /// repeated (a list of whole URLs, which [`check_one_scheme`] refuses).
    ///
    /// The credentials end at the first `@` of the authority: a password's own `@` must be
    /// percent-encoded, so a later `@` belongs to a host entry, which
    /// [`HostSyntax::check`] refuses with a message saying where credentials go.
    pub fn parse(url: &'a str) -> Option<Self> {
        if url.matches("://").count() > 1 {
            return None;
        }
        let start = url.find("://")? + 3;
        let end = url[start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| start + i);
        let hosts_start = url[start..end].find('@').map_or(start, |at| start + at + 1);
        Some(HostList {
            prefix: &url[..hosts_start],
            hosts: url[hosts_start..end].split(',').collect(),
            suffix: &url[end..],
        })
    }

    /// The URL's scheme (before `://`).
    pub fn scheme(&self) -> &'a str {
        self.prefix.split("://").next().unwrap_or_default()
    }

    /// The single-host URL of `host`: the prefix, `host`, the suffix.
    pub fn with_host(&self, host: &str) -> String {
        format!("{}{host}{}", self.prefix, self.suffix)
    }

    /// The URL with every host, without its query and fragment: what a configuration keeps
    /// once it has read the parameters.
    pub fn without_query(&self) -> String {
        let path = self.suffix.split(['?', '#']).next().unwrap_or_default();
        format!("{}{}{path}", self.prefix, self.hosts.join(","))
    }

    /// The hosts, then `more` (the entries of a `servers` parameter), each checked with
    /// `syntax` and numbered in that order in its messages.
    pub fn checked_with<'b>(
        &'b self,
        more: &'b [String],
        syntax: &HostSyntax<'_>,
    ) -> Result<Vec<CheckedHost<'b>>> {
        let entries: Vec<&str> = self
            .hosts
            .iter()
            .copied()
            .chain(more.iter().map(String::as_str))
            .collect();
        let count = entries.len();
        entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                let (host, port) = syntax.check(entry, i + 1, count)?;
                Ok(CheckedHost { entry, host, port })
            })
            .collect()
    }

    /// The URL for messages and logs: the first host's URL passed through `redact_one` (the
    /// adapter's redaction of a standard URL: password, secret parameters), the other hosts
    /// put back after the first, each through [`redact_host`].
    pub fn redacted(&self, redact_one: impl Fn(&str) -> String) -> String {
        let first = redact_one(&self.with_host(self.hosts[0]));
        if self.hosts.len() == 1 {
            return first;
        }
        let Some(list) = HostList::parse(&first) else {
            return "<unparseable URL>".to_owned();
        };
        let rest: Vec<String> = self.hosts[1..].iter().map(|h| redact_host(h)).collect();
        format!(
            "{}{},{}{}",
            list.prefix,
            list.hosts.join(","),
            rest.join(","),
            list.suffix
        )
    }
}

/// One host of a [`HostList`], checked: as written, and its host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedHost<'a> {
    /// `host[:port]` as written.
    pub entry: &'a str,
    /// The host name or address (IPv6 in brackets).
    pub host: String,
    /// The port, if given.
    pub port: Option<u16>,
}

/// `url` for messages and logs, whatever its form: several hosts ([`HostList::redacted`]), a
/// list of whole URLs (each through `redact_one`), or one standard URL (`redact_one`).
pub fn redact_urls(url: &str, redact_one: impl Fn(&str) -> String) -> String {
    if url.matches("://").count() > 1 {
        return url
            .split(',')
            .map(|part| {
                if part.contains("://") {
                    redact_one(part)
                } else {
                    redact_host(part)
                }
            })
            .collect::<Vec<_>>()
            .join(",");
    }
    match HostList::parse(url) {
        Some(list) => list.redacted(redact_one),
        None => redact_one(url),
    }
}

/// A host entry for messages: anything before an `@` (credentials where they do not belong)
/// is hidden.
pub fn redact_host(entry: &str) -> String {
    match entry.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => entry.to_owned(),
    }
}

/// Refuses a list of whole URLs (`nats://a:1,nats://b:2`): the scheme is given once.
/// `example` shows the accepted form.
pub fn check_one_scheme(
    url: &str,
    example: &str,
    redact_one: impl Fn(&str) -> String,
) -> Result<()> {
    if url.matches("://").count() > 1 {
        return Err(Error::invalid_config(format!(
            "`{}` repeats `scheme://`: give the scheme and credentials once, then the hosts \
             separated by commas (`{example}`)",
            redact_urls(url, redact_one)
        )));
    }
    Ok(())
}

/// How an adapter names and checks the hosts of its URLs, for [`HostSyntax::check`].
#[derive(Debug, Clone, Copy)]
pub struct HostSyntax<'a> {
    /// What one host is, capitalised for the start of a message: `"NATS server"`.
    pub what: &'a str,
    /// The same in a count: `"server"` (`(server 2 of 3)`).
    pub noun: &'a str,
    /// The accepted form, shown when credentials or a scheme appear on a later host:
    /// `"nats://user:pw@a:4222,b:4222"`.
    pub example: &'a str,
    /// Whether every host must give its port.
    pub port_required: bool,
    /// What goes once after the last host, named when a host carries a path
    /// (`"the vhost"`); empty when nothing does.
    pub after_hosts: &'a str,
}

impl HostSyntax<'_> {
    /// Checks the `position`-th host `entry` of `count`: `host[:port]` and nothing else.
    /// Returns its host and port, or an [`InvalidConfig`](crate::ErrorKind::InvalidConfig)
    /// error naming it and saying what is wrong.
    pub fn check(
        &self,
        entry: &str,
        position: usize,
        count: usize,
    ) -> Result<(String, Option<u16>)> {
        let form = if self.port_required {
            "HOST:PORT"
        } else {
            "HOST[:PORT]"
        };
        let bad = |why: &str| {
            Error::invalid_config(format!(
                "{} `{}` ({} {position} of {count}) is not {form}: {why}",
                self.what,
                redact_host(entry),
                self.noun
            ))
        };
        if entry.trim().is_empty() {
            return Err(bad("empty (two commas in a row, or a comma at an end?)"));
        }
        if entry.contains('@') {
            return Err(bad(&format!(
                "credentials go once before the first host (`{}`) and apply to every {}",
                self.example, self.noun
            )));
        }
        if entry.contains("://") {
            return Err(bad(&format!(
                "give the scheme once, before the first host (`{}`)",
                self.example
            )));
        }
        if entry.contains(['/', '?', '#', ' ']) {
            return Err(bad(&if self.after_hosts.is_empty() {
                "only a host and a port".to_owned()
            } else {
                format!(
                    "only a host and a port ({} goes once, after the last host)",
                    self.after_hosts
                )
            }));
        }
        if entry.ends_with(':') {
            return Err(bad("no port after `:`"));
        }
        let parsed = Url::parse(&format!("x://{entry}")).map_err(|e| bad(&e.to_string()))?;
        match (parsed.host_str(), parsed.port()) {
            (Some(host), None) if !host.is_empty() && self.port_required => Err(bad("no port")),
            (Some(host), port) if !host.is_empty() => Ok((host.to_owned(), port)),
            _ => Err(bad("no host")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::redact;

    const SYNTAX: HostSyntax<'static> = HostSyntax {
        what: "Test node",
        noun: "node",
        example: "x://user:pw@a:1,b:2/v",
        port_required: false,
        after_hosts: "the vhost",
    };

    #[test]
    fn urls_are_cut_around_their_hosts() {
        let list = HostList::parse("amqp://u:p%40w@a:1,b,c:3/%2f?x=1").unwrap();
        assert_eq!(list.prefix, "amqp://u:p%40w@");
        assert_eq!(list.hosts, ["a:1", "b", "c:3"]);
        assert_eq!(list.suffix, "/%2f?x=1");
        assert_eq!(list.with_host("b"), "amqp://u:p%40w@b/%2f?x=1");
        assert_eq!(list.without_query(), "amqp://u:p%40w@a:1,b,c:3/%2f");
        let one = HostList::parse("redis://h:1").unwrap();
        assert_eq!(
            (one.prefix, one.hosts.as_slice(), one.suffix),
            ("redis://", &["h:1"][..], "")
        );
        assert_eq!(HostList::parse("no scheme"), None);
        assert_eq!(HostList::parse("x://a:1,x://b:2"), None);
    }

    #[test]
    fn redaction_hides_every_secret_and_keeps_every_host() {
        assert_eq!(
            redact_urls("x://u:secret@a:1,b:2/v?q=1", redact),
            "x://u:***@a:1,b:2/v?q=1"
        );
        assert_eq!(redact_urls("x://u:secret@a:1", redact), "x://u:***@a:1");
        let listed = redact_urls("x://u:secret@a:1,x://v:other@b:2", redact);
        assert!(
            !listed.contains("secret") && !listed.contains("other"),
            "{listed}"
        );
        let misplaced = redact_urls("x://a:1,v:other@b:2", redact);
        assert!(!misplaced.contains("other"), "{misplaced}");
        assert_eq!(redact_host("u:pw@h:1"), "***@h:1");
    }

    #[test]
    fn each_host_is_checked_with_a_message_naming_it() {
        assert_eq!(
            SYNTAX.check("a:1", 1, 2).unwrap(),
            ("a".to_owned(), Some(1))
        );
        assert_eq!(SYNTAX.check("b", 2, 2).unwrap(), ("b".to_owned(), None));
        let cases = [
            ("", "empty"),
            ("u:s3cr3t@b:2", "credentials go once"),
            ("x://b:2", "give the scheme once"),
            ("b:2/v", "the vhost goes once"),
            ("b:", "no port after"),
            ("b:x", "invalid port number"),
        ];
        for (entry, why) in cases {
            let err = SYNTAX.check(entry, 2, 3).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidConfig);
            assert!(err.message().contains("(node 2 of 3)"), "{err}");
            assert!(err.message().contains(why), "{entry}: {err}");
            assert!(!err.message().contains("s3cr3t"), "{err}");
        }
        let strict = HostSyntax {
            port_required: true,
            ..SYNTAX
        };
        let err = strict.check("b", 1, 1).unwrap_err();
        assert!(err.message().contains("is not HOST:PORT: no port"), "{err}");
        let list = HostList::parse("x://a:1,b:2").unwrap();
        let more = ["c:3".to_owned(), "d:x".to_owned()];
        let err = list.checked_with(&more, &SYNTAX).unwrap_err();
        assert!(err.message().contains("`d:x` (node 4 of 4)"), "{err}");
        let checked = list.checked_with(&more[..1], &SYNTAX).unwrap();
        let entries: Vec<&str> = checked.iter().map(|h| h.entry).collect();
        assert_eq!(entries, ["a:1", "b:2", "c:3"]);
        assert_eq!((checked[2].host.as_str(), checked[2].port), ("c", Some(3)));
    }

    #[test]
    fn a_list_of_whole_urls_is_refused_without_its_secrets() {
        let err =
            check_one_scheme("x://u:secret@a:1,x://b:2", "x://u:pw@a:1,b:2", redact).unwrap_err();
        assert!(err.message().contains("repeats `scheme://`"), "{err}");
        assert!(!err.message().contains("secret"), "{err}");
        check_one_scheme("x://a:1,b:2", "", redact).unwrap();
    }
}

//! Outbound address policy (SSRF protection) and the resolver webhook requests use.
//!
//! A webhook URL must be `http` or `https`, and every address its host resolves to must be a
//! public unicast address: loopback, private (RFC 1918, unique-local `fc00::/7`), link-local,
//! shared (CGNAT `100.64.0.0/10`), multicast, broadcast, unspecified and documentation
//! addresses are refused — including IPv4 addresses mapped into IPv6, and every deprecated or
//! IPv4-embedding IPv6 range (see [`is_public`]) — unless covered by an
//! operator's allow-list (`--webhook-allow CIDR`). The check runs at registration and again at
//! every delivery: the delivery client resolves through [`CheckedResolver`], which refuses a
//! name if any of its addresses is refused and hands the client only the addresses it
//! checked, so the connection goes to a checked address (no second, unchecked lookup).
//! Redirects are never followed and no proxy is used.
//!
//! Names are looked up through a [`HostResolver`]: the system resolver
//! ([`SystemResolver`], `tokio::net::lookup_host`) unless another one is given with
//! [`OutboundPolicy::with_resolver`] (tests use one whose answer changes, as DNS can).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Looks a host name up: every address it resolves to, with `port`.
#[async_trait::async_trait]
pub trait HostResolver: Send + Sync + 'static {
    /// The addresses of `host` (a domain name, never an IP literal).
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver, through `tokio::net::lookup_host`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

#[async_trait::async_trait]
impl HostResolver for SystemResolver {
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Which outbound addresses are allowed besides public ones, and how names are resolved.
#[derive(Clone)]
pub struct OutboundPolicy {
    allow: Vec<IpNet>,
    resolver: Arc<dyn HostResolver>,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        OutboundPolicy::new(Vec::new())
    }
}

impl std::fmt::Debug for OutboundPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundPolicy")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

/// What a caller is told when a URL's host does not resolve or resolves to an address that
/// is not allowed: the same words for both (see [`UrlRefusal::Unresolvable`]).
const REFUSED_HOST: &str = "the URL's host does not resolve to an address deliveries may go to (only public addresses, unless the gateway operator allows a network with --webhook-allow)";

/// Why a webhook URL is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlRefusal {
    /// Not an absolute `http`/`https` URL with a host.
    #[error("the URL must be an absolute http or https URL with a host: {0}")]
    Malformed(String),
    /// The host did not resolve. The message is [`Forbidden`](Self::Forbidden)'s, word for
    /// word: if the two differed, a key could tell which internal names exist (one that
    /// resolves to a private address would answer "not allowed", a made-up one "does not
    /// resolve"). It does not quote the host either: error bodies quote no request value.
    #[error("{}", REFUSED_HOST)]
    Unresolvable(String),
    /// The host is or resolves to an address that is not allowed.
    #[error("{}", REFUSED_HOST)]
    Forbidden {
        /// The host.
        host: String,
        /// The refused address: for the server's log only (the message does not show it,
        /// so a caller cannot use the check to read internal DNS answers).
        addr: IpAddr,
    },
}

impl OutboundPolicy {
    /// A policy allowing public addresses plus the given networks, resolving names with
    /// the system resolver.
    pub fn new(allow: Vec<IpNet>) -> Self {
        OutboundPolicy {
            allow,
            resolver: Arc::new(SystemResolver),
        }
    }

    /// The same policy, resolving names with `resolver` (at registration and at delivery).
    pub fn with_resolver(mut self, resolver: Arc<dyn HostResolver>) -> Self {
        self.resolver = resolver;
        self
    }

    /// The allowed networks besides public addresses.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }

    /// Whether a connection to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow.iter().any(|net| net.contains(&ip)) || is_public(ip)
    }

    /// Checks `url` now: its scheme, and every address its host resolves to.
    pub async fn check_url(&self, url: &str) -> Result<url::Url, UrlRefusal> {
        let parsed = url::Url::parse(url).map_err(|e| UrlRefusal::Malformed(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(UrlRefusal::Malformed(
                "the scheme is not http or https".into(),
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlRefusal::Malformed(
                "credentials in the URL are not accepted".into(),
            ));
        }
        let host = parsed
            .host()
            .ok_or_else(|| UrlRefusal::Malformed("no host".into()))?;
        let port = parsed.port_or_known_default().unwrap_or(443);
        match host {
            url::Host::Ipv4(ip) => self.check_addrs(&ip.to_string(), [IpAddr::V4(ip)])?,
            url::Host::Ipv6(ip) => self.check_addrs(&ip.to_string(), [IpAddr::V6(ip)])?,
            url::Host::Domain(name) => {
                self.resolve(name, port).await?;
            }
        }
        Ok(parsed)
    }

    fn check_addrs(
        &self,
        host: &str,
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> Result<(), UrlRefusal> {
        for addr in addrs {
            if !self.allows(addr) {
                // The address goes to the server's log only, never to the caller.
                tracing::warn!(host, %addr, "webhook address refused: not public and not allow-listed");
                return Err(UrlRefusal::Forbidden {
                    host: host.to_owned(),
                    addr,
                });
            }
        }
        Ok(())
    }

    /// Resolves `host` and checks every address; the addresses, all allowed.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, UrlRefusal> {
        let addrs: Vec<SocketAddr> = self.resolver.lookup(host, port).await.map_err(|e| {
            tracing::debug!(host, error = %e, "webhook host does not resolve");
            UrlRefusal::Unresolvable(host.to_owned())
        })?;
        if addrs.is_empty() {
            tracing::debug!(host, "webhook host resolves to no address");
            return Err(UrlRefusal::Unresolvable(host.to_owned()));
        }
        self.check_addrs(host, addrs.iter().map(SocketAddr::ip))?;
        Ok(addrs)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are judged as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Whether `ip` is a public unicast address.
///
/// Besides the special-purpose ranges, every IPv6 range that embeds an IPv4 address or is
/// deprecated is refused as a whole, whatever the embedded address: IPv4-compatible
/// (`::/96`), IPv4-translated (`::ffff:0:0/96`), NAT64 (`64:ff9b::/96`, local-use
/// `64:ff9b:1::/48`), 6to4 (`2002::/16`), Teredo (`2001::/32`) and site-local (`fec0::/10`).
/// A gateway or relay on the path may turn them into the IPv4 address they carry (loopback or
/// private included), so judging them by their IPv6 form would let such an address through.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(v4: std::net::Ipv4Addr) -> bool {
    let o = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_multicast()
        || v4.is_broadcast()
        || v4.is_unspecified()
        || v4.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        // 6to4 relay anycast (192.88.99.0/24, deprecated by RFC 7526).
        || (o[0] == 192 && o[1] == 88 && o[2] == 99)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || o[0] >= 240)
}

fn is_public_v6(v6: std::net::Ipv6Addr) -> bool {
    let s = v6.segments();
    let refused = v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        // IPv4-compatible ::/96 (deprecated, RFC 4291 §2.5.5.1).
        || s[..6] == [0; 6]
        // IPv4-translated ::ffff:0:0/96 (RFC 2765 SIIT).
        || (s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0)
        // Discard-only 100::/64 (RFC 6666).
        || (s[0] == 0x0100 && s[1..4] == [0; 3])
        // NAT64 well-known 64:ff9b::/96 and local-use 64:ff9b:1::/48 (RFC 6052, RFC 8215).
        || (s[0] == 0x0064 && s[1] == 0xff9b)
        // Teredo 2001::/32 (embeds the server's and the client's IPv4 addresses).
        || (s[0] == 0x2001 && s[1] == 0)
        // Benchmarking 2001:2::/48, ORCHID 2001:10::/28 and ORCHIDv2 2001:20::/28.
        || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0)
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0010)
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0020)
        // Documentation 2001:db8::/32 and 3fff::/20 (RFC 9637).
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] & 0xfff0) == 0x3ff0
        // 6to4 2002::/16 (embeds an IPv4 address; deprecated by RFC 7526).
        || s[0] == 0x2002
        // Unique-local fc00::/7, link-local fe80::/10, site-local fec0::/10 (deprecated).
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0;
    !refused
}

/// The resolver of the delivery client: resolves, checks every address against the policy,
/// and returns only checked addresses.
#[derive(Clone, Debug)]
pub struct CheckedResolver {
    policy: Arc<OutboundPolicy>,
}

impl CheckedResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: Arc<OutboundPolicy>) -> Self {
        CheckedResolver { policy }
    }
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        Box::pin(async move {
            let addrs = policy.resolve(name.as_str(), 0).await?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_refused_by_default() {
        let policy = OutboundPolicy::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!policy.allows(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(policy.allows(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn deprecated_and_ipv4_embedding_ipv6_ranges_are_refused() {
        let policy = OutboundPolicy::default();
        for ip in [
            // IPv4-compatible (::/96), loopback, private and public v4 inside.
            "::127.0.0.1",
            "::10.0.0.1",
            "::8.8.8.8",
            "::2",
            // IPv4-translated (::ffff:0:0/96).
            "::ffff:0:7f00:1",
            "::ffff:0:a00:1",
            "::ffff:0:808:808",
            // 6to4 (2002::/16) embedding loopback, private, metadata and public v4.
            "2002:7f00:1::1",
            "2002:a00:1::1",
            "2002:a9fe:a9fe::1",
            "2002:808:808::1",
            // NAT64 well-known and local-use prefixes.
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b::808:808",
            "64:ff9b:1::a00:1",
            // Teredo (2001::/32).
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            // Site-local (fec0::/10, deprecated).
            "fec0::1",
            "fed0::1",
            "feff:ffff::1",
            // Discard-only, benchmarking, ORCHID, documentation.
            "100::1",
            "2001:2::1",
            "2001:10::1",
            "2001:20::1",
            "2001:db8::1",
            "3fff::1",
            // 6to4 relay anycast (IPv4).
            "192.88.99.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!is_public(ip), "{ip} must not be public");
            assert!(!policy.allows(ip), "{ip} must be refused");
        }
        // Neighbours of the refused ranges stay public.
        for ip in [
            "2001:4860:4860::8888",
            "2003::1",
            "2606:4700::1111",
            "64:ff9c::1",
            "192.88.98.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(is_public(ip), "{ip} must be public");
        }
        // An operator's allow-list can still open such a range on purpose.
        let open = OutboundPolicy::new(vec!["2002::/16".parse().unwrap()]);
        assert!(open.allows("2002:7f00:1::1".parse().unwrap()));
    }

    #[test]
    fn allow_list_opens_a_network() {
        let policy = OutboundPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(policy.allows("127.0.0.1".parse().unwrap()));
        assert!(policy.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!policy.allows("10.0.0.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn urls_are_checked_by_scheme_and_resolved_address() {
        let policy = OutboundPolicy::default();
        assert!(matches!(
            policy.check_url("http://127.0.0.1:9/x").await,
            Err(UrlRefusal::Forbidden { .. })
        ));
        assert!(matches!(
            policy.check_url("http://localhost:9/x").await,
            Err(UrlRefusal::Forbidden { .. })
        ));
        assert!(matches!(
            policy.check_url("http://[::1]/").await,
            Err(UrlRefusal::Forbidden { .. })
        ));
        assert!(matches!(
            policy.check_url("file:///etc/passwd").await,
            Err(UrlRefusal::Malformed(_))
        ));
        let open = OutboundPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert!(open.check_url("http://localhost:9/x").await.is_ok());
    }

    /// Resolves `internal.example` to a private address and nothing else at all.
    struct OneInternalName;

    #[async_trait::async_trait]
    impl HostResolver for OneInternalName {
        async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            match host {
                "internal.example" => Ok(vec![SocketAddr::from(([10, 0, 0, 7], port))]),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such host",
                )),
            }
        }
    }

    #[tokio::test]
    async fn an_internal_name_and_a_made_up_one_are_refused_in_the_same_words() {
        let policy = OutboundPolicy::default().with_resolver(Arc::new(OneInternalName));
        let internal = policy.check_url("http://internal.example/hook").await;
        let made_up = policy.check_url("http://made-up.example/hook").await;
        assert!(
            matches!(internal, Err(UrlRefusal::Forbidden { .. })),
            "{internal:?}"
        );
        assert!(
            matches!(made_up, Err(UrlRefusal::Unresolvable(_))),
            "{made_up:?}"
        );
        // What a caller reads cannot tell an existing internal name from a made-up one.
        let (internal, made_up) = (internal.unwrap_err(), made_up.unwrap_err());
        assert_eq!(internal.to_string(), made_up.to_string());
        assert!(!internal.to_string().contains("10.0.0.7"));
    }
}

//! Typed addresses for the `src` and `dst` of transfer operations.
//!
//! On the wire an address is a string, so that plans stay readable and any
//! tool can produce them; in code it is an [`Address`]. Parsing is strict and
//! printing is exact: for every string `s` that parses,
//! `s.parse::<Address>()?.to_string() == s`. Only canonical spellings parse
//! (no `//`, `.` or `..` in paths, IP addresses in their standard form,
//! lowercase host names), so comparing address strings compares places as far
//! as syntax can tell, which is what the overlap checks of `validate()` rely
//! on. Anything else is rejected with a message saying what the right form is.
//!
//! | form | meaning |
//! |---|---|
//! | `file:///abs/path` | a local file, absolute path |
//! | `tier://NODE/TIER` | a cache tier of a node: `gpu`, `cpu`, `dax`, `ssd`, `remote`, optionally numbered (`gpu1`) |
//! | `device://DEVICE[/RESOURCE]` | memory of a device (`gpu0`), optionally a named buffer in it |
//! | `strata://KEY` | an object in the stratacache store |
//! | `tcp://HOST:PORT` | a network peer; IPv6 hosts in brackets |

use std::fmt;
use std::str::FromStr;

/// A parsed `src` / `dst` address. See the module documentation for the forms.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// `file:///abs/path`: a local file.
    File {
        /// Absolute path, starting with `/`.
        path: String,
    },
    /// `tier://NODE/TIER`: a cache tier on a node.
    Tier {
        /// Node name.
        node: String,
        /// Tier on that node.
        tier: TierName,
    },
    /// `device://DEVICE[/RESOURCE]`: device memory.
    Device {
        /// Device name such as `gpu0`.
        device: String,
        /// Buffer or tensor inside the device; empty for the device as a whole.
        resource: String,
    },
    /// `strata://KEY`: an object in the artifact store.
    Strata {
        /// Store key.
        key: String,
    },
    /// `tcp://HOST:PORT`: a network peer.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port, 1 to 65535.
        port: u16,
    },
}

/// The kind of a cache tier, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierKind {
    /// GPU memory (HBM).
    Gpu,
    /// Host DRAM.
    Cpu,
    /// CXL or persistent memory mapped as DAX.
    Dax,
    /// Local SSD.
    Ssd,
    /// A remote store.
    Remote,
}

impl TierKind {
    /// Every tier kind, fastest first.
    pub const ALL: [TierKind; 5] = [
        TierKind::Gpu,
        TierKind::Cpu,
        TierKind::Dax,
        TierKind::Ssd,
        TierKind::Remote,
    ];

    /// The name used in addresses.
    pub fn name(self) -> &'static str {
        match self {
            TierKind::Gpu => "gpu",
            TierKind::Cpu => "cpu",
            TierKind::Dax => "dax",
            TierKind::Ssd => "ssd",
            TierKind::Remote => "remote",
        }
    }
}

/// A tier of a node, optionally numbered when a node has several of a kind
/// (`gpu0`, `gpu1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierName {
    /// What kind of tier.
    pub kind: TierKind,
    /// Which one, when numbered.
    pub index: Option<u32>,
}

impl fmt::Display for TierName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        match self.index {
            Some(i) => write!(f, "{i}"),
            None => Ok(()),
        }
    }
}

/// Why a string is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {input:?}: {reason}")]
pub struct AddressError {
    /// The string that was given.
    pub input: String,
    /// What is wrong and what the right form is.
    pub reason: String,
}

impl Address {
    /// The scheme (`file`, `tier`, `device`, `strata`, `tcp`).
    pub fn scheme(&self) -> &'static str {
        match self {
            Address::File { .. } => "file",
            Address::Tier { .. } => "tier",
            Address::Device { .. } => "device",
            Address::Strata { .. } => "strata",
            Address::Tcp { .. } => "tcp",
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::File { path } => write!(f, "file://{path}"),
            Address::Tier { node, tier } => write!(f, "tier://{node}/{tier}"),
            Address::Device { device, resource } if resource.is_empty() => {
                write!(f, "device://{device}")
            }
            Address::Device { device, resource } => write!(f, "device://{device}/{resource}"),
            Address::Strata { key } => write!(f, "strata://{key}"),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

const FORMS: &str = "file:///abs/path, tier://NODE/TIER, device://DEVICE[/RESOURCE], \
                     strata://KEY or tcp://HOST:PORT";

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| AddressError {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(fail(format!("empty; expected one of {FORMS}")));
        }
        if let Some(c) = input.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(fail(format!(
                "contains {c:?}; addresses are printable ASCII without spaces"
            )));
        }
        let Some((scheme, rest)) = input.split_once("://") else {
            return Err(fail(format!("no scheme; expected one of {FORMS}")));
        };
        match scheme {
            "file" => parse_file(rest),
            "tier" => parse_tier(rest),
            "device" => parse_device(rest),
            "strata" if rest.is_empty() => Err("the key is empty: strata://KEY".to_owned()),
            "strata" => Ok(Address::Strata {
                key: rest.to_owned(),
            }),
            "tcp" => parse_tcp(rest),
            other => Err(format!("unknown scheme {other:?}; expected one of {FORMS}")),
        }
        .map_err(fail)
    }
}

impl TryFrom<&str> for Address {
    type Error = AddressError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

fn parse_file(rest: &str) -> Result<Address, String> {
    let Some(relative) = rest.strip_prefix('/') else {
        return Err(
            "file addresses take an absolute local path, e.g. file:///data/model.safetensors"
                .to_owned(),
        );
    };
    if relative
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "path {rest:?} is not canonical: no empty, '.' or '..' components and no trailing '/'"
        ));
    }
    Ok(Address::File {
        path: rest.to_owned(),
    })
}

/// Names of nodes and devices: letters, digits, `.`, `_` and `-`, but not
/// `.` or `..`.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A host in its one canonical spelling: an IPv4 address as `Ipv4Addr`
/// prints it, or a lowercase DNS name (labels of letters, digits and `-`,
/// not starting or ending with `-`).
fn check_host(host: &str) -> Result<(), String> {
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match host.parse::<std::net::Ipv4Addr>() {
            Ok(ip) if ip.to_string() == host => Ok(()),
            _ => Err(format!("{host:?} is not an IPv4 address in standard form")),
        };
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if host.len() <= 253 && host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "bad host {host:?}: use a lowercase DNS name or an IP address"
        ))
    }
}

/// A decimal number as printed by `Display`: no sign, no leading zeros.
fn canonical_number<T: FromStr>(s: &str) -> Option<T> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

fn parse_tier(rest: &str) -> Result<Address, String> {
    let usage = "expected tier://NODE/TIER with TIER one of gpu, cpu, dax, ssd, remote, \
                 optionally numbered (gpu1)";
    let Some((node, tier)) = rest.split_once('/') else {
        return Err(usage.to_owned());
    };
    if !is_name(node) {
        return Err(format!(
            "node {node:?} must be letters, digits, '.', '_' or '-'; {usage}"
        ));
    }
    let digits_at = tier
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(tier.len());
    let (kind_name, number) = tier.split_at(digits_at);
    let kind = TierKind::ALL
        .into_iter()
        .find(|k| k.name() == kind_name)
        .ok_or_else(|| format!("unknown tier {tier:?}; {usage}"))?;
    let index = if number.is_empty() {
        None
    } else {
        Some(
            canonical_number(number)
                .ok_or_else(|| format!("bad tier number {number:?}; {usage}"))?,
        )
    };
    Ok(Address::Tier {
        node: node.to_owned(),
        tier: TierName { kind, index },
    })
}

fn parse_device(rest: &str) -> Result<Address, String> {
    let (device, resource) = rest.split_once('/').unwrap_or((rest, ""));
    if !is_name(device) {
        return Err(format!(
            "device {device:?} must be letters, digits, '.', '_' or '-', \
             e.g. device://gpu0 or device://gpu0/kv_pool"
        ));
    }
    if rest.ends_with('/') {
        return Err("trailing '/': write device://DEVICE or device://DEVICE/RESOURCE".to_owned());
    }
    Ok(Address::Device {
        device: device.to_owned(),
        resource: resource.to_owned(),
    })
}

fn parse_tcp(rest: &str) -> Result<Address, String> {
    let usage = "expected tcp://HOST:PORT, with an IPv6 host in brackets (tcp://[::1]:9000)";
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(|| usage.to_owned())?;
        let port = after.strip_prefix(':').ok_or_else(|| usage.to_owned())?;
        match host.parse::<std::net::Ipv6Addr>() {
            Ok(ip) if ip.to_string() == host => {}
            Ok(ip) => return Err(format!("write the IPv6 address {host:?} as {ip}")),
            Err(_) => return Err(format!("{host:?} is not an IPv6 address; {usage}")),
        }
        (host, port)
    } else {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| usage.to_owned())?;
        check_host(host).map_err(|e| format!("{e}; {usage}"))?;
        (host, port)
    };
    let port: u16 = canonical_number(port)
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("bad port {port:?}: must be 1 to 65535; {usage}"))?;
    Ok(Address::Tcp {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_print_back_identically() {
        for s in [
            "file:///data/model.safetensors",
            "tier://node0/cpu",
            "tier://node-1.rack2/gpu3",
            "device://gpu0",
            "device://gpu0/kv/layer.0",
            "strata://kv/abc:12",
            "tcp://10.0.0.1:9000",
            "tcp://[::1]:9000",
            "tcp://worker-3:65535",
        ] {
            let a: Address = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(a.to_string(), s);
        }
    }

    #[test]
    fn garbage_is_rejected_with_the_right_form() {
        for (s, hint) in [
            ("", "empty"),
            ("gpu0", "no scheme"),
            ("http://x", "unknown scheme"),
            ("file://relative/path", "absolute"),
            ("tier://node0", "tier://NODE/TIER"),
            ("tier://node0/hbm", "unknown tier"),
            ("tier://node0/gpu01", "bad tier number"),
            ("device://", "device"),
            ("device://gpu0/", "trailing"),
            ("strata://", "key is empty"),
            ("tcp://host", "HOST:PORT"),
            ("tcp://host:0", "1 to 65535"),
            ("tcp://host:070", "bad port"),
            ("tcp://::1:80", "bad host"),
            ("tier://node 0/cpu", "spaces"),
            ("file:///a//b", "not canonical"),
            ("file:///a/./b", "not canonical"),
            ("file:///a/../b", "not canonical"),
            ("file:///a/", "not canonical"),
            ("file:///\u{200b}x", "printable ASCII"),
            ("tier://../cpu", "node"),
            ("device://./x", "device"),
            ("tcp://[0:0:0:0:0:0:0:1]:80", "as ::1"),
            ("tcp://[:]:80", "not an IPv6"),
            ("tcp://Host:80", "lowercase"),
            ("tcp://-a:80", "bad host"),
            ("tcp://a..b:80", "bad host"),
            ("tcp://010.0.0.1:80", "standard form"),
        ] {
            let err = s.parse::<Address>().expect_err(s);
            assert!(err.reason.contains(hint), "{s}: {err}");
        }
    }
}

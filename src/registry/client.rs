//! Who the client is, for the per-IP limits: the socket peer, or, when the peer is a trusted proxy
//! (`TRUSTED_PROXIES`), the right-most address of `X-Forwarded-For` that is not itself trusted. The
//! left part of that header is whatever the client wrote, so it is never believed.

use std::net::{IpAddr, Ipv4Addr};

use http::request::Parts;

use crate::config::Cidr;
use crate::server::Peer;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The client's address for `req`.
pub fn client_ip(req: &Parts, trusted: &[Cidr]) -> IpAddr {
    // A request without a peer (none comes from the server without one) counts as one client.
    let peer = req
        .extensions
        .get::<Peer>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Every X-Forwarded-For line, in order, read from the right.
    let hops: Vec<&str> = req
        .headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        // An address, or one with a port (`1.2.3.4:5678`, `[2001:db8::1]:5678`).
        let parsed = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|s| s.ip()));
        match parsed {
            Ok(ip) if is_trusted(ip) => client = ip,
            Ok(ip) => return ip,
            // Garbage where an address should be: stop at the last address believed.
            Err(_) => return client,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn req(peer: &str, xff: &[&str]) -> Parts {
        let mut b = http::Request::builder();
        for v in xff {
            b = b.header(X_FORWARDED_FOR, *v);
        }
        let (mut parts, _) = b.body(()).unwrap().into_parts();
        parts
            .extensions
            .insert(Peer(format!("{peer}:1234").parse().unwrap()));
        parts
    }

    fn trusted(list: &str) -> Vec<Cidr> {
        let map: HashMap<String, String> = [
            ("HARBOR_URL".to_string(), "http://h".to_string()),
            ("TRUSTED_PROXIES".to_string(), list.to_string()),
        ]
        .into();
        crate::config::Config::from_map(&map)
            .unwrap()
            .trusted_proxies
    }

    #[test]
    fn the_peer_unless_it_is_a_trusted_proxy() {
        let none = trusted("");
        let lb = trusted("10.0.0.0/8");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_ip(&req("1.2.3.4", &["9.9.9.9"]), &none),
            ip("1.2.3.4")
        );
        assert_eq!(
            client_ip(&req("1.2.3.4", &["9.9.9.9"]), &lb),
            ip("1.2.3.4"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            client_ip(&req("10.0.0.1", &["9.9.9.9"]), &lb),
            ip("9.9.9.9")
        );
        assert_eq!(
            client_ip(&req("10.0.0.1", &["6.6.6.6, 9.9.9.9"]), &lb),
            ip("9.9.9.9"),
            "the right-most untrusted hop, not what the client wrote on the left"
        );
        assert_eq!(
            client_ip(&req("10.0.0.1", &["6.6.6.6", "9.9.9.9, 10.2.2.2"]), &lb),
            ip("9.9.9.9"),
            "across lines, skipping trusted hops"
        );
        assert_eq!(
            client_ip(&req("10.0.0.1", &["10.3.3.3"]), &lb),
            ip("10.3.3.3"),
            "all trusted: the left-most"
        );
        assert_eq!(client_ip(&req("10.0.0.1", &[]), &lb), ip("10.0.0.1"));
        assert_eq!(
            client_ip(&req("10.0.0.1", &["evil, 10.2.2.2"]), &lb),
            ip("10.2.2.2"),
            "garbage stops the walk"
        );
        assert_eq!(
            client_ip(&req("10.0.0.1", &["9.9.9.9:5678"]), &lb),
            ip("9.9.9.9"),
            "a hop with a port"
        );
        assert_eq!(
            client_ip(&req("10.0.0.1", &["[2001:db8::7]:5678"]), &lb),
            ip("2001:db8::7")
        );
    }
}

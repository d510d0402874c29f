//! What the pod's network namespace holds, read with `ip -j` inside it: its ethernet links with
//! their addresses and permanent neighbours, and the routes through a gateway on them.

use std::path::Path;
use std::process::Command;

use hako_protocol as pb;
use serde::Deserialize;

use super::{plain_name, NetError, TAP_SUFFIX};

/// Runs `program args` inside the network namespace `netns`.
pub fn run_in(netns: &Path, program: &str, args: &[&str]) -> Result<String, NetError> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args);
    let shown = format!("{program} {}", args.join(" "));
    let out = cmd.output().map_err(|e| NetError::Command {
        command: shown.clone(),
        message: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Command {
            command: shown,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[derive(Deserialize)]
struct IpLink {
    #[serde(default)]
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    addr_info: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct IpAddr {
    family: String,
    local: String,
    prefixlen: u32,
    #[serde(default)]
    scope: String,
}

#[derive(Deserialize)]
struct IpNeigh {
    dst: String,
    #[serde(default)]
    dev: String,
    #[serde(default)]
    lladdr: String,
    #[serde(default)]
    state: Vec<String>,
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: String,
}

/// The name link `index` has now in `netns`: a link keeps its index when it is renamed, as
/// Docker renames a veth once it has moved it into the namespace.
pub fn name_of(netns: &Path, index: u32) -> Option<String> {
    let json = run_in(netns, "ip", &["-j", "link", "show"]).ok()?;
    let links: Vec<IpLink> = serde_json::from_str(&json).ok()?;
    let link = links.into_iter().find(|l| l.ifindex == index)?;
    link.ifname.split('@').next().map(str::to_string)
}

/// An ethernet link of the pod, as the namespace shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundLink {
    /// The kernel's index: with the MAC, what tells one link from another over time.
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<String>,
    /// Permanent neighbour entries: (address, MAC).
    pub neighbours: Vec<(String, String)>,
}

/// The pod's links and routes at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    pub links: Vec<FoundLink>,
    pub routes: Vec<pb::Route>,
}

/// Reads the namespace: links, their neighbours, the routes on them.
pub fn scan(netns: &Path) -> Result<Scan, NetError> {
    let mut links = parse_links(&run_in(netns, "ip", &["-j", "addr", "show"])?)?;
    if links.is_empty() {
        // Nothing for the VM to take over (a fresh namespace, `--network none`): neighbours
        // and routes only ever belong to a link.
        return Ok(Scan {
            links,
            routes: Vec::new(),
        });
    }
    let neighbours = run_in(netns, "ip", &["-j", "neigh", "show"])?;
    for link in &mut links {
        link.neighbours = parse_neighbours(&neighbours, &link.name);
    }
    let devs: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
    let mut routes = parse_routes(
        &run_in(netns, "ip", &["-j", "-4", "route", "show"])?,
        &devs,
        false,
    );
    routes.extend(parse_routes(
        &run_in(netns, "ip", &["-j", "-6", "route", "show"])?,
        &devs,
        true,
    ));
    Ok(Scan { links, routes })
}

/// Parses `ip -j addr show`: the ethernet links with their global addresses (loopback and
/// hako's own taps left out).
pub fn parse_links(json: &str) -> Result<Vec<FoundLink>, NetError> {
    let links: Vec<IpLink> = serde_json::from_str(json).map_err(|e| NetError::Command {
        command: "ip -j addr show".to_string(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for link in links {
        if link.link_type != "ether" || link.ifname.ends_with(TAP_SUFFIX) {
            continue;
        }
        // "eth0@if12": the part before '@' is the name.
        let name = link
            .ifname
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string();
        plain_name(&name)?;
        let addresses = link
            .addr_info
            .iter()
            .filter(|a| a.scope == "global" && (a.family == "inet" || a.family == "inet6"))
            .map(|a| format!("{}/{}", a.local, a.prefixlen))
            .collect();
        out.push(FoundLink {
            index: link.ifindex,
            name,
            mac: link.address.to_ascii_lowercase(),
            mtu: link.mtu,
            addresses,
            neighbours: Vec::new(),
        });
    }
    Ok(out)
}

/// Parses `ip -j neigh show`: the permanent entries on `dev` (what a plugin set on purpose;
/// learnt entries the guest learns again itself).
pub fn parse_neighbours(json: &str, dev: &str) -> Vec<(String, String)> {
    let entries: Vec<IpNeigh> = serde_json::from_str(json).unwrap_or_default();
    entries
        .into_iter()
        .filter(|n| n.dev == dev && !n.lladdr.is_empty())
        .filter(|n| n.state.iter().any(|s| s == "PERMANENT"))
        .map(|n| (n.dst, n.lladdr))
        .collect()
}

/// Parses `ip -j route show`: the routes through a gateway on one of `devs`.
pub fn parse_routes(json: &str, devs: &[String], ipv6: bool) -> Vec<pb::Route> {
    let routes: Vec<IpRoute> = serde_json::from_str(json).unwrap_or_default();
    routes
        .into_iter()
        .filter(|r| devs.contains(&r.dev))
        .filter_map(|r| {
            Some(pb::Route {
                destination: r.dst,
                gateway: r.gateway?,
                ipv6,
                ..Default::default()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_neighbours_and_routes_are_read_from_ip_json() {
        let links = r#"[
          {"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,"addr_info":[]},
          {"ifindex":7,"ifname":"eth0@if7","link_type":"ether","address":"02:42:0A:58:00:02","mtu":1450,
           "addr_info":[{"family":"inet","local":"10.88.0.2","prefixlen":16,"scope":"global"},
                        {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"},
                        {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global"}]},
          {"ifindex":9,"ifname":"tap0_hk","link_type":"ether","address":"aa:aa:aa:aa:aa:aa","mtu":1500,"addr_info":[]}]"#;
        let parsed = parse_links(links).expect("parsed");
        assert_eq!(
            parsed,
            [FoundLink {
                index: 7,
                name: "eth0".into(),
                mac: "02:42:0a:58:00:02".into(),
                mtu: 1450,
                addresses: vec!["10.88.0.2/16".into(), "fd00::2/64".into()],
                neighbours: Vec::new(),
            }]
        );
        assert!(parse_links("not json").is_err());
        let odd =
            r#"[{"ifindex":2,"ifname":"-x","link_type":"ether","address":"02:00:00:00:00:01"}]"#;
        assert!(matches!(parse_links(odd), Err(NetError::BadName(_))));

        let neighbours = r#"[{"dst":"10.88.0.1","dev":"eth0","lladdr":"ee:ee:ee:ee:ee:ee","state":["PERMANENT"]},
                             {"dst":"10.88.0.9","dev":"eth0","lladdr":"02:00:00:00:00:09","state":["REACHABLE"]},
                             {"dst":"fd00::1","dev":"eth0","lladdr":"ee:ee:ee:ee:ee:01","state":["PERMANENT"]},
                             {"dst":"10.1.0.1","dev":"other","lladdr":"ee:ee:ee:ee:ee:02","state":["PERMANENT"]}]"#;
        assert_eq!(
            parse_neighbours(neighbours, "eth0"),
            [
                ("10.88.0.1".to_string(), "ee:ee:ee:ee:ee:ee".to_string()),
                ("fd00::1".to_string(), "ee:ee:ee:ee:ee:01".to_string())
            ]
        );

        let routes = r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0"},
                         {"dst":"10.88.0.0/16","dev":"eth0","scope":"link"},
                         {"dst":"default","gateway":"192.168.1.1","dev":"other"}]"#;
        let parsed = parse_routes(routes, &["eth0".to_string()], false);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].destination, "default");
        assert_eq!(parsed[0].gateway, "10.88.0.1");
    }
}

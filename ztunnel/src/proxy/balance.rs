//! Which endpoints of a service a connection tries, in order: the closest
//! tier first (`mesh::locality::tiers`), at random within a tier so load
//! spreads, at most `MAX_ATTEMPTS` of them. A dial that fails moves on to
//! the next before the client sees an error; FAILOVER's lower tiers come
//! after the closest, STRICT has none.

use std::sync::Arc;

use mesh::locality::LoadBalancing;
use mesh::Workload;
use rand::seq::SliceRandom;

/// Dials per client connection: the first choice and two more.
pub const MAX_ATTEMPTS: usize = 3;

/// `eps` (endpoint, port it listens on) in the order to try them, cut to
/// `MAX_ATTEMPTS`. Empty when nothing may serve `src` (STRICT, or no
/// endpoints).
pub fn order(
    src: Option<&Workload>,
    lb: Option<&LoadBalancing>,
    eps: Vec<(Arc<Workload>, u16)>,
) -> Vec<(Arc<Workload>, u16)> {
    let tiers = mesh::locality::tiers(src, lb, eps.iter().map(|(w, _)| &**w));
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(MAX_ATTEMPTS.min(eps.len()));
    for mut tier in tiers {
        tier.shuffle(&mut rng);
        for i in tier {
            if out.len() == MAX_ATTEMPTS {
                return out;
            }
            out.push(eps[i].clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::locality::{LoadBalancing, Locality};

    fn w(name: &str, node: &str, zone: &str) -> Arc<Workload> {
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: a}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a}}\n\
             spec: {{nodeName: {node}}}\nstatus: {{podIP: 10.0.0.1}}\n"
        );
        let st = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
        let mut w = Workload::clone(st.workloads.values().next().unwrap());
        w.locality = Some(Arc::new(Locality {
            region: "r".into(),
            zone: zone.into(),
            subzone: String::new(),
        }));
        Arc::new(w)
    }

    #[test]
    fn closest_first_bounded_and_spread() {
        let src = w("client", "n1", "za");
        let eps: Vec<_> = [
            ("a1", "za"),
            ("a2", "za"),
            ("b1", "zb"),
            ("b2", "zb"),
            ("b3", "zb"),
        ]
        .into_iter()
        .map(|(n, z)| (w(n, "n2", z), 8080))
        .collect();
        let zone = LoadBalancing::prefer_same_zone();
        let mut first = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let got = order(Some(&src), Some(&zone), eps.clone());
            let names: Vec<_> = got.iter().map(|(w, _)| w.name.as_str()).collect();
            assert_eq!(names.len(), MAX_ATTEMPTS);
            // Both of the zone before anything of the other.
            let mut near = names[..2].to_vec();
            near.sort();
            assert_eq!(near, ["a1", "a2"]);
            assert!(names[2].starts_with('b'));
            first.insert(names[0].to_string());
        }
        // Random within the tier: both near endpoints come first sometimes
        // (the chance of one never doing so in 64 tries is 2^-63).
        assert_eq!(first.len(), 2);

        let strict = LoadBalancing::node_local();
        assert!(order(Some(&src), Some(&strict), eps.clone()).is_empty());
        assert_eq!(order(Some(&src), None, eps[..2].to_vec()).len(), 2);
    }
}

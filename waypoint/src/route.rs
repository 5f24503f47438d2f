//! Which rule a request takes: Gateway API HTTPRoutes for the service first
//! (most specific match wins, as that API defines), else the service's
//! VirtualService (first matching rule in order), else straight to the
//! service itself.

use std::borrow::Cow;

use http::request::Parts;
use mesh::routes::{precedence, Backend, HttpRoute, RouteApi, RouteMatch, RouteRule};
use mesh::MeshState;

pub struct Chosen<'a> {
    /// `kind ns/name` of the route, for logs; None for the default route.
    pub route: Option<String>,
    pub rule: Cow<'a, RouteRule>,
    /// The prefix the match used (for prefix rewrites).
    pub matched_prefix: Option<String>,
}

fn matches(m: &RouteMatch, req: &Parts) -> bool {
    let path = req.uri.path();
    if m.path.as_ref().is_some_and(|p| !p.matches(path)) {
        return false;
    }
    if m.method
        .as_ref()
        .is_some_and(|want| want != req.method.as_str())
    {
        return false;
    }
    let header_ok = m.headers.iter().all(|(name, want)| {
        req.headers
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| want.matches(v))
    });
    header_ok
        && m.query.iter().all(|(name, want)| {
            req.uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .any(|(k, v)| k == name && want.matches(v))
        })
}

fn prefix_of(m: &RouteMatch) -> Option<String> {
    match &m.path {
        Some(mesh::routes::StrMatch::Prefix(p)) => Some(p.clone()),
        _ => None,
    }
}

fn route_name(r: &HttpRoute) -> String {
    let kind = match r.api {
        RouteApi::HttpRoute => "HTTPRoute",
        RouteApi::VirtualService => "VirtualService",
    };
    format!("{kind} {}/{}", r.namespace, r.name)
}

/// The rule for a request to service `host` on `port`; None when routes for
/// the host exist but none matches (404, flag NR).
pub fn choose<'a>(state: &'a MeshState, host: &str, port: u16, req: &Parts) -> Option<Chosen<'a>> {
    let for_host = |api: RouteApi| state.http_routes.get(host).filter(move |r| r.api == api);
    if for_host(RouteApi::HttpRoute).next().is_some() {
        let mut best: Option<(&HttpRoute, &RouteRule, Option<&RouteMatch>)> = None;
        let mut best_key = None;
        for r in for_host(RouteApi::HttpRoute) {
            for rule in &r.rules {
                if rule.matches.is_empty() {
                    // The default match: PathPrefix "/", least specific.
                    let key = (1, 1, false, 0, 0);
                    if best_key.is_none_or(|b| key > b) {
                        best = Some((r, rule, None));
                        best_key = Some(key);
                    }
                }
                for m in rule.matches.iter().filter(|m| matches(m, req)) {
                    let key = precedence(m);
                    // Strictly greater: declaration order breaks ties.
                    if best_key.is_none_or(|b| key > b) {
                        best = Some((r, rule, Some(m)));
                        best_key = Some(key);
                    }
                }
            }
        }
        let (r, rule, m) = best?;
        return Some(Chosen {
            route: Some(route_name(r)),
            rule: Cow::Borrowed(rule),
            matched_prefix: m.and_then(prefix_of).or(Some("/".into())),
        });
    }
    if let Some(vs) = for_host(RouteApi::VirtualService).next() {
        for rule in &vs.rules {
            if rule.matches.is_empty() {
                return Some(Chosen {
                    route: Some(route_name(vs)),
                    rule: Cow::Borrowed(rule),
                    matched_prefix: None,
                });
            }
            if let Some(m) = rule.matches.iter().find(|m| matches(m, req)) {
                return Some(Chosen {
                    route: Some(route_name(vs)),
                    rule: Cow::Borrowed(rule),
                    matched_prefix: prefix_of(m),
                });
            }
        }
        return None;
    }
    Some(Chosen {
        route: None,
        rule: Cow::Owned(RouteRule {
            backends: vec![Backend {
                host: host.to_string(),
                port: Some(port),
                subset: None,
                weight: 1,
            }],
            ..Default::default()
        }),
        matched_prefix: None,
    })
}

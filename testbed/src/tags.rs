//! Tag lists as Harbor answers them (`src/server/registry/util/util.go`,
//! `SendListTagsResponse`): the tags sorted and made unique, then the page `n`/`last` picks, with
//! a `Link: <path?last=…&n=…>; rel="next"` header while more follow, and
//! `{"name":"<repository>","tags":[…]}` (a JSON encoder's line: a trailing newline).
//!
//! Which tags go in is `proxy.rs`'s business (`repoproxy/tag.go`: the local tags, plus the
//! upstream's when it answers).

use http::{header, Response, StatusCode};

use crate::standin::{full, harbor_error, Body};

/// `ParseNAndLastParameters`: `n` (absent, or a non-negative integer) and `last`; `None` when `n`
/// is neither (answered with [`bad_n`]).
pub(crate) fn parse_n_last(query: Option<&str>) -> Option<(Option<usize>, String)> {
    let pairs = crate::harbor::query_pairs(query);
    let first = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (n, last) = (first("n"), first("last"));
    if n.is_empty() {
        return Some((None, last));
    }
    match n.parse::<i64>() {
        Ok(v) if v >= 0 => Some((Some(usize::try_from(v).unwrap_or(usize::MAX)), last)),
        _ => None,
    }
}

/// Harbor's answer to an `n` that is no non-negative integer.
pub(crate) fn bad_n() -> Response<Body> {
    harbor_error(
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
        "the N must be a positive int type",
    )
}

/// `pickItems`: the first `n` of `items` (sorted) after `last`, and the last one picked when more
/// follow.
fn pick(items: &[String], n: Option<usize>, last: &str) -> (Vec<String>, Option<String>) {
    if items.is_empty() || n == Some(0) {
        return (Vec::new(), None);
    }
    let start = if last.is_empty() {
        0
    } else {
        items.partition_point(|t| t.as_str() <= last)
    };
    let n = n.unwrap_or(items.len());
    let end = start.saturating_add(n).min(items.len());
    let page = items[start..end].to_vec();
    let next = match page.last() {
        Some(l) if Some(l) != items.last() => Some(l.clone()),
        _ => None,
    };
    (page, next)
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Harbor's answer: `tags` sorted and unique, paged by `n` and `last`; `path` is the request's
/// path (the `Link` header keeps it and replaces the query).
pub(crate) fn page(
    name: &str,
    mut tags: Vec<String>,
    n: Option<usize>,
    last: &str,
    path: &str,
) -> Response<Body> {
    tags.sort();
    tags.dedup();
    let (items, next) = pick(&tags, n, last);
    let mut body =
        serde_json::to_vec(&serde_json::json!({"name": name, "tags": items})).expect("json");
    body.push(b'\n');
    let mut res = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len());
    if let (Some(next), Some(n)) = (next, n) {
        let link = format!("<{path}?last={}&n={n}>; rel=\"next\"", query_escape(&next));
        res = res.header(header::LINK, link);
    }
    res.body(full(body)).expect("response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_as_harbor_does() {
        let all = tags(&["a", "b", "c", "d"]);
        assert_eq!(pick(&all, None, ""), (all.clone(), None));
        assert_eq!(
            pick(&all, Some(2), ""),
            (tags(&["a", "b"]), Some("b".into()))
        );
        assert_eq!(pick(&all, Some(2), "b"), (tags(&["c", "d"]), None));
        assert_eq!(pick(&all, Some(3), "bb"), (tags(&["c", "d"]), None));
        assert_eq!(pick(&all, None, "a"), (tags(&["b", "c", "d"]), None));
        assert_eq!(pick(&all, Some(0), ""), (vec![], None));
        assert_eq!(pick(&all, Some(2), "z"), (vec![], None));
        assert_eq!(pick(&[], Some(2), ""), (vec![], None));
    }

    #[test]
    fn parses_n_and_last() {
        assert_eq!(parse_n_last(None), Some((None, String::new())));
        assert_eq!(
            parse_n_last(Some("n=2&last=v%2B1")),
            Some((Some(2), "v+1".to_string()))
        );
        assert_eq!(parse_n_last(Some("n=-1")), None);
        assert_eq!(parse_n_last(Some("n=x")), None);
        assert_eq!(query_escape("v1.0+b/c"), "v1.0%2Bb%2Fc");
    }
}

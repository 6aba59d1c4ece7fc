//! The distribution spec's grammars for repository names, tags and digests, and the registry's
//! limits on them. Used by the route parser for every request and by the configuration for
//! `PROXY_PROJECT`; it knows nothing else.

use crate::error::Error;

/// Longest repository name accepted after the proxy prefix, as the distribution registry limits it.
pub const MAX_NAME_LEN: usize = 255;
/// Largest manifest (or referrers index) the router passes on, as the distribution registry limits
/// a manifest.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Longest tag, from the tag grammar.
const MAX_TAG_LEN: usize = 128;

/// One path component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_name_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-"+, always followed by an alphanumeric.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

pub fn valid_name(name: &str) -> Result<&str, Error> {
    if name.is_empty() {
        return Err(Error::NameInvalid {
            reason: "the repository name is empty",
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::NameInvalid {
            reason: "the repository name is longer than 255 characters",
        });
    }
    if name.split('/').all(is_name_component) {
        Ok(name)
    } else {
        Err(Error::NameInvalid {
            reason: "each path component must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*",
        })
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> Result<&str, Error> {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-');
    if ok {
        Ok(tag)
    } else {
        Err(Error::TagInvalid {
            reason: "a tag must match [A-Za-z0-9_][A-Za-z0-9._-]{0,127}",
        })
    }
}

/// `algorithm:hex` for sha256, sha384 and sha512, lowercase hex of the algorithm's length.
pub fn valid_digest(digest: &str) -> Result<&str, Error> {
    let (algorithm, hex) = digest.split_once(':').ok_or(Error::DigestInvalid {
        reason: "a digest is algorithm:encoded",
    })?;
    let len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => {
            return Err(Error::DigestInvalid {
                reason: "unsupported digest algorithm; expected sha256, sha384 or sha512",
            })
        }
    };
    let hex_ok = hex.len() == len
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    if hex_ok {
        Ok(digest)
    } else {
        Err(Error::DigestInvalid {
            reason: "the encoded part must be lowercase hex of the algorithm's length",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_components() {
        for ok in [
            "a",
            "0",
            "a.b",
            "a_b",
            "a__b",
            "a-b",
            "a---b",
            "a1.b2_c3__d4-e5",
        ] {
            assert!(is_name_component(ok), "{ok}");
        }
        for bad in [
            "", "A", ".a", "a.", "a..b", "a___b", "a_.b", "a/b", "-", "é",
        ] {
            assert!(!is_name_component(bad), "{bad}");
        }
    }
}

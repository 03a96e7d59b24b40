//! Secrets stay in the process: passwords inside URLs (`HF_ENDPOINT=http://user:PASS@host`) and the
//! values of credential variables (`HF_TOKEN`, `AWS_SECRET_ACCESS_KEY`, ...) are masked in every message
//! that leaves it: errors, log lines, a row's `error` column, manifests.

/// Variables whose values are credentials.
const SECRET_VARS: [&str; 8] = [
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "CONALA_SECRET",
];

const MASK: &str = "***";

/// `text` with URL passwords and credential values masked.
pub fn redact(text: &str) -> String {
    let mut out = mask_url_passwords(text);
    for var in SECRET_VARS {
        if let Ok(v) = std::env::var(var) {
            // Short values would mask ordinary words; real credentials are long.
            if v.len() >= 8 && out.contains(&v) {
                out = out.replace(&v, MASK);
            }
        }
    }
    out
}

/// `scheme://user:password@host` becomes `scheme://user:***@host`.
fn mask_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:{MASK}")),
                    None => out.push_str(MASK), // a token as the user name
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            mask_url_passwords("GET http://me:hunter2@127.0.0.1:9/api failed; see https://x.y/z"),
            "GET http://me:***@127.0.0.1:9/api failed; see https://x.y/z"
        );
        assert_eq!(
            mask_url_passwords("s3://tok3n@bucket/a s3://b/c"),
            "s3://***@bucket/a s3://b/c"
        );
        assert_eq!(mask_url_passwords("no urls here"), "no urls here");
    }

    #[test]
    fn credential_values_are_masked() {
        std::env::set_var("CONALA_SECRET", "s3cr3t-value-123");
        assert_eq!(
            redact("token s3cr3t-value-123 was rejected"),
            "token *** was rejected"
        );
        std::env::remove_var("CONALA_SECRET");
    }
}
